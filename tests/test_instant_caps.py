"""Instant access has caps: live exports in all (``VIRTBACKUP_INSTANT_MAX_EXPORTS``) and
per transfer worker (``VIRTBACKUP_INSTANT_MAX_PER_WORKER``); a create beyond either is a
409 naming the cap, and nothing more is served. A restore point written with the
repository library (no VM needed) on a filesystem destination; a system per cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from harness import System, local_config, running_system

from virtbackup.repository.records import DiskManifest, DiskRecord, RestorePoint
from virtbackup.repository.repository import Repository
from virtbackup.storage.filesystem import FilesystemDriver

TS = "2026-01-30T12-00-00"
VM = "caps-vm"
XML = f"vms/{VM}/{TS}/domain.xml"
CAPS = {
    "total": {"VIRTBACKUP_INSTANT_MAX_EXPORTS": "2", "VIRTBACKUP_INSTANT_MAX_PER_WORKER": "5"},
    "per-worker": {
        "VIRTBACKUP_INSTANT_MAX_EXPORTS": "5",
        "VIRTBACKUP_INSTANT_MAX_PER_WORKER": "1",
    },
}


async def write_point(root: Path) -> None:
    repo = await Repository.open_or_create(FilesystemDriver(root / "VirtBackup"))
    chunk = b"\x5a" * 65536
    ids: list[str | None] = list(await repo.store_bytes(chunk))
    manifest = DiskManifest(
        target="vda", size=len(chunk), chunk_size=repo.chunk_size, format="raw",
        source_path="/x/vda.img", chunks=ids,
    )  # fmt: skip
    point = RestorePoint(
        vm_name=VM, timestamp=TS, source_server_id="local", source_server_name="Local",
        kind="full", created_at="2026-01-30T12:00:00Z",
        disks=[DiskRecord(target="vda", basename="vda.img", path="/x/vda.img", format="raw",
                          size=len(chunk), manifest=f"vms/{VM}/{TS}/vda.manifest")],
    )  # fmt: skip
    await repo.commit(point, [manifest], f"<domain><name>{VM}</name></domain>")
    await repo.close()


@pytest.fixture(scope="module", params=sorted(CAPS))
def capped(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, System, Path]]:
    data = tmp_path_factory.mktemp("caps")
    repo = data / "repo"
    repo.mkdir(mode=0o700)
    with running_system(data, workers=1, orchestrators=1, **CAPS[request.param]) as system:
        yield request.param, system, repo


@pytest.fixture
async def api(capped: tuple[str, System, Path]) -> AsyncIterator[httpx.AsyncClient]:
    _, system, repo = capped
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=120
    ) as client:
        assert (await client.post("/config", json=local_config(repo))).status_code == 200
        yield client


async def test_a_create_beyond_a_cap_is_409_naming_it(
    capped: tuple[str, System, Path], api: httpx.AsyncClient
) -> None:
    which, _, repo = capped
    await write_point(repo)
    allowed = 2 if which == "total" else 1
    made = []
    for _ in range(allowed):
        resp = await api.post("/restore/exports", json={"xmlPath": XML, "disk": "vda"})
        assert resp.status_code == 200, resp.text
        made.append(resp.json()["id"])
    resp = await api.post("/restore/exports", json={"xmlPath": XML, "disk": "vda"})
    assert resp.status_code == 409, resp.text
    setting = "MAX_EXPORTS" if which == "total" else "MAX_PER_WORKER"
    assert f"VIRTBACKUP_INSTANT_{setting}" in resp.json()["error"], resp.text
    listed = (await api.get("/restore/exports")).json()
    assert sorted(e["id"] for e in listed if e["state"] == "active") == sorted(made)
    # Stopping one frees its place.
    assert (await api.delete(f"/restore/exports/{made[0]}")).json()["state"] == "stopped"
    resp = await api.post("/restore/exports", json={"xmlPath": XML, "disk": "vda"})
    assert resp.status_code == 200, resp.text
