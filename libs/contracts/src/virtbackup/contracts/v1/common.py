"""Reply envelope and error codes shared by every command."""

from __future__ import annotations

from typing import Final, Generic, Literal, TypeVar

import msgspec

T = TypeVar("T")

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
