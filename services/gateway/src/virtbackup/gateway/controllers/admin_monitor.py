"""The server monitor (agents-backend-api.md's ``GET /api/v1/admin/monitor/server``).

Every instance of every service answers its ping with its host's CPU, memory, disk and
load when asked (``Ping(host=True)``, ``runtime.hoststats``), so the monitor reads the
hosts the way ``/api/v1/runtime-state`` reads the replicas: no other channel. The NATS
server is read through the gateway's own connection (version, server id, JetStream
usage of the account from ``$JS.API.INFO``, the streams the gateway may read). NATS'
own connection count needs its system account or monitoring port, which no service is
given: ``connections`` counts the VirtBackup instances that answered (each holds one
connection). ``GET /api/v1/admin/monitor/redis`` is not served: there is no Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

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
                "connections": sum(len(p) for p in answered.values()),
                "jetstream": {
                    "enabled": bool(nats.get("jetstream")),
                    "account": await account_state(gw.bus),
                    "streams": stream_states,
                },
            },
            "workers": {"count": counts.live, "busy": counts.busy},
        }
