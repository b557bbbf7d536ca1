"""The running exporter: poller + NVML + cached exposition behind a small HTTP server.

``/metrics`` (text format 0.0.4, gzip when asked), ``/healthz`` (503 until every target was
polled once, or when the poller died) and ``/`` (a landing page listing targets).
"""

from __future__ import annotations

import html
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from types import ModuleType
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from kvstats.http import QuietThreadingHTTPServer, refuse_body

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
        self._httpd: QuietThreadingHTTPServer | None = None
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
        return int(self._httpd.server_address[1])

    def start(self, host: str | None = None, port: int | None = None) -> None:
        host = self.config.listen_host if host is None else host
        port = self.config.listen_port if port is None else port
        # TLS is set up per connection in the handler thread (see Handler.setup): a slow client
        # blocks only itself, and plain HTTP on the TLS port gets a 400 instead of silence.
        self._httpd = QuietThreadingHTTPServer((host, port), _handler(self, self.web.ssl_context()))
        self.poller.start()
        threading.Thread(target=self._httpd.serve_forever, name="kvcache-http", daemon=True).start()
        log.info(
            "serving /metrics on %s:%d for %d targets", host, self.port, len(self.config.targets)
        )

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
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


PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)


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


def _handler(exporter: Exporter, tls: ssl.SSLContext | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvcache-exporter"
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that stops talking (or never finishes TLS) is dropped
        # Headers and body are two writes: without TCP_NODELAY, Nagle + delayed ACK add 40 ms.
        disable_nagle_algorithm = True
        plain_on_tls = False

        def setup(self) -> None:
            if tls is not None:
                self.request.settimeout(self.timeout)
                first = self.request.recv(1, socket.MSG_PEEK)
                if first and first[0] != 0x16:  # not a TLS handshake record: plain HTTP
                    self.plain_on_tls = True
                    self.request.sendall(PLAIN_HTTP_ON_TLS)
                else:
                    self.request = tls.wrap_socket(self.request, server_side=True)
            super().setup()

        def handle(self) -> None:
            if not self.plain_on_tls:
                super().handle()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _reply(
            self, status: HTTPStatus, body: bytes, content_type: str, gzipped: bool = False
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            if refuse_body(self):
                return
            path = self.path.split("?", 1)[0]
            # /healthz says only "ok": left open for orchestrators' probes.
            if path != "/healthz" and not exporter.auth.check(self.headers.get("Authorization")):
                self.send_response(HTTPStatus.UNAUTHORIZED)
                self.send_header("WWW-Authenticate", f'Basic realm="{REALM}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path == "/metrics":
                if accepts_gzip(self.headers.get("Accept-Encoding", "")):
                    self._reply(
                        HTTPStatus.OK, exporter.exposition.render_gzip(), CONTENT_TYPE_LATEST, True
                    )
                else:
                    self._reply(HTTPStatus.OK, exporter.exposition.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = exporter.healthy()
                self._reply(
                    HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                    b"ok\n" if ok else b"not ready: targets not polled yet\n",
                    "text/plain",
                )
            elif path == "/":
                self._reply(HTTPStatus.OK, _landing(exporter), "text/html; charset=utf-8")
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        do_HEAD = do_GET

        def _refuse_method(self) -> None:
            """405 on a path served by GET, 404 elsewhere; the connection is closed either way
            (a body left unread must never be read as the next request)."""
            path = self.path.split("?", 1)[0]
            allowed = path in GET_PATHS
            body = (
                f"{self.command} {path}: method not allowed\n".encode()
                if allowed
                else b"not found\n"
            )
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED if allowed else HTTPStatus.NOT_FOUND)
            if allowed:
                self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")  # also sets close_connection
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/-/reload" or not exporter.lifecycle:
                self._refuse_method()
                return
            if not exporter.auth.check(self.headers.get("Authorization")):
                self.close_connection = True
                self.send_response(HTTPStatus.UNAUTHORIZED)
                self.send_header("WWW-Authenticate", f'Basic realm="{REALM}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            ok, message = exporter.reload()
            self._reply(
                HTTPStatus.OK if ok else HTTPStatus.INTERNAL_SERVER_ERROR,
                f"{message}\n".encode(),
                "text/plain",
            )

    return Handler
