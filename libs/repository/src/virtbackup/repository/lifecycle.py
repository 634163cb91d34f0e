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

from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec

from virtbackup.repository.format import point_prefix
from virtbackup.storage.errors import NotFoundError

if TYPE_CHECKING:
    from virtbackup.repository.repository import Repository

POINT_META_NAME: Final = "point.json"
VERIFY_NAME: Final = "verify.json"
#: The longest ``notes`` (characters).
NOTES_MAX_LENGTH: Final = 1024

Notes = Annotated[str, msgspec.Meta(max_length=NOTES_MAX_LENGTH)]


class PointMeta(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``point.json``: whether the point is protected, and the user's notes."""

    protected: bool = False
    notes: Notes = ""


class Verification(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """``verify.json``: the last verification of a point. ``state`` is ``None`` (and
    every other field empty) when the point was never verified."""

    state: Literal["ok", "damaged"] | None = None
    verified_at: str | None = None
    mode: str | None = None
    chunks_checked: int = 0
    damaged_chunks: list[str] = msgspec.field(default_factory=list)


def point_meta_key(vm: str, timestamp: str) -> str:
    """``vms/<vm>/<timestamp>/point.json`` (``ValueError`` as ``format.point_prefix``)."""
    return f"{point_prefix(vm, timestamp)}/{POINT_META_NAME}"


def verify_key(vm: str, timestamp: str) -> str:
    """``vms/<vm>/<timestamp>/verify.json`` (``ValueError`` as ``format.point_prefix``)."""
    return f"{point_prefix(vm, timestamp)}/{VERIFY_NAME}"


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


async def read_verification(repo: Repository, vm: str, timestamp: str) -> Verification:
    """The point's ``verify.json``, or the defaults (never verified) when it is absent or
    does not decode."""
    try:
        raw = await repo.driver.get(verify_key(vm, timestamp))
    except NotFoundError:
        return Verification()
    try:
        return msgspec.json.decode(raw, type=Verification)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Verification()
