"""Module-level command handlers, bound at start, through FastStream's test broker.

No server is needed here: ``TestNatsBroker`` routes requests in memory, so these tests
cover the binding, the request validation and the error mapping of ``Commands`` and
``Bus.handle``. Handlers that need JetStream are tested against a real nats-server
(e.g. services/job-orchestrator/tests/test_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest
from faststream.nats import TestNatsBroker
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, ServiceError
from virtbackup.runtime.settings import load_settings


class Lookup(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    item_id: str
    count: int = 1


class Found(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    item_id: str
    served_by: str


@dataclass
class Deps:
    name: str
    seen: list[Lookup] = field(default_factory=list)


commands: Commands[Deps] = Commands()


@commands.handler("vb.cmd.item.get", Lookup)
async def get_item(deps: Deps, req: Lookup) -> Found:
    deps.seen.append(req)
    if req.item_id == "busy":
        raise Conflict("item busy is locked by job 42")
    if req.item_id == "boom":
        raise RuntimeError("a bug")
    return Found(item_id=req.item_id, served_by=deps.name)


@pytest.fixture
def bus() -> Bus:
    return Bus(make_broker(load_settings(), "test", TracerProvider()), "test")


async def test_a_bound_handler_answers_with_its_dependencies(bus: Bus) -> None:
    deps = Deps("replica-a")
    commands.attach(bus, deps)
    async with TestNatsBroker(bus.broker):
        found = await bus.request("vb.cmd.item.get", Lookup(item_id="x"), Found)
    assert found == Found(item_id="x", served_by="replica-a")
    assert deps.seen == [Lookup(item_id="x")]


async def test_errors_map_to_fault_codes_and_back(bus: Bus) -> None:
    commands.attach(bus, Deps("replica-a"))
    async with TestNatsBroker(bus.broker):
        with pytest.raises(Conflict, match="locked by job 42"):
            await bus.request("vb.cmd.item.get", Lookup(item_id="busy"), Found)
        with pytest.raises(ServiceError, match="RuntimeError: a bug") as crashed:
            await bus.request("vb.cmd.item.get", Lookup(item_id="boom"), Found)
        assert crashed.value.code == "internal"


async def test_a_malformed_request_never_reaches_the_handler(bus: Bus) -> None:
    deps = Deps("replica-a")
    commands.attach(bus, deps)
    async with TestNatsBroker(bus.broker) as broker:
        reply = await broker.request(b'{"count": 3}', "vb.cmd.item.get")
        fault = msgspec.json.decode(reply.body)["error"]
        assert fault["code"] == "bad_request"
        assert "itemId" in fault["message"]
        wrong = Wrong(item_id="x", count="3")
        with pytest.raises(BadRequest, match="count"):
            await bus.request("vb.cmd.item.get", wrong, Found)
    assert deps.seen == []


class Wrong(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    item_id: str
    count: str
