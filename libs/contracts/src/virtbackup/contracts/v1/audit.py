"""The audit trail's records (stream ``VB_AUDIT``).

``vb.audit.opera``: one ``OperaRecord`` per mutating request (``POST``, ``PUT``,
``PATCH``, ``DELETE``) that passed authentication, on every listener of the gateway.
A record never holds a request's body, its query string or its headers: only who, what
route, which ids, and how it ended. Its id is its stream sequence.

``vb.audit.login``: one ``LoginRecord`` per login or refresh attempt.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message

#: The longest path (and each path parameter) a record keeps; longer ones end ``...``.
PATH_MAX: Final = 512


class OperaRecord(Message, frozen=True, kw_only=True):
    """One mutating request.

    ``actor``: who made it (a user name, ``token`` for the installation token,
    ``agent:<id>`` for a remote agent's key, ``token:<name>@<user>`` for an API token).
    ``time``: when it arrived (UTC ISO-8601, milliseconds). ``listener``: ``api`` (the
    HTTPS listener: the agent API and ``/api/v1``) or ``hypersdk``. ``route``: the
    route's template (``/api/v1/jobs/{job_id}``; empty for a path no route has);
    ``path``: the path as requested. ``target``: the path parameters (ids) by name.
    ``status``: the HTTP status answered; ``success``: below 400. ``requestId``: the
    request's id (the client's ``x-request-id`` when it sent a usable one), also in the
    response's ``x-request-id`` header. ``clientAddress``: the peer's address.
    ``durationMs``: from the request's arrival to its answer."""

    actor: str
    time: str
    listener: str
    method: str
    route: str
    path: str
    target: dict[str, str] = msgspec.field(default_factory=dict)
    status: int
    success: bool
    request_id: str
    client_address: str = ""
    duration_ms: float = 0.0


LoginStatus = Literal["success", "failure"]


class LoginRecord(msgspec.Struct, kw_only=True):
    """One login (or refresh) attempt: the user name given, the client's address,
    ``success`` or ``failure`` and why, when (UTC ISO-8601), the client's user agent, and
    ``kind`` ``login`` or ``refresh``. Never a password or a token."""

    username: str
    address: str
    status: LoginStatus
    reason: str
    time: str
    user_agent: str = ""
    kind: str = "login"
