"""``repository.json`` and the object layout.

Keys (relative to the destination's ``VirtBackup`` folder)::

    repository.json                              this file
    chunks/<first two hex>/<id>                  one chunk blob, immutable
    vms/<vm>/<timestamp>/domain.xml              the domain XML at backup time (a blob)
    vms/<vm>/<timestamp>/<target>.manifest       one manifest blob per disk
    vms/<vm>/<timestamp>/backup.json             the restore point record, written last

``<vm>`` is the VM's name encoded by ``vm_segment`` (``parse_vm_segment`` is the
inverse): any name libvirt accepts becomes one safe, ASCII-only path segment, and a name
made only of letters, digits and ``_ . + -`` (starting with a letter or digit) is its own
segment, as it was before names were encoded. The real name is ``vmName`` in
``backup.json``.
"""

from __future__ import annotations

import re
import string
from typing import Final, Literal
from urllib.parse import unquote_to_bytes

import msgspec

from virtbackup.storage.keys import MAX_SEGMENT_BYTES

FORMAT_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 4 << 20
CONFIG_KEY: Final = "repository.json"
CHUNKS_PREFIX: Final = "chunks/"
POINTS_PREFIX: Final = "vms/"

_ID = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")
#: Characters a VM name keeps in its segment (``_SAFE_FIRST`` only as the first one).
_SAFE_FIRST: Final = frozenset(string.ascii_letters + string.digits)
_SAFE: Final = _SAFE_FIRST | frozenset("_.+-")
#: What an encoded segment may look like (``parse_vm_segment`` also checks it is canonical).
_SEGMENT = re.compile(r"^(?:[A-Za-z0-9_.+-]|%[0-9A-F]{2})+(?![\s\S])")
#: The longest encoded VM name: the storage drivers' segment limit, which is within
#: NAME_MAX (255 bytes) of every file system a destination may sit on.
MAX_VM_SEGMENT: Final = MAX_SEGMENT_BYTES
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
    """Disk targets (``vda``, ``sdb``...) are path segments as they are: only letters,
    digits and ``_ . + -``, starting with a letter or digit. ``ValueError`` otherwise."""
    if not _NAME.match(value) or value in {".", ".."}:
        raise ValueError(f"invalid {kind} {value!r}")
    return value


def vm_segment(name: str) -> str:
    """The path segment of VM ``name`` in the repository's keys (``vms/<segment>/``).

    Letters and digits stay as they are, and so do ``_ . + -`` except as the first
    character; every other character (space, ``%``, ``/``, ``\\``, NUL, non-ASCII...)
    becomes ``%XX`` for each byte of its UTF-8 encoding, hex digits upper case. So:

    * a name that was already a safe segment keeps its key (repositories written before
      names were encoded read as they are; sealed objects use their key as associated
      data, so it must not change);
    * a segment is never ``.``, ``..``, empty, hidden (``.x``) or an option (``-x``), and
      holds only ASCII: no Unicode normalisation (macOS, some SMB servers) can change it;
    * the encoding is one-to-one and ``parse_vm_segment`` recovers the name exactly.

    Names differing only in the case of ASCII letters (``Web1``, ``web1``) have segments
    differing the same way, which a case-insensitive destination stores in one folder;
    the repository tells their points apart by ``vmName`` in ``backup.json``.

    ``ValueError`` (naming the VM name) for an empty name, one that is not encodable as
    UTF-8 (a lone surrogate), or one whose segment is longer than ``MAX_VM_SEGMENT``
    characters (200: 200 safe characters, 33 letters of two bytes such as ``ü``, 22 of three).
    """
    if not name:
        raise ValueError("invalid vm name: empty")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"invalid vm name {name!r}: not valid Unicode text") from None
    segment = "".join(
        char
        if char in _SAFE_FIRST or (index and char in _SAFE)
        else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        for index, char in enumerate(name)
    )
    if len(segment) > MAX_VM_SEGMENT:
        raise ValueError(
            f"invalid vm name {name!r}: too long for a repository key ({len(segment)} "
            f"characters once encoded, at most {MAX_VM_SEGMENT}: each byte of a character "
            "other than a letter, digit or _ . + - takes three)"
        )
    return segment


def parse_vm_segment(segment: str) -> str:
    """The VM name whose ``vm_segment`` is ``segment``.

    ``ValueError`` for anything ``vm_segment`` never makes: other characters, a ``%``
    without two upper-case hex digits, bytes that are not UTF-8, or a non-canonical form
    (``%41`` for ``A``, ``%2e`` for ``.``), so that one name has exactly one segment.
    """
    if not _SEGMENT.match(segment):
        raise ValueError(f"invalid vm name segment {segment!r}")
    try:
        name = unquote_to_bytes(segment).decode("utf-8")
        canonical = vm_segment(name)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"invalid vm name segment {segment!r}") from None
    if canonical != segment:
        raise ValueError(f"invalid vm name segment {segment!r} (not canonical: {canonical!r})")
    return name


def check_timestamp(value: str) -> str:
    if not _TIMESTAMP.match(value):
        raise ValueError(f"invalid timestamp {value!r} (expected YYYY-MM-DDTHH-MM-SS)")
    return value


def vm_prefix(vm: str) -> str:
    """``vms/<segment>/``: the prefix of every key of ``vm``'s restore points
    (``ValueError`` for a name ``vm_segment`` refuses)."""
    return f"{POINTS_PREFIX}{vm_segment(vm)}/"


def point_prefix(vm: str, timestamp: str) -> str:
    return f"{vm_prefix(vm)}{check_timestamp(timestamp)}"


def xml_path(vm: str, timestamp: str) -> str:
    """``vms/<segment>/<timestamp>/domain.xml``: the key of a point's domain XML, which is
    also the agent API's ``xmlPath`` naming the point (``parse_xml_key`` is the inverse).

    ``ValueError`` for a VM name ``vm_segment`` refuses or a malformed timestamp.
    """
    return f"{point_prefix(vm, timestamp)}/domain.xml"


def manifest_key(vm: str, timestamp: str, target: str) -> str:
    """``vms/<segment>/<timestamp>/<target>.manifest``: the key of one disk's manifest.

    ``ValueError`` for a VM name ``vm_segment`` refuses, a malformed timestamp, or a
    target that is not a safe path segment.
    """
    return f"{point_prefix(vm, timestamp)}/{check_name('disk target', target)}.manifest"


def record_key(vm: str, timestamp: str) -> str:
    return f"{point_prefix(vm, timestamp)}/backup.json"


def parse_xml_key(xml_path: str) -> tuple[str, str]:
    """``vms/<segment>/<timestamp>/domain.xml`` -> (VM name, timestamp), the name decoded
    (``parse_vm_segment``); ``ValueError`` otherwise.

    This is how a request's ``xmlPath`` is confined to the repository: anything that is
    not exactly such a key (``..``, absolute paths, other files, a segment that is not
    the canonical encoding of a name) is refused.
    """
    parts = xml_path.split("/")
    if len(parts) != 4 or parts[0] != "vms" or parts[3] != "domain.xml":
        raise ValueError(f"xmlPath {xml_path!r} is not a restore point of this destination")
    vm = parse_vm_segment(parts[1])
    timestamp = check_timestamp(parts[2])
    return vm, timestamp
