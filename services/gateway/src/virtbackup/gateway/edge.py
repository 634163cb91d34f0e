"""What every request must be before a handler sees it (both listeners).

``check_request`` runs before Litestar decodes anything (an app-level ``before_request``
hook), so no handler, and no command it sends, ever sees:

- a body that is not declared JSON: 415 (``application/json`` or ``application/*+json``;
  no route takes another type). A JSON body sent as ``text/plain`` needs no CORS
  preflight from a browser, so it must not be accepted as JSON;
- a body that is not UTF-8, nests deeper than ``MAX_JSON_DEPTH``, holds a NUL character
  or a lone UTF-16 surrogate (``"\\ud800"``, no character at all) in a string, or an object
  with a key twice (``{"dryRun": true, "dryRun": false}``: msgspec would keep the last
  silently): 400 naming the place (``- at `$.vmName```). msgspec has no depth limit of
  its own: a 50,000-deep document would raise ``RecursionError`` in the decoder;
- a body that its route's ``data`` type does not take *strictly* (``bodies.decode_body``:
  ``"60"`` is no integer, ``"true"`` no boolean): 400 naming the field. Litestar's own
  decoding of ``data`` is lax (``strict=False``), so every listener's bodies are decoded
  here first, the one strict path; handlers that take the raw body decode it with
  ``bodies.decode_body`` too;
- a NUL character in a path or query parameter: 400 naming the parameter;
- on ``GET``/``DELETE`` of the native API (``/api/v1``) and of the HyperSDK listener,
  a query parameter its route does not declare (``?vmname=`` for ``?vmName=``): 400
  naming it and the ones the route takes. A misspelled filter must never widen a
  listing (or what a script deletes next) to everything.

It also answers ``OPTIONS`` itself with every method of the path: Litestar's own answer
lists only the methods of the handler registered first when a path has several.
"""

from __future__ import annotations

import json
import re
from typing import Any

from litestar import Request, Response
from litestar.constants import RESERVED_KWARGS
from litestar.exceptions import HTTPException

from virtbackup.contracts.v1.common import shown
from virtbackup.gateway.bodies import decode_body
from virtbackup.gateway.errors import SNAKE_CASE, client_name
from virtbackup.runtime.errors import BadRequest

#: How deeply a JSON body may nest objects and arrays (the configuration needs 5).
MAX_JSON_DEPTH = 64

_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$", re.ASCII)
#: A JSON string literal (escapes included), matched without backtracking.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
#: Every byte but the four brackets, to be deleted.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")
#: An escaped NUL: ``\u0000`` after an even number of backslashes.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000", re.IGNORECASE)


class UnsupportedMediaType(HTTPException):
    """415: the request has a body that is not declared JSON."""

    status_code = 415


def is_json(content_type: str) -> bool:
    """Whether a ``Content-Type`` value names JSON (parameters such as charset ignored)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return bool(_JSON_TYPE.match(media))


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``body`` nests objects/arrays more than ``limit`` deep.

    Brackets inside strings do not count. Runs in C-speed passes (at most ``limit`` of
    them, each over the brackets only), so a 10 MB body costs milliseconds. A body that
    is not well-formed may be answered either way; the decoder refuses it next.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    opening = brackets.translate(bytes.maketrans(b"{}", b"[]"))
    run = b"[" * (limit + 1)
    # Each pass removes the innermost level; anything left after ``limit`` is deeper.
    for _ in range(limit):
        if run in opening:
            return True
        shorter = _INNERMOST.sub(b"", brackets)
        if shorter == brackets:  # nothing left, or not balanced: the decoder decides
            return False
        brackets = shorter
        opening = brackets.translate(bytes.maketrans(b"{}", b"[]"))
    return bool(brackets)


#: An escaped UTF-16 surrogate (``\\ud800``-``\\udfff``), paired or not.
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F]", re.IGNORECASE)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in order (duplicates kept)."""


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a string holds a NUL character"
    if _LONE_SURROGATE.search(text):
        return (
            "a string holds a lone UTF-16 surrogate (an escape such as \\ud800 that is not "
            "half of a pair), which is no character"
        )
    return None


def _shown_key(key: str) -> str:
    return _LONE_SURROGATE.sub("?", key).replace("\x00", "\\u0000")


