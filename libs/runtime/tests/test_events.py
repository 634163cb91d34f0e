"""Events and the bus against a real nats-server: trace context in stored events, event
feeds from each start point, connection state, buckets."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from faststream.nats import NatsBroker
from faststream.nats.security import NatsUserPassword
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.contracts import buckets, subjects
from virtbackup.contracts.streams import EVENTS
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.errors import NotFound
from virtbackup.runtime.events import EventFeed
from virtbackup.runtime.kv import keys, read_value, valid_key
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import ensure_bucket


def admin(server: NatsServer) -> dict[str, NatsUserPassword]:
    creds = server.credentials()
    assert creds is not None
    return {"security": NatsUserPassword(creds.user, creds.password)}


def traceparent_trace_id(header: str) -> int:
    version, trace_id, _span, _flags = header.split("-")
    assert version == "00"
    return int(trace_id, 16)


async def stored_headers(bus: Bus, subject: str) -> dict[str, str]:
    msg = await bus.js.get_last_msg(EVENTS.name, subject)
    return dict(msg.headers or {})


async def test_a_stored_event_carries_the_publishers_trace(
    bus: Bus, provider: TracerProvider
) -> None:
    with provider.get_tracer("client").start_as_current_span("request") as span:
        event = await bus.publish_event("job.created", {"id": "j1"}, key="j1")
    headers = await stored_headers(bus, "vb.evt.job.created.j1")
    assert traceparent_trace_id(headers["traceparent"]) == span.get_span_context().trace_id
    assert headers["Nats-Msg-Id"] == event.id


async def test_the_trace_goes_along_without_faststreams_middleware_too(
    nats_server: NatsServer, provider: TracerProvider
) -> None:
    broker = NatsBroker(nats_server.url, **admin(nats_server))  # no telemetry middleware
    plain = Bus(broker, "plain")
    await broker.connect()
    try:
        await plain.js.add_stream(name=EVENTS.name, subjects=list(EVENTS.subjects))
        with provider.get_tracer("client").start_as_current_span("request") as span:
            await plain.publish_event("job.created", {"id": "j2"}, key="j2")
        headers = await stored_headers(plain, "vb.evt.job.created.j2")
    finally:
        await broker.stop()
    assert traceparent_trace_id(headers["traceparent"]) == span.get_span_context().trace_id


async def test_a_second_publish_of_an_event_id_is_not_stored(bus: Bus) -> None:
    body = json.dumps({"type": "x.y", "id": "e1", "time": "t", "source": "s"}).encode()
    assert await bus.publish_stored("vb.evt.x.y", body, stream=EVENTS, msg_id="e1")
    assert not await bus.publish_stored("vb.evt.x.y", body, stream=EVENTS, msg_id="e1")
    assert (await bus.js.stream_info(EVENTS.name)).state.messages == 1


async def test_a_feed_from_new_sees_only_later_events_on_its_subject(bus: Bus) -> None:
    await bus.publish_event("job.created", {"n": 1}, key="a")
    async with EventFeed(bus, subjects.event("job.created", "a")) as feed:
        assert await feed.next(timeout=0.3) is None
        await bus.publish_event("job.created", {"n": 2}, key="b")  # other subject
        await bus.publish_event("job.created", {"n": 3}, key="a")
        stored = await feed.next(timeout=5)
        assert stored is not None
        assert stored.event.payload == {"n": 3}
        assert stored.event.type == "job.created"
        assert stored.event.source == "test"
        assert stored.sequence == 3
        assert stored.subject == "vb.evt.job.created.a"
        assert stored.key == "a"
        assert await feed.next(timeout=0.3) is None


async def test_a_feed_from_all_or_from_a_sequence(bus: Bus) -> None:
    for n in range(1, 5):
        await bus.publish_event("job.updated", {"n": n}, key=f"j{n}")
    async with EventFeed(bus, subjects.EVENTS_ALL, start="all") as feed:
        got = [await feed.next(timeout=5) for _ in range(4)]
    assert [(s.sequence, s.event.payload["n"]) for s in got if s] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
    ]
    async with EventFeed(bus, subjects.EVENTS_ALL, start=3) as feed:
        third = await feed.next(timeout=5)
        fourth = await feed.next(timeout=5)
        assert await feed.next(timeout=0.3) is None
    assert third is not None and fourth is not None
    assert (third.sequence, fourth.sequence) == (3, 4)
    with pytest.raises(ValueError, match="starts at 1"):
        EventFeed(bus, start=0)


async def test_a_feed_skips_what_is_not_an_event_and_iterates(bus: Bus) -> None:
    feed = await EventFeed(bus, "vb.evt.job.>").open()
    try:
        await bus.js.publish("vb.evt.job.created.x", b"not json", stream=EVENTS.name)
        await bus.publish_event("job.finished", {"ok": True}, key="x")
        async for stored in feed:
            assert stored.event.type == "job.finished"
            assert stored.sequence == 2
            break
    finally:
        await feed.close()
    await feed.close()  # idempotent


async def test_connected_follows_the_connection(nats_server: NatsServer) -> None:
    broker = NatsBroker(nats_server.url, **admin(nats_server))
    plain = Bus(broker, "plain")
    assert not plain.connected
    await broker.connect()
    assert plain.connected
    await broker.stop()
    assert not plain.connected


async def test_key_value_finds_existing_buckets_only(bus: Bus) -> None:
    with pytest.raises(NotFound, match="VB_WORKERS"):
        await bus.key_value(buckets.WORKERS)
    await ensure_bucket(bus.js, buckets.WORKERS)
    kv = await bus.key_value(buckets.WORKERS)
    assert await keys(kv) == []
    await kv.put("w1", b'{"a": 1}')
    assert await keys(kv) == ["w1"]


async def test_keys_lists_every_live_key_at_once(bus: Bus) -> None:
    """Right after the writes, every time: nats-py's own ``keys()`` sometimes answered
    too few (its watch could end before the entries already stored arrived)."""
    await ensure_bucket(bus.js, buckets.EXPORTS)
    kv = await bus.key_value(buckets.EXPORTS)
    for round_ in range(20):
        names = [f"k{round_}-{n}" for n in range(12)]
        await asyncio.gather(*(kv.put(name, b"{}") for name in names))
        await kv.delete(names[0])
        await kv.purge(names[1])
        found = await keys(kv)
        assert set(names[2:]) <= set(found), (round_, found)
        assert names[0] not in found and names[1] not in found


class Value(msgspec.Struct):
    a: int


async def test_read_value_decodes_or_says_none(bus: Bus) -> None:
    kv = await ensure_bucket(bus.js, buckets.JOBS)
    assert await read_value(kv, "missing", Value) is None
    await kv.put("k", b'{"a": 2}')
    assert await read_value(kv, "k", Value) == Value(a=2)
    await kv.delete("k")
    assert await read_value(kv, "k", Value) is None
    await kv.put("bad", b'{"a": "x"}')
    with pytest.raises(msgspec.ValidationError):
        await read_value(kv, "bad", Value)
    # A key no bucket can hold is simply not there (nats-py would raise InvalidKeyError,
    # and let "k\n" through its own check).
    for key in ("", ".k", "k.", "k\n", "a b", "a*", "a>", "x" * 1025):
        assert not valid_key(key), key
        assert await read_value(kv, key, Value) is None
    assert valid_key("vc-1.a/b=c_d") and valid_key("x" * 1024)
