"""Reply envelope and error codes shared by every command."""

from __future__ import annotations

from typing import Annotated, Final, Generic, Literal, TypeVar

import msgspec

T = TypeVar("T")

#: What a server id may be: what ``AgentConfig.servers[].id`` allows (the gateway
#: refuses anything else with a 400 naming the field, the services at their bus edge).
#: ``(?![\s\S])`` is the end of the string (``$`` would allow a final newline).
SERVER_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]+(?![\s\S])"
#: A libvirt domain name as a request may name one: no control character (a NUL would
#: reach libvirt's C API; libvirt itself refuses a newline) and no ``/`` (libvirt refuses
#: it in names). Anything else (spaces, ``%``, ``\``, any Unicode letter) is a valid name:
#: it is never used as a path as it is (the repository percent-encodes it, KV keys
#: base64url-encode it). A backup also refuses a name too long for a repository key
#: (over 200 characters once percent-encoded), before its job exists.
VM_NAME_PATTERN: Final = r"^[^\x00-\x1f\x7f/]+(?![\s\S])"
NAME_MAX_LENGTH: Final = 200

ServerId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=NAME_MAX_LENGTH, pattern=SERVER_ID_PATTERN)
]
VmName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=NAME_MAX_LENGTH, pattern=VM_NAME_PATTERN)
]

FaultCode = Literal["bad_request", "not_found", "conflict", "unavailable", "internal"]

BAD_REQUEST: Final = "bad_request"
NOT_FOUND: Final = "not_found"
CONFLICT: Final = "conflict"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"


class Message(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=False
):
    """Base of every bus message: frozen, keyword-only, camelCase on the wire."""


class Fault(Message, frozen=True, kw_only=True):
    """Why a command failed. ``code`` tells the caller whether a retry can help."""

    code: FaultCode
    message: str


class Reply(msgspec.Struct, Generic[T], frozen=True, kw_only=True, omit_defaults=True):
    """Every command's reply: exactly one of ``result`` and ``error`` is set."""

    result: T | None = None
    error: Fault | None = None


class Empty(Message, frozen=True, kw_only=True):
    """A command or reply without fields."""
