"""In-process adapters that read a real engine's KV block pool (they import the engine)."""
