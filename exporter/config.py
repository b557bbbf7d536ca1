"""Exporter configuration: YAML validated into dataclasses.

Every error names the file, the key (``targets[1].url``) and what is wrong, because a sidecar
that starts with a typo'd config and silently exports nothing is worse than one that refuses.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from engine_shim.events.discovery import EventSource
from kvstats.kinds import KINDS, target_kinds

from .errors import ConfigError

__all__ = ["ConfigError"]
from kvstats.units import host_port, size_bytes

DEFAULT_LISTEN = "0.0.0.0:8322"
NVML_MODES = ("auto", "on", "off")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 86400.0
MIN_POLL_INTERVAL = 0.1  # faster polling measures the exporter, not the engine
# RFC 6750 b64token: what an Authorization: Bearer header may carry.
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """A target's KV event streams (vLLM / SGLang ``--kv-events-config`` with the zmq
    publisher): rank r publishes on the endpoint's port + r, its replay socket likewise. With
    ``discover``, the engine says where (vLLM's /kv_event_sources, SGLang's /server_info)."""

    endpoint: str | None = None
    replay_endpoint: str | None = None
    dp_ranks: int = 1
    topic: str = ""
    max_batch_bytes: int = 16 << 20
    replay_timeout: float = 2.0
    discover: bool = False

    def sources(self) -> tuple[EventSource, ...]:
        """The configured publishers, one per DP rank (none where they are discovered)."""
        if self.endpoint is None:
            return ()
        return tuple(
            EventSource(
                dp_rank=rank,
                endpoint=_rank_endpoint(self.endpoint, rank),
                replay_endpoint=None
                if self.replay_endpoint is None
                else _rank_endpoint(self.replay_endpoint, rank),
                topic=self.topic,
            )
            for rank in range(self.dp_ranks)
        )


def _rank_endpoint(endpoint: str, rank: int) -> str:
    """Rank ``rank``'s endpoint: the engines bind port + rank (vLLM, SGLang)."""
    base, _, port = endpoint.rpartition(":")
    return f"{base}:{int(port) + rank}"


_ZMQ_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: str
    url: str
    timeout: float
    bearer_token_env: str | None = None
    # Label to use when the engine reports no model name (bridges of old engines).
    model: str | None = None
    events: EventsConfig | None = None

    def bearer_token(self) -> str | None:
        """Read when needed, never stored: a secret has no place in a repr or a log."""
        if not self.bearer_token_env:
            return None
        return os.environ.get(self.bearer_token_env, "").strip() or None


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str
    listen_port: int
    poll_interval: float
    timeout: float
    max_response_bytes: int
    max_series_per_target: int
    max_backoff: float
    eta_window: float
    nvml: str
    targets: tuple[Target, ...]
    # engine name -> GPU UUIDs, for engines whose snapshots carry no UUID.
    gpus: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = "<config>"
    # exporter-toolkit style TLS / basic-auth file for /metrics (see exporter/webconfig.py).
    web_config_file: str | None = None


