"""Native API: health, runtime state, server info, updates and restart (backend-api.md).

* ``GET /healthz``: 200 ``{"ok": true, ...}`` when NATS is connected and every service
  answers its ping, else 503 with the same body naming what is missing. Like every
  route, it needs the token (the existing health routes do too).
* ``GET /api/v1/runtime-state``: every service's replicas (each instance answers the
  ping), the live transfer workers (their heartbeats in ``VB_WORKERS``), the work queue
  (``VB_WORK`` and its consumer) and the NATS server.
* ``GET /api/v1/server-info``: version, build, the API documents served and where.
* ``/api/v1/update/check``, ``/tags``, ``/status``: the running version of every service
  and the releases of the feed at ``VIRTBACKUP_RELEASE_FEED_URL`` (JSON
  ``{"releases": [{"version", "tag", "publishedAt", "notes", "url"}]}``, read with a
  5 s timeout, at most 1 MiB, no credentials sent). ``apply`` and ``rollback`` are 501:
  updating is the deployment's job (Helm, compose).
* ``POST /api/v1/server/restart``: in the single-machine mode (``virtbackup up``), asks
  the launcher to restart every service (202); elsewhere 501 naming what to do instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
from typing import Any

import httpx
import msgspec
from litestar import Controller, Response, get, post
from litestar.exceptions import HTTPException

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.v1.ping import Ping, Pong
from virtbackup.gateway.bodies import NoBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import __version__
from virtbackup.runtime.errors import NotFound, ServiceError
from virtbackup.runtime.introspect import account_state, request_all, server_state, stream_state
from virtbackup.runtime.kv import keys, read_value

#: Seconds every instance has to answer a ping (on loopback or a cluster network they
#: answer within milliseconds).
PING_WAIT = 0.3
#: Seconds ``/healthz`` waits for the first instance of each service.
HEALTH_WAIT = 2.0
FEED_TIMEOUT = 5.0
FEED_MAX_BYTES = 1 << 20
#: Seconds between the restart's answer and the launcher's signal.
RESTART_DELAY = 0.5


class Release(msgspec.Struct, kw_only=True, rename="camel"):
    version: str
    tag: str = ""
    published_at: str | None = None
    notes: str = ""
    url: str = ""


class Feed(msgspec.Struct, kw_only=True):
    releases: list[Release]


async def replicas(gw: Gateway) -> dict[str, list[Pong]]:
    """Every instance of every service that answered its ping in ``PING_WAIT``."""
    answers = await asyncio.gather(
        *(
            request_all(gw.bus, subjects.ping(service), Ping(), Pong, wait=PING_WAIT)
            for service in subjects.SERVICES
        )
    )
    return dict(zip(subjects.SERVICES, answers, strict=True))


async def workers(gw: Gateway) -> list[dict[str, Any]]:
    """The live transfer workers' heartbeats (as they write them)."""
    try:
        kv = await gw.bus.key_value(buckets.WORKERS)
    except NotFound:
        return []
    out = []
    for key in await keys(kv):
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            beat = await read_value(kv, key, dict[str, Any])
            if beat is not None:
                out.append({"id": key, **beat})
    return out


async def read_feed(url: str) -> list[Release]:
    """The releases the feed lists, newest version first; ``ValueError`` naming why it
    could not be read (also when it takes more than ``FEED_TIMEOUT`` seconds in all: httpx's
    timeout is per read, and a feed may send a byte at a time)."""
    try:
        async with (
            asyncio.timeout(FEED_TIMEOUT),
            httpx.AsyncClient(timeout=FEED_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", url, headers={"accept": "application/json"}) as resp,
        ):
            if resp.status_code != 200:
                raise ValueError(f"the release feed answered HTTP {resp.status_code}")
            body = b""
            async for part in resp.aiter_bytes():
                body += part
                if len(body) > FEED_MAX_BYTES:
                    raise ValueError(f"the release feed is larger than {FEED_MAX_BYTES} bytes")
    except TimeoutError:
        raise ValueError(f"the release feed did not answer within {FEED_TIMEOUT:.0f} s") from None
    except httpx.HTTPError as exc:
        raise ValueError(f"the release feed could not be read: {type(exc).__name__}") from None
    try:
        feed = msgspec.json.decode(body, type=Feed)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"the release feed is not as expected: {exc}") from None
    return sorted(feed.releases, key=lambda r: _version_key(r.version), reverse=True)


