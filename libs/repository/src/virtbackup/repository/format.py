"""``repository.json`` and the object layout.

Keys (relative to the destination's ``VirtBackup`` folder)::

    repository.json                              this file
    chunks/<first two hex>/<id>                  one chunk blob, immutable
    vms/<vm>/<timestamp>/domain.xml              the domain XML at backup time (a blob)
    vms/<vm>/<timestamp>/<target>.manifest       one manifest blob per disk
    vms/<vm>/<timestamp>/backup.json             the restore point record, written last

``<vm>`` is the VM's name encoded by ``vm_segment``: any name libvirt accepts becomes one
safe, ASCII-only path segment, and a name made only of letters, digits and ``_ . + -``
(starting with a letter or digit) is its own segment, as it was before names were
encoded. A name whose encoding is longer than a segment may be gets a *hashed* segment
(a prefix of the encoding, ``~`` and a hash of the name). The real name is ``vmName`` in
``backup.json``; ``parse_vm_segment`` recovers it from a segment that is not hashed.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Annotated, Final, Literal
from urllib.parse import unquote_to_bytes

import msgspec

from virtbackup.storage.keys import MAX_SEGMENT_BYTES

#: The newest repository format this code reads and writes, and that of new
#: repositories. Format 1 stores a chunk as one zstd frame (or as it is); format 2 as one
#: record per 256 KiB (``codec.FRAMED``), which format-1 readers would take for damaged. A
#: reader refuses a format above this one (``Repository.open``).
FORMAT_VERSION: Final = 2
#: The oldest format this code still reads and writes (as it is: chunks in one frame).
MIN_FORMAT_VERSION: Final = 1
#: The first format whose chunks are framed (``codec.compress_framed``).
FRAMED_FORMAT: Final = 2
#: Bytes of disk per chunk in a new repository (``chunkSize``, fixed at creation). 2 MiB:
#: on the benchmark (``bench/README.md``, "Chunk sizes") it reads and compresses less
#: than 4 MiB for scattered guest writes (incrementals 1.1-1.2x faster) and stores 7%
#: less over a full backup and its incrementals, at the same full-backup and restore
#: speed, for twice the objects per GB.
DEFAULT_CHUNK_SIZE: Final = 2 << 20
#: The chunk size of a ``repository.json`` that does not name one: every repository was
#: made with 4 MiB before the default changed, so one without the field is read as that,
#: never as whatever the default is now.
LEGACY_CHUNK_SIZE: Final = 4 << 20
#: The chunk sizes a repository may have: a power of two from 64 KiB to 64 MiB. The
#: chunk size is also the decoder's output bound, and the planner and the inventory's
#: extent maps divide by it: 0, a negative or an odd size would fail later or store
#: nothing (a negative one made ``store_bytes`` return no chunks, "successfully").
MIN_CHUNK_SIZE: Final = 64 << 10
MAX_CHUNK_SIZE: Final = 64 << 20


def check_chunk_size(size: int) -> int:
    """``size`` if it is a power of two from MIN_CHUNK_SIZE to MAX_CHUNK_SIZE, else
    ``ValueError`` naming ``chunkSize``."""
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or size & (size - 1):
        raise ValueError(
            f"chunkSize {size}: a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes"
        )
    return size


#: zstd level of a new repository's chunks (``compressionLevel``). Level 1 is the only
#: one whose stored bytes stay within the peer's (``virtnbdbackup -z``) on the benchmark's
#: full + incremental backups; faster (negative) levels save up to a quarter of the
#: compression CPU for 5-14% more bytes (``bench/README.md``, "Compression").
DEFAULT_COMPRESSION_LEVEL: Final = 1
#: The zstd levels a repository may choose: zstd's fast levels (-7 to -1) and 1 to 19
#: (0 is zstd's default, level 3; above 19 needs far more memory to compress).
MIN_COMPRESSION_LEVEL: Final = -7
MAX_COMPRESSION_LEVEL: Final = 19
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
#: A longer encoding is cut to at most this many characters (whole characters of the
#: name), then ``~`` and :data:`HASH_DIGITS` hex digits of the SHA-256 of the name's
#: UTF-8 bytes follow: 197 characters at most.
HASHED_PREFIX: Final = 180
HASH_DIGITS: Final = 16
#: A hashed segment: ``~`` is never part of an encoding (a ``~`` in a name is ``%7E``).
_HASHED = re.compile(r"^((?:[A-Za-z0-9_.+-]|%[0-9A-F]{2})+)~([0-9a-f]{16})(?![\s\S])")
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
    chunk_size: int = LEGACY_CHUNK_SIZE
    hash: Literal["blake3", "blake3-keyed"] = "blake3"
    compression: Literal["zstd"] = "zstd"
    #: The zstd level chunks and objects are compressed with (fixed at creation, like
    #: ``chunk_size``; absent in repositories made before it existed: level 1). Readers
    #: need not know it: every blob is a zstd frame whatever its level.
    compression_level: Annotated[
        int, msgspec.Meta(ge=MIN_COMPRESSION_LEVEL, le=MAX_COMPRESSION_LEVEL)
    ] = DEFAULT_COMPRESSION_LEVEL
    encryption: Encryption | None = None

    def __post_init__(self) -> None:
        # msgspec turns this ValueError into a ValidationError when decoding.
        check_chunk_size(self.chunk_size)


def check_id(chunk_id: str) -> str:
    if not _ID.match(chunk_id):
        raise ValueError(f"not a chunk id: {chunk_id!r}")
    return chunk_id


def chunk_key(chunk_id: str) -> str:
    check_id(chunk_id)
    return f"{CHUNKS_PREFIX}{chunk_id[:2]}/{chunk_id}"


#: Suffix of a quarantined chunk's key (``chunks/ab/<id>.bad``).
QUARANTINE_SUFFIX: Final = ".bad"


def quarantine_key(chunk_id: str) -> str:
    """``chunks/<id[:2]>/<id>.bad``: where verify moves a chunk it proved damaged."""
    return chunk_key(chunk_id) + QUARANTINE_SUFFIX


def quarantined_id(name: str) -> str | None:
    """The chunk id of a quarantined object's last key segment (``<id>.bad``), else None."""
    if not name.endswith(QUARANTINE_SUFFIX):
        return None
    chunk_id = name[: -len(QUARANTINE_SUFFIX)]
    return chunk_id if _ID.match(chunk_id) else None


