"""``repository.json`` and the object layout.

Keys (relative to the destination's ``VirtBackup`` folder)::

    repository.json                              this file
    chunks/<first two hex>/<id>                  one chunk blob, immutable
    vms/<vm>/<timestamp>/domain.xml              the domain XML at backup time (a blob)
    vms/<vm>/<timestamp>/<target>.manifest       one manifest blob per disk
    vms/<vm>/<timestamp>/backup.json             the restore point record, written last
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

FORMAT_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 4 << 20
CONFIG_KEY: Final = "repository.json"
CHUNKS_PREFIX: Final = "chunks/"
POINTS_PREFIX: Final = "vms/"

_ID = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{1,6})?$")


class KdfParams(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    name: Literal["scrypt"] = "scrypt"
    salt: str
    n: int
    r: int
    p: int


class Encryption(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    cipher: str
    kdf: KdfParams
    wrapped_key: str


class RepositoryConfig(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    format: int = FORMAT_VERSION
    id: str
    created_at: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    hash: Literal["blake3", "blake3-keyed"] = "blake3"
    compression: Literal["zstd"] = "zstd"
    encryption: Encryption | None = None


def check_id(chunk_id: str) -> str:
    if not _ID.match(chunk_id):
        raise ValueError(f"not a chunk id: {chunk_id!r}")
    return chunk_id


def chunk_key(chunk_id: str) -> str:
    check_id(chunk_id)
    return f"{CHUNKS_PREFIX}{chunk_id[:2]}/{chunk_id}"


def check_name(kind: str, value: str) -> str:
    """VM names and disk targets become path segments: only safe characters."""
    if not _NAME.match(value) or value in {".", ".."}:
        raise ValueError(f"invalid {kind} {value!r}")
    return value


def check_timestamp(value: str) -> str:
    if not _TIMESTAMP.match(value):
        raise ValueError(f"invalid timestamp {value!r} (expected YYYY-MM-DDTHH-MM-SS)")
    return value


def vm_prefix(vm: str) -> str:
    """``vms/<vm>/``: the prefix of every key of ``vm``'s restore points."""
    return f"{POINTS_PREFIX}{check_name('vm name', vm)}/"


def point_prefix(vm: str, timestamp: str) -> str:
    return f"{vm_prefix(vm)}{check_timestamp(timestamp)}"


def xml_path(vm: str, timestamp: str) -> str:
    """``vms/<vm>/<timestamp>/domain.xml``: the key of a point's domain XML, which is also
    the agent API's ``xmlPath`` naming the point (``parse_xml_key`` is the inverse).

    ``ValueError`` for a VM name or timestamp that is not a safe path segment.
    """
    return f"{point_prefix(vm, timestamp)}/domain.xml"


def manifest_key(vm: str, timestamp: str, target: str) -> str:
    """``vms/<vm>/<timestamp>/<target>.manifest``: the key of one disk's manifest.

    ``ValueError`` for a name, timestamp or target that is not a safe path segment.
    """
    return f"{point_prefix(vm, timestamp)}/{check_name('disk target', target)}.manifest"


def record_key(vm: str, timestamp: str) -> str:
    return f"{point_prefix(vm, timestamp)}/backup.json"


def parse_xml_key(xml_path: str) -> tuple[str, str]:
    """``vms/<vm>/<timestamp>/domain.xml`` -> (vm, timestamp); ``ValueError`` otherwise.

    This is how a request's ``xmlPath`` is confined to the repository: anything that is
    not exactly such a key (``..``, absolute paths, other files) is refused.
    """
    parts = xml_path.split("/")
    if len(parts) != 4 or parts[0] != "vms" or parts[3] != "domain.xml":
        raise ValueError(f"xmlPath {xml_path!r} is not a restore point of this destination")
    vm, timestamp = parts[1], parts[2]
    check_name("vm name", vm)
    check_timestamp(timestamp)
    return vm, timestamp