def _version_key(text: str) -> tuple[int, ...]:
    """``1.2.10`` as (1, 2, 10) (a leading ``v`` and a ``-suffix`` ignored); ``()`` for
    text that is no such version, which sorts last."""
    core = text.strip().removeprefix("v").split("-", 1)[0].split("+", 1)[0]
    parts = core.split(".")
    if not all(p.isdigit() for p in parts):
        return ()
    return tuple(int(p) for p in parts)


def newer(candidate: str, running: str) -> bool:
    """Whether version ``candidate`` is later than ``running`` (both numeric)."""
    a, b = _version_key(candidate), _version_key(running)
    return bool(a and b) and a > b


async def update_view(gw: Gateway) -> dict[str, Any]:
    """The running version, the feed's releases and whether one is newer."""
    url = gw.settings.release_feed_url
    out: dict[str, Any] = {
        "currentVersion": __version__,
        "feedUrl": url or None,
        "latestVersion": None,
        "updateAvailable": False,
        "releases": [],
        "error": None,
    }
    if not url:
        out["error"] = "no release feed is configured (VIRTBACKUP_RELEASE_FEED_URL)"
        return out
    try:
        releases = await read_feed(url)
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    out["releases"] = [msgspec.to_builtins(r) for r in releases]
    if releases:
        out["latestVersion"] = releases[0].version
        out["updateAvailable"] = newer(releases[0].version, __version__)
    return out


class NotDoneHere(HTTPException):
    """501: what was asked is the deployment's job, not VirtBackup's (the message says
    what does it); answered as ``{"error": ...}`` like every error."""

    status_code = 501


def _not_here(what: str) -> NotDoneHere:
    return NotDoneHere(
        detail=f"{what} is not done by VirtBackup: it is the deployment's job. With Helm: "
        "helm upgrade (or helm rollback) vb helm/virtbackup --set image.tag=<version>; "
        "with compose: set the image tag, then docker compose pull && docker compose up -d"
    )


