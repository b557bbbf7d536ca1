"""Every error the exporter raises, in one place (httpx's ``_exceptions.py`` is the model).

A poll's failure carries one of ``ERROR_REASONS``: that is the ``reason`` label of
``kvcache_exporter_poll_errors_total``, pre-seeded at 0 for each.
"""

from __future__ import annotations

# Every reason a poll can fail, in the order they are listed and exported.
ERROR_REASONS = (
    "connect",  # refused, reset, DNS, TLS, or not HTTP
    "timeout",  # no complete answer within the target's timeout
    "http_status",  # an answer other than 200
    "too_large",  # a body past max_response_bytes
    "invalid_body",  # not JSON / not UTF-8 text, nested too deeply, numbers too long
    "invalid_snapshot",  # JSON or metrics text that breaks the snapshot contract
    "too_many_series",  # more series than max_series_per_target
    "duplicate_instance",  # an engine another target already reports
    "unsupported_engine",  # a shim that does not recognise its engine: the poll still counts
    "internal",  # a bug: counted and logged, never fatal
)


class PollError(Exception):
    """A failed poll, with its reason (one of ``ERROR_REASONS``)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in ERROR_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class ConfigError(ValueError):
    """A configuration that cannot be used: names the file, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class NvmlUnavailable(RuntimeError):
    """``nvml: on`` but NVML cannot start."""


class NvmlTimeout(RuntimeError):
    """An NVML call did not return in time (a hung driver or GPU)."""
