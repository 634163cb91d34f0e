"""VM names in repository keys: any name is one safe, reversible path segment; names that
were safe before keep their keys, so repositories written before still read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from virtbackup.repository.format import (
    HASHED_PREFIX,
    MAX_VM_SEGMENT,
    manifest_key,
    parse_vm_segment,
    parse_xml_key,
    record_key,
    vm_segment,
    xml_path,
)
from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.storage.errors import NotFoundError
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.storage.keys import validate_key
from virtbackup.testing.fixtures import driver_case

TS = "2026-01-30T12-00-00"
LEGACY = Path(__file__).parent / "data" / "legacy-v1"

HOSTILE = [
    "..",
    ".",
    "a/b",
    "../../etc",
    "%41",
    "%2E%2E",
    "-rf",
    ".vbtmp-x",
    "fc-with space",
    "fc-ü",
    "fc-Ü",
    "fc-u\u0308",  # ü decomposed: another name, another segment
    "Web1",
    "web1",
    "back\\slash",
    "nul\x00byte",
    "tab\tname",
    " lead",
    "trail ",
    "日本語",
    "CON",
    "x" * MAX_VM_SEGMENT,
    "ü" * 33,
]
#: Names libvirt accepts whose encoding is longer than a segment: hashed segments.
LONG = [
    "x" * (MAX_VM_SEGMENT + 1),
    "x" * 240,
    "X" * 240,
    "x" * 239 + "y",
    "fc-" + "ü" * 34,
    "日" * 24,
    "日" * 82,
    "a" * 179 + "日" * 10,
    "a b" * 80,
    "~" * 70,
]


@pytest.mark.parametrize("name", HOSTILE)
def test_any_name_is_one_safe_reversible_segment(name: str) -> None:
    segment = vm_segment(name)
    assert parse_vm_segment(segment) == name
    assert segment.isascii() and segment.isprintable()
    assert "/" not in segment and "\\" not in segment
    assert segment not in {".", ".."} and segment[0] not in ".-"
    assert len(segment) <= MAX_VM_SEGMENT
    # Every key of the point is a valid driver key inside vms/<segment>/.
    for key in (xml_path(name, TS), manifest_key(name, TS, "vda"), record_key(name, TS)):
        assert validate_key(key).split("/")[:2] == ["vms", segment]
    assert parse_xml_key(xml_path(name, TS)) == (segment, TS)


@pytest.mark.parametrize("name", LONG)
def test_a_long_name_has_a_hashed_segment(name: str) -> None:
    segment = vm_segment(name)
    prefix, _, digest = segment.rpartition("~")
    assert len(segment) <= MAX_VM_SEGMENT and len(prefix) <= HASHED_PREFIX
    assert segment.isascii() and segment.isprintable() and segment[0] not in ".-"
    assert len(digest) == 16 and digest == digest.lower()
    # The prefix is the encoding of the name's first whole characters.
    decoded = parse_vm_segment(prefix)
    assert decoded is not None and name.startswith(decoded)
    assert parse_vm_segment(segment) is None  # the name is only in backup.json
    assert vm_segment(name) == segment  # stable
    for key in (xml_path(name, TS), manifest_key(name, TS, "vda"), record_key(name, TS)):
        assert validate_key(key).split("/")[:2] == ["vms", segment]
    assert parse_xml_key(xml_path(name, TS)) == (segment, TS)


def test_long_names_sharing_a_prefix_get_other_segments() -> None:
    segments = {vm_segment(name) for name in LONG}
    assert len(segments) == len(LONG)
    assert len({s.lower() for s in segments}) == len(LONG)  # even without case
    assert not segments & {vm_segment(name) for name in HOSTILE}


def test_segments_are_one_to_one_and_differ_beyond_case_unless_the_names_do() -> None:
    segments = {name: vm_segment(name) for name in HOSTILE}
    assert len(set(segments.values())) == len(HOSTILE)
    folded: dict[str, list[str]] = {}
    for name, segment in segments.items():
        folded.setdefault(segment.lower(), []).append(name)
    # Only names that differ in the case of ASCII letters may share a folder on a
    # case-insensitive destination; non-ASCII letters are hex digits, upper case.
    assert sorted(v for v in folded.values() if len(v) > 1) == [["Web1", "web1"]]
    assert vm_segment("fc-ü") == "fc-%C3%BC" and vm_segment("fc-Ü") == "fc-%C3%9C"


@pytest.mark.parametrize(
    "name", ["vm1", "Web_1.2+x-y", "a", "0", "x-" * 100, "host.example.com", "a+b_c-d.e"]
)
def test_names_that_were_safe_keep_their_keys(name: str) -> None:
    assert vm_segment(name) == name
    assert xml_path(name, TS) == f"vms/{name}/{TS}/domain.xml"


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("bad \ud800 surrogate", "not valid Unicode")],
)
def test_names_no_segment_can_hold_are_refused(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"invalid vm name.*{why}"):
        vm_segment(name)


@pytest.mark.parametrize(
    "segment",
    [
        *("", "%41", "%2e", "%2E%2e", "..", ".", ".x", "-x", "a b", "a/b", "%C3", "%FF", "%"),
        *("%4", "ü", "x" * (MAX_VM_SEGMENT + 1), "~" + "0" * 16, "x~0123456789ABCDEF"),
        *("x~0123", "%41~0123456789abcdef", "x" * (HASHED_PREFIX + 1) + "~0123456789abcdef"),
        *("x~0123456789abcdef~0123456789abcdef", ".x~0123456789abcdef"),
    ],
)
def test_only_canonical_segments_are_read(segment: str) -> None:
    with pytest.raises(ValueError, match="invalid vm name segment"):
        parse_vm_segment(segment)


def _point(vm: str, ts: str) -> tuple[RestorePoint, DiskManifest]:
    manifest = DiskManifest(
        target="vda", size=4096, chunk_size=4096, format="qcow2", source_path="/x", chunks=[None]
    )
    point = RestorePoint(
        vm_name=vm,
        timestamp=ts,
        source_server_id="local",
        source_server_name="Local",
        kind="full",
        disks=[
            DiskRecord(
                target="vda",
                basename="vda.qcow2",
                path="/x",
                format="qcow2",
                size=4096,
                manifest=manifest_key(vm, ts, "vda"),
            )
        ],
        created_at="2026-01-30T12:00:00Z",
    )
    return point, manifest


async def test_points_of_hostile_names_stay_inside_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    repo = await Repository.open_or_create(FilesystemDriver(root), "pw")
    for name in HOSTILE + LONG:
        point, manifest = _point(name, TS)
        await repo.commit(point, [manifest], f"<domain>{name!r}</domain>")
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # nothing written beside it
    folders = sorted(p.name for p in (root / "vms").iterdir())
    assert folders == sorted(vm_segment(name) for name in HOSTILE + LONG)

    listed = await repo.restore_points()
    assert sorted(p.vm_name for p in listed) == sorted(HOSTILE + LONG)
    for point in listed:
        loaded = await repo.restore_point(point.xml_path)
        assert loaded == point
        assert await repo.domain_xml(loaded) == f"<domain>{point.vm_name!r}</domain>"
        assert (await repo.manifest(loaded, "vda")).chunks == [None]
        assert [p.vm_name for p in await repo.restore_points(point.vm_name)] == [point.vm_name]
        assert await repo.new_timestamp(point.vm_name) != TS


async def test_names_sharing_a_folder_on_a_case_insensitive_destination(tmp_path: Path) -> None:
    """What a case-insensitive store (SMB, exFAT, macOS) makes of ``Web1`` and ``web1``:
    one folder. The records, not the folder, say whose point is whose."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    mine, manifest = _point("web1", "2026-01-30T12-00-00")
    await repo.commit(mine, [manifest], "<domain/>")
    other, manifest = _point("Web1", "2026-01-30T12-00-01")
    await repo.commit(other, [manifest], "<domain/>")
    (tmp_path / "vms/Web1/2026-01-30T12-00-01").rename(tmp_path / "vms/web1/2026-01-30T12-00-01")
    (tmp_path / "vms/Web1").rmdir()

    listed = await repo.restore_points()
    assert [(p.vm_name, p.timestamp) for p in listed] == [
        ("Web1", "2026-01-30T12-00-01"),
        ("web1", "2026-01-30T12-00-00"),
    ]
    assert await repo.restore_points("web1") == [mine]
    # web1's key finds a record that is Web1's: not web1's point.
    with pytest.raises(NotFoundError):
        await repo.restore_point("vms/web1/2026-01-30T12-00-01/domain.xml")
    assert (await repo.restore_point(mine.xml_path)) == mine


