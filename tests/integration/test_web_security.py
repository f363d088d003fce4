"""Secured endpoints (issue 6, item 3): /metrics behind TLS with client certificates
and bcrypt basic auth from an exporter-toolkit web config file given with
`--web.config.file` to a real `serve` process; and the unix socket's mode, owner and
refusals. Every certificate is made here, by the test."""

from __future__ import annotations

import base64
import datetime
import grp
import http.client
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Sidecar
from exporter.config import ConfigError, parse_config
from exporter.splice import ListenError

from .harness import run_async, short_tmpdir, simulated_step_runner
from .sidecar import ServeProcess, serve_argv, serve_process, sidecar_config

pytestmark = pytest.mark.integration

USER = "prometheus"
PASSWORD = "correct horse battery staple"

# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Identity]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    identity = Identity(directory / f"{name}.crt", directory / f"{name}.key")
    identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    identity.key.chmod(0o600)
    return cert, key, identity


@dataclass(frozen=True)
class Pki:
    server_ca: Identity
    server: Identity
    client_ca: Identity
    client: Identity
    rogue_client: Identity  # signed by a CA the server does not trust


def make_pki(directory: Path) -> Pki:
    server_ca_cert, server_ca_key, server_ca = _issue(directory, "server-ca", None, ca=True)
    _, _, server = _issue(directory, "server", (server_ca_cert, server_ca_key), server=True)
    client_ca_cert, client_ca_key, client_ca = _issue(directory, "client-ca", None, ca=True)
    _, _, client = _issue(directory, "client", (client_ca_cert, client_ca_key))
    rogue_ca_cert, rogue_ca_key, _ = _issue(directory, "rogue-ca", None, ca=True)
    _, _, rogue = _issue(directory, "rogue", (rogue_ca_cert, rogue_ca_key))
    return Pki(server_ca, server, client_ca, client, rogue)


# -- a serve process behind TLS + basic auth ---------------------------------------------------


@dataclass
class Secured:
    port: int
    pki: Pki
    hashed: str
    process: ServeProcess

    def context(self, identity: Identity | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki.server_ca.cert)
        if identity is not None:
            context.load_cert_chain(identity.cert, identity.key)
        return context

    def get(
        self,
        path: str = "/metrics",
        *,
        identity: Identity | None = None,
        authorization: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(identity), timeout=10
        )
        try:
            headers = {} if authorization is None else {"Authorization": authorization}
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    with short_tmpdir("srx-tls-") as d:
        directory = Path(d)
        pki = make_pki(directory)
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        web_config = directory / "web-config.yml"
        web_config.write_text(
            "tls_server_config:\n"
            f"  cert_file: {pki.server.cert}\n"
            f"  key_file: {pki.server.key}\n"
            "  client_auth_type: RequireAndVerifyClientCert\n"
            f"  client_ca_file: {pki.client_ca.cert}\n"
            "basic_auth_users:\n"
            f"  {USER}: {hashed}\n"
            "  other: $2b$04$" + "a" * 53 + "\n"
        )
        config = directory / "config.yml"
        config.write_text(
            f"listen: unix://{d}/sidecar.sock\n"
            f"upstream: unix://{d}/step-runner.sock\n"
            "shutdown: {grace_period: 0s, final_scrape_wait: 0s}\n"
        )
        argv = serve_argv(
            "--web.config.file", str(web_config), "--log.level", "debug", config=config
        )
        with serve_process(argv) as process:
            port = int(process.web.rpartition(":")[2])
            yield Secured(port, pki, hashed, process)


def test_client_certificate_and_password_get_the_metrics(secured: Secured) -> None:
    status, _, body = secured.get(identity=secured.pki.client, authorization=basic(USER, PASSWORD))
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "step_runner_jobs" in names


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic(USER, "wrong password"),
        basic(USER, ""),
        basic("nobody", PASSWORD),
        basic("other", PASSWORD),
        "Basic !!!not-base64!!!",
        "Bearer " + PASSWORD,
        "Basic " + base64.b64encode(USER.encode()).decode(),  # no colon
    ],
)
@pytest.mark.parametrize("path", ["/metrics", "/-/healthy", "/-/ready", "/"])
def test_wrong_or_missing_credentials_get_401(
    secured: Secured, authorization: str | None, path: str
) -> None:
    status, headers, body = secured.get(
        path, identity=secured.pki.client, authorization=authorization
    )
    assert status == 401
    assert headers.get("WWW-Authenticate", "").startswith("Basic")
    assert b"step_runner" not in body


