"""The login log (agents-backend-api.md, ``/api/v1/admin/log/login-logs``).

* ``GET`` (``logs:read``; filters ``username`` (exact), ``status`` (``success`` or
  ``failure``), ``since`` and ``until`` (ISO-8601 with a zone); ``page`` from 1, ``size``
  1-1000): ``{"items", "total", "page", "size", "total_pages"}``, newest first; an item
  is ``{"id", "username", "address", "status", "reason", "time", "user_agent",
  "kind"}`` (``kind``: ``login`` or ``refresh``).
* ``DELETE /{id}`` (``logs:delete``): 204; 404 when the id is no login record.

Records are in ``VB_AUDIT`` (``login_log``). Errors are ``{"detail", "code"}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, delete, get
from litestar.params import Parameter

from virtbackup.gateway.login_log import LoginLog
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import Unavailable


def _log(gw: Gateway) -> LoginLog:
    if gw.login_log is None:
        raise Unavailable("the login log is not available on this gateway")
    return gw.login_log


class LoginLogsController(Controller):
    path = "/api/v1/admin/log/login-logs"

    @get()
    async def list_login_logs(
        self,
        gw: Gateway,
        username: Annotated[str, Parameter(max_length=128)] = "",
        status: Annotated[str, Parameter(max_length=16)] = "",
        since: Annotated[str, Parameter(max_length=64)] = "",
        until: Annotated[str, Parameter(max_length=64)] = "",
        page: Annotated[int, Parameter(ge=1, le=100_000)] = 1,
        size: Annotated[int, Parameter(ge=1, le=1000)] = 20,
    ) -> dict[str, Any]:
        """A page of login attempts, newest first (see module)."""
        return await _log(gw).query(
            username=username, status=status, since=since, until=until, page=page, size=size
        )

    @delete("/{log_id:int}", status_code=204)
    async def delete_login_log(
        self, gw: Gateway, log_id: Annotated[int, Parameter(ge=1, le=2**63 - 1)]
    ) -> None:
        """Remove one login record (``logs:delete``)."""
        await _log(gw).delete(log_id)
