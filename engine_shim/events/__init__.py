"""KV events (vLLM's and SGLang's ZMQ streams) as the exporter reads them, without I/O.

``decode`` turns one published payload into typed events (both encodings vLLM has shipped,
and SGLang's); ``residency`` keeps the resident prefix blocks per KV group and tier and says
whether that count is whole; ``merge`` adds what they prove to an engine's snapshot. The
subscriber (sockets, replay) is the exporter's: ``exporter/event_streams.py``.
"""
