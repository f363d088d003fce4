from __future__ import annotations

import base64
import datetime
import shutil
import ssl
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exporter.config import ConfigError, Problem
from exporter.webconfig import (
    WebServerConfig,
    check_basic_auth,
    load_web_config,
    parse_web_config,
    ssl_context,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "web-config.yml"


# --- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path  # signs the server and the good client
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another, self-signed CA
    rogue_key: Path
    encrypted_key: Path  # server_key, password-protected


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    san: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        # OpenSSL 3 refuses a CA without keyCertSign when it verifies a chain.
        usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key, rogue_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(4)
    )
    ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    server = _certificate("localhost", server_key, "test CA", ca_key, san="localhost")
    client = _certificate("prometheus", client_key, "test CA", ca_key)
    rogue = _certificate("rogue", rogue_key, "rogue", rogue_key)
    return Pki(
        dir=d,
        ca=_write(d / "ca.crt", _pem(ca)),
        server_cert=_write(d / "server.crt", _pem(server)),
        server_key=_write(d / "server.key", _pem_key(server_key)),
        client_cert=_write(d / "client.crt", _pem(client)),
        client_key=_write(d / "client.key", _pem_key(client_key)),
        rogue_cert=_write(d / "rogue.crt", _pem(rogue)),
        rogue_key=_write(d / "rogue.key", _pem_key(rogue_key)),
        encrypted_key=_write(d / "encrypted.key", _pem_key(server_key, b"secret")),
    )


