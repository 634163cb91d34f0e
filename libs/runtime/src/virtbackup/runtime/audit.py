"""The audit trail in ``VB_AUDIT`` (``contracts.streams.AUDIT``): the operation log
(``vb.audit.opera``, one ``v1.audit.OperaRecord`` per message) and login attempts
(``vb.audit.login``, one ``v1.audit.LoginRecord`` each). Only the gateway may write,
read or delete here (its NATS permissions); what it decides to record is
``gateway.audit_log``'s and ``gateway.login_log``'s.

Entries are kept ``VIRTBACKUP_AUDIT_RETENTION_DAYS`` (the stream's ``max_age``); the
stream denies purging. A single entry can be deleted (a documented route), which is
why ``deny_delete`` is off.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import AUDIT, DAY, StreamSpec
from virtbackup.contracts.v1.audit import LoginRecord, OperaRecord
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.errors import NotFound, Unavailable
from virtbackup.runtime.provision import ensure_stream

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def audit_stream(retention_days: float) -> StreamSpec:
    """``VB_AUDIT`` keeping entries ``retention_days``."""
    return msgspec.structs.replace(AUDIT, max_age_seconds=retention_days * DAY)


async def provision_audit(bus: Bus, retention_days: float) -> None:
    """Create ``VB_AUDIT`` or bring it to ``retention_days`` (idempotent)."""
    await ensure_stream(bus.js, audit_stream(retention_days))


async def append_opera(bus: Bus, record: OperaRecord, msg_id: str) -> None:
    """Store one operation log record, acknowledged by JetStream (``Unavailable`` when
    not; a retry with the same ``msg_id`` never stores it twice)."""
    await bus.publish_stored(
        subjects.AUDIT_OPERA, _encoder.encode(record), stream=AUDIT, msg_id=msg_id
    )


async def append_login(bus: Bus, record: LoginRecord) -> None:
    """Store one login attempt, acknowledged by JetStream (``Unavailable`` when not)."""
    await bus.publish_stored(
        subjects.AUDIT_LOGIN, _encoder.encode(record), stream=AUDIT, msg_id=uuid.uuid4().hex
    )


def read_opera(
    bus: Bus, *, since: datetime | None, timeout: float
) -> AsyncIterator[tuple[int, OperaRecord]]:
    """Every operation log record stored from ``since`` on (all without), oldest first,
    with its stream sequence (:func:`read_entries`)."""
    return read_entries(bus, subjects.AUDIT_OPERA, OperaRecord, since=since, timeout=timeout)


def read_logins(
    bus: Bus, *, since: datetime | None, timeout: float
) -> AsyncIterator[tuple[int, LoginRecord]]:
    """Every login attempt stored from ``since`` on (all without), oldest first, with its
    stream sequence (:func:`read_entries`)."""
    return read_entries(bus, subjects.AUDIT_LOGIN, LoginRecord, since=since, timeout=timeout)


async def read_entries(
    bus: Bus, subject: str, kind: type[T], *, since: datetime | None, timeout: float
) -> AsyncIterator[tuple[int, T]]:
    """Every entry of ``subject`` (one kind of audit record) stored from ``since`` on (all
    without), oldest first, decoded as ``kind``, with its stream sequence. ``Unavailable``
    when reading takes more than ``timeout`` seconds; an entry that does not decode is
    skipped with a warning."""
    try:
        info = await bus.js.stream_info(AUDIT.name, subjects_filter=subject)
    except NotFoundError:
        return
    if not (info.state.subjects or {}).get(subject):
        return
    if since is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since.astimezone(UTC)
        )
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub: Any = await bus.js.subscribe(
        subject, stream=AUDIT.name, ordered_consumer=True, config=config
    )
    decoder = msgspec.json.Decoder(kind)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable("reading the audit trail took too long: narrow it")
            try:
                msg = await sub.next_msg(timeout=min(remaining, 2.0))
            except (NatsTimeoutError, TimeoutError):
                return  # nothing (more) from ``since`` on
            seq = msg.metadata.sequence.stream
            try:
                yield seq, decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("undecodable audit entry %s on %s", seq, subject)
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def delete_opera(bus: Bus, seq: int) -> None:
    """Delete the operation log entry ``seq`` (:func:`delete_entry`)."""
    await delete_entry(bus, subjects.AUDIT_OPERA, seq, "operation log entry")


async def delete_login(bus: Bus, seq: int) -> None:
    """Delete the login log entry ``seq`` (:func:`delete_entry`)."""
    await delete_entry(bus, subjects.AUDIT_LOGIN, seq, "login log entry")


async def delete_entry(bus: Bus, subject: str, seq: int, what: str) -> None:
    """Delete entry ``seq`` of ``subject``; ``NotFound`` naming ``what`` when there is none
    (also when ``seq`` is an entry of another kind, such as a login attempt's for the
    operation log)."""
    try:
        stored = await bus.js.get_msg(AUDIT.name, seq)
    except NotFoundError:
        raise NotFound(f"no {what} {seq}") from None
    if stored.subject != subject:
        raise NotFound(f"no {what} {seq}")
    try:
        await bus.js.delete_msg(AUDIT.name, seq)
    except NotFoundError:
        raise NotFound(f"no {what} {seq}") from None
