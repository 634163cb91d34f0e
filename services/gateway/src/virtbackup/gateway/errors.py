"""Errors become ``{"error": "<message>"}`` with the right status, at the edge only
(``{"detail": "<message>", "code": "<CODE>"}`` on agents-backend-api.md's families,
``/api/v1/admin`` and ``/api/v1/task``: :func:`error_body`).

A message a client sees is written for it: a fault of kind ``internal`` (a bug, or an
error nobody classified) and any unhandled exception are logged in full, with the
request's id (``audit_log``: the client's ``x-request-id`` or a new one; the log line
carries the trace id too), and answered ``{"error": "internal error (request id <id>)"}``
(the id also in the ``x-request-id`` header), so no exception name or internal detail
reaches a client.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.types import ExceptionHandlersMap
from opentelemetry import trace

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.readable import readable as contracts_readable
from virtbackup.runtime.errors import ServiceError

log = logging.getLogger(__name__)

#: The ASGI scope's request id (``audit_log.OperationLog`` sets it: the client's
#: ``x-request-id`` or a new one), quoted by an internal error.
REQUEST_ID_KEY = "virtbackup.request_id"

STATUS_BY_CODE = {
    "bad_request": 400,
    "not_found": 404,
    "conflict": 409,
    "unavailable": 503,
    "internal": 500,
}


def readable(message: str) -> str:
    """A msgspec validation message with the patterns said in words
    (``contracts.v1.readable``)."""
    return contracts_readable(message)


class ErrorBody(msgspec.Struct):
    """Every error response of both listeners: what went wrong, for a person to read."""

    error: str


DESCRIPTIONS = {
    400: "Bad request: the message names the field or parameter",
    401: "No or wrong token",
    403: "The credential is valid but not for this route: the message says which it takes",
    404: "Not found: the message names what",
    409: "Conflict with the current state",
    413: "Request body too large",
    412: "Precondition failed: the resource changed since it was read (If-Match)",
    415: "The body is not declared as application/json",
    429: "Too many failed logins: try again after the seconds ``Retry-After`` gives",
    500: "Internal error (logged with the request id the message gives)",
    502: "A destination or server answered with an error: the message names it",
    503: "A service, server or destination is unavailable: a retry can help",
    501: "Not done by VirtBackup here: the message names what does it",
}


def responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses ``{"error": str}`` for ``statuses`` (for a route decorator)."""
    return {
        status: ResponseSpec(data_container=ErrorBody, description=DESCRIPTIONS[status])
        for status in statuses
    }


#: The longest message an error answer carries. Messages quote a client's values through
#: ``contracts.v1.common.shown`` (at most ``ECHO_LIMIT`` characters each); this is the
#: last bound, should a message quote something at length anyway.
MAX_MESSAGE_CHARS = 4000


#: Route families whose errors are ``{"detail": ..., "code": ...}`` (agents-backend-api.md's
#: format: ``/api/v1/admin/...`` and ``/api/v1/task/...``); every other route answers
#: ``{"error": ...}``.
DETAIL_FAMILIES = ("/api/v1/admin/", "/api/v1/task/")
#: ``code`` of a ``{"detail", "code"}`` error, by HTTP status.
CODE_BY_STATUS = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
}


def error_body(path: str, status: int, message: str) -> dict[str, str]:
    """An error answer's body for a request to ``path``, in its route family's format:
    ``{"detail": message, "code": "NOT_FOUND"}`` (``CODE_BY_STATUS``) under
    ``DETAIL_FAMILIES``, else ``{"error": message}``. Every error of every listener is
    shaped here (ASGI middleware answering by itself can call it too)."""
    if path.startswith(DETAIL_FAMILIES):
        return {"detail": message, "code": CODE_BY_STATUS.get(status, f"HTTP_{status}")}
    return {"error": message}


def _error(
    request: Request[Any, Any, Any],
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, str]]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "... (message cut)"
    body = error_body(request.scope.get("path", ""), status, message)
    return Response(body, status_code=status, headers=headers)