class BackendSystemController(Controller):
    @get("/healthz")
    async def healthz(self, gw: Gateway) -> Response[dict[str, Any]]:
        """200 when NATS is connected and every service answers its ping (``services``:
        name -> answered); else 503 naming what does not."""
        nats = gw.bus.connected

        async def alive(service: str) -> bool:
            try:
                await gw.bus.request(subjects.ping(service), Ping(), Pong, timeout=HEALTH_WAIT)
            except ServiceError:
                return False
            return True

        answers = await asyncio.gather(*(alive(s) for s in subjects.SERVICES)) if nats else []
        services = dict(zip(subjects.SERVICES, answers, strict=False))
        services.update({s: False for s in subjects.SERVICES if s not in services})
        ok = nats and all(services.values())
        missing = [s for s, n in services.items() if not n]
        body: dict[str, Any] = {"ok": ok, "nats": nats, "services": services, "missing": missing}
        if not ok:
            body["error"] = "not healthy: " + (
                "NATS is not connected" if not nats else f"no answer from {', '.join(missing)}"
            )
        return Response(body, status_code=200 if ok else 503)

    @get("/api/v1/runtime-state")
    async def runtime_state(self, gw: Gateway) -> dict[str, Any]:
        """Services and their replicas, transfer workers, the work queue, NATS."""
        answered = await replicas(gw)
        services = [
            {
                "service": service,
                "replicas": len(pongs),
                "instances": [msgspec.to_builtins(p) for p in pongs],
            }
            for service, pongs in answered.items()
        ]
        queue = await stream_state(gw.bus, streams.WORK.name, streams.TRANSFER_CONSUMER.durable)
        return {
            "services": services,
            "workers": await workers(gw),
            "queue": queue,
            "nats": {**server_state(gw.bus), "account": await account_state(gw.bus)},
        }

    @get("/api/v1/server-info")
    async def server_info(self, gw: Gateway) -> dict[str, Any]:
        """Version, build, the API documents served and their base URLs."""
        s = gw.settings
        agent = f"https://{s.agent_bind_host()}:{s.agent_port}"
        hypersdk = f"http://{s.hypersdk_host}:{s.hypersdk_port}"
        return {
            "name": "VirtBackup",
            "version": __version__,
            "build": {
                "commit": s.build_commit or None,
                "date": s.build_date or None,
                "python": platform.python_version(),
            },
            "apis": [
                {"document": "agent-api.md", "baseUrl": agent, "openapi": "/schema/openapi.json"},
                {"document": "backend-api.md", "baseUrl": f"{agent}/api/v1", "openapi": None},
                {"document": "hypersdk-api.md", "baseUrl": hypersdk, "openapi": None},
            ],
            "listeners": {"agent": agent, "hypersdk": hypersdk},
            "mode": "single-machine" if _launcher(gw) else "deployment",
        }

    @post("/api/v1/update/check", status_code=200)
    async def update_check(self, gw: Gateway, data: NoBody | None = None) -> dict[str, Any]:
        """Read the release feed now: ``currentVersion``, ``latestVersion``,
        ``updateAvailable``, ``releases`` and ``error`` (why the feed was not read)."""
        return await update_view(gw)

    @get("/api/v1/update/tags")
    async def update_tags(self, gw: Gateway) -> dict[str, Any]:
        """The versions (image tags) the feed offers, newest first."""
        view = await update_view(gw)
        tags = [r.get("tag") or r["version"] for r in view["releases"]]
        return {"tags": tags, "currentVersion": __version__, "error": view["error"]}

    @get("/api/v1/update/status")
    async def update_status(self, gw: Gateway) -> dict[str, Any]:
        """The running version of every instance of every service, and the feed's view."""
        answered = await replicas(gw)
        running = {
            service: sorted({p.version for p in pongs}) for service, pongs in answered.items()
        }
        versions = {v for vs in running.values() for v in vs}
        return {
            **await update_view(gw),
            "services": running,
            "consistent": len(versions) <= 1,
        }

    @post("/api/v1/update/apply", status_code=202, responses=responses(501))
    async def update_apply(self, data: NoBody | None = None) -> dict[str, Any]:
        """501: applying an update is the deployment's job (Helm or compose)."""
        raise _not_here("applying an update")

    @post("/api/v1/update/rollback", status_code=202, responses=responses(501))
    async def update_rollback(self, data: NoBody | None = None) -> dict[str, Any]:
        """501: rolling back is the deployment's job (Helm or compose)."""
        raise _not_here("rolling back an update")

    @post("/api/v1/server/restart", status_code=202, responses=responses(501))
    async def restart(self, gw: Gateway, data: NoBody | None = None) -> dict[str, Any]:
        """Single-machine mode: the launcher restarts every service (202, the gateway
        included: reconnect in a few seconds). Elsewhere 501 naming what to do."""
        pid = _launcher(gw)
        if not pid:
            raise NotDoneHere(
                detail="restart is available only in the single-machine mode "
                "(virtbackup up); on Kubernetes use kubectl rollout restart (or "
                "helm upgrade), with compose docker compose restart"
            )

        async def signal_later() -> None:
            await asyncio.sleep(RESTART_DELAY)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGHUP)

        _pending.add(task := asyncio.create_task(signal_later()))
        task.add_done_callback(_pending.discard)
        return {"restarting": True, "services": list(subjects.SERVICES)}


_pending: set[asyncio.Task[None]] = set()


def _launcher(gw: Gateway) -> int:
    """The pid of the ``virtbackup up`` launcher this gateway runs under, else 0 (the
    setting must name this process's parent: a stale value does nothing)."""
    pid = gw.settings.launcher_pid
    return pid if pid and pid == os.getppid() else 0
