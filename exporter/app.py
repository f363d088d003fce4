"""The running sidecar: config in, splice + observers + accounting + web endpoint out."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import pwd
import signal
import time

from prometheus_client import CollectorRegistry

from . import __version__
from .accounting import Accounting
from .config import Address, Config, ConfigError
from .errors import StartError
from .logs import fields
from .metrics import Metrics, labelled_registry, register_default_collectors
from .observer import CLIENT_BLOCKS, SERVER_BLOCKS
from .splice import Endpoint, Splice
from .taps import TapParts, create_tap
from .web import WebServer
from .webconfig import check_basic_auth, load_web_config, ssl_context

log = logging.getLogger("exporter")

# How often reachability is probed while no connection tells us.
PROBE_INTERVAL = 5.0

__all__ = ["Sidecar", "endpoint"]


def endpoint(address: Address) -> Endpoint:
    if address.kind == "unix":
        return Endpoint(path=address.path)
    return Endpoint(host=address.host, port=address.port)


def _uid(owner: str | int | None) -> int | None:
    if owner is None or isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise StartError(f"socket.owner: no user {owner!r} on this machine") from None


def _socket_group(configured: str | int | None, tap_default: str | None) -> int | None:
    if configured is not None or tap_default is None:
        return _gid(configured)
    try:
        return grp.getgrnam(tap_default).gr_gid
    except KeyError:  # "when it exists": without it the process's group stays
        return None


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartError(f"socket.group: no group {group!r} on this machine") from None


class Sidecar:
    """One sidecar: listen address, upstream, metrics registry and web endpoint."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        *,
        web: bool = True,
        process_metrics: bool = True,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_metrics:
            register_default_collectors(self.registry)
        self.metrics = Metrics(
            self.registry,
            package=config.service_package,
            version=__version__,
            hpack_memos=(CLIENT_BLOCKS, SERVER_BLOCKS),
        )
        self.accounting = Accounting(
            self.metrics,
            upstream=str(config.upstream),
            max_jobs=config.jobs.max_tracked,
            ttl=config.jobs.ttl,
        )
        # What the listening socket speaks (SPEC section 7): it makes each connection's watcher.
        self.tap = create_tap(config.tap, TapParts(config, self.accounting))
        self.exposed = labelled_registry(self.registry, dict(config.labels))
        self._want_web = web
        self.web: WebServer | None = None
        self.splice: Splice | None = None
        self._stopping = False
        self._probe_task: asyncio.Task[None] | None = None
        self.metrics.upstream_up.set(0)

    # -- SpliceEvents
    def upstream_state(self, reachable: bool) -> None:
        self.metrics.upstream_up.set(1 if reachable else 0)
        state = "reachable" if reachable else "unreachable"
        log.info(
            f"{self.tap.upstream_name} {state}", extra=fields(upstream=str(self.config.upstream))
        )

    def connection_rejected(self) -> None:
        self.metrics.rejected_connections.inc()
        log.warning("connection limit reached; closing a new client connection")

    @property
    def ready(self) -> bool:
        return self.splice is not None and self.splice.serving and not self._stopping

    async def start(self) -> None:
        """Start the web endpoint and the splice. Raises StartError (or ConfigError for
        the web config file) with a one-line message; nothing started stays running."""
        try:
            await self._start()
        except BaseException as exc:
            await self._undo_start()
            if isinstance(exc, StartError | ConfigError) or not isinstance(exc, Exception):
                raise
            # A failure to start is one line, never a traceback (SPEC section 6); the
            # traceback is kept for debug logging.
            log.debug("start failed", exc_info=True)
            raise StartError(f"cannot start: {type(exc).__name__}: {exc}") from exc

    async def _undo_start(self) -> None:
        if self.splice is not None:
            await self.splice.close()
            self.splice = None
        if self.web is not None:
            self.web.stop()
            self.web = None

    async def _start(self) -> None:
        cfg = self.config
        if self._want_web:
            tls = None
            authorize = None
            headers: dict[str, str] = {}
            if cfg.web.config_file is not None:
                web_cfg = load_web_config(cfg.web.config_file)
                try:
                    tls = ssl_context(web_cfg)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    raise StartError(
                        f"web.config_file {cfg.web.config_file}: cannot load the TLS "
                        f"certificate and key: {exc}"
                    ) from exc
                headers = dict(web_cfg.http_server_config.headers)
                if web_cfg.basic_auth_users:

                    def authorize(header: str | None) -> bool:
                        return check_basic_auth(web_cfg, header)

            host, port = cfg.web.listen_address
            self.web = WebServer(
                self.exposed,
                host=host,
                port=port,
                metrics_path=cfg.web.metrics_path,
                ready=lambda: self.ready,
                tls=tls,
                authorize=authorize,
                headers=headers,
            )
            self.web.start()
        self.splice = Splice(
            endpoint(cfg.listen),
            endpoint(cfg.upstream),
            self.tap.watcher,
            self,
            socket_mode=cfg.socket.mode,
            socket_owner=_uid(cfg.socket.owner),
            socket_group=_socket_group(cfg.socket.group, self.tap.default_socket_group),
            max_connections=cfg.limits.max_connections,
        )
        await self.splice.start()
        await self.splice.probe_upstream()
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())
        log.info(
            "listening",
            extra=fields(
                listen=str(self.splice.listen),
                upstream=str(cfg.upstream),
                web=f"{self.web.host}:{self.web.port}" if self.web else "",
                version=__version__,
            ),
        )

    async def _probe_loop(self) -> None:
        splice = self.splice
        assert splice is not None
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            # Live connections already report reachability; probe only when idle so
            # step-runner does not see a stream of empty connections.
            if splice.active_connections == 0:
                await splice.probe_upstream()
            self.accounting.tracker.expire()

    async def stop(
        self, grace: float | None = None, final_scrape_wait: float | None = None
    ) -> None:
        """Stop accepting, let open connections finish within the grace period, then
        keep /metrics up until it has been scraped once more (or the wait expires)."""
        cfg = self.config.shutdown
        grace = cfg.grace_period if grace is None else grace
        wait = cfg.final_scrape_wait if final_scrape_wait is None else final_scrape_wait
        self._stopping = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        if self.splice is not None:
            await self.splice.stop_accepting()
            cut = await self.splice.drain(grace)
            if cut:
                log.warning("grace period over; cut open connections", extra=fields(count=cut))
        if self.web is not None:
            if wait > 0:
                seen = self.web.scrapes
                started = time.monotonic()
                scraped = await asyncio.to_thread(self.web.wait_for_scrape, seen, wait)
                log.info(
                    "final scrape" if scraped else "no final scrape before the wait expired",
                    extra=fields(waited=round(time.monotonic() - started, 3)),
                )
            self.web.stop()

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("shutting down", extra=fields(grace=self.config.shutdown.grace_period))
        await self.stop()
