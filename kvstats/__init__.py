"""The contract between engines and the exporter, torch-free and dependency-light.

- ``snapshot``: the ``kvcache.stats/v2`` types and their one validator;
- ``capacity``: group-aware capacity arithmetic (vLLM's formulas);
- ``kinds``: the registry of engine kinds (config, CLI and bridges read it);
- ``units``: sizes and HOST:PORT as people write them;
- ``http``: the small threaded HTTP server both the shim and the exporter serve from.

``engine_shim`` (producers: reference engine, adapters, bridges) and ``exporter`` (the sidecar)
both depend on this package and never on each other's internals.
"""
