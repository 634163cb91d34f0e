"""Make a listener's OpenAPI document describe what the listener answers.

Litestar documents errors as its own ``{status_code, detail, extra}``; both listeners
answer every error as ``{"error": "<message>"}`` (``errors.ErrorBody``), but the routes
of agents-backend-api.md (``/api/v1/admin``, ``/api/v1/task``) as ``{"detail", "code"}``
(``DetailCodeBody``). Routes that read
their body themselves (to keep masked secrets, to accept several forms of a field) have
no ``data`` parameter, so Litestar documents no body for them: ``finish_document`` adds
the schema each names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, RequestBody

from virtbackup.gateway.errors import DESCRIPTIONS, detail_code_family

_METHODS = ("get", "put", "post", "delete", "patch")
_WITH_BODY = frozenset({"put", "post", "patch"})
_ERROR_REF = "#/components/schemas/ErrorBody"
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
    "title": "ErrorBody",
}
_DETAIL_REF = "#/components/schemas/DetailCodeBody"
_DETAIL_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
    "required": ["detail", "code"],
    "title": "DetailCodeBody",
}


def _error_response(status: int, ref: str = _ERROR_REF) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=DESCRIPTIONS[status],
        content={"application/json": OpenAPIMediaType(schema={"$ref": ref})},  # type: ignore[arg-type]
    )


def finish_document(
    app: Litestar,
    bodies: Mapping[tuple[str, str], type[Any]],
    errors: Mapping[tuple[str, str], tuple[int, ...]] | None = None,
) -> None:
    """Rewrite ``app``'s OpenAPI document in place (before it is first served).

    Every operation: 400 (always, replacing Litestar's schema), 401, 403 (a role
    without the route's permission), 500 and 503 as ``ErrorBody`` (``DetailCodeBody``
    on ``/api/v1/admin`` and ``/api/v1/task``, which also get 404 and 409) unless the
    route documents its own; those taking a body also 413 and 415. ``bodies`` maps
    ``(METHOD, path)`` to the msgspec type of a JSON request body the handler decodes
    itself; ``errors`` adds statuses to routes whose module does not
    declare them.
    """
    document = app.openapi_schema
    components = document.components
    schemas: dict[str, Any] = components.schemas if components else {}
    schemas["ErrorBody"] = _ERROR_SCHEMA
    types = list(bodies.values())
    refs, extra = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    for name, schema in extra.items():
        schemas.setdefault(name, schema)
    body_schema = dict(zip(bodies, refs, strict=True))
    for path, item in (document.paths or {}).items():
        for method in _METHODS:
            operation = getattr(item, method, None)
            if operation is None:
                continue
            responses: dict[str, Any] = operation.responses or {}
            operation.responses = responses
            detail = detail_code_family(path)
            ref = _DETAIL_REF if detail else _ERROR_REF
            if detail:
                schemas["DetailCodeBody"] = _DETAIL_SCHEMA
            responses["400"] = _error_response(400, ref)
            statuses = [401, 403, 500, 503, *(errors or {}).get((method.upper(), path), ())]
            if detail:
                statuses += [404, 409]
            if method in _WITH_BODY:
                statuses += [413, 415]
            for status in statuses:
                if str(status) not in responses:
                    responses[str(status)] = _error_response(status, ref)
            if detail:  # those declared with ``errors.responses()`` say ErrorBody
                for code in list(responses):
                    if code.isdigit() and int(code) >= 400:
                        responses[code] = _error_response(int(code), ref)
            schema = body_schema.get((method.upper(), path))
            if schema is not None:
                operation.request_body = RequestBody(
                    required=True,
                    content={"application/json": OpenAPIMediaType(schema=schema)},  # type: ignore[arg-type]
                )
