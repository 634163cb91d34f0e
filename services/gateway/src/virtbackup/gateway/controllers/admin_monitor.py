"""The server monitor (agents-backend-api.md's ``GET /api/v1/admin/monitor/server``).

Every instance of every service answers its ping with its host's CPU, memory, disk and
load when asked (``Ping(host=True)``, ``runtime.hoststats``), so the monitor reads the
hosts the way ``/api/v1/runtime-state`` reads the replicas: no other channel. The NATS
server is read through the gateway's own connection (version, server id, JetStream
usage of the account from ``$JS.API.INFO``, the streams the gateway may read). NATS'
own connection count needs its system account (which no service is given) or its
monitoring endpoint: with ``VIRTBACKUP_NATS_MONITOR_URL`` set, ``/varz`` is read
(``nats.server``: connections, CPU, memory, uptime; ``connectionsSource: "varz"``),
else ``connections`` counts the VirtBackup instances that answered (each holds one
connection; ``connectionsSource: "instances"``). ``GET /api/v1/admin/monitor/redis`` is
not served: there is no Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec
from litestar import Controller, get

from virtbackup.contracts import streams, subjects
from virtbackup.contracts.v1.ping import Ping, Pong
from virtbackup.gateway.controllers.backend_system import PING_WAIT
from virtbackup.gateway.hypersdk_status import worker_counts
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.introspect import account_state, request_all, server_state, stream_state

#: The streams whose state the gateway may read (its NATS permissions).
STREAMS = (streams.EVENTS.name, streams.WORK.name, streams.JOB_LOGS.name, streams.AUDIT.name)


#: Seconds to read the NATS monitoring endpoint; at most this many bytes of it.
VARZ_TIMEOUT = 3.0
VARZ_MAX_BYTES = 1 << 20


class Varz(msgspec.Struct):
    """What the monitor shows of nats-server's ``/varz``."""

    connections: int
    total_connections: int = 0
    cpu: float = 0.0
    mem: int = 0
    uptime: str = ""
    slow_consumers: int = 0
    in_msgs: int = 0
    out_msgs: int = 0


async def read_varz(base_url: str) -> dict[str, Any]:
    """nats-server's own view (``<base_url>/varz``): ``connections``,
    ``totalConnections``, ``cpuPercent``, ``memoryBytes``, ``uptime``, ``slowConsumers``,
    ``inMsgs``, ``outMsgs``; ``{"error": ...}`` naming why it could not be read."""
    url = base_url.rstrip("/") + "/varz"
    try:
        async with httpx.AsyncClient(timeout=VARZ_TIMEOUT, follow_redirects=False) as client:
            resp = await client.get(url)
        if resp.status_code != 200:
            return {"error": f"the NATS monitoring endpoint answered HTTP {resp.status_code}"}
        if len(resp.content) > VARZ_MAX_BYTES:
            return {"error": "the NATS monitoring endpoint's answer is too large"}
        varz = msgspec.json.decode(resp.content, type=Varz)
    except httpx.HTTPError as exc:
        return {"error": f"the NATS monitoring endpoint could not be read: {type(exc).__name__}"}
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return {"error": f"the NATS monitoring endpoint's answer is not as expected: {exc}"}
    return {
        "connections": varz.connections,
        "totalConnections": varz.total_connections,
        "cpuPercent": varz.cpu,
        "memoryBytes": varz.mem,
        "uptime": varz.uptime,
        "slowConsumers": varz.slow_consumers,
        "inMsgs": varz.in_msgs,
        "outMsgs": varz.out_msgs,
    }


def _instance(pong: Pong) -> dict[str, Any]:
    view = msgspec.to_builtins(pong)
    assert isinstance(view, dict)
    view.pop("traceId", None)
    return view


def _hosts(answered: dict[str, list[Pong]]) -> list[dict[str, Any]]:
    """One entry per host (by host name): its latest stats and the instances on it."""
    hosts: dict[str, dict[str, Any]] = {}
    for service, pongs in answered.items():
        for pong in pongs:
            if pong.host is None:
                continue
            stats = msgspec.to_builtins(pong.host)
            entry = hosts.setdefault(pong.host.hostname, {**stats, "instances": []})
            entry["instances"].append({"service": service, "instance": pong.instance})
    return sorted(hosts.values(), key=lambda h: str(h["hostname"]))


class AdminMonitorController(Controller):
    path = "/api/v1/admin/monitor"

    @get("/server")
    async def server(self, gw: Gateway) -> dict[str, Any]:
        """Every service's instances with their host's CPU, memory, disk and load
        (``services``; ``hosts``: the same stats once per host), the NATS server
        (``nats``) and the transfer workers (``workers``: ``count``, ``busy``)."""
        answers = await asyncio.gather(
            *(
                request_all(gw.bus, subjects.ping(s), Ping(host=True), Pong, wait=PING_WAIT)
                for s in subjects.SERVICES
            )
        )
        answered = dict(zip(subjects.SERVICES, answers, strict=True))
        counts = await worker_counts(gw)
        stream_states = [await stream_state(gw.bus, name) for name in STREAMS]
        nats = server_state(gw.bus)
        instances = sum(len(p) for p in answered.values())
        url = gw.settings.nats_monitor_url
        varz = await read_varz(url) if url else None
        if varz is not None and "connections" in varz:
            connections, source = varz["connections"], "varz"
        else:
            connections, source = instances, "instances"
        return {
            "time": utcnow_iso(),
            "services": [
                {
                    "service": service,
                    "replicas": len(pongs),
                    "instances": [_instance(p) for p in pongs],
                }
                for service, pongs in answered.items()
            ],
            "hosts": _hosts(answered),
            "nats": {
                **nats,
                "connections": connections,
                "connectionsSource": source,
                "server": varz,
                "jetstream": {
                    "enabled": bool(nats.get("jetstream")),
                    "account": await account_state(gw.bus),
                    "streams": stream_states,
                },
            },
            "workers": {"count": counts.live, "busy": counts.busy},
        }
