"""The operation log: every mutating request on every listener, in ``VB_AUDIT``.

``OperationLog`` is an ASGI middleware placed *inside* authentication (``app.create_asgi``
and ``hypersdk.create_hypersdk_asgi``), so a request it sees has passed it: requests
refused there (no or a wrong credential) are not operations (failed logins are the login
log's). A known identity refused for want of a permission (403) is: ``IdentityAuth``
answers it through another ``OperationLog`` around ``identity_auth.answer_refusal``
(its ``route`` is empty: no route was matched). For every HTTP request it

* gives the request an id: the client's ``x-request-id`` when it is usable (1 to 128
  letters, digits, ``.``, ``_``, ``:`` or ``-``), else a new one; it is in the ASGI scope
  (:data:`REQUEST_ID_KEY`: ``errors`` quotes it in an internal error) and in the
  response's ``x-request-id`` header;
* for ``POST``, ``PUT``, ``PATCH`` and ``DELETE``, once the answer is sent, hands an
  ``OperaRecord`` (actor, time, listener, method, route template, path, path
  parameters, status, success, request id, client address, duration) to the
  :class:`AuditTrail`. Bodies, query strings and headers are never recorded: a
  password in a body or a token in a header cannot reach the log.

A handler may mark a request that changed nothing as routine (:data:`UNRECORDED_KEY` in
the scope: a remote agent's lease poll answered ``assigned: false``, every few seconds
of every agent); it is not recorded unless it failed.

WebSocket connections are passed through unrecorded: no message a client sends on
``/ws`` or ``/events`` changes state (``/ws`` answers ``ping`` only).

The actor is ``scope["virtbackup.actor"]`` (set by the user/role authentication), else
``agent:<id>`` for a remote agent's ``bak_`` key (``agent_auth``), else the middleware's
``default_actor``: ``token`` behind the installation token's check. A request that
reached the application without any credential (only ``POST /api/v1/agent/register``,
whose credential is the one-time token in its body) is recorded when it succeeded, as
``registration-token``, and not when it failed (anyone may send those).

Writing is asynchronous: the answer never waits for JetStream. Records go through a
bounded queue to one writer task that stores each with JetStream's acknowledgement and
retries (``tenacity``: 5 attempts over about 6 s). A record that cannot be stored (the
queue is full, JetStream does not acknowledge it, the gateway stops with records still
queued) is never dropped silently: it is logged as an error with its fields (none of them
secret) and counted in ``virtbackup_audit_records_lost_total``.

Deleting: ``VB_AUDIT`` denies purging; single entries can be deleted (a documented
route) by the gateway only (NATS permissions), and the deletion is itself an operation,
recorded like any other with the deleted entry's id as its target. JetStream's
``deny_delete`` would make the route impossible, and a tombstone beside a kept entry
would keep what an operator deleted (e.g. an entry recorded by mistake).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from prometheus_client import Counter
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from virtbackup.contracts.v1.audit import PATH_MAX, OperaRecord
from virtbackup.gateway.agent_auth import AGENT_SCOPE_KEY, REGISTER_PATH
from virtbackup.gateway.auth import ASGIApp, Message, Receive, Scope, Send
from virtbackup.gateway.errors import REQUEST_ID_KEY
from virtbackup.runtime.audit import append_opera, delete_opera, read_opera
from virtbackup.runtime.bus import Bus

log = logging.getLogger(__name__)

#: Scope keys: who made the request and what it may do (set by the authentication); the
#: request's id is set here (``errors.REQUEST_ID_KEY``).
ACTOR_KEY: Final = "virtbackup.actor"
PERMISSIONS_KEY: Final = "virtbackup.permissions"

MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The actor of a request that succeeded without any credential in its headers.
REGISTRATION_ACTOR: Final = "registration-token"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEADER = b"x-request-id"

RECORDED = Counter("virtbackup_audit_records_written", "Operation log records stored in VB_AUDIT")
LOST = Counter(
    "virtbackup_audit_records_lost",
    "Operation log records that could not be stored in VB_AUDIT (each is logged as an error)",
)

#: Records waiting for the writer at most; one more is lost (logged and counted).
QUEUE_MAX = 10_000
#: Seconds a listing may read the stream before it gives up (503).
SCAN_TIMEOUT = 20.0


#: Set (True) in the scope by a handler whose request changed nothing and comes often
#: (an agent's empty lease): the operation log does not record it when it succeeded.
UNRECORDED_KEY = "virtbackup.audit.unrecorded"


def request_id_of(scope: Scope) -> str:
    """The client's ``x-request-id`` when usable (see module), else a new one."""
    for name, value in scope.get("headers", ()):
        if name == _HEADER:
            text: str = value.decode("latin-1").strip()
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _clip(text: str) -> str:
    return text if len(text) <= PATH_MAX else text[: PATH_MAX - 3] + "..."


