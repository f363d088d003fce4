"""The Prometheus exporter-toolkit web config file (`--web.config.file`): TLS and basic
auth for the metrics endpoint, in the format every Prometheus exporter shares
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md).

Keys the toolkit has but this exporter cannot honour with Python's ssl module are
errors, never silently ignored: a security setting that does nothing is worse than a
refusal to start. Passwords and bcrypt hashes never appear in messages or reprs.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import bcrypt

from .yamlfile import (
    Check,
    Collector,
    ConfigError,
    Marks,
    Problem,
    collected,
    empty_mapping,
    optional_section,
    parse_file,
    parse_section,
    required,
    section,
    setting,
    show,
    string_mapping,
)

CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = MappingProxyType(
    {
        "NoClientCert": ssl.CERT_NONE,
        # Go asks for a certificate but neither requires nor verifies it; nothing here
        # uses an unverified certificate, so not asking grants exactly the same access.
        "RequestClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }
)
TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
)
# Header name -> accepted values (lower case), None for any value.
ALLOWED_HEADERS: Mapping[str, tuple[str, ...] | None] = MappingProxyType(
    {
        "Content-Security-Policy": None,
        "X-Frame-Options": ("deny", "sameorigin"),
        "X-Content-Type-Options": ("nosniff",),
        "X-XSS-Protection": None,
        "Strict-Transport-Security": None,
    }
)

_BCRYPT_HASH = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")


def _file_name(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file name, got {show(value)}")
    return Path(value)


def _client_auth_type(value: object) -> str:
    if value == "RequireAnyClientCert":
        raise ValueError(
            "RequireAnyClientCert is not supported (Python's ssl module cannot require a"
            " certificate without verifying it): use RequireAndVerifyClientCert"
        )
    if not isinstance(value, str) or value not in CLIENT_AUTH_TYPES:
        raise ValueError(f"expected one of {', '.join(CLIENT_AUTH_TYPES)}, got {show(value)}")
    return value


def _tls_version(value: object) -> str:
    if value in ("TLS10", "TLS11"):
        raise ValueError(f"{value} is insecure and not supported: use TLS12 or TLS13")
    if not isinstance(value, str) or value not in TLS_VERSIONS:
        raise ValueError(f"expected TLS12 or TLS13, got {show(value)}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def _header_problem(name: object, value: object) -> str | None:
    if not isinstance(name, str) or name not in ALLOWED_HEADERS:
        return f"cannot be configured (allowed: {', '.join(ALLOWED_HEADERS)})"
    if value is None:
        return None
    if not isinstance(value, str) or any(ch in value for ch in "\r\n\0"):
        return f"expected a single-line string, got {show(value)}"
    accepted = ALLOWED_HEADERS[name]
    if value and accepted is not None and value.lower() not in accepted:
        return f"expected one of {', '.join(accepted)}, got {show(value)}"
    return None


def _user_problem(user: object, hashed: object) -> str | None:
    if not isinstance(user, str) or not user or ":" in user:
        return "user names must be non-empty strings without ':'"
    if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
        # The value may be a password pasted by mistake: never echo it.
        return "expected a bcrypt hash ($2y$10$...), got something else"
    return None


def _verifies(auth: str) -> bool:
    return CLIENT_AUTH_TYPES[auth] != ssl.CERT_NONE


# --- the schema: one field per key ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSServerConfig:
    # Relative file names are relative to the web config file, as in exporter-toolkit.
    cert_file: Path = required(_file_name, file_path=True)
    key_file: Path = required(_file_name, file_path=True)
    client_auth_type: str = setting("NoClientCert", _client_auth_type)
    client_ca_file: Path | None = setting(None, _file_name, file_path=True)
    min_version: str = setting("TLS12", _tls_version)
    max_version: str = setting("TLS13", _tls_version)
    prefer_server_cipher_suites: bool = setting(True, _bool)

    # exporter-toolkit keys this exporter refuses, and why: clearer than "unknown key".
    REFUSED: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "cert": "inline certificates are not supported: use cert_file",
            "key": "inline keys are not supported: use key_file",
            "client_ca": "inline CAs are not supported: use client_ca_file",
            "client_allowed_sans": "not supported by this exporter",
            "cipher_suites": "not supported: OpenSSL's defaults apply",
            "curve_preferences": "not supported: OpenSSL's defaults apply",
        }
    )
    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check(
            "max_version",
            ("min_version", "max_version"),
            lambda low, high: (
                f"must not be below min_version ({low})"
                if TLS_VERSIONS[low] > TLS_VERSIONS[high]
                else None
            ),
        ),
        Check(
            "client_auth_type",
            ("client_auth_type", "client_ca_file"),
            lambda auth, ca: (
                f"{auth} needs client_ca_file to verify against"
                if _verifies(auth) and ca is None
                else None
            ),
        ),
        Check(
            "client_ca_file",
            ("client_auth_type", "client_ca_file"),
            lambda auth, ca: (
                "set, but client_auth_type is NoClientCert"
                if auth == "NoClientCert" and ca is not None
                else None
            ),
        ),
    )


@dataclass(frozen=True, slots=True)
class HTTPServerConfig:
    # Accepted for compatibility; the metrics server speaks HTTP/1.1.
    http2: bool = setting(True, _bool)
    # A blank value means unset, as in exporter-toolkit.
    headers: Mapping[str, str] = collected(
        empty_mapping,
        string_mapping("expected a mapping", _header_problem, keep_blank=False),
    )


@dataclass(frozen=True, slots=True)
class WebServerConfig:
    tls_server_config: TLSServerConfig | None = optional_section(TLSServerConfig)
    http_server_config: HTTPServerConfig = section(HTTPServerConfig)
    # user -> bcrypt hash; kept out of repr so logging the config cannot leak a hash.
    basic_auth_users: Mapping[str, str] = collected(
        empty_mapping,
        string_mapping("expected a mapping of user names to bcrypt hashes", _user_problem),
        repr=False,
    )

    REFUSED: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"rate_limit": "not supported by this exporter"}
    )

    @property
    def auth_required(self) -> bool:
        return bool(self.basic_auth_users)


def load_web_config(path: Path) -> WebServerConfig:
    """Load and validate a web config file; relative file names in it are relative to
    it, as in exporter-toolkit. Raises ConfigError listing every problem."""
    return parse_file(
        path, lambda doc: parse_web_config(doc.data, str(path), doc.marks, base_dir=path.parent)
    )


def parse_web_config(
    data: object,
    source: str = "<web config>",
    marks: Marks | None = None,
    *,
    base_dir: Path | None = None,
) -> WebServerConfig:
    """Validate loaded YAML data, including that the TLS files load."""
    c = Collector(source, marks, base_dir=base_dir)
    cfg = parse_section(c, WebServerConfig, {} if data is None else data)
    c.check()
    assert cfg is not None  # anything missing or invalid is a problem above
    if cfg.tls_server_config is not None:
        _check_tls_files(c, cfg.tls_server_config)
        c.check()
    return cfg


def _check_tls_files(c: Collector, tls: TLSServerConfig) -> None:
    path = ("tls_server_config",)
    files = {"cert_file": tls.cert_file, "key_file": tls.key_file}
    if tls.client_ca_file is not None:
        files["client_ca_file"] = tls.client_ca_file
    unreadable = False
    for key, file in files.items():
        try:
            file.read_bytes()
        except OSError as e:
            c.add((*path, key), f"cannot read {file}: {e.strerror or e}")
            unreadable = True
    if unreadable:
        return
    try:
        ssl_context(WebServerConfig(TLSServerConfig(tls.cert_file, tls.key_file)))
    except (OSError, ValueError) as e:
        c.add((*path, "key_file"), f"cannot load certificate and key: {e}")
    if tls.client_ca_file is not None:
        try:
            ssl.create_default_context(cafile=tls.client_ca_file)
        except (OSError, ValueError) as e:
            c.add((*path, "client_ca_file"), f"cannot load CA certificates: {e}")


def _no_key_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang a daemon.
    raise ValueError("the key is encrypted; exporter-toolkit web configs take unencrypted keys")


def ssl_context(cfg: WebServerConfig) -> ssl.SSLContext | None:
    """A server SSLContext for the metrics endpoint, or None to serve plain HTTP.

    Reads the certificate files now: call it again to pick up rotated certificates.
    Raises OSError, ssl.SSLError or ValueError when they do not load.
    """
    tls = cfg.tls_server_config
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_no_key_password)
    ctx.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.client_ca_file is not None and ctx.verify_mode != ssl.CERT_NONE:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


# --- basic auth -----------------------------------------------------------------------


class _AuthCache:
    """Recent results of (user, hash, password) checks, each kept for `ttl` seconds:
    bcrypt (tens of milliseconds by design) runs once a minute per credential rather
    than on every scrape, and a client repeating a wrong password costs one bcrypt,
    not one per request.

    Keys come from `_cache_key`.
    """

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self._ttl = ttl
        self._entries: OrderedDict[bytes, float] = OrderedDict()  # key -> expiry
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            expires = self._entries.get(key)
            if expires is None:
                return False
            if expires <= time.monotonic():
                del self._entries[key]
                return False
            return True

    def add(self, key: bytes) -> None:
        with self._lock:
            self._entries[key] = time.monotonic() + self._ttl
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


_KEY_SECRET = secrets.token_bytes(32)


def _cache_key(user: str, hashed: str, password: bytes) -> bytes:
    """A keyed HMAC: no password sits in memory, and a changed hash in a reloaded
    config never matches an old entry."""
    mac = hmac.new(_KEY_SECRET, digestmod="sha256")
    for part in (user.encode(), hashed.encode(), password):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.digest()


AUTH_CACHE_TTL = 60.0
# Separate caches, so that a flood of distinct wrong passwords cannot evict the
# scraper's good credentials (and make each of its scrapes wait for bcrypt).
_successes = _AuthCache(size=256, ttl=AUTH_CACHE_TTL)
_failures = _AuthCache(size=4096, ttl=AUTH_CACHE_TTL)
# One bcrypt at a time: it releases the GIL and would otherwise take every core the
# byte splice needs, one per concurrent login attempt.
_bcrypt_lock = threading.Lock()


@cache
def _dummy_hash(cost: int) -> bytes:
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))


def _cost(hashed: str) -> int:
    match = _BCRYPT_HASH.fullmatch(hashed)
    return int(match.group(1)) if match else 10


def _credentials(header: str | None) -> tuple[str, bytes] | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
        user, sep, password = raw.partition(b":")
        return (user.decode("utf-8"), password) if sep else None
    except ValueError:  # bad base64 (binascii.Error), non-ASCII text or non-UTF-8 user
        return None


def check_basic_auth(cfg: WebServerConfig, authorization_header: str | None) -> bool:
    """Whether a request with this `Authorization` header may see the endpoint: always
    when no users are configured, else only with a user's password."""
    if not cfg.basic_auth_users:
        return True
    credentials = _credentials(authorization_header)
    if credentials is None:
        return False
    user, password = credentials
    hashed = cfg.basic_auth_users.get(user)
    # An unknown user is checked against a dummy hash of the configured cost, so that
    # timing does not tell which user names exist; it is cached like a wrong password.
    key = _cache_key(user, hashed or "", password)
    if key in _successes:
        return True
    if key in _failures:
        return False
    if hashed is None:
        _checkpw(password, _dummy_hash(max(_cost(h) for h in cfg.basic_auth_users.values())))
        ok = False
    else:
        ok = _checkpw(password, hashed.encode())
    (_successes if ok else _failures).add(key)
    return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    with _bcrypt_lock:
        try:
            return bcrypt.checkpw(password, hashed)
        except ValueError:  # over bcrypt's 72-byte limit, or a hash bcrypt rejects
            return False


__all__ = [
    "ALLOWED_HEADERS",
    "CLIENT_AUTH_TYPES",
    "TLS_VERSIONS",
    "ConfigError",
    "HTTPServerConfig",
    "Problem",
    "TLSServerConfig",
    "WebServerConfig",
    "check_basic_auth",
    "load_web_config",
    "parse_web_config",
    "ssl_context",
]
