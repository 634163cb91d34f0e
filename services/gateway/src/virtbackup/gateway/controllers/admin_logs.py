"""The operation log (agents-backend-api.md's ``/api/v1/admin/log/opera-logs``).

* ``GET /api/v1/admin/log/opera-logs``: entries newest first, filtered by ``actor``,
  ``method``, ``route`` (a prefix of the route template or of the path), ``status``,
  ``outcome`` (``success``: status below 400, ``failure``), ``since`` and ``until``
  (ISO-8601; a time without a zone is UTC), one page at a time as every list of
  ``/api/v1/admin`` (``page`` from 1, ``size`` 1-1000, default 20): ``{"items", "total",
  "page", "size", "total_pages"}``. Each item is an ``OperaRecord`` with its ``id`` (the
  entry's sequence in ``VB_AUDIT``).
* ``DELETE /api/v1/admin/log/opera-logs/{id}``: deletes that entry (404 when there is
  none); the deletion is itself recorded, as every mutating request is.

Errors are ``{"detail": ..., "code": ...}`` (``errors.error_body``). Who may read
(``logs:read``) and delete (``logs:delete``) is the authentication's rule table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from litestar import Controller, delete, get
from litestar.params import Parameter

from virtbackup.contracts.v1.common import shown
from virtbackup.gateway.audit_log import MUTATING, AuditTrail, OperaFilter
from virtbackup.gateway.errors import responses
from virtbackup.gateway.login_log import paged
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest, Unavailable


def _when(value: str | None, name: str) -> datetime | None:
    """``value`` as an aware time (UTC when it names no zone); 400 naming ``name``."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"not an ISO-8601 date or time: {shown(value)} - at `{name}`") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def trail_of(gw: Gateway) -> AuditTrail:
    """The gateway's audit trail; 503 when it has none (no bus)."""
    if gw.audit is None:
        raise Unavailable("the operation log is not available on this gateway")
    return gw.audit


class OperaLogsController(Controller):
    path = "/api/v1/admin/log/opera-logs"

    @get(responses=responses(503))
    async def list_opera_logs(
        self,
        gw: Gateway,
        actor: str | None = Parameter(query="actor", default=None, max_length=256),
        method: str | None = Parameter(query="method", default=None),
        route: str | None = Parameter(query="route", default=None, max_length=512),
        status: int | None = Parameter(query="status", default=None, ge=100, le=599),
        outcome: Literal["success", "failure"] | None = Parameter(query="outcome", default=None),
        since: str | None = Parameter(query="since", default=None),
        until: str | None = Parameter(query="until", default=None),
        page: int = Parameter(query="page", default=1, ge=1, le=100_000),
        size: int = Parameter(query="size", default=20, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Operation log entries newest first, filtered, one page (see the module)."""
        if method is not None and method.upper() not in MUTATING:
            raise BadRequest(
                f"method: {shown(method)} is not recorded (only {', '.join(sorted(MUTATING))})"
                " - at `method`"
            )
        where = OperaFilter(
            actor=actor,
            method=method.upper() if method else None,
            route=route,
            status=status,
            success=None if outcome is None else outcome == "success",
            since=_when(since, "since"),
            until=_when(until, "until"),
        )
        found = await trail_of(gw).list(where)
        return paged(
            [{"id": seq, **msgspec.to_builtins(record)} for seq, record in found], page, size
        )

    @delete("/{log_id:str}", status_code=200, responses=responses(404, 503))
    async def delete_opera_log(self, gw: Gateway, log_id: str) -> dict[str, Any]:
        """Delete one entry (its ``id``); the deletion is itself an entry."""
        if not log_id.isascii() or not log_id.isdigit() or int(log_id) < 1 or len(log_id) > 19:
            raise BadRequest(
                f"id: {shown(log_id)} is not an operation log entry's id (a positive integer)"
                " - at `id`"
            )
        seq = int(log_id)
        await trail_of(gw).delete(seq)
        return {"id": seq, "deleted": True}