def check_name(kind: str, value: str) -> str:
    """Disk targets (``vda``, ``sdb``...) are path segments as they are: only letters,
    digits and ``_ . + -``, starting with a letter or digit. ``ValueError`` otherwise."""
    if not _NAME.match(value) or value in {".", ".."}:
        raise ValueError(f"invalid {kind} {value!r}")
    return value


def _encoded(name: str) -> list[str]:
    """Each character of ``name`` as it is written in a segment (see ``vm_segment``)."""
    return [
        char
        if char in _SAFE_FIRST or (index and char in _SAFE)
        else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        for index, char in enumerate(name)
    ]


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

    An encoding longer than ``MAX_VM_SEGMENT`` (200) characters (a name of more than 200
    safe characters, 34 letters of two bytes such as ``ü``, 23 of three such as ``日``)
    is *hashed*: the encoding of the name's first characters, at most ``HASHED_PREFIX``
    (180) characters of it, then ``~`` and the first ``HASH_DIGITS`` (16) hex digits of
    the SHA-256 of the whole name in UTF-8 (e.g. ``xxx...x~3f2c9a0b1d4e5f60``). The name
    is then only in ``backup.json``: the repository checks that a record's ``vmName``
    has the segment it was found under. Names that fit keep their segments.

    Names differing only in the case of ASCII letters (``Web1``, ``web1``) have segments
    differing the same way, which a case-insensitive destination stores in one folder;
    the repository tells their points apart by ``vmName`` in ``backup.json``.

    ``ValueError`` for an empty name or one that is not encodable as UTF-8 (a lone
    surrogate).
    """
    if not name:
        raise ValueError("invalid vm name: empty")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("invalid vm name: not valid Unicode text") from None
    parts = _encoded(name)
    segment = "".join(parts)
    if len(segment) <= MAX_VM_SEGMENT:
        return segment
    prefix, size = [], 0
    for part in parts:
        if size + len(part) > HASHED_PREFIX:
            break
        prefix.append(part)
        size += len(part)
    digest = hashlib.sha256(raw).hexdigest()[:HASH_DIGITS]
    return f"{''.join(prefix)}~{digest}"


def parse_vm_segment(segment: str) -> str | None:
    """The VM name whose ``vm_segment`` is ``segment``; ``None`` for a hashed segment (a
    long name's: the name is only in the points' ``backup.json``).

    ``ValueError`` for anything ``vm_segment`` never makes: other characters, a ``%``
    without two upper-case hex digits, bytes that are not UTF-8, a non-canonical form
    (``%41`` for ``A``, ``%2e`` for ``.``), so that one name has exactly one segment, or
    a hashed segment whose prefix is not the canonical encoding of up to
    ``HASHED_PREFIX`` characters. The message does not quote the segment.
    """
    hashed = _HASHED.match(segment)
    encoded = hashed.group(1) if hashed else segment
    if not _SEGMENT.match(encoded):
        raise ValueError("invalid vm name segment: not an encoded VM name")
    try:
        name = unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("invalid vm name segment: not UTF-8 once decoded") from None
    canonical = "".join(_encoded(name))
    if canonical != encoded:
        raise ValueError("invalid vm name segment: not the canonical encoding of a name")
    if hashed:
        if len(encoded) > HASHED_PREFIX:
            raise ValueError("invalid vm name segment: hashed with too long a prefix")
        return None
    if len(segment) > MAX_VM_SEGMENT:
        raise ValueError("invalid vm name segment: too long (a long name's segment is hashed)")
    return name


def check_vm_segment(segment: str) -> str:
    """``segment`` if ``vm_segment`` could have made it (see ``parse_vm_segment``), else
    ``ValueError``."""
    parse_vm_segment(segment)
    return segment


def check_timestamp(value: str) -> str:
    if not _TIMESTAMP.match(value):
        raise ValueError(f"invalid timestamp {value!r} (expected YYYY-MM-DDTHH-MM-SS)")
    return value


def segment_record_key(segment: str, timestamp: str) -> str:
    """``vms/<segment>/<timestamp>/backup.json`` for a checked segment (``parse_xml_key``)."""
    return f"{POINTS_PREFIX}{check_vm_segment(segment)}/{check_timestamp(timestamp)}/backup.json"


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
    """``vms/<segment>/<timestamp>/domain.xml`` -> (segment, timestamp), the segment one
    ``vm_segment`` could have made (``parse_vm_segment`` decodes it, unless it is hashed:
    the VM's name is then in the point's ``backup.json``); ``ValueError`` otherwise.

    This is how a request's ``xmlPath`` is confined to the repository: anything that is
    not exactly such a key (``..``, absolute paths, other files, a segment that is not
    the canonical encoding of a name) is refused. Messages do not quote ``xml_path``
    (the caller quotes as much of it as it wants to show).
    """
    parts = xml_path.split("/")
    if len(parts) != 4 or parts[0] != "vms" or parts[3] != "domain.xml":
        raise ValueError(
            "not the key of a restore point's domain XML (vms/<vm>/<timestamp>/domain.xml)"
        )
    segment = check_vm_segment(parts[1])
    try:
        timestamp = check_timestamp(parts[2])
    except ValueError:
        raise ValueError("invalid timestamp (expected YYYY-MM-DDTHH-MM-SS)") from None
    return segment, timestamp