def _client(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """A real TLS handshake between the two contexts over memory buffers; raises
    ssl.SSLError from whichever side refuses."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_out, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, server_out, server_side=True)
    client = client_ctx.wrap_bio(to_client, client_out, server_hostname="localhost")
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError(f"handshake did not finish: {done}")


def write(directory: Path, text: str) -> Path:
    path = directory / "web-config.yml"
    path.write_text(textwrap.dedent(text))
    return path


def tls_config(pki: Pki, extra: str = "", auth: str = "RequireAndVerifyClientCert") -> Path:
    return write(
        pki.dir,
        f"""\
        tls_server_config:
          cert_file: server.crt
          key_file: server.key
          client_auth_type: {auth}
          client_ca_file: ca.crt
        {extra}""",
    )


# --- loading and TLS ---------------------------------------------------------------------


def test_empty_file_serves_plain_http_without_auth(tmp_path: Path) -> None:
    cfg = load_web_config(write(tmp_path, ""))
    assert cfg == WebServerConfig()
    assert ssl_context(cfg) is None
    assert not cfg.auth_required
    assert check_basic_auth(cfg, None)


def test_example_loads(tmp_path: Path, pki: Pki) -> None:
    shutil.copy(EXAMPLE, tmp_path / "web-config.yml")
    shutil.copy(pki.server_cert, tmp_path / "server.crt")
    shutil.copy(pki.server_key, tmp_path / "server.key")
    shutil.copy(pki.ca, tmp_path / "client-ca.crt")
    cfg = load_web_config(tmp_path / "web-config.yml")
    assert cfg.tls_server_config is not None
    assert cfg.tls_server_config.cert_file == tmp_path / "server.crt"
    assert cfg.tls_server_config.client_ca_file == tmp_path / "client-ca.crt"
    assert dict(cfg.http_server_config.headers) == {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "deny",
        "Strict-Transport-Security": "max-age=31536000",
    }
    assert list(cfg.basic_auth_users) == ["prometheus"]


def test_mutual_tls_accepts_a_client_of_the_ca_only(pki: Pki) -> None:
    cfg = load_web_config(tls_config(pki, "  min_version: TLS13\n"))
    assert cfg.tls_server_config is not None
    assert cfg.tls_server_config.key_file == pki.server_key  # relative to the web config
    server = ssl_context(cfg)
    assert server is not None
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version == ssl.TLSVersion.TLSv1_3
    handshake(server, _client(pki, pki.client_cert, pki.client_key))
    with pytest.raises(ssl.SSLError):
        handshake(server, _client(pki))
    with pytest.raises(ssl.SSLError):
        handshake(server, _client(pki, pki.rogue_cert, pki.rogue_key))


def test_verify_if_given_lets_clients_without_certificates_in(pki: Pki) -> None:
    server = ssl_context(load_web_config(tls_config(pki, auth="VerifyClientCertIfGiven")))
    assert server is not None
    handshake(server, _client(pki))
    with pytest.raises(ssl.SSLError):
        handshake(server, _client(pki, pki.rogue_cert, pki.rogue_key))


def test_server_only_tls(pki: Pki) -> None:
    path = write(pki.dir, "tls_server_config: {cert_file: server.crt, key_file: server.key}\n")
    server = ssl_context(load_web_config(path))
    assert server is not None
    assert server.verify_mode == ssl.CERT_NONE
    handshake(server, _client(pki))


def test_min_version_is_enforced(pki: Pki) -> None:
    server = ssl_context(load_web_config(tls_config(pki, "  min_version: TLS13\n")))
    assert server is not None
    old_client = _client(pki, pki.client_cert, pki.client_key)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(server, old_client)


# --- bad files ---------------------------------------------------------------------------

BAD = [
    # (file text, 'LINE: KEY: MESSAGE')
    ("tls_config: {}\n", "1: tls_config: unknown key (did you mean 'tls_server_config'?)"),
    ("rate_limit: {burst: 1}\n", "1: rate_limit: not supported by this exporter"),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "4: tls_server_config.cipher_suites: not supported: OpenSSL's defaults apply",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_ca: '-----BEGIN CERTIFICATE-----'\n",
        "4: tls_server_config.client_ca: inline CAs are not supported: use client_ca_file",
    ),
    (
        "tls_server_config:\n  key_file: server.key\n",
        "1: tls_server_config.cert_file: required when tls_server_config is set"
        " (missing cert_file)",
    ),
    ("tls_server_config: yes\n", "1: tls_server_config: expected a mapping, got true"),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAnyClientCert\n",
        "4: tls_server_config.client_auth_type: RequireAnyClientCert is not supported (Python's"
        " ssl module cannot require a certificate without verifying it):"
        " use RequireAndVerifyClientCert",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: Mandatory\n",
        "4: tls_server_config.client_auth_type: expected one of NoClientCert, RequestClientCert,"
        " VerifyClientCertIfGiven, RequireAndVerifyClientCert, got 'Mandatory'",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n",
        "4: tls_server_config.client_auth_type: RequireAndVerifyClientCert needs client_ca_file"
        " to verify against",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_ca_file: ca.crt\n",
        "4: tls_server_config.client_ca_file: set, but client_auth_type is NoClientCert",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  min_version: TLS11\n",
        "4: tls_server_config.min_version: TLS11 is insecure and not supported: use TLS12 or TLS13",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  min_version: TLS13\n  max_version: TLS12\n",
        "5: tls_server_config.max_version: must not be below min_version (TLS13)",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  prefer_server_cipher_suites: sometimes\n",
        "4: tls_server_config.prefer_server_cipher_suites: expected true or false, got 'sometimes'",
    ),
    (
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
        "2: tls_server_config.cert_file: cannot read {dir}/missing.crt: No such file or directory",
    ),
    (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: encrypted.key\n",
        "3: tls_server_config.key_file: cannot load certificate and key: the key is encrypted;"
        " exporter-toolkit web configs take unencrypted keys",
    ),
    (
        "http_server_config:\n  headers:\n    Server: nginx\n",
        "3: http_server_config.headers.Server: cannot be configured (allowed:"
        " Content-Security-Policy, X-Frame-Options, X-Content-Type-Options, X-XSS-Protection,"
        " Strict-Transport-Security)",
    ),
    (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "3: http_server_config.headers.X-Frame-Options: expected one of deny, sameorigin,"
        " got 'allow'",
    ),
    (
        'http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nSet-Cookie: x"\n',
        "3: http_server_config.headers.Content-Security-Policy: expected a single-line string,"
        " got 'a\\r\\nSet-Cookie: x'",
    ),
    (
        "http_server_config:\n  http2: 1\n",
        "2: http_server_config.http2: expected true or false, got 1",
    ),
    (
        "basic_auth_users: [alice]\n",
        "1: basic_auth_users: expected a mapping of user names to bcrypt hashes, got a list",
    ),
    (
        "basic_auth_users:\n  'a:b': $2b$04$aReHLMckNPFQKSeDmcQiyui6MKLFundQFKVl.3PGiCcoS9AAqoc\n",
        "2: basic_auth_users.a:b: user names must be non-empty strings without ':'",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[b[1].split(":")[1] for b in BAD])
def test_bad_file(pki: Pki, text: str, expected: str) -> None:
    path = write(pki.dir, text)
    with pytest.raises(ConfigError) as raised:
        load_web_config(path)
    expected = expected.format(dir=pki.dir)
    line, key, message = expected.split(": ", 2)
    assert raised.value.problems == (Problem(str(path), int(line), key, message),)


def test_certificate_and_key_that_do_not_match(pki: Pki) -> None:
    path = write(pki.dir, "tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n")
    with pytest.raises(ConfigError) as raised:
        load_web_config(path)
    (problem,) = raised.value.problems
    assert (problem.line, problem.key) == (3, "tls_server_config.key_file")
    assert problem.message.startswith("cannot load certificate and key: ")


def test_all_problems_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        http_server_config: {http2: maybe}
        basic_auth_users:
          alice: hunter2
        extra: 1
        """,
    )
    with pytest.raises(ConfigError) as raised:
        load_web_config(path)
    assert [(p.line, p.key) for p in raised.value.problems] == [
        (1, "http_server_config.http2"),
        (3, "basic_auth_users.alice"),
        (4, "extra"),
    ]