@pytest.mark.parametrize("who", ["no certificate", "a certificate of another CA"])
def test_clients_without_a_trusted_certificate_are_refused(secured: Secured, who: str) -> None:
    identity = None if who == "no certificate" else secured.pki.rogue_client
    with pytest.raises((ssl.SSLError, ConnectionError)):
        secured.get(identity=identity, authorization=basic(USER, PASSWORD))


def test_plain_http_to_the_tls_port_gets_no_metrics(secured: Secured) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", secured.port, timeout=10)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": basic(USER, PASSWORD)})
        response = connection.getresponse()
        status, body = response.status, response.read()
    except (OSError, http.client.HTTPException):
        return  # the handshake failed and the connection was dropped: what we want
    finally:
        connection.close()
    assert status != 200 and b"step_runner" not in body


def test_a_client_that_never_starts_its_handshake_blocks_nobody(secured: Secured) -> None:
    """One TCP connection that sends nothing (a port scanner, a stuck client) must not
    stop Prometheus from scraping."""
    idle = socket.create_connection(("127.0.0.1", secured.port))
    try:
        status = secured.get(identity=secured.pki.client, authorization=basic(USER, PASSWORD))[0]
        assert status == 200
    finally:
        idle.close()


def test_no_password_or_hash_is_ever_logged(secured: Secured) -> None:
    for authorization in (basic(USER, PASSWORD), basic(USER, "wrong password"), None):
        secured.get(identity=secured.pki.client, authorization=authorization)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        secured.get(identity=None, authorization=basic(USER, PASSWORD))
    logged = secured.process.log.text()
    assert "listening" in logged  # the log is there, and at debug level
    for secret in (
        PASSWORD,
        "wrong password",
        secured.hashed,
        secured.hashed[7:],  # the salt and digest without the "$2b$04$" prefix
        basic(USER, PASSWORD).split()[1],
        basic(USER, "wrong password").split()[1],
    ):
        assert secret not in logged


# -- the unix socket ------------------------------------------------------------------------


def _sidecar(directory: str, upstream: str, **config: object) -> Sidecar:
    raw = sidecar_config(directory, upstream, **config)
    return Sidecar(parse_config(raw, source="<test>"), web=False, process_metrics=False)


def test_socket_is_created_with_the_default_mode_never_world_writable() -> None:
    async def main() -> None:
        with short_tmpdir() as d:
            sidecar = _sidecar(d, f"unix://{d}/up.sock")
            old = os.umask(0)  # even with the most permissive umask
            try:
                await sidecar.start()
            finally:
                os.umask(old)
            try:
                st = os.lstat(f"{d}/sidecar.sock")
                assert stat.S_ISSOCK(st.st_mode)
                assert stat.S_IMODE(st.st_mode) == 0o660
                assert not st.st_mode & stat.S_IWOTH
                assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
            finally:
                await sidecar.stop(grace=0, final_scrape_wait=0)

    run_async(main())


