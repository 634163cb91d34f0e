"""The gateway process: the bus, then the HTTPS agent listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator

import uvicorn

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.gateway.agent_refs import with_agent_check
from virtbackup.gateway.agents_store import AgentStore
from virtbackup.gateway.app import create_asgi
from virtbackup.gateway.audit_log import AuditTrail
from virtbackup.gateway.config_store import ConfigStore
from virtbackup.gateway.controllers.backend_vault import register_vault_commands
from virtbackup.gateway.credentials import ensure_certificate, ensure_token
from virtbackup.gateway.heap import freeze_when_started
from virtbackup.gateway.hypersdk import create_hypersdk_asgi, create_metrics_asgi
from virtbackup.gateway.hypersdk_metrics import dedicated_port
from virtbackup.gateway.identity_store import IdentityStore, tidy_forever
from virtbackup.gateway.login_log import LoginLog
from virtbackup.gateway.loop_watch import threshold_ms, watch
from virtbackup.gateway.ntfy_mirror import NtfyMirror
from virtbackup.gateway.state import Gateway
from virtbackup.gateway.vault_store import VaultStore
from virtbackup.runtime.audit import provision_audit
from virtbackup.runtime.logging import setup_logging
from virtbackup.runtime.sealing import SecretBox
from virtbackup.runtime.service import ServiceSpec, start_service, stop_service
from virtbackup.runtime.settings import Settings, load_settings
from virtbackup.runtime.vault import VaultCipher

log = logging.getLogger(__name__)

#: Seconds a stopping gateway waits for queued operation log records to be stored.
AUDIT_DRAIN_SECONDS = 3.0

SPEC = ServiceSpec(
    name=subjects.GATEWAY,
    streams=(streams.EVENTS,),  # VB_AUDIT: provisioned in serve, with its retention
    buckets=(
        buckets.CONFIG,
        buckets.WEBHOOKS,
        buckets.AGENTS,
        buckets.VAULT,
        buckets.ANOMALIES,
        buckets.USERS,
    ),
    register=register_vault_commands,
)


class _NoQueryInLog(logging.Filter):
    """uvicorn logs every WebSocket handshake with its full path (``"WebSocket
    /ws?token=..." 403``) on its error logger, whatever ``access_log`` says: the query
    string, which may carry what a client should not have put there, is cut off."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and "WebSocket" in str(record.msg):
            record.args = tuple(
                a.split("?", 1)[0] + "?..." if isinstance(a, str) and "?" in a else a
                for a in record.args
            )
        return True


logging.getLogger("uvicorn.error").addFilter(_NoQueryInLog())


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the gateway process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _reseal(vault: VaultStore) -> None:
    count = await vault.reseal()
    if count:
        log.info("vault connections sealed again under the current key", extra={"count": count})


async def _serve_metrics(gw: Gateway, server: _Server, port: int) -> None:
    """Serve the listener of ``metrics.port``; one that cannot start (the port is taken)
    never stops the gateway: the error is logged and the HyperSDK listener's ``/metrics``
    answers 503 naming the port until ``metrics.port`` is changed and the gateway
    restarted."""
    try:
        await server.serve()
    except (SystemExit, OSError) as exc:  # uvicorn exits when it cannot bind
        reason = (
            f"the metrics listener on port {port} (metrics.port) could not start"
            f" (address in use or not allowed: {exc!r}); set another metrics.port and"
            " restart the gateway"
        )
        log.error(reason)
        gw.metrics_failed_port = port
        gw.metrics_failure = reason


async def serve(settings: Settings | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    settings = settings or load_settings()
    setup_logging(SPEC.name, settings.log_level, settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = ensure_token(settings)
    cert, key = ensure_certificate(settings)
    ctx = await start_service(SPEC, settings)
    try:
        if (loop_watch_ms := threshold_ms()) is not None:  # diagnostics (loop_watch)
            ctx.spawn(watch(loop_watch_ms), "loop-watch")
        store = ConfigStore(ctx.bucket(buckets.CONFIG), settings.agent_yaml)
        await store.initialize()
        ctx.spawn(store.follow(), "export-agent-yaml")
        box = SecretBox.from_settings(settings)
        mirror = NtfyMirror(store.kv, ctx.bucket(buckets.WEBHOOKS), box)
        ctx.spawn(mirror.follow(), "ntfy-settings-for-the-notifier")
        vault = VaultStore(ctx.bucket(buckets.VAULT), VaultCipher.from_settings(settings), box)
        store.reserved_ports = {settings.agent_port: "agent API (VIRTBACKUP_AGENT_PORT)"}
        if settings.metrics_port:
            store.reserved_ports[settings.metrics_port] = (
                "own metrics endpoint (VIRTBACKUP_METRICS_PORT)"
            )
        store.check = vault.check_config  # references to the vault (vaultConnectionId)
        ctx.spawn(_reseal(vault), "vault-reseal")  # after a rotation of the vault key
        gw = Gateway(
            settings=settings,
            bus=ctx.bus,
            config=store,
            token=token,
            ntfy=mirror,
            secrets=box,
            vault=vault,
        )
        gw.agents = AgentStore(ctx.bucket(buckets.AGENTS))
        # The audit trail (VB_AUDIT), its retention from VIRTBACKUP_AUDIT_RETENTION_DAYS.
        await provision_audit(ctx.bus, settings.audit_retention_days)
        gw.audit = AuditTrail(ctx.bus)
        ctx.spawn(gw.audit.run(), "operation-log-writer")
        gw.identity = IdentityStore(ctx.bucket(buckets.USERS), box)
        await gw.identity.jwt_key()  # made at first start
        ctx.spawn(tidy_forever(gw.identity, settings.login_failure_window), "identity-tidy")
        gw.login_log = LoginLog(ctx.bus)
        # A server may name only a registered agent (``agent_refs``).
        store.check = with_agent_check(store.check, lambda: gw.agents)
        config = uvicorn.Config(
            create_asgi(gw),
            host=settings.agent_bind_host(),
            port=settings.agent_port,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_config=None,
            access_log=False,
            # The gateway terminates TLS itself, behind no proxy: X-Forwarded-For is a
            # client's word (uvicorn trusts it from 127.0.0.1 by default), and the login
            # lockout and the logs use the address.
            proxy_headers=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        hypersdk = uvicorn.Config(
            create_hypersdk_asgi(gw),
            host=settings.hypersdk_host,
            port=settings.hypersdk_port,
            log_config=None,
            access_log=False,
            proxy_headers=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ws_ping_interval=54.0,  # the document's heartbeat
            ws_ping_timeout=20.0,
        )
        servers = [_Server(config), _Server(hypersdk)]
        optional: _Server | None = None
        cfg, _ = await store.load()
        metrics_port = dedicated_port(gw, cfg.metrics.port)
        if metrics_port in store.reserved_ports:  # stored before this was refused
            assert metrics_port is not None
            gw.metrics_failed_port = metrics_port
            gw.metrics_failure = (
                f"the metrics listener on port {metrics_port} (metrics.port) was not started:"
                f" it is the gateway's {store.reserved_ports[metrics_port]}; set another"
                " metrics.port and restart the gateway"
            )
            log.error(gw.metrics_failure)
            metrics_port = None
        if metrics_port is not None:  # ``metrics.port`` (read at start)
            metrics = uvicorn.Config(
                create_metrics_asgi(gw),
                host=settings.hypersdk_host,
                port=metrics_port,
                log_config=None,
                access_log=False,
                proxy_headers=False,
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
            optional = _Server(metrics)
        tasks = {asyncio.create_task(s.serve()) for s in servers}
        ctx.spawn(freeze_when_started(list(servers)), "freeze-start-up-heap")  # heap.py
        if optional is not None and metrics_port is not None:
            ctx.spawn(_serve_metrics(gw, optional, metrics_port), "metrics-listener")
            servers.append(optional)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks)
        stopped.cancel()
        if gw.audit is not None:  # the last requests' records, before the bus closes
            await gw.audit.drain(AUDIT_DRAIN_SECONDS)
    finally:
        await stop_service(SPEC, ctx)


def main() -> None:
    asyncio.run(serve())
