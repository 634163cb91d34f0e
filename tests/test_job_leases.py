"""Job leases (``job_orchestrator/leases.py``) against a real nats-server: a lease that
lapsed while nobody took the job (its holder's renewals lagged: a busy orchestrator
holding the leases of thousands of queued jobs) is taken again by its holder, also when
a job's own renewal (``confirm``) and a renewal round run at once; one that another
instance took meanwhile is lost. (Before, a lapsed lease was always lost: its job was
cancelled, or gave itself up and was failed by its own orchestrator's sweep, "the
job-orchestrator instance running it stopped", although nothing had stopped.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import LEASE_SECONDS
from virtbackup.job_orchestrator.leases import JobLeases
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.testing.nats import connect

JOB = "01a22f471eb36d5a346ed8d2"


@pytest.fixture
async def kv(nats_server: NatsServer) -> AsyncIterator[KeyValue]:
    nc = await connect(nats_server)
    try:
        yield await nc.jetstream().create_key_value(bucket="T_LEASES", ttl=LEASE_SECONDS)
    finally:
        await nc.drain()


async def test_a_lapsed_lease_nobody_took_is_taken_again(kv: KeyValue) -> None:
    leases = JobLeases(kv, "orchestrator-a/1")
    assert await leases.take(JOB)
    for _ in range(10):
        await kv.purge(JOB)  # as the bucket's TTL does to a lease renewed too late
        leases.renewed[JOB] -= LEASE_SECONDS  # and so late that the job renews it itself
        # A renewal round and the job's own renewal before a step, at once.
        lost, confirmed = await asyncio.gather(leases.renew_all(), leases.confirm(JOB))
        assert lost == [] and confirmed, (lost, confirmed)
        assert leases.valid(JOB)
        entry = await kv.get(JOB)
        assert entry.value == b"orchestrator-a/1" and entry.revision == leases.held[JOB]
    assert await leases.renew_all() == []  # and renewed as before from then on


async def test_a_lapsed_lease_another_instance_took_is_lost(kv: KeyValue) -> None:
    mine, other = JobLeases(kv, "orchestrator-a/1"), JobLeases(kv, "orchestrator-b/2")
    assert await mine.take(JOB)
    await kv.purge(JOB)
    assert await other.take(JOB)  # its sweep took the job over
    assert await mine.renew_all() == [JOB]
    assert not mine.valid(JOB) and not await mine.confirm(JOB)
    assert (await kv.get(JOB)).value == b"orchestrator-b/2"