async def test_a_hashed_folder_holds_only_its_own_names_points(tmp_path: Path) -> None:
    """A record put in a long name's folder that names another VM is not that folder's
    point: ``xmlPath`` cannot reach it, and the listing leaves it out."""
    repo = await Repository.open_or_create(FilesystemDriver(tmp_path))
    long_name = "x" * 240
    mine, manifest = _point(long_name, TS)
    await repo.commit(mine, [manifest], "<domain/>")
    other, manifest = _point("x" * 241, "2026-01-30T12-00-01")
    await repo.commit(other, [manifest], "<domain/>")
    folder = vm_segment(long_name)
    (tmp_path / "vms" / vm_segment("x" * 241) / other.timestamp).rename(
        tmp_path / "vms" / folder / other.timestamp
    )
    assert [(p.vm_name, p.timestamp) for p in await repo.restore_points()] == [(long_name, TS)]
    assert await repo.restore_point(mine.xml_path) == mine
    with pytest.raises(NotFoundError):
        await repo.restore_point(f"vms/{folder}/{other.timestamp}/domain.xml")


@pytest.mark.parametrize(
    ("flavour", "passphrase"), [("plain", None), ("encrypted", "legacy passphrase")]
)
async def test_a_repository_written_before_names_were_encoded_still_reads(
    tmp_path: Path, flavour: str, passphrase: str | None
) -> None:
    """``data/legacy-v1`` was written by the code of 09276f4 (names were path segments as
    they were): its points list with the same ``xmlPath``s and restore to the same bytes."""
    root = tmp_path / flavour
    shutil.copytree(LEGACY / flavour, root)
    repo = await Repository.open(FilesystemDriver(root), passphrase)
    points = await repo.restore_points()
    assert [p.xml_path for p in points] == [
        "vms/Web_1.2+x-y/2026-01-30T12-00-00/domain.xml",
        "vms/vm1/2026-01-30T12-00-00/domain.xml",
        "vms/vm1/2026-01-30T12-00-01/domain.xml",
    ]
    assert [p.vm_name for p in await repo.restore_points("vm1")] == ["vm1", "vm1"]
    for point, version in zip(points, [3, 1, 2], strict=True):
        assert await repo.restore_point(point.xml_path) == point
        assert await repo.domain_xml(point) == f"<domain><name>{point.vm_name}</name></domain>"
        manifest = await repo.manifest(point, "vda")
        pieces = [
            await repo.load_chunk(cid) if cid else bytes(manifest.chunk_size)
            for cid in manifest.chunks
        ]
        restored = b"".join(pieces)[: manifest.size]
        assert restored == _legacy_disk(version)
    # A new backup of a legacy VM goes into the same folder, beside the old points.
    point, manifest = _point("vm1", "2026-01-30T12-00-02")
    await repo.commit(point, [manifest], "<domain/>")
    assert sorted(p.name for p in (root / "vms").iterdir()) == ["Web_1.2+x-y", "vm1"]
    assert len(await repo.restore_points("vm1")) == 3


