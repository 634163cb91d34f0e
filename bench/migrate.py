"""Warm migration of a running VM with a 1 GiB disk: downtime against copy time.

Built on the tests' fixtures, not on ``virtbackup up`` (which would replace this
machine's QEMU TLS CA): a system of its own (``tests/harness.running_system``: NATS and
every service, ``--workers`` transfer workers, one orchestrator), and as the second
host the system libvirt reached over SSH on loopback (a root sshd of its own,
``virtbackup.testing.sshd``), configured as server ``remote`` with a directory of its
own: the target images are written through the inventory's TLS ``qemu-nbd`` exports, as
for a remote host (the tests' ``test_migrate.py`` does the same).

The VM: a ``--disk-mib`` qcow2 disk (1024) holding ``--data-mib`` of data (600, written
with ``qemu-io`` in 64 MiB segments of different patterns before it starts), no OS. While
the migration runs the guest keeps writing through the monitor (1 MiB at a scattered
offset every ``--write-interval`` seconds) until the source is stopped. The migration is
submitted through the HyperSDK API (``max_downtime_seconds`` ``--max-downtime``,
``shutdown_timeout_seconds`` 1: without an OS, ACPI does nothing and it is powered off).

Printed: the copy time (the first pass), each pass's bytes and seconds, the downtime
and its breakdown (``result.cutoverSeconds``: seconds from the source's stop to the
last delta's exports begun (read from the images' bitmaps, or the VM started paused),
the last delta copied, the state files staged, the domain
defined, the VM running, and the source's backup job ended, which runs alongside the
define and start), the shutdown time and the whole job; then whether
the target image equals the source's (``qemu-img compare``). ``--json PATH`` keeps them.

    .venv/bin/python bench/migrate.py [--disk-mib 1024] [--data-mib 600] [--workers 2]
        [--max-downtime 30] [--json bench/results/migrate.json]

Needs root (libvirt, sshd). Removes what it made (VMs, images, the system's data).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx
from harness import local_config, running_system

from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.sshd import SshdServer, sshd_server
from virtbackup.testing.vms import create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection, open_connection

MiB = 1 << 20
SEGMENT = 64 * MiB


def fill(image: Path, data_mib: int) -> None:
    """``data_mib`` MiB of data in the image, 64 MiB segments spread over the disk."""
    size = int(
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(image)],
                check=True, capture_output=True, text=True,
            ).stdout
        )["virtual-size"]
    )  # fmt: skip
    segments = max(1, data_mib * MiB // SEGMENT)
    slots = size // SEGMENT
    chosen = sorted(
        random.Random(0).sample(  # noqa: S311 - a workload, not a secret
            range(slots), min(segments, slots)
        )
    )
    commands: list[str] = []
    for n, slot in enumerate(chosen):
        commands += ["-c", f"write -P 0x{(n * 37 + 1) % 255 + 1:02x} {slot * SEGMENT} {SEGMENT}"]
    subprocess.run(
        ["qemu-io", "-f", "qcow2", *commands, str(image)], check=True, capture_output=True
    )


async def writer(conn: Connection, name: str, size: int, interval: float, count: list[int]) -> None:
    """1 MiB guest writes at scattered offsets until the VM stops answering."""
    rng = random.Random(1)  # noqa: S311 - a workload, not a secret
    while True:
        offset = rng.randrange(0, size // MiB) * MiB
        try:
            await guest_write(conn, name, "vda", offset, MiB, pattern=0x11 + count[0] % 200)
        except Exception:
            return
        count[0] += 1
        await asyncio.sleep(interval)


async def configure(api: httpx.AsyncClient, repo: Path, remote: SshdServer, target: Path) -> None:
    cfg = local_config(repo)
    cfg["servers"].append(
        {
            "id": "remote", "name": "Remote", "host": remote.host, "port": remote.port,
            "username": remote.username, "privateKey": remote.private_key,
            "restoreDirectories": [str(target)],
        }
    )  # fmt: skip
    resp = await api.post("/config", json=cfg)
    resp.raise_for_status()
    deadline = time.monotonic() + 90
    while (await api.get("/servers/remote/vms")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("server remote never listed its VMs")
        await asyncio.sleep(0.5)


async def migrate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ensure_libvirtd()
    pid = os.getpid()
    name, moved = f"vbb-mig-{pid}", f"vbb-migt-{pid}"
    vm_dir, target_dir = vm_directory(prefix="vbbench-mig-"), vm_directory(prefix="vbbench-migt-")
    repo = work / "repo"
    repo.mkdir()
    conn = await open_connection()
    try:
        with (
            running_system(work / "system", workers=args.workers, orchestrators=1) as system,
            sshd_server(root=True) as remote,
        ):
            made = await create_vm(conn, name, vm_dir, [args.disk_mib * MiB], start=False)
            fill(made.disks[0], args.data_mib)
            dom = await conn.lookup(name)
            await conn.call(dom.create, timeout=60)
            async with (
                httpx.AsyncClient(
                    base_url=system.url, headers=system.auth(), verify=False, timeout=60
                ) as api,
                httpx.AsyncClient(
                    base_url=system.hypersdk_url, headers=system.auth(), timeout=60
                ) as hs,
            ):
                await configure(api, repo, remote, target_dir)
                writes = [0]
                task = asyncio.create_task(
                    writer(conn, name, args.disk_mib * MiB, args.write_interval, writes)
                )
                body = {
                    "vm_path": f"local/{name}",
                    "source": {"type": "libvirt", "server_id": "local"},
                    "destination": {"type": "kvm", "server_id": "remote"},
                    "options": {
                        "vm_name": moved, "target_directory": str(target_dir),
                        "shutdown_timeout_seconds": 1,
                        "max_downtime_seconds": args.max_downtime,
                    },
                }  # fmt: skip
                started = time.monotonic()
                resp = await hs.post("/jobs/submit", json=body)
                resp.raise_for_status()
                job_id = resp.json()["job_id"]
                while True:
                    record = (await api.get(f"/jobs/{job_id}")).json()
                    if record["state"] in {"success", "failure", "canceled"}:
                        break
                    if time.monotonic() - started > 1800:
                        raise TimeoutError(record)
                    await asyncio.sleep(0.2)
                elapsed = time.monotonic() - started
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if record["state"] != "success":
                raise RuntimeError(f"the migration ended {record['state']}: {record['message']}")
            compared = subprocess.run(
                ["qemu-img", "compare", "-U", str(made.disks[0]),
                 str(target_dir / f"{moved}-vda.qcow2")],
                capture_output=True, text=True,
            )  # fmt: skip
            return {
                "disk_mib": args.disk_mib,
                "data_mib": args.data_mib,
                "workers": args.workers,
                "guest_writes": writes[0],
                "job_seconds": round(elapsed, 3),
                "identical": compared.returncode == 0,
                "result": record["result"],
            }
    finally:
        for vm in (name, moved):
            await remove_vm(conn, vm)
        await conn.close()
        for path in (vm_dir, target_dir):
            shutil.rmtree(path, ignore_errors=True)


def report(out: dict[str, Any]) -> None:
    result = out["result"]
    print(
        f"VM: {out['disk_mib']} MiB qcow2 disk, {out['data_mib']} MiB of data, "
        f"{out['workers']} workers; {out['guest_writes']} guest writes of 1 MiB meanwhile"
    )
    print(f"copy (first pass): {result['copySeconds']} s; whole job {out['job_seconds']} s")
    for p in result["passes"]:
        kind = (
            "offline (last delta)" if p.get("offline") else ("copy" if p["pass"] == 0 else "sync")
        )
        rate = p["bytes"] / p["seconds"] / 1e6 if p["seconds"] else 0
        print(f"  pass {p['pass']} {kind}: {p['bytes'] / MiB:.1f} MiB in {p['seconds']} s"
              f" ({rate:.0f} MB/s)")  # fmt: skip
    print(f"shutdown (request to off, not in the downtime): {result.get('shutdownSeconds')} s")
    print(f"downtime: {result['downtimeSeconds']} s; from the stop, cumulative:")
    last = 0.0
    for step, at in result["cutoverSeconds"].items():
        print(f"  {step:>8}: {at:7.3f} s  (+{at - last:.3f})")
        last = at
    print(f"target image identical to the source's: {out['identical']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-mib", type=int, default=1024)
    parser.add_argument("--data-mib", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-downtime", type=float, default=30.0)
    parser.add_argument("--write-interval", type=float, default=0.05)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vbbench-migrate-", dir="/var/tmp"))
    try:
        out = asyncio.run(migrate(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
