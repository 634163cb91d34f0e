"""The login log: every login (and refresh) attempt, in the audit stream ``VB_AUDIT``.

One JSON record per attempt on ``vb.audit.login`` (:class:`LoginRecord`: user name,
client address, ``success`` or ``failure``, the reason, the time, the user agent), stored
before the answer is sent: an attempt whose record cannot be stored is refused (503),
so no login goes unlogged. A record's id is its stream sequence. The stream is
append-only for everyone but the gateway (NATS permissions), which deletes single
records for ``DELETE /api/v1/admin/log/login-logs/{id}`` (that deletion is itself an
operation, in the operation log). Records older than ``VIRTBACKUP_AUDIT_RETENTION_DAYS``
go by the stream's max age.

Listing reads the subject's records (``runtime.audit.read_logins``: the newest
:data:`READ_MAX` at most), filters them in the gateway and pages them.
"""

from __future__ import annotations

import logging
from collections import deque
from datetime import datetime
from typing import Any, Final

import msgspec

from virtbackup.contracts.v1.audit import LoginRecord, LoginStatus
from virtbackup.runtime.audit import append_login, delete_login, read_logins
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, NotFound, Unavailable

log = logging.getLogger(__name__)

#: The most records a listing reads (the newest).
READ_MAX: Final = 50_000
#: Seconds a listing may take to read the log.
READ_TIMEOUT: Final = 10.0


class LoginLog:
    """Writes and reads the login records of ``VB_AUDIT``."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def record(
        self,
        *,
        username: str,
        address: str,
        status: LoginStatus,
        reason: str,
        user_agent: str = "",
        kind: str = "login",
    ) -> None:
        """Store one attempt; ``Unavailable`` (503) when it cannot be stored."""
        entry = LoginRecord(
            username=username[:128],
            address=address,
            status=status,
            reason=reason,
            time=utcnow_iso(),
            user_agent=user_agent[:256],
            kind=kind,
        )
        try:
            await append_login(self.bus, entry)
        except Exception as exc:
            log.error("a login attempt could not be logged: %r", exc)
            raise Unavailable("the login log cannot be written; try again") from None

    async def _read(self) -> list[tuple[int, LoginRecord]]:
        newest: deque[tuple[int, LoginRecord]] = deque(maxlen=READ_MAX)
        async for item in read_logins(self.bus, since=None, timeout=READ_TIMEOUT):
            newest.append(item)
        return list(newest)

    async def query(
        self,
        *,
        username: str = "",
        status: str = "",
        since: str = "",
        until: str = "",
        page: int = 1,
        size: int = 20,
    ) -> dict[str, Any]:
        """A page of records, newest first: ``{"items", "total", "page", "size",
        "total_pages"}``; each item is the record with its ``id``. ``since``/``until``
        are ISO-8601 (400 naming them otherwise); ``username`` matches exactly."""
        lower, upper = _instant(since, "since"), _instant(until, "until")
        if status and status not in ("success", "failure"):
            raise BadRequest("status must be success or failure - at `status`")

        def keep(rec: LoginRecord) -> bool:
            when = _instant(rec.time, "time")
            return (
                (not username or rec.username == username)
                and (not status or rec.status == status)
                and (lower is None or (when is not None and when >= lower))
                and (upper is None or (when is not None and when <= upper))
            )

        found = [
            {"id": seq, **msgspec.to_builtins(rec)}
            for seq, rec in reversed(await self._read())
            if keep(rec)
        ]
        return paged(found, page, size)

    async def delete(self, record_id: int) -> None:
        """Remove one login record; ``NotFound`` when the id is no login record."""
        try:
            await delete_login(self.bus, record_id)
        except NotFound:
            raise NotFound(f"login log {record_id} not found") from None


def _instant(text: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{field} must be an ISO-8601 time - at `{field}`") from None
    if when.tzinfo is None:
        raise BadRequest(f"{field} must name its time zone (e.g. Z) - at `{field}`")
    return when


def paged(items: list[Any], page: int, size: int) -> dict[str, Any]:
    """Page ``page`` (from 1) of ``size`` items: ``{"items", "total", "page", "size",
    "total_pages"}`` (the admin routes' pagination)."""
    start = (page - 1) * size
    return {
        "items": items[start : start + size],
        "total": len(items),
        "page": page,
        "size": size,
        "total_pages": (len(items) + size - 1) // size,
    }