def test_a_password_or_hash_is_never_echoed(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    bad = write(tmp_path, f"basic_auth_users:\n  alice: hunter2\n  bob: '{hashed[:-1]}'\n")
    with pytest.raises(ConfigError) as raised:
        load_web_config(bad)
    assert [p.message for p in raised.value.problems] == [
        "expected a bcrypt hash ($2y$10$...), got something else"
    ] * 2
    assert "hunter2" not in str(raised.value)
    assert hashed[:-1] not in str(raised.value)
    good = load_web_config(write(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n"))
    assert hashed not in repr(good)


# --- basic auth ---------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def users() -> WebServerConfig:
    # Cost 4 keeps the suite fast; the cost does not change what is accepted.
    alice = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()
    # htpasswd writes $2y$; bcrypt treats it as $2b$.
    bob = bcrypt.hashpw("bøb:pw".encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    return parse_web_config({"basic_auth_users": {"alice": alice, "bob": bob}})


def test_basic_auth_accepts_each_user_with_their_password(users: WebServerConfig) -> None:
    assert users.auth_required
    assert check_basic_auth(users, basic("alice", "alice-pw"))
    assert check_basic_auth(users, "basic " + basic("bob", "bøb:pw").split()[1])


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        basic("alice", "wrong"),
        basic("alice", "alice-pw "),
        basic("bob", "alice-pw"),
        basic("carol", "alice-pw"),
        basic("alice", "x" * 100),  # over bcrypt's 72-byte limit
        "Bearer " + base64.b64encode(b"alice:alice-pw").decode(),
        "Basic not-base64!",
        "Basic " + base64.b64encode(b"alice").decode(),  # no ':'
        "Basic " + base64.b64encode(b"\xffalice:alice-pw").decode(),
        "Basic ünïcode",
    ],
)
def test_basic_auth_rejects(users: WebServerConfig, header: str | None) -> None:
    assert not check_basic_auth(users, header)


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Hashes the real bcrypt.checkpw is run against, in order."""
    calls: list[bytes] = []
    real: Callable[[bytes, bytes], bool] = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_successful_checks_are_cached(bcrypt_calls: list[bytes]) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    cfg = parse_web_config({"basic_auth_users": {"alice": hashed}})
    for _ in range(3):
        assert check_basic_auth(cfg, basic("alice", "pw"))
    assert len(bcrypt_calls) == 1
    for _ in range(2):
        assert not check_basic_auth(cfg, basic("alice", "nope"))
    assert len(bcrypt_calls) == 2  # a repeated wrong password costs one bcrypt
    assert not check_basic_auth(cfg, basic("alice", "nope2"))
    assert len(bcrypt_calls) == 3


def test_a_changed_hash_does_not_reuse_the_cache(bcrypt_calls: list[bytes]) -> None:
    old = parse_web_config(
        {"basic_auth_users": {"alice": bcrypt.hashpw(b"a", bcrypt.gensalt(4)).decode()}}
    )
    new = parse_web_config(
        {"basic_auth_users": {"alice": bcrypt.hashpw(b"b", bcrypt.gensalt(4)).decode()}}
    )
    assert check_basic_auth(old, basic("alice", "a"))
    assert not check_basic_auth(new, basic("alice", "a"))
    assert check_basic_auth(new, basic("alice", "b"))
    assert len(bcrypt_calls) == 3


def test_unknown_users_cost_a_bcrypt_run_too(
    users: WebServerConfig, bcrypt_calls: list[bytes]
) -> None:
    assert not check_basic_auth(users, basic("mallory", "alice-pw"))
    assert len(bcrypt_calls) == 1
    assert bcrypt_calls[0].startswith(b"$2b$04$")  # the configured cost, not a cheaper one
