"""The bundled reference engine: real paged KV pools on torch tensors (CUDA when present)."""

from .engine import EngineConfig, ReferenceEngine, Request, RequestRejected
from .model import ModelShape

__all__ = ["EngineConfig", "ModelShape", "ReferenceEngine", "Request", "RequestRejected"]