def actor_of(scope: Scope, default: str | None) -> str | None:
    """Who made the request (see module); None when no credential was presented."""
    actor: object = scope.get(ACTOR_KEY)
    if isinstance(actor, str) and actor:
        return actor
    agent = scope.get(AGENT_SCOPE_KEY)
    if agent:
        return f"agent:{agent}"
    return default


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class OperationLog:
    """ASGI middleware: request ids on every HTTP request, an ``OperaRecord`` for every
    mutating one (see the module). ``trail`` None: ids only (a gateway without a bus)."""

    def __init__(
        self,
        app: ASGIApp,
        trail: Callable[[], AuditTrail | None],
        *,
        listener: str,
        default_actor: str | None,
    ) -> None:
        self.app = app
        self.trail = trail
        self.listener = listener
        self.default_actor = default_actor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        scope[REQUEST_ID_KEY] = rid
        started = time.monotonic()
        arrived = _now_iso()
        status = 500  # the application ended without answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                headers.append((_HEADER, rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if scope.get("method") in MUTATING:
                try:
                    self._record(scope, rid, arrived, status, time.monotonic() - started)
                except Exception:  # a bug here must not turn an answered request into one
                    LOST.inc()
                    log.exception("operation log record not made for request id %s", rid)

    def _record(self, scope: Scope, rid: str, arrived: str, status: int, seconds: float) -> None:
        trail = self.trail()
        if trail is None or (scope.get(UNRECORDED_KEY) is True and status < 400):
            return
        actor = actor_of(scope, self.default_actor)
        if actor is None:
            if status >= 400 or scope.get("path") != REGISTER_PATH:
                return
            actor = REGISTRATION_ACTOR
        client = scope.get("client")
        params = scope.get("path_params") or {}
        trail.submit(
            OperaRecord(
                actor=actor,
                time=arrived,
                listener=self.listener,
                method=str(scope.get("method")),
                route=str(scope.get("path_template") or ""),
                path=_clip((scope.get("raw_path") or b"").decode("latin-1") or str(scope["path"])),
                target={str(k): _clip(str(v)) for k, v in params.items()},
                status=status,
                success=status < 400,
                request_id=rid,
                client_address=str(client[0]) if client else "",
                duration_ms=round(seconds * 1000, 3),
            )
        )


@dataclass(frozen=True)
class OperaFilter:
    """What a listing keeps: ``actor`` and ``method`` exactly, ``route`` a prefix of the
    route template or of the path, ``status`` exactly, ``success`` the outcome, and the
    time window ``since`` <= time < ``until``."""

    actor: str | None = None
    method: str | None = None
    route: str | None = None
    status: int | None = None
    success: bool | None = None
    since: datetime | None = None
    until: datetime | None = None

    def keeps(self, record: OperaRecord, at: datetime) -> bool:
        return (
            (self.actor is None or record.actor == self.actor)
            and (self.method is None or record.method == self.method)
            and (
                self.route is None
                or record.route.startswith(self.route)
                or record.path.startswith(self.route)
            )
            and (self.status is None or record.status == self.status)
            and (self.success is None or record.success == self.success)
            and (self.since is None or at >= self.since)
            and (self.until is None or at < self.until)
        )


def _record_time(record: OperaRecord) -> datetime:
    try:
        return datetime.fromisoformat(record.time)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


class AuditTrail:
    """The operation log in ``VB_AUDIT`` (``vb.audit.opera``): written through a queue
    (:meth:`submit`, :meth:`run`), listed (:meth:`list`) and deleted (:meth:`delete`)."""

    def __init__(self, bus: Bus, *, queue_max: int = QUEUE_MAX) -> None:
        self.bus = bus
        self.queue: asyncio.Queue[OperaRecord] = asyncio.Queue(maxsize=queue_max)

    def submit(self, record: OperaRecord) -> None:
        """Queue ``record`` for the writer; never blocks. A full queue loses it: logged
        as an error and counted."""
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self._lost(record, "the queue is full")

    def _lost(self, record: OperaRecord, why: str) -> None:
        LOST.inc()
        log.error(
            "operation log record not stored (%s): %s %s by %s, status %s, request id %s",
            why,
            record.method,
            record.path,
            record.actor,
            record.status,
            record.request_id,
            extra={"request_id": record.request_id},
        )

    async def store(self, record: OperaRecord) -> None:
        """Store one record (JetStream acknowledges it; retried, one message id for all
        attempts so a retry never stores it twice). ``Unavailable`` when it could not."""
        msg_id = uuid.uuid4().hex
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(5),
            wait=wait_exponential(multiplier=0.2, max=3.0),
            reraise=True,
        ):
            with attempt:
                await append_opera(self.bus, record, msg_id)
        RECORDED.inc()

    async def run(self) -> None:
        """The writer: stores queued records in order, for the life of the gateway."""
        while True:
            record = await self.queue.get()
            try:
                await self.store(record)
            except asyncio.CancelledError:
                self._lost(record, "the gateway stopped")
                raise
            except Exception as exc:
                self._lost(record, f"JetStream did not store it: {exc}")
            finally:
                self.queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the queued records to be stored (at stop);
        those still queued then are lost (logged and counted)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)
        while not self.queue.empty():
            self._lost(self.queue.get_nowait(), "the gateway stopped")

    async def list(self, where: OperaFilter) -> list[tuple[int, OperaRecord]]:
        """The records ``where`` keeps, newest first, each with its id (stream sequence).
        Reads the stream from ``where.since`` on (all of it without); ``Unavailable`` when
        that takes more than ``SCAN_TIMEOUT`` seconds."""
        found = [
            (seq, record)
            async for seq, record in read_opera(self.bus, since=where.since, timeout=SCAN_TIMEOUT)
            if where.keeps(record, _record_time(record))
        ]
        found.reverse()
        return found

    async def delete(self, seq: int) -> None:
        """Delete the operation log entry ``seq``; ``NotFound`` when there is none (also
        when ``seq`` is another kind of audit entry, such as a login attempt's)."""
        await delete_opera(self.bus, seq)
