"""The audit trail in ``VB_AUDIT`` (``contracts.streams.AUDIT``): the operation log
(``vb.audit.opera``, one ``v1.audit.OperaRecord`` per message) and login attempts
(``vb.audit.login``). Only the gateway may write, read or delete here (its NATS
permissions); what it decides to record is ``gateway.audit_log``'s.

Entries are kept ``VIRTBACKUP_AUDIT_RETENTION_DAYS`` (the stream's ``max_age``); the
stream denies purging. A single entry can be deleted (a documented route), which is
why ``deny_delete`` is off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import AUDIT, DAY, StreamSpec
from virtbackup.contracts.v1.audit import OperaRecord
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.errors import NotFound, Unavailable
from virtbackup.runtime.provision import ensure_stream

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(OperaRecord)


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


async def read_opera(
    bus: Bus, *, since: datetime | None, timeout: float
) -> AsyncIterator[tuple[int, OperaRecord]]:
    """Every operation log record stored from ``since`` on (all without), oldest first,
    with its stream sequence. ``Unavailable`` when reading takes more than ``timeout``
    seconds; an entry that does not decode is skipped with a warning."""
    try:
        info = await bus.js.stream_info(AUDIT.name, subjects_filter=subjects.AUDIT_OPERA)
    except NotFoundError:
        return
    if not (info.state.subjects or {}).get(subjects.AUDIT_OPERA):
        return
    if since is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since.astimezone(UTC)
        )
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub: Any = await bus.js.subscribe(
        subjects.AUDIT_OPERA, stream=AUDIT.name, ordered_consumer=True, config=config
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable("reading the operation log took too long: narrow it")
            try:
                msg = await sub.next_msg(timeout=min(remaining, 2.0))
            except (NatsTimeoutError, TimeoutError):
                return  # nothing (more) from ``since`` on
            seq = msg.metadata.sequence.stream
            try:
                yield seq, _decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("undecodable operation log entry %s", seq)
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def delete_opera(bus: Bus, seq: int) -> None:
    """Delete the operation log entry ``seq``; ``NotFound`` when there is none (also
    when ``seq`` is another kind of audit entry, such as a login attempt's)."""
    try:
        stored = await bus.js.get_msg(AUDIT.name, seq)
    except NotFoundError:
        raise NotFound(f"no operation log entry {seq}") from None
    if stored.subject != subjects.AUDIT_OPERA:
        raise NotFound(f"no operation log entry {seq}")
    try:
        await bus.js.delete_msg(AUDIT.name, seq)
    except NotFoundError:
        raise NotFound(f"no operation log entry {seq}") from None
