"""Reply envelope and error codes shared by every command."""

from __future__ import annotations

from typing import Annotated, Final, Generic, Literal, TypeVar

import msgspec

from virtbackup.contracts.v1.readable import described

T = TypeVar("T")

#: What a server id may be: what ``AgentConfig.servers[].id`` allows (the gateway
#: refuses anything else with a 400 naming the field, the services at their bus edge).
#: ``(?![\s\S])`` is the end of the string (``$`` would allow a final newline).
SERVER_ID_PATTERN: Final = described(
    r"^[A-Za-z0-9_.:-]+(?![\s\S])", "a server id (letters, digits, '_', '.', ':' and '-')"
)
#: A libvirt domain name as a request may name one: no control character (a NUL would
#: reach libvirt's C API; libvirt itself refuses a newline) and no ``/`` (libvirt refuses
#: it in names). Anything else (spaces, ``%``, ``\``, any Unicode letter) is a valid name:
#: it is never used as a path as it is (the repository percent-encodes it, hashing a long
#: one; KV keys base64url-encode it).
VM_NAME_PATTERN: Final = described(
    r"^[^\x00-\x1f\x7f/]+(?![\s\S])", "a VM name (1 to 247 characters, no control character or '/')"
)
#: The longest server id (and other short identifiers).
NAME_MAX_LENGTH: Final = 200
#: The longest domain name libvirt's QEMU driver accepts, in bytes of UTF-8: libvirt
#: itself sets no limit, but it keeps a persistent domain's definition in
#: ``<name>.xml`` (written as ``<name>.xml.new`` first, in ``/etc/libvirt/qemu``), so a
#: longer name exceeds NAME_MAX (255 bytes) and ``virsh define`` fails ("File name too
#: long"). A name of 247 ASCII characters is accepted, one of 248 is not.
VM_NAME_MAX_BYTES: Final = 247
#: ``VmName``'s limit in characters (msgspec counts characters): no name of more can be
#: a domain's. A name within it but over :data:`VM_NAME_MAX_BYTES` in UTF-8 is a name no
#: domain has (404), or refused where a new domain would get it (``vm_name_fits``).
VM_NAME_MAX_LENGTH: Final = VM_NAME_MAX_BYTES

ServerId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=NAME_MAX_LENGTH, pattern=SERVER_ID_PATTERN)
]
VmName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=VM_NAME_MAX_LENGTH, pattern=VM_NAME_PATTERN)
]


def vm_name_fits(name: str) -> bool:
    """Whether libvirt can define a domain named ``name`` (its UTF-8 is at most
    :data:`VM_NAME_MAX_BYTES` bytes)."""
    return len(name.encode("utf-8", "surrogatepass")) <= VM_NAME_MAX_BYTES


#: How many characters of a client's value an error message quotes (``shown``).
ECHO_LIMIT: Final = 200


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``value`` as an error message quotes what a client sent: ``repr`` of at most
    ``limit`` characters of it, then ``...`` (and how long it was) when it is longer, so
    that an error never echoes a client's value at any length (a 500 KB ``xmlPath``
    must not make a 500 KB answer)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


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
