"""Engine knowledge: the KV stats snapshot, the reference engine, adapters and bridges.

Importing this package (and ``snapshot``, ``capacity``, ``server``) never imports torch;
only ``engine_shim.reference`` and in-process adapters do.
"""

__version__ = "0.1.0"
