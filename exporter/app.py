"""The running exporter: poller + NVML + cached exposition behind a small HTTP server.

``/metrics`` (text format 0.0.4, gzip when asked), ``/healthz`` (503 until every target was
polled once, or when the poller died) and ``/`` (a landing page listing targets).
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType

from prometheus_client import CONTENT_TYPE_LATEST

from kvstats.http import HTTPServer, Request, Response

from .config import Config, ConfigError
from .exposition import ExporterView, Exposition
from .nvml import NvmlReader
from .poller import Poller
from .state import ReloadStats, TargetReport
from .webconfig import REALM, BasicAuth, WebConfig, load_web_config

log = logging.getLogger(__name__)


class Exporter:
    def __init__(
        self,
        config: Config,
        nvml_module: ModuleType | None = None,
        web: WebConfig | None = None,
        loader: Callable[[], Config] | None = None,
        lifecycle: bool = False,
    ) -> None:
        self.config = config
        if web is None and config.web_config_file is not None:
            web = load_web_config(config.web_config_file)  # raises ConfigError
        self.web = web or WebConfig()
        self.auth = BasicAuth(self.web.basic_auth_users)
        self.nvml = NvmlReader(nvml_module)
        self.nvml_enabled = self.nvml.start(config.nvml)  # raises NvmlUnavailable for nvml: on
        self.exposition = Exposition()
        self.exposition.view_source = self.view
        self.exposition.set_targets([t.name for t in config.targets])
        self.poller = Poller(config, self.nvml, self._changed)
        self._httpd: HTTPServer | None = None
        # Reload: the loader re-reads the config file (None: nothing to reload from);
        # ``lifecycle`` also allows POST /-/reload (Prometheus' --web.enable-lifecycle).
        self._loader = loader
        self.lifecycle = lifecycle
        self.reloads = ReloadStats()
        self._reload_lock = threading.Lock()

    def _changed(self, report: TargetReport | None) -> None:
        """From the poller: a target's new state (rendered now), or fleet-wide news."""
        if report is None:
            self.exposition.invalidate()
        else:
            self.exposition.update(report)

    def view(self) -> ExporterView:
        """The fleet-wide part of a render (targets are rendered as they change)."""
        return ExporterView(
            (),
            self.poller.gpu_readings(),
            dict(self.nvml.errors),
            self.nvml_enabled,
            self.config.gpus,
            self.reloads,
        )

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration and apply it; on any error keep the running one.

        Targets, intervals, timeouts, limits, GPU map and basic-auth users are applied; a
        target kept as it was keeps its counters and history. The listen address, TLS files
        and the NVML mode need a restart (said in the log)."""
        with self._reload_lock:
            if self._loader is None:
                return False, "no configuration file to reload from"
            try:
                config = self._loader()
                web = (
                    load_web_config(config.web_config_file)
                    if config.web_config_file is not None
                    else WebConfig()
                )
            except Exception as exc:  # a bad file never takes the running exporter down
                message = (
                    str(exc)
                    if isinstance(exc, ConfigError)
                    else f"unexpected {type(exc).__name__} while reading the configuration"
                )
                self.reloads.failures += 1
                self.reloads.last_ok = False
                self.exposition.invalidate()
                log.error("reload failed, the running configuration stays: %s", message)
                return False, message
            needs_restart = [
                what
                for what, running, wanted in (
                    (
                        "listen",
                        (self.config.listen_host, self.config.listen_port),
                        (config.listen_host, config.listen_port),
                    ),
                    ("nvml", self.config.nvml, config.nvml),
                    (
                        "TLS",
                        (self.web.cert_file, self.web.key_file, self.web.client_ca_file),
                        (web.cert_file, web.key_file, web.client_ca_file),
                    ),
                )
                if running != wanted
            ]
            if needs_restart:
                log.warning(
                    "reload: %s changed and apply only after a restart", ", ".join(needs_restart)
                )
            old = self.poller
            self.exposition.set_targets([t.name for t in config.targets])
            kept = {s.target.name: s for s in old.states}
            poller = Poller(config, self.nvml, self._changed, kept)
            old.stop()
            if old.rounds_completed.is_set():
                poller.rounds_completed.set()  # the kept targets have data; new ones follow
            before = {t.name for t in self.config.targets}
            after = {t.name for t in config.targets}
            self.config, self.web, self.auth = config, web, BasicAuth(web.basic_auth_users)
            self.poller = poller
            poller.start()
            self.reloads.successes += 1
            self.reloads.last_ok = True
            self.reloads.last_success = time.time()
            self.exposition.invalidate()
            log.info(
                "configuration reloaded: %d targets (added: %s; removed: %s)",
                len(config.targets),
                ", ".join(sorted(after - before)) or "none",
                ", ".join(sorted(before - after)) or "none",
            )
            return True, "reloaded"

    def healthy(self) -> bool:
        return self.poller.alive() and self.poller.rounds_completed.is_set()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.port

    def start(self, host: str | None = None, port: int | None = None) -> None:
        host = self.config.listen_host if host is None else host
        port = self.config.listen_port if port is None else port
        # TLS is set up per connection on the server's loop: a slow handshake holds only
        # itself, and plain HTTP on the TLS port gets a 400 instead of silence.
        self._httpd = HTTPServer(
            _handler(self),
            host,
            port,
            name="kvcache-http",
            server_header="kvcache-exporter",
            tls=self.web.ssl_context(),
            body_limit=body_limit,
            placement=self._placement,
        )
        self.poller.start()
        self._httpd.start()
        log.info(
            "serving /metrics on %s:%d for %d targets", host, self.port, len(self.config.targets)
        )

    def _placement(self, request: Request) -> str:
        """Reads of what is already rendered answer on the loop; a password not seen before
        (bcrypt) on threads of its own; a reload on the workers."""
        if self.auth.costly(request.headers.get("authorization")):
            return "expensive"
        if request.method in ("GET", "HEAD"):
            return "inline"
        return "pool"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.stop()
        self.poller.stop()
        self.nvml.stop()


def _landing(exporter: Exporter) -> bytes:
    rows = "".join(
        f"<tr><td>{html.escape(t.name)}</td><td>{t.kind}</td><td>{html.escape(t.url)}</td>"
        f"<td>{'up' if s.up else 'down'}</td></tr>"
        for t, s in zip(exporter.config.targets, exporter.poller.reports(), strict=True)
    )
    return (
        "<!doctype html><html><head><title>kvcache-exporter</title></head><body>"
        "<h1>kvcache-exporter</h1>"
        "<p><a href='/metrics'>/metrics</a> · <a href='/healthz'>/healthz</a></p>"
        f"<table><tr><th>target</th><th>kind</th><th>url</th><th>state</th></tr>{rows}</table>"
        "</body></html>"
    ).encode()


def accepts_gzip(header: str) -> bool:
    """Accept-Encoding with q-values (RFC 9110): gzip;q=0 means no; * covers gzip."""
    weights: dict[str, float] = {}
    for part in header.split(","):
        coding, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if coding:
            weights[coding.lower()] = weight
    return weights.get("gzip", weights.get("*", 0.0)) > 0


# Paths the exporter serves with GET (and HEAD); another method there is 405, not 404.
GET_PATHS = ("/metrics", "/healthz", "/")
RELOAD_BODY_BYTES = 64 << 10  # POST /-/reload: a body is read (and ignored), never reparsed


def body_limit(method: str, path: str) -> int:
    return RELOAD_BODY_BYTES if (method, path) == ("POST", "/-/reload") else 0


def _unauthorised() -> Response:
    return Response(401, headers=[("WWW-Authenticate", f'Basic realm="{REALM}"')])


class _Routes:
    """The exporter's routes: /metrics, /healthz and the landing page on GET/HEAD, reloads on
    POST /-/reload (with ``lifecycle``); everything but /healthz behind basic auth if set."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def handle(self, request: Request) -> Response:
        path, exporter = request.path, self.exporter
        if request.method in ("GET", "HEAD"):
            # /healthz says only "ok": left open for orchestrators' probes.
            if path != "/healthz" and not exporter.auth.check(request.headers.get("authorization")):
                return _unauthorised()
            return self.read(request)
        if request.method == "POST" and path == "/-/reload" and exporter.lifecycle:
            if not exporter.auth.check(request.headers.get("authorization")):
                return _unauthorised()
            ok, message = exporter.reload()
            return Response(200 if ok else 500, f"{message}\n".encode())
        # 405 on a path served by GET, 404 elsewhere.
        if path in GET_PATHS:
            return Response(
                405,
                f"{request.method} {path}: method not allowed\n".encode(),
                headers=[("Allow", "GET, HEAD")],
                close=True,
            )
        return Response(404, b"not found\n", close=True)

    def read(self, request: Request) -> Response:
        path, exporter = request.path, self.exporter
        if path == "/metrics":
            if accepts_gzip(request.headers.get("accept-encoding", "")):
                return Response(
                    200,
                    exporter.exposition.render_gzip(),
                    CONTENT_TYPE_LATEST,
                    [("Content-Encoding", "gzip")],
                )
            return Response(200, exporter.exposition.render(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ok = exporter.healthy()
            return Response(
                200 if ok else 503, b"ok\n" if ok else b"not ready: targets not polled yet\n"
            )
        if path == "/":
            return Response(200, _landing(exporter), "text/html; charset=utf-8")
        return Response(404, b"not found\n")


def _handler(exporter: Exporter) -> Callable[[Request], Response]:
    return _Routes(exporter).handle
