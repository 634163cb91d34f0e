"""A restore point's mutable sidecars, next to its ``backup.json``.

``backup.json`` is the commit marker and never changes once written; what may change
later about a point lives in small plaintext JSON objects beside it:

* ``vms/<vm>/<timestamp>/point.json``: ``{"protected": bool, "notes": str}``, set through
  the API (``PATCH /api/v1/restore-points/{id}``). A protected point is never pruned nor
  deleted.
* ``vms/<vm>/<timestamp>/verify.json``: the last verification's outcome
  (``{"state": "ok"|"damaged", "verifiedAt", "mode", "chunksChecked", "damagedChunks"}``),
  written by verify jobs.

Reading either returns the defaults when it is absent (a point made before sidecars
existed, or never changed): not protected, no notes, never verified. A sidecar that does
not decode reads as the defaults too (it holds no data a restore needs), except that a
``point.json`` that cannot be read is treated as protected by callers that delete
(:func:`read_point_meta` with ``strict=True`` raises instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Final

import msgspec

from virtbackup.repository.format import point_prefix
from virtbackup.repository.verification import (
    VERIFY_NAME,
    Verification,
    read_verification,
    verification_key,
)
from virtbackup.storage.errors import NotFoundError

if TYPE_CHECKING:
    from virtbackup.repository.repository import Repository

POINT_META_NAME: Final = "point.json"
#: The longest ``notes`` (characters).
NOTES_MAX_LENGTH: Final = 1024

Notes = Annotated[str, msgspec.Meta(max_length=NOTES_MAX_LENGTH)]


class PointMeta(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``point.json``: whether the point is protected, and the user's notes."""

    protected: bool = False
    notes: Notes = ""


def point_meta_key(vm: str, timestamp: str) -> str:
    """``vms/<vm>/<timestamp>/point.json`` (``ValueError`` as ``format.point_prefix``)."""
    return f"{point_prefix(vm, timestamp)}/{POINT_META_NAME}"


class SidecarError(Exception):
    """A sidecar exists but cannot be decoded."""


async def read_point_meta(
    repo: Repository, vm: str, timestamp: str, *, strict: bool = False
) -> PointMeta:
    """The point's ``point.json``, or the defaults when absent. A file that does not
    decode reads as the defaults, or raises ``SidecarError`` when ``strict``."""
    try:
        raw = await repo.driver.get(point_meta_key(vm, timestamp))
    except NotFoundError:
        return PointMeta()
    try:
        return msgspec.json.decode(raw, type=PointMeta)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        if strict:
            raise SidecarError(f"{point_meta_key(vm, timestamp)}: {exc}") from None
        return PointMeta()


async def write_point_meta(repo: Repository, vm: str, timestamp: str, meta: PointMeta) -> None:
    """Replace the point's ``point.json`` (atomically, as every driver's ``put``)."""
    await repo.driver.put(point_meta_key(vm, timestamp), msgspec.json.encode(meta))


#: ``verify.json``'s key (see :mod:`virtbackup.repository.verification`, its owner).
verify_key = verification_key

__all__ = [
    "NOTES_MAX_LENGTH",
    "POINT_META_NAME",
    "VERIFY_NAME",
    "PointMeta",
    "SidecarError",
    "Verification",
    "point_meta_key",
    "read_point_meta",
    "read_verification",
    "verify_key",
    "write_point_meta",
]
