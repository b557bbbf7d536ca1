"""The bundled reference engine: real paged KV pools on torch tensors (CUDA when present)."""

from .engine import ReferenceEngine
from .model import ModelShape
from .request import EngineConfig, Request, RequestRejected

__all__ = ["EngineConfig", "ModelShape", "ReferenceEngine", "Request", "RequestRejected"]
