"""Checkpoints left by deleted points (``checkpoints_left``): the per-VM record in
``VB_LOCKS`` across two orchestrator instances on a real nats-server. No inventory runs
here, so every forget is left (no responder) and stays remembered."""

from __future__ import annotations

import asyncio
import time

from virtbackup.contracts import buckets
from virtbackup.job_orchestrator import checkpoints_left
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.runtime.kv import read_value


async def remembered(jc: JobContext, server: str, vm: str) -> list[str]:
    record = await read_value(
        jc.ctx.bucket(buckets.LOCKS),
        checkpoints_left.left_key(server, vm),
        checkpoints_left.LeftCheckpoints,
    )
    return record.checkpoints if record is not None else []


async def test_two_instances_remember_every_checkpoint_once_and_keep_what_is_left(
    replicas: tuple[JobContext, JobContext],
) -> None:
    a, b = replicas
    vm = "web 1/ü"  # any name is a key
    names = [f"vb-{n:03d}" for n in range(12)]
    await asyncio.gather(
        *(checkpoints_left.remember(jc, "s1", vm, name) for jc in (a, b) for name in names)
    )
    assert sorted(await remembered(a, "s1", vm)) == names  # each once, none lost to a race
    assert await remembered(a, "s1", "other") == []
    # No inventory answers: each is left again, and stays remembered. Quickly: no
    # responder is an answer, not a timeout.
    started = time.monotonic()
    assert await checkpoints_left.retry_left(b, "s1", vm, "job-1") == []
    assert time.monotonic() - started < 10
    assert sorted(await remembered(b, "s1", vm)) == names
    # Nothing remembered: nothing asked.
    assert await checkpoints_left.retry_left(a, "s1", "other") == []


def test_keys_hold_any_vm_name() -> None:
    key = checkpoints_left.left_key("local", "a b/..ü")
    assert key.startswith("ckpt.") and key.count(".") == 2
    assert key != checkpoints_left.left_key("local", "a b/..u")