def parse_duration(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(source, key, f"expected a duration like 5s or 500ms, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    else:
        raise ConfigError(source, key, f"expected a duration like 5s or 500ms, got {value!r}")
    if not seconds > 0:
        raise ConfigError(source, key, "must be positive")
    if not seconds <= MAX_DURATION:  # also refuses .inf and .nan
        raise ConfigError(source, key, f"must be at most {MAX_DURATION:g} s (one day)")
    return seconds


def parse_size(value: Any, source: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        try:
            size = size_bytes(value)
        except ValueError:
            raise ConfigError(source, key, f"expected a size like 4MiB, got {value!r}") from None
    else:
        raise ConfigError(source, key, f"expected a size like 4MiB, got {value!r}")
    if size <= 0:
        raise ConfigError(source, key, "must be positive")
    return size


def parse_listen(value: Any, source: str, key: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(source, key, f"expected HOST:PORT, got {value!r}")
    try:
        return host_port(value, "0.0.0.0")
    except ValueError as exc:
        raise ConfigError(source, key, str(exc)) from None


class _Section:
    def __init__(self, data: Any, source: str, key: str, allowed: set[str]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, key or "(top level)", "expected a mapping")
        unknown = sorted(set(map(str, data)) - allowed)
        if unknown:
            where = f"{key}.{unknown[0]}" if key else unknown[0]
            raise ConfigError(source, where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        self.data, self.source, self.key = data, source, key

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.data.get(name, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(self.source, self.path(name), f"expected a string, got {value!r}")
        return value

    def required_string(self, name: str) -> str:
        value = self.string(name)
        if not value:
            raise ConfigError(self.source, self.path(name), "is required")
        return value

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                self.source, self.path(name), f"expected an integer >= {minimum}, got {value!r}"
            )
        return value


def _zmq_endpoint(value: str, source: str, key: str, ranks: int) -> str:
    found = _ZMQ_TCP.match(value.replace("*", "0.0.0.0", 1))
    if not found:
        raise ConfigError(source, key, f"expected tcp://HOST:PORT, got {value!r}")
    if found.group(1) in ("0.0.0.0", "[::]"):
        raise ConfigError(
            source, key, f"{value!r} is where the engine binds: name its host, e.g. tcp://vllm:5557"
        )
    port = int(found.group(2))
    if not 0 < port <= 65535 - (ranks - 1):
        raise ConfigError(source, key, f"port {port} (+ {ranks - 1} ranks) is not a TCP port")
    return value


def _events(data: Any, source: str, key: str) -> EventsConfig:
    where = {"endpoint", "replay_endpoint", "dp_ranks", "topic"}
    s = _Section(data, source, key, {*where, "max_batch_bytes", "replay_timeout", "discover"})
    max_batch_bytes = parse_size(
        s.data.get("max_batch_bytes", "16MiB"), source, s.path("max_batch_bytes")
    )
    replay_timeout = parse_duration(
        s.data.get("replay_timeout", "2s"), source, s.path("replay_timeout")
    )
    discover = s.data.get("discover", False)
    if not isinstance(discover, bool):
        raise ConfigError(source, s.path("discover"), f"expected true or false, got {discover!r}")
    if discover:
        given = sorted(where & set(s.data))
        if given:
            raise ConfigError(
                source,
                s.path(given[0]),
                "comes from the engine with discover: true (leave it out, or discover out)",
            )
        return EventsConfig(
            discover=True, max_batch_bytes=max_batch_bytes, replay_timeout=replay_timeout
        )
    ranks = s.integer("dp_ranks", 1)
    if ranks > 256:
        raise ConfigError(source, s.path("dp_ranks"), "at most 256 ranks")
    replay = s.string("replay_endpoint")
    return EventsConfig(
        endpoint=_zmq_endpoint(s.required_string("endpoint"), source, s.path("endpoint"), ranks),
        replay_endpoint=None
        if replay is None
        else _zmq_endpoint(replay, source, s.path("replay_endpoint"), ranks),
        dp_ranks=ranks,
        topic=s.string("topic", "") or "",
        max_batch_bytes=max_batch_bytes,
        replay_timeout=replay_timeout,
    )


def _target(data: Any, source: str, key: str, default_timeout: float) -> Target:
    s = _Section(
        data, source, key, {"name", "kind", "url", "timeout", "bearer_token_env", "model", "events"}
    )
    name = s.required_string("name")
    if not _NAME.match(name):
        raise ConfigError(source, s.path("name"), "use 1-63 letters, digits, '_', '.', ':' or '-'")
    kind = s.required_string("kind")
    if kind not in KINDS:
        raise ConfigError(
            source, s.path("kind"), f"must be one of {', '.join(target_kinds())}, got {kind!r}"
        )
    url = s.required_string("url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        raise ConfigError(source, s.path("url"), f"not a URL: {redact_url(url)!r}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            source,
            s.path("url"),
            "credentials in a URL are refused (they would show in logs and pages, and are never"
            " sent): use bearer_token_env",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(source, s.path("url"), f"expected an http(s) URL, got {url!r}")
    if parts.path in ("", "/"):
        url = url.rstrip("/") + KINDS[kind].default_path
    timeout = parse_duration(s.data.get("timeout", default_timeout), source, s.path("timeout"))
    token_env = s.string("bearer_token_env")
    if token_env is not None:
        _check_token(os.environ.get(token_env), token_env, source, s.path("bearer_token_env"))
    return Target(
        name=name,
        kind=kind,
        url=url,
        timeout=timeout,
        bearer_token_env=token_env,
        model=s.string("model"),
        events=None
        if s.data.get("events") is None
        else _events(s.data["events"], source, s.path("events")),
    )


def redact_url(url: str) -> str:
    """The URL without any user:password@ part."""
    return re.sub(r"(?<=://)[^/@]*@", "", url)


def _check_token(value: str | None, env: str, source: str, key: str) -> None:
    """Validated without ever being shown: the message names the variable, not the value."""
    if value is None:
        raise ConfigError(source, key, f"environment variable {env} is not set")
    token = value.strip()  # a trailing newline from `echo` or a file is not part of the token
    if not token:
        raise ConfigError(source, key, f"environment variable {env} is empty")
    if not _BEARER_TOKEN.match(token):
        raise ConfigError(
            source,
            key,
            f"environment variable {env} is not a valid bearer token (RFC 6750 allows letters,"
            " digits, -._~+/ and trailing =; the value is not shown)",
        )


TOP_KEYS = {
    "listen",
    "poll_interval",
    "timeout",
    "max_response_bytes",
    "max_series_per_target",
    "max_backoff",
    "eta_window",
    "nvml",
    "gpus",
    "targets",
    "web_config_file",
}


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    s = _Section(data, source, "", TOP_KEYS)
    host, port = parse_listen(s.data.get("listen", DEFAULT_LISTEN), source, "listen")
    interval = parse_duration(s.data.get("poll_interval", "5s"), source, "poll_interval")
    if interval < MIN_POLL_INTERVAL:
        raise ConfigError(
            source, "poll_interval", f"{interval * 1000:g} ms is below the minimum of 100ms"
        )
    timeout = parse_duration(s.data.get("timeout", min(2.0, interval)), source, "timeout")
    nvml = _nvml_mode(s.data.get("nvml", "auto"), source)
    targets = _targets(s.data.get("targets"), source, timeout, interval)
    gpus = _gpu_map(s.data.get("gpus", {}) or {}, source, [t.name for t in targets])
    return Config(
        listen_host=host,
        listen_port=port,
        poll_interval=interval,
        timeout=timeout,
        max_response_bytes=parse_size(
            s.data.get("max_response_bytes", "4MiB"), source, "max_response_bytes"
        ),
        max_series_per_target=s.integer("max_series_per_target", 2000),
        max_backoff=parse_duration(
            s.data.get("max_backoff", max(30.0, interval)), source, "max_backoff"
        ),
        eta_window=parse_duration(
            s.data.get("eta_window", max(60.0, 6 * interval)), source, "eta_window"
        ),
        nvml=nvml,
        targets=targets,
        gpus=gpus,
        source=source,
        web_config_file=s.string("web_config_file"),
    )


def _nvml_mode(nvml: Any, source: str) -> str:
    """``nvml``: auto, on or off (YAML's booleans read as on and off)."""
    if nvml is True:
        nvml = "on"
    elif nvml is False:
        nvml = "off"
    if nvml not in NVML_MODES:
        raise ConfigError(source, "nvml", f"must be one of {', '.join(NVML_MODES)}, got {nvml!r}")
    return str(nvml)


def _targets(raw: Any, source: str, timeout: float, interval: float) -> tuple[Target, ...]:
    """The targets, named uniquely, each answering within a poll interval."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(source, "targets", "expected a non-empty list of targets")
    targets = tuple(_target(t, source, f"targets[{i}]", timeout) for i, t in enumerate(raw))
    names = [t.name for t in targets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(source, f"targets[{i}].name", f"duplicate target name {name!r}")
    for i, t in enumerate(targets):
        if t.timeout > interval:
            raise ConfigError(
                source,
                f"targets[{i}].timeout",
                f"{t.timeout} s is longer than poll_interval {interval} s",
            )
    return targets


def _gpu_map(raw: Any, source: str, names: list[str]) -> dict[str, tuple[str, ...]]:
    """``gpus``: target name -> the GPU UUIDs its pools live on (a UUID or a list)."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "gpus", "expected a mapping of target name to GPU UUIDs")
    gpus: dict[str, tuple[str, ...]] = {}
    for engine, uuids in raw.items():
        if engine not in names:
            raise ConfigError(source, f"gpus.{engine}", "names no target")
        if isinstance(uuids, str):
            uuids = [uuids]
        if not isinstance(uuids, list) or not all(isinstance(u, str) and u for u in uuids):
            raise ConfigError(source, f"gpus.{engine}", "expected a GPU UUID or a list of them")
        gpus[engine] = tuple(uuids)
    return gpus


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML keeps the last, silently: a second
    ``targets:`` would drop the first list)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, loader: type[Any] = yaml.SafeLoader) -> Any:
    """A YAML file's data, or ``ConfigError`` with the file, the position and the problem and
    nothing of the file's content (it may hold secrets: bcrypt hashes, tokens)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            source, f"line {line}, column {column}", "not UTF-8 text (save the file as UTF-8)"
        ) from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(source, where, f"invalid YAML: {problem}") from None
    except (ValueError, RecursionError) as exc:  # e.g. nesting too deep for the parser
        raise ConfigError(source, "(file)", f"invalid YAML: {type(exc).__name__}") from None


def load_config(path: str | Path) -> Config:
    source = str(path)
    data = read_yaml(path, _UniqueKeyLoader)  # a SafeLoader subclass
    config = parse_config(data, source)
    if config.web_config_file is not None:
        web = Path(config.web_config_file)
        resolved = web if web.is_absolute() else Path(path).resolve().parent / web
        config = dataclasses.replace(config, web_config_file=str(resolved))
    return config
