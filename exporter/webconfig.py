"""TLS and basic auth for ``/metrics``, in the exporter-toolkit web config format users know::

    tls_server_config:
      cert_file: /etc/kvcache/tls.crt
      key_file: /etc/kvcache/tls.key
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt, as `htpasswd -nBC 10 "" | tr -d ':\\n'` prints

Passwords exist only as bcrypt hashes in a file; nothing secret is logged or exported. A
successful check is cached (by a hash of the credentials) so a scrape does not pay bcrypt's
deliberate slowness every time, as exporter-toolkit does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from .config import ConfigError, read_yaml

REALM = "kvcache-exporter"


@dataclass(frozen=True)
class WebConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    basic_auth_users: dict[str, bytes] = field(default_factory=dict)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.cert_file is None or self.key_file is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_ca_file)
        return context


def load_web_config(path: str | Path) -> WebConfig:
    source = str(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "expected a mapping")
    unknown = set(data) - {"tls_server_config", "basic_auth_users"}
    if unknown:
        raise ConfigError(
            source, sorted(unknown)[0], "unknown key (allowed: basic_auth_users, tls_server_config)"
        )
    cert, key, ca = _tls_files(data.get("tls_server_config") or {}, source, Path(path))
    web = WebConfig(cert, key, ca, _users(data.get("basic_auth_users") or {}, source))
    if cert is not None:
        try:
            web.ssl_context()
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                source, "tls_server_config", f"cannot load the certificate or key: {exc}"
            ) from None
    return web


def _tls_files(tls: Any, source: str, path: Path) -> tuple[Path | None, Path | None, Path | None]:
    """cert_file, key_file and client_ca_file, relative to the web config file, each existing."""
    if not isinstance(tls, dict):
        raise ConfigError(source, "tls_server_config", "expected a mapping")
    base = path.resolve().parent

    def file_key(key: str) -> Path | None:
        value = tls.get(key)
        if value is None:
            return None
        resolved = base / str(value)
        if not resolved.is_file():
            raise ConfigError(source, f"tls_server_config.{key}", f"no such file: {resolved}")
        return resolved

    cert, key, ca = file_key("cert_file"), file_key("key_file"), file_key("client_ca_file")
    if (cert is None) != (key is None):
        raise ConfigError(source, "tls_server_config", "cert_file and key_file go together")
    return cert, key, ca


def _users(users: Any, source: str) -> dict[str, bytes]:
    """basic_auth_users: user name -> bcrypt hash (never a password)."""
    if not isinstance(users, dict):
        raise ConfigError(
            source, "basic_auth_users", "expected a mapping of user name to bcrypt hash"
        )
    hashed: dict[str, bytes] = {}
    for user, digest in users.items():
        if not isinstance(digest, str) or not digest.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(
                source,
                f"basic_auth_users.{user}",
                "expected a bcrypt hash ($2y$...), not a password",
            )
        hashed[str(user)] = digest.encode()
    return hashed


# bcrypt reads at most 72 bytes; exporter-toolkit (Go) refuses longer passwords, and so do we.
MAX_PASSWORD_BYTES = 72
# bcrypt runs on at most this many threads at once: a flood of wrong passwords queues here
# instead of taking every core from the scrapes that are answered from the success cache.
BCRYPT_CONCURRENCY = 1


def _cost(digest: bytes) -> int:
    try:
        return int(digest.split(b"$")[2])
    except (IndexError, ValueError):
        return 10


class BasicAuth:
    """Checks ``Authorization: Basic ...`` against bcrypt hashes, caching successes.

    Every refusal of a well-formed header costs one bcrypt check at the configured cost, whether
    the user exists or not (no user-existence oracle); the scheme is case-insensitive (RFC 7617).
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self.users = users
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()
        self._bcrypt = threading.BoundedSemaphore(BCRYPT_CONCURRENCY)
        cost = max((_cost(d) for d in users.values()), default=4)
        self._dummy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(cost)) if users else b""

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def _checkpw(self, password: bytes, digest: bytes) -> bool:
        with self._bcrypt:
            return bcrypt.checkpw(password, digest)

    @staticmethod
    def _credentials(header: str | None) -> tuple[str, bytes] | None:
        """User and password of a well-formed ``Basic`` header (RFC 7617), else None."""
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        user, _, password = decoded.partition(":")
        return user, password.encode()

    def _cached(self, digest: bytes, password: bytes) -> bytes | None:
        """The success-cache key, or None when this password was not accepted before."""
        key = hashlib.sha256(digest + b"\0" + password).digest()
        with self._lock:
            return key if any(hmac.compare_digest(key, k) for k in self._ok) else None

    def costly(self, header: str | None) -> bool:
        """Whether checking ``header`` needs bcrypt (not a success seen before): the HTTP front
        answers those on threads of their own, so guesses never delay cached scrapes."""
        parsed = self._credentials(header) if self.enabled else None
        if parsed is None:
            return False
        digest = self.users.get(parsed[0])
        return digest is None or self._cached(digest, parsed[1]) is None

    def check(self, header: str | None) -> bool:
        if not self.enabled:
            return True
        parsed = self._credentials(header)
        if parsed is None:
            return False
        user, password = parsed
        digest = self.users.get(user)
        if digest is None or len(password) > MAX_PASSWORD_BYTES:
            self._checkpw(password[:MAX_PASSWORD_BYTES], self._dummy)  # the same work
            return False
        if self._cached(digest, password) is not None:
            return True
        if not self._checkpw(password, digest):
            return False
        key = hashlib.sha256(digest + b"\0" + password).digest()
        with self._lock:
            if len(self._ok) > 1024:
                self._ok.clear()
            self._ok.add(key)
        return True
