"""What a backup to two destinations at once costs against one backup to each.

A VM with a disk of mixed content (``content.create_mixed_image``) is backed up in full,
into empty repositories each time (so every chunk is written, nothing deduplicated):
to a filesystem destination alone, to an S3 destination (SeaweedFS) alone, and to both
at once (``alsoDestinationIds``); ``--rounds`` times, interleaved. Prints, per run, the
job's wall time and the bytes it read from the disk (``bytesTransferred``: one read
when the fan-out reads once).

Runs its own system (``tests/harness.running_system``: a NATS server and the services
as processes, one orchestrator, ``--workers`` transfer workers), never ``virtbackup up``.

    .venv/bin/python bench/fanout.py --disk-mib 1024 --content-mib 512 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: bench/ and tests/ as run.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import running_system, wait_job

from bench.content import MiB, create_mixed_image
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.seaweedfs import SeaweedServer
from virtbackup.testing.vms import create_vm, remove_vm, vm_directory
from virtbackup.virt import open_connection


async def run(args: argparse.Namespace) -> None:
    ensure_libvirtd()
    conn = await open_connection()
    vm_name = f"vbbench-fan-{os.getpid()}"
    directory = vm_directory(prefix="vbbench-fan-")
    seaweed = SeaweedServer()
    seaweed.start()
    data = Path(tempfile.mkdtemp(prefix="vbbench-fan-sys-"))
    try:
        vm = await create_vm(conn, vm_name, directory, [args.disk_mib * MiB], start=False)
        create_mixed_image(vm.disks[0], args.disk_mib * MiB, args.content_mib * MiB)
        dom = await conn.lookup(vm_name)
        await conn.call(dom.create, timeout=60)
        runs: list[tuple[str, list[str]]] = []
        destinations: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for label, kinds in (("fs", ["fs"]), ("s3", ["s3"]), ("fs+s3", ["fs", "s3"])):
                ids = []
                for kind in kinds:
                    dest_id = f"{kind}-{r}-{label.replace('+', '')}"
                    ids.append(dest_id)
                    if kind == "fs":
                        path = directory / dest_id
                        path.mkdir()
                        params: dict[str, Any] = {"path": str(path)}
                        driver = "filesystem"
                    else:
                        params = seaweed.params(prefix=f"{dest_id}-{os.getpid()}")
                        driver = "s3"
                    destinations.append(
                        {"id": dest_id, "name": dest_id, "driverId": driver, "params": params}
                    )
                runs.append((label, ids))
        config = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": destinations,
            "backupDestinationId": destinations[0]["id"],
        }
        with running_system(data, workers=args.workers, orchestrators=1) as system:
            async with httpx.AsyncClient(
                base_url=system.url, headers=system.auth(), verify=False, timeout=60
            ) as api:
                resp = await api.post("/config", json=config)
                assert resp.status_code == 200, resp.text
                times: dict[str, list[float]] = {}
                for label, ids in runs:
                    body = {"vmName": vm_name, "destinationId": ids[0],
                            "alsoDestinationIds": ids[1:]}  # fmt: skip
                    dom = await conn.lookup(vm_name)
                    if not await conn.call(dom.isActive):  # a guest without an OS may stop
                        await conn.call(dom.create, timeout=60)
                    started = time.monotonic()
                    resp = await api.post("/servers/local/backup", json=body)
                    assert resp.status_code == 200, resp.text
                    job = await wait_job(api, resp.json()["jobId"], timeout=900)
                    took = time.monotonic() - started
                    assert job["state"] == "success", job
                    times.setdefault(label, []).append(took)
                    print(
                        f"{label:6s} {took:6.2f} s  read {job['bytesTransferred'] / MiB:7.1f} MiB"
                        f"  written {job['physicalBytes'] / MiB:7.1f} MiB",
                        flush=True,
                    )
                for label, values in times.items():
                    print(f"{label:6s} median {statistics.median(values):6.2f} s")
    finally:
        await remove_vm(conn, vm_name, delete_directory=directory)
        await conn.close()
        seaweed.close()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-mib", type=int, default=1024)
    parser.add_argument("--content-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