def request_id() -> str:
    """The current trace id when a trace is recorded (it finds every log line of the
    request in every service), else a random one."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return format(ctx.trace_id, "032x")
    return uuid.uuid4().hex


def _internal(
    request: Request[Any, Any, Any], detail: str, exc: BaseException | None
) -> Response[dict[str, str]]:
    rid = str(request.scope.get(REQUEST_ID_KEY) or request_id())
    log.error(
        "internal error on %s %s: %s",
        request.method,
        request.url.path,
        detail,
        exc_info=exc,
        extra={"request_id": rid},  # the log line has the trace id too (runtime.logging)
    )
    return _error(request, 500, f"internal error (request id {rid})", {"x-request-id": rid})


def service_error(request: Request[Any, Any, Any], exc: ServiceError) -> Response[dict[str, str]]:
    status = STATUS_BY_CODE.get(exc.code, 500)
    if status == 500:
        return _internal(request, f"fault {exc.code}: {exc.message}", None)
    if status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.message)
    return _error(request, status, exc.message)


#: ``app.state`` key: the listener names its fields in snake_case (the HyperSDK API).
SNAKE_CASE = "snake_case_fields"


def client_name(request: Request[Any, Any, Any], key: str) -> str:
    """A parameter as the client names it: its header, query or cookie name, else (a
    path parameter) in the listener's case (camelCase but on the HyperSDK listener)."""
    param = request.route_handler.parsed_fn_signature.parameters.get(key)
    kwarg = getattr(param, "kwarg_definition", None)
    for alias in ("header", "query", "cookie"):
        named = getattr(kwarg, alias, None)
        if isinstance(named, str) and named:
            return named
    if key in request.query_params or request.app.state.get(SNAKE_CASE):
        return key
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, str]]:
    """Litestar's parameter validation, in the form of every field error:
    ``invalid request: <what> - at `<name>``` (a body's fields are ``$.name``: bodies are
    decoded by ``bodies.decode_body`` before Litestar sees them)."""
    details = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict):
                key = item.get("key")
                msg = item.get("message", "")
                if key == "data" and msg == repr("data"):  # Litestar's KeyError: no body
                    msg = "the request has no body: send a JSON object"
                if key == "data" or (key and item.get("source") == "body"):
                    where = "$" if key == "data" else f"$.{key}"
                    details.append(f"{msg} - at `{where}`")
                elif key:
                    details.append(f"{msg} - at `{client_name(request, str(key))}`")
                else:
                    details.append(str(msg))
    message = "; ".join(details) or exc.detail
    return _error(request, 400, readable(f"invalid request: {message}"))


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
    where = f"{request.method} {shown(request.url.path)}"
    if exc.status_code == 404:
        return _error(request, 404, f"not found: {where}")
    if exc.status_code == 405:
        return _error(request, 405, f"method not allowed: {where}")
    if exc.status_code == 413:
        return _error(request, 413, f"request body too large (limit {_limit(request)} bytes)")
    if exc.status_code == 500:
        return _internal(request, f"{type(exc).__name__}: {exc.detail}", exc)
    return _error(request, exc.status_code, exc.detail)


def _limit(request: Request[Any, Any, Any]) -> object:
    return getattr(request.app, "request_max_body_size", "?")


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    return _internal(request, "unhandled exception", exc)


def detail_code_family(path: str) -> bool:
    """Whether errors on ``path`` are ``{"detail", "code"}`` (:data:`DETAIL_FAMILIES`)."""
    return path.startswith(DETAIL_FAMILIES)


def problem(
    status: int, detail: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Response[dict[str, str]]:
    """An error of the ``{"detail", "code"}`` family (``code`` from the status unless
    given)."""
    body = {
        "detail": detail[:MAX_MESSAGE_CHARS],
        "code": code or CODE_BY_STATUS.get(status, f"HTTP_{status}"),
    }
    return Response(body, status_code=status, headers=headers)


HANDLERS: ExceptionHandlersMap = {
    ServiceError: service_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