def body_problem(value: Any, path: str = "$") -> tuple[str, str] | None:
    """The first problem (a NUL or a lone surrogate in a string or key, a key given
    twice) of a document decoded with ``_Pairs`` objects, and its JSON path."""
    if isinstance(value, str):
        problem = _string_problem(value)
        return (problem, path) if problem else None
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, item in value:
            where = f"{path}.{_shown_key(key)}"
            problem = _string_problem(key)
            if problem:
                return problem.replace("a string", "a key"), where
            if key in seen:
                return f"the key {shown(key)} is given twice in one object", where
            seen.add(key)
            found = body_problem(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = body_problem(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _has_duplicate(pairs: list[tuple[str, Any]]) -> bool:
    return len({key for key, _ in pairs}) != len(pairs)


def check_body(body: bytes) -> None:
    """Refuse a JSON body that is not UTF-8 or too deep, has a NUL or a lone surrogate in
    a string, or an object with a key given twice.

    Raises ``BadRequest`` (400) whose message names the byte or the JSON path. A body
    that is not JSON at all passes: the strict decoder (``bodies.decode_body``) says
    where it is malformed.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (at byte {exc.start})") from None
    if json_too_deep(body):
        raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    duplicate = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicate
        duplicate = duplicate or _has_duplicate(items)
        return {}  # only whether there is one matters in this pass

    suspicious = _NUL_ESCAPE.search(body) or _SURROGATE_ESCAPE.search(body)
    try:
        # The standard library's decoder sees what msgspec's hides: every key of an
        # object, and lone surrogates (msgspec refuses those as "truncated" input).
        json.loads(text, object_pairs_hook=pairs)
        if not (duplicate or suspicious):
            return
        found = body_problem(json.loads(text, object_pairs_hook=_Pairs))
    except (ValueError, RecursionError):
        return  # malformed: the strict decoder says where
    if found:
        problem, where = found
        raise BadRequest(f"{problem} - at `{where}`")


_PARAM_TYPE = re.compile(r"\{(\w+):[^}]*\}")


def _allowed_methods(request: Request[Any, Any, Any]) -> str:
    # The scope's template is written ``{name}``; the router's ``{name:type}``.
    template = request.scope.get("path_template", "")
    methods: set[str] = set()
    for path, handlers in request.app.route_handler_method_map.items():
        if _PARAM_TYPE.sub(r"{\1}", path) == template:
            methods.update(handlers)
    methods.discard("asgi")
    methods.add("OPTIONS")
    return ", ".join(sorted(methods))


#: Methods whose query parameters are checked against the route's declared ones.
_STRICT_QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE"})


def declared_query(request: Request[Any, Any, Any]) -> set[str] | None:
    """The query parameters the route of ``request`` declares, as the client writes
    them (``Parameter(query=...)`` aliases), or None when it takes any (``query``)."""
    handler = request.scope.get("route_handler")
    signature = getattr(handler, "parsed_fn_signature", None)
    if handler is None or signature is None:
        return None
    if "query" in signature.parameters:
        return None
    dependencies = set(handler.resolve_dependencies())
    names: set[str] = set()
    for name, field in signature.parameters.items():
        if name in RESERVED_KWARGS or name in dependencies or name in request.path_params:
            continue
        kwarg = getattr(field, "kwarg_definition", None)
        if getattr(kwarg, "header", None) or getattr(kwarg, "cookie", None):
            continue
        if type(kwarg).__name__ == "DependencyKwarg":
            continue
        names.add(getattr(kwarg, "query", None) or name)
    return names


def check_query_names(request: Request[Any, Any, Any]) -> None:
    """400 naming the first query parameter the route does not declare, or one given
    more than once (see the module docstring for where this applies)."""
    if request.method not in _STRICT_QUERY_METHODS or not request.query_params:
        return
    if not (request.url.path.startswith("/api/v1/") or request.app.state.get(SNAKE_CASE)):
        return
    allowed = declared_query(request)
    if allowed is None:
        return
    for name in request.query_params:
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) if allowed else "none"
            raise BadRequest(
                f"unknown query parameter {shown(name)} (this route takes: {takes}) - at `{name}`"
            )
        # No route takes a list: a second value would be dropped without a word (as a
        # duplicate key in a body is refused).
        if len(request.query_params.getall(name)) > 1:
            raise BadRequest(f"query parameter {shown(name)} is given more than once - at `{name}`")


async def check_request(request: Request[Any, Any, Any]) -> Response[None] | None:
    """The app-level ``before_request`` hook: see the module docstring.

    Returns the answer to ``OPTIONS``; raises ``UnsupportedMediaType`` (415) or
    ``BadRequest`` (400) for a request no handler may see; else returns None.
    """
    if request.method == "OPTIONS":
        return Response(None, status_code=204, headers={"Allow": _allowed_methods(request)})
    for kind, params in (("path", request.path_params), ("query", request.query_params)):
        for name, value in params.items():
            if isinstance(value, str) and "\x00" in value:
                where = client_name(request, name)
                raise BadRequest(f"a {kind} parameter holds a NUL character - at `{where}`")
    check_query_names(request)
    headers = request.headers
    declared = headers.get("content-length", "0").strip() not in ("", "0")
    if declared or "transfer-encoding" in headers:
        content_type = headers.get("content-type", "")
        if not is_json(content_type):
            got = content_type.split(";", 1)[0].strip() or "none"
            raise UnsupportedMediaType(
                detail=f"unsupported content type {shown(got)}: send the body as application/json"
            )
        body = await request.body()
        if body:
            check_body(body)
        strictly_decoded(request, body)
    return None


def strictly_decoded(request: Request[Any, Any, Any], body: bytes) -> None:
    """Decode ``body`` strictly as the route's ``data`` parameter (if it has one), so that
    Litestar's lax decoding that follows only ever sees a body the strict one took.

    Raises ``BadRequest`` (400) naming the field; a missing body is a 400 when ``data``
    is required (an optional ``data`` is ``None`` then).
    """
    handler = request.scope.get("route_handler")
    field = getattr(handler, "parsed_data_field", None)
    if field is None:
        return  # no data parameter: the handler reads the raw body (or none) itself
    if not body.strip():
        if not field.is_optional:
            raise BadRequest("request body must be a JSON object")
        return
    decode_body(body, field.annotation)
