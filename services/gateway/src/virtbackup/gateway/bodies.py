"""The base of every JSON request body the gateway decodes (both listeners).

A body names exactly the fields its API document gives it: an unknown or mistyped field
(``vmname`` for ``vmName``, ``target_directory`` for ``targetDirectory``) is a 400 naming
the field, never silently ignored, so that a typo cannot turn a restore under a new name
into one over the original VM, or send a backup to the default destination. The
configuration (``POST /config``) is strict the same way (``contracts.v1.config.Strict``).

Every body is decoded *strictly* (``decode_body``): ``"60"`` is no integer and ``"true"``
no boolean, on every listener. ``edge.check_request`` decodes each route's ``data``
parameter this way before Litestar's own (lax) decoding runs; handlers that read the raw
body call ``decode_body`` themselves.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, TypeVar

import msgspec
from litestar import Request

from virtbackup.contracts.v1.readable import described
from virtbackup.gateway.errors import readable
from virtbackup.runtime.errors import BadRequest

T = TypeVar("T")
_AT = re.compile(r" - at `[^`]*`$")


#: One line of text, at least one character: declared in words, so that a refusal says
#: what the field expects instead of quoting the regex (``contracts.v1.readable``).
ONE_LINE: Final = described(
    r"^[^\x00-\x1f\x7f]+$", "one line of text (at least one character, no control character)"
)
#: A name or label sent by an agent: one line, 1 to 253 characters.
LineText = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=ONE_LINE)]


class Body(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """A camelCase request body: unknown fields are refused (400 naming the field)."""


class SnakeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A snake_case request body (the HyperSDK API): unknown fields are refused."""


class NoBody(Body, kw_only=True):
    """The body of a route that takes none: absent, or ``{}`` (the agent API documents
    ``{}`` for some); any field is refused."""


def located(message: str) -> str:
    """A msgspec validation message, ending ``- at `$...``` (``$`` for the whole body)
    as every message about a body's field does."""
    return message if _AT.search(message) else f"{message} - at `$`"


def decode_body(raw: bytes, kind: type[T]) -> T:
    """``raw`` (JSON) decoded strictly as ``kind`` (no string-to-number or -boolean
    coercion). Raises ``BadRequest`` (400): ``invalid request: <what> - at `$.field```
    (the field as the client named it), or ``malformed JSON: ...``."""
    try:
        return msgspec.json.decode(raw, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        raise BadRequest(readable(f"invalid request: {located(str(exc))}")) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


B = TypeVar("B", bound=msgspec.Struct)


async def strict_body(request: Request[Any, Any, Any], kind: type[B], *, optional: bool) -> B:
    """The request's JSON body decoded strictly as ``kind`` (``decode_body``); an absent
    body is ``kind()`` when ``optional``, else a 400."""
    raw = await request.body()
    if not raw.strip():
        if optional:
            return kind()
        raise BadRequest("request body must be a JSON object")
    return decode_body(raw, kind)
