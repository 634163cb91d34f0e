"""Job output logs (Proxmox Backup Server's task log) in ``VB_JOB_LOGS``.

Each line is one message on ``vb.log.job.<job id>``, JSON ``{"ts", "level", "line"}``
(``contracts.v1.jobctl.LogLine``), stored with JetStream's acknowledgement. Any service
allowed to publish there appends lines (``append``); readers get a job's whole log
(``read``) or follow every job's new lines (``LogFeed``, for ``/events``). A job's
lines go with it (``purge``), else with the stream's limits (90 days, 2 GiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import JOB_LOGS
from virtbackup.contracts.v1.jobctl import LINE_MAX, LogLevel, LogLine
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.clock import utcnow_iso

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LogLine)

#: Most lines ``read`` returns (the newest are kept when a log is longer).
READ_MAX_LINES = 20_000


def clip(line: str) -> str:
    """One line as stored: control characters but tab as spaces, at most ``LINE_MAX``
    characters (a longer one ends with ``...``)."""
    text = "".join(c if c == "\t" or c >= " " else " " for c in line)
    return text if len(text) <= LINE_MAX else text[: LINE_MAX - 3] + "..."


async def append(bus: Bus, job_id: str, line: str, level: LogLevel = "info") -> LogLine:
    """Store one line of ``job_id``'s log (``Unavailable`` when JetStream does not
    acknowledge it in time)."""
    entry = LogLine(ts=utcnow_iso(), level=level, line=clip(line))
    await bus.publish_stored(
        subjects.job_log(job_id), _encoder.encode(entry), stream=JOB_LOGS, msg_id=uuid.uuid4().hex
    )
    return entry


async def try_append(bus: Bus, job_id: str, line: str, level: LogLevel = "info") -> None:
    """``append`` where a lost line must not fail the caller (logged instead)."""
    try:
        await append(bus, job_id, line, level)
    except Exception as exc:
        log.warning("could not store a line of job %s's log: %s", job_id, exc)


async def count(bus: Bus, job_id: str) -> int:
    """How many lines ``job_id``'s log holds."""
    try:
        info = await bus.js.stream_info(JOB_LOGS.name, subjects_filter=subjects.job_log(job_id))
    except NotFoundError:
        return 0
    return int((info.state.subjects or {}).get(subjects.job_log(job_id), 0))


async def read(bus: Bus, job_id: str, *, timeout: float = 10.0) -> list[LogLine]:
    """Every line of ``job_id``'s log, oldest first (the newest ``READ_MAX_LINES`` of a
    longer one); ``[]`` for a job without lines."""
    total = await count(bus, job_id)
    if total == 0:
        return []
    subject = subjects.job_log(job_id)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub: Any = await bus.js.subscribe(
        subject, stream=JOB_LOGS.name, ordered_consumer=True, config=config
    )
    lines: list[LogLine] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=remaining)
            except (NatsTimeoutError, TimeoutError):
                break
            try:
                lines.append(_decoder.decode(msg.data))
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("undecodable line in the log of job %s", job_id)
            if msg.metadata.num_pending == 0:
                break
    finally:
        try:
            await sub.unsubscribe()
        except Exception as exc:
            log.debug("closing a log reader: %s", exc)
    return lines[-READ_MAX_LINES:]


def render(lines: list[LogLine]) -> str:
    """The log as text: ``<ts> <LEVEL> <line>`` per line."""
    return "".join(f"{entry.ts} {entry.level.upper():5} {entry.line}\n" for entry in lines)


async def purge(bus: Bus, job_id: str) -> None:
    """Remove every line of ``job_id``'s log (nothing to remove is not an error)."""
    with contextlib.suppress(NotFoundError):
        await bus.js.purge_stream(JOB_LOGS.name, subject=subjects.job_log(job_id))


class LogFeed:
    """New lines of every job's log, as they are stored: ``(job id, line)``."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._sub: Any = None

    async def open(self) -> LogFeed:
        """Start following; lines stored from now on are not missed. ``NotFound``-like
        errors (no stream yet) leave the feed empty."""
        if self._sub is None:
            try:
                self._sub = await self.bus.js.subscribe(
                    subjects.JOB_LOGS_ALL,
                    stream=JOB_LOGS.name,
                    ordered_consumer=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
                )
            except NotFoundError:
                log.info("no %s stream yet: job log lines are not followed", JOB_LOGS.name)
        return self

    async def next(self, timeout: float) -> tuple[str, LogLine] | None:
        """The next line and its job, or None when none came within ``timeout``."""
        if self._sub is None:
            await asyncio.sleep(timeout)
            return None
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except (NatsTimeoutError, TimeoutError):
            return None
        try:
            entry = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return msg.subject.rsplit(".", 1)[-1], entry

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("closing a log feed: %s", exc)
