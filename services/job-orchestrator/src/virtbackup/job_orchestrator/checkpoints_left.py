"""Checkpoints left on a VM by deleted restore points, forgotten later.

Deleting a restore point deletes its libvirt checkpoint on the VM's server, best effort
(``points.forget_checkpoint``): while a job holds the VM (a backup running on it, a
restore) or the server cannot be reached, the inventory leaves it. Each checkpoint is a
dirty bitmap QEMU updates on every write, and no point uses it any more, so it is
remembered here and asked for again after the VM's next backup ends (``retry_left``),
under the same rule: best effort, never failing anything.

One record per VM in ``VB_LOCKS`` (the orchestrator's coordination bucket), key
``ckpt.<server>.<vm>`` (each part base64url, as the VM locks), changed only by
compare-and-swap::

    {"checkpoints": ["vb-20261130T120000-ab12cd", ...]}

The record goes when its last checkpoint is forgotten. A checkpoint that is gone by
then (the VM was redefined, someone deleted it) counts as forgotten (the inventory
answers success for it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import InventoryCmd
from virtbackup.contracts.v1.inventory import CheckpointForgetRequest, Ok
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.runtime.errors import ServiceError

log = logging.getLogger(__name__)

#: How long one forget waits for the inventory (seconds).
FORGET_TIMEOUT: Final = 30.0
#: Compare-and-swap attempts before a change of the record is given up (logged); after
#: a lost race an attempt waits up to ``BACKOFF`` seconds (random), so that writers that
#: collided do not collide again.
ATTEMPTS: Final = 50
BACKOFF: Final = 0.05
#: At most this many checkpoints are remembered per VM (the oldest go first): a VM whose
#: server is gone for good must not grow a record without end.
MAX_REMEMBERED: Final = 256


class LeftCheckpoints(msgspec.Struct, frozen=True, kw_only=True):
    checkpoints: list[str] = msgspec.field(default_factory=list)


def left_key(server_id: str, vm_name: str) -> str:
    """``ckpt.<server>.<vm>``, each part base64url without padding (any VM name)."""

    def enc(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") or "_"

    return f"ckpt.{enc(server_id)}.{enc(vm_name)}"


async def _read(kv: KeyValue, key: str) -> tuple[LeftCheckpoints, int | None]:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # also a deleted key
        return LeftCheckpoints(), None
    if not entry.value:
        return LeftCheckpoints(), entry.revision
    try:
        return msgspec.json.decode(entry.value, type=LeftCheckpoints), entry.revision
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("the record %s of left checkpoints cannot be read: replaced", key)
        return LeftCheckpoints(), entry.revision


async def _change(
    kv: KeyValue, key: str, change: Callable[[list[str]], list[str]]
) -> list[str] | None:
    """Apply ``change`` to the remembered list by compare-and-swap (the key goes when the
    list is empty); the new list, or ``None`` when every attempt lost a race."""
    for _ in range(ATTEMPTS):
        record, revision = await _read(kv, key)
        new = change(list(record.checkpoints))
        if new == record.checkpoints:
            return new
        try:
            if not new:
                if revision is not None:
                    await kv.delete(key, last=revision)
            elif revision is None:
                await kv.create(key, msgspec.json.encode(LeftCheckpoints(checkpoints=new)))
            else:
                value = msgspec.json.encode(LeftCheckpoints(checkpoints=new))
                await kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            await asyncio.sleep(random.uniform(0, BACKOFF))  # noqa: S311 (jitter, no secret)
            continue
        return new
    return None


async def remember(jc: JobContext, server_id: str, vm_name: str, checkpoint: str) -> None:
    """Remember that ``checkpoint`` of the VM was left (its point is deleted), so that
    ``retry_left`` forgets it later. Never raises (a failure is logged: the checkpoint is
    then left as before)."""
    key = left_key(server_id, vm_name)

    def add(names: list[str]) -> list[str]:
        if checkpoint in names:
            return names
        return [*names, checkpoint][-MAX_REMEMBERED:]

    try:
        if await _change(jc.ctx.bucket(buckets.LOCKS), key, add) is None:
            log.warning("could not remember checkpoint %s of %s: busy", checkpoint, vm_name)
    except Exception as exc:
        log.warning("could not remember checkpoint %s of %s: %s", checkpoint, vm_name, exc)


async def forget(
    jc: JobContext, server_id: str, vm_name: str, checkpoint: str, job_id: str = ""
) -> tuple[bool, str]:
    """Ask the VM's server to delete ``checkpoint``: ``(True, what it did)``, or
    ``(False, why it was left)`` (held, unreachable, an error). Never raises."""
    request = CheckpointForgetRequest(
        server_id=server_id, vm_name=vm_name, checkpoint=checkpoint, job_id=job_id
    )
    try:
        answer = await jc.bus.request(
            InventoryCmd.CHECKPOINT_FORGET, request, Ok, timeout=FORGET_TIMEOUT
        )
    except ServiceError as exc:
        return False, exc.message
    except Exception as exc:
        return False, str(exc) or type(exc).__name__
    return answer.success, answer.message


async def retry_left(jc: JobContext, server_id: str, vm_name: str, job_id: str = "") -> list[str]:
    """Forget the checkpoints remembered for the VM (after its backup ``job_id`` ended:
    its own hold on the VM is no hold); returns those forgotten. Those left again stay
    remembered. Best effort: never raises, never fails the job that ends."""
    key = left_key(server_id, vm_name)
    try:
        kv = jc.ctx.bucket(buckets.LOCKS)
        record, _ = await _read(kv, key)
        done: list[str] = []
        for checkpoint in record.checkpoints:
            ok, message = await forget(jc, server_id, vm_name, checkpoint, job_id)
            if ok:
                done.append(checkpoint)
                log.info("left checkpoint %s of %s: %s", checkpoint, vm_name, message)
            else:
                log.info("checkpoint %s of %s is left again: %s", checkpoint, vm_name, message)
        if done:
            with contextlib.suppress(Exception):
                await _change(kv, key, lambda names: [n for n in names if n not in done])
        return done
    except Exception as exc:
        log.warning("could not forget the checkpoints left on %s: %s", vm_name, exc)
        return []