def test_the_docker_taps_socket_gets_the_docker_group_by_default() -> None:
    # SPEC section 7: the tap's socket grants what the daemon's does, so by default it
    # gets the daemon's group (docker.io creates it); the step-runner tap keeps the
    # process's group, and a configured group always wins.
    docker_gid = grp.getgrnam("docker").gr_gid

    async def socket_gid(**config: object) -> int:
        with short_tmpdir() as d:
            sidecar = _sidecar(d, f"unix://{d}/up.sock", **config)
            await sidecar.start()
            try:
                return os.lstat(f"{d}/sidecar.sock").st_gid
            finally:
                await sidecar.stop(grace=0, final_scrape_wait=0)

    assert run_async(socket_gid(tap="docker")) == docker_gid
    assert run_async(socket_gid()) == os.getgid()
    assert run_async(socket_gid(tap="docker", socket={"group": os.getgid()})) == os.getgid()


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_socket_mode_and_owner_from_the_config() -> None:
    async def main() -> None:
        with short_tmpdir() as d:
            sidecar = _sidecar(
                d, f"unix://{d}/up.sock", socket={"mode": "0600", "owner": "nobody", "group": 65534}
            )
            await sidecar.start()
            try:
                st = os.lstat(f"{d}/sidecar.sock")
                assert stat.S_IMODE(st.st_mode) == 0o600
                assert (st.st_uid, st.st_gid) == (65534, 65534)
            finally:
                await sidecar.stop(grace=0, final_scrape_wait=0)

    run_async(main())


@pytest.mark.parametrize("mode", ["0666", "0662", "0777", "0o602"])
def test_a_world_writable_mode_is_refused(mode: str) -> None:
    with pytest.raises(ConfigError, match=r"socket\.mode"):
        parse_config(
            {
                "listen": "unix:///tmp/x.sock",
                "upstream": "unix:///tmp/y.sock",
                "socket": {"mode": mode},
            }
        )


def _occupy(path: Path, kind: str, elsewhere: Path) -> None:
    if kind == "regular file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to a file":
        elsewhere.write_text("precious")
        path.symlink_to(elsewhere)
    elif kind == "symlink to a stale socket":
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(elsewhere))
        stale.close()  # nobody listens: the kind of file the sidecar would replace
        path.symlink_to(elsewhere)
    elif kind == "dangling symlink":
        path.symlink_to(elsewhere)


KINDS = [
    "regular file",
    "directory",
    "fifo",
    "symlink to a file",
    "symlink to a stale socket",
    "dangling symlink",
]


@pytest.mark.parametrize("kind", KINDS)
def test_anything_but_a_stale_socket_at_the_path_is_refused(kind: str) -> None:
    with short_tmpdir() as d:
        path, elsewhere = Path(d, "sidecar.sock"), Path(d, "elsewhere")
        _occupy(path, kind, elsewhere)
        before = _both(path, elsewhere)
        sidecar = _sidecar(d, f"unix://{d}/up.sock")
        with pytest.raises(ListenError):
            run_async(sidecar.start())
        assert _both(path, elsewhere) == before
        if kind in ("regular file", "symlink to a file"):
            assert path.read_text() == "precious"


def _both(path: Path, elsewhere: Path) -> list[tuple[int, int, int] | None]:
    """What is at the path and at the symlink target, unchanged if nothing was touched."""
    return [
        _identity(os.lstat(path)),
        _identity(os.lstat(elsewhere) if elsewhere.exists() else None),
    ]


def _identity(st: os.stat_result | None) -> tuple[int, int, int] | None:
    return None if st is None else (st.st_ino, st.st_mode, st.st_size)


@pytest.mark.parametrize("replacement", ["regular file", "symlink", "another socket"])
def test_shutdown_never_deletes_what_replaced_its_socket(replacement: str) -> None:
    """An operator (or a second instance) put something else at the path while the
    sidecar ran: stopping must not delete it."""

    async def main() -> None:
        async with simulated_step_runner(relay=False) as sim:
            with short_tmpdir() as d:
                sidecar = _sidecar(d, sim.listen_address)
                await sidecar.start()
                path = Path(d, "sidecar.sock")
                other = _replace(path, replacement)
                before = os.lstat(path)
                try:
                    await sidecar.stop(grace=0, final_scrape_wait=0)
                    assert _identity(os.lstat(path)) == _identity(before)
                finally:
                    if other is not None:
                        other.close()

    run_async(main())


def _replace(path: Path, replacement: str) -> socket.socket | None:
    """Atomically put something else where the sidecar's socket is."""
    staged = path.with_name("staged")
    other = None
    if replacement == "regular file":
        staged.write_text("precious")
    elif replacement == "symlink":
        staged.symlink_to(path.with_name("target"))
    else:
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(staged))
        other.listen()
    os.replace(staged, path)
    return other