@pytest.mark.parametrize("kind", ["sftp", "s3", "gdrive"])
async def test_points_of_hostile_names_on_every_remote_destination(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    case = driver_case(request, kind, tmp_path)
    repo = await Repository.open_or_create(case.driver)
    try:
        for name in HOSTILE + LONG:
            point, manifest = _point(name, TS)
            await repo.commit(point, [manifest], f"<domain>{name!r}</domain>")
        listed = await repo.restore_points()
        assert sorted(p.vm_name for p in listed) == sorted(HOSTILE + LONG)
        for point in listed:
            assert await repo.restore_point(point.xml_path) == point
            assert await repo.domain_xml(point) == f"<domain>{point.vm_name!r}</domain>"
        assert [p.vm_name for p in await repo.restore_points("fc-ü")] == ["fc-ü"]
        if case.local_root is not None:  # SFTP: the folders, seen from behind its back
            folders = {p.name for p in (case.local_root / "vms").iterdir()}
            assert folders == {vm_segment(name) for name in HOSTILE + LONG}
    finally:
        await repo.close()


def _legacy_disk(version: int) -> bytes:
    """The disk content ``data/legacy-v1`` holds (64 KiB chunks: pattern, zeros, pattern,
    an 8 KiB tail)."""
    chunk = 64 << 10
    first = bytes(range(256)) * (chunk // 256)
    third = bytes((i * 7 + version) % 251 for i in range(chunk))
    return first + bytes(chunk) + third + b"tail" * 2048
