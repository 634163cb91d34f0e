"""``verify.json``: the outcome of the last verification of a restore point.

``vms/<vm>/<timestamp>/verify.json`` is a plaintext sidecar beside ``backup.json``
(never inside it: ``backup.json`` is the commit marker). It names only chunk ids, which
``backup.json`` names as well, so it needs no key. Shape (camelCase)::

    {"state": "ok" | "damaged", "verifiedAt": "2026-01-30T12:00:00Z",
     "mode": "full" | "sample", "chunksChecked": 412, "damagedChunks": ["9af1...", ...]}

Reading a point that was never verified (no file, or a file that does not decode)
returns the defaults: ``state`` and ``verifiedAt`` ``None``, no chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

import msgspec

from virtbackup.repository.format import point_prefix
from virtbackup.storage.errors import NotFoundError

if TYPE_CHECKING:
    from virtbackup.repository.repository import Repository

VERIFY_NAME: Final = "verify.json"

VerifyState = Literal["ok", "damaged"]
VerifyMode = Literal["full", "sample"]


class Verification(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The last verification of one restore point (defaults: never verified)."""

    state: VerifyState | None = None
    verified_at: str | None = None
    mode: VerifyMode | None = None
    chunks_checked: int = 0
    damaged_chunks: list[str] = msgspec.field(default_factory=list)


def verification_key(vm: str, timestamp: str) -> str:
    """``vms/<segment>/<timestamp>/verify.json`` (``ValueError`` for a bad name or time)."""
    return f"{point_prefix(vm, timestamp)}/{VERIFY_NAME}"


async def read_verification(repo: Repository, vm: str, timestamp: str) -> Verification:
    """The point's ``verify.json``, or the defaults when it has none (or an unreadable
    one). Storage errors other than a missing object propagate."""
    try:
        raw = await repo.driver.get(verification_key(vm, timestamp))
    except NotFoundError:
        return Verification()
    try:
        return msgspec.json.decode(raw, type=Verification)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Verification()


async def write_verification(
    repo: Repository, vm: str, timestamp: str, verification: Verification
) -> None:
    """Store the point's ``verify.json`` (replacing the previous one; one atomic put)."""
    await repo.driver.put(verification_key(vm, timestamp), msgspec.json.encode(verification))
