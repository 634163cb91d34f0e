"""Jobs in the ``VB_JOBS`` key-value bucket; racing updates use compare-and-swap."""

from __future__ import annotations

import re
from collections.abc import Callable

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.jobs import Job
from virtbackup.runtime.errors import NotFound

_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_decoder = msgspec.json.Decoder(Job)
_encoder = msgspec.json.Encoder()


class JobStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, job: Job) -> Job:
        await self.kv.create(job.id, _encoder.encode(job))
        return job

    async def get(self, job_id: str) -> tuple[Job, int]:
        """The job and its revision; ``NotFound`` for an unknown or malformed id."""
        if not _VALID_ID.match(job_id):
            raise NotFound(f"job {job_id!r} not found")
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            raise NotFound(f"job {job_id!r} not found") from None
        if entry.value is None:
            raise NotFound(f"job {job_id!r} not found")
        return _decoder.decode(entry.value), entry.revision or 0

    async def update(self, job_id: str, change: Callable[[Job], Job]) -> Job:
        """Apply ``change`` atomically (retried on a concurrent update)."""
        while True:
            job, revision = await self.get(job_id)
            updated = change(job)
            if updated is job:
                return job
            try:
                await self.kv.update(job_id, _encoder.encode(updated), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return updated

    async def list(self) -> list[Job]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        jobs: list[Job] = []
        for key in keys:
            try:
                jobs.append((await self.get(key))[0])
            except NotFound:
                continue
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs
