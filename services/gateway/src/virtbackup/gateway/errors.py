"""Errors become ``{"error": "<message>"}`` with the right status, at the edge only."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from virtbackup.runtime.errors import ServiceError

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "bad_request": 400,
    "not_found": 404,
    "conflict": 409,
    "unavailable": 503,
    "internal": 500,
}


def _error(status: int, message: str) -> Response[dict[str, str]]:
    return Response({"error": message}, status_code=status)


def service_error(_: Request[Any, Any, Any], exc: ServiceError) -> Response[dict[str, str]]:
    status = STATUS_BY_CODE.get(exc.code, 500)
    if status >= 500:
        log.error("service error: %s", exc.message)
    return _error(status, exc.message)


def validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, str]]:
    details = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict):
                key = item.get("key")
                msg = item.get("message", "")
                details.append(f"{msg} (at {key})" if key else str(msg))
    message = "; ".join(details) or exc.detail
    return _error(400, f"invalid request: {message}")


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return _error(404, f"not found: {where}")
    if exc.status_code == 405:
        return _error(405, f"method not allowed: {where}")
    if exc.status_code == 413:
        return _error(413, f"request body too large (limit {_limit(request)} bytes)")
    return _error(exc.status_code, exc.detail)


def _limit(request: Request[Any, Any, Any]) -> object:
    return getattr(request.app, "request_max_body_size", "?")


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error")


HANDLERS: ExceptionHandlersMap = {
    ServiceError: service_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
