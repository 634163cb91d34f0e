"""Destination driver descriptions, as ``GET /drivers`` shows them."""

from __future__ import annotations

import msgspec

from virtbackup.contracts.v1.common import Message


class DriverParam(Message, frozen=True, kw_only=True):
    """One configuration parameter of a driver (a key of a destination's ``params``)."""

    name: str
    type: str
    required: bool = False
    secret: bool = False
    default: str | int | bool | None = None
    description: str = ""


class Capabilities(Message, frozen=True, kw_only=True):
    supports_range_read: bool
    supports_batch_delete: bool
    supports_multipart_upload: bool
    supports_server_side_copy: bool
    supports_conditional_write: bool
    supports_versioning: bool
    max_concurrent_writes: int
    params: list[DriverParam] = msgspec.field(default_factory=list)


class DriverInfo(Message, frozen=True, kw_only=True):
    id: str
    label: str
    uses_path: bool
    capabilities: Capabilities
