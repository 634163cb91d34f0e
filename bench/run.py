"""The benchmark: VirtBackup against virtnbdbackup on the same VM, in one run.

For each repetition, on one VM with a 4 GiB qcow2 disk holding about 2 GiB of mixed
content (binaries, text, random data, zero ranges):

* virtnbdbackup: full backup, about 200 MiB of scattered guest writes, incremental,
  ``virtnbdrestore`` of the chain to a new image (checked with ``qemu-img compare``);
* VirtBackup, through its HTTP API, once with 1 and once with 2 transfer-worker
  processes: full backup to a new local repository, the same amount of guest writes,
  incremental, restore of the latest point to a new image (checked the same way).

It prints the medians as a table (seconds, MB/s of VM data, and the ratio of
virtnbdbackup's time to VirtBackup's: above 1 means VirtBackup is faster) and writes
everything as JSON. Run it with ``task bench`` or::

    uv run python bench/run.py --reps 3 --json bench/results/latest.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peer
from virtbackup.runtime.ports import free_port
from virtbackup.virt import Connection, open_connection

MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000


@dataclass
class VbCycle:
    workers: int
    full_stored_bytes: int
    full_seconds: float
    full_bytes_read: int
    inc_seconds: float
    inc_bytes_read: int
    restore_seconds: float
    stored_bytes: int
    identical: bool


@dataclass
class Report:
    machine: dict[str, Any]
    vm: dict[str, Any]
    peer_version: str | None
    peer: list[dict[str, Any]] = field(default_factory=list)
    virtbackup: list[VbCycle] = field(default_factory=list)


class VirtBackup:
    """``virtbackup up`` in a temporary data directory, driven over its API."""

    def __init__(self, workers: int, workdir: Path) -> None:
        self.workers = workers
        self.data = workdir / f"vb-data-{workers}"
        self.port = free_port()
        self.nats_port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.token = ""

    def __enter__(self) -> VirtBackup:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTBACKUP_")}
        env.update(
            VIRTBACKUP_DATA_DIR=str(self.data),
            VIRTBACKUP_AGENT_PORT=str(self.port),
            VIRTBACKUP_HYPERSDK_PORT=str(free_port()),
            VIRTBACKUP_LOG_LEVEL="WARNING",
        )
        launcher = Path(sys.executable).with_name("virtbackup")
        self.proc = subprocess.Popen(
            [
                str(launcher),
                "up",
                "--workers",
                str(self.workers),
                "--nats-port",
                str(self.nats_port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            found = re.search(r"VirtBackup is up: \S+\s+\(token: (\S+)\)", line)
            if found:
                self.token = found.group(1)
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError("VirtBackup did not start")

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def nats_options(self) -> dict[str, str]:
        """``nats.connect`` arguments: its NATS as ``admin`` (the launcher's credentials)."""
        users = json.loads((self.data / "secrets" / "nats-users.json").read_text())
        return {"servers": self.nats_url, "user": "admin", "password": users["admin"]}

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{self.port}",
            headers={"x-agent-token": self.token},
            verify=False,
            timeout=120,
        )


async def _wait(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = (await api.get(f"/jobs/{job_id}")).json()
        if job["state"] in {"success", "failure", "canceled"}:
            if job["state"] != "success":
                raise RuntimeError(f"job {job_id} {job['state']}: {job['message']}")
            return job
        await asyncio.sleep(0.05)


async def _timed_job(
    api: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    resp = await api.post(path, json=body)
    resp.raise_for_status()
    job = await _wait(api, resp.json()["jobId"])
    return time.monotonic() - started, job


def _du(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        if item.is_file():
            total += item.stat().st_blocks * 512
    return total


async def vb_cycle(
    conn: Connection, vm: peer.PreparedVm, workdir: Path, workers: int, rep: int
) -> VbCycle:
    repo = workdir / f"vb-repo-{workers}-{rep}"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    await peer.remove_checkpoints(conn, vm.name)
    with VirtBackup(workers, workdir) as vb:
        async with vb.client() as api:
            cfg = {
                "servers": [{"id": "local", "name": "bench", "host": ""}],
                "destinations": [
                    {"id": "bench", "driverId": "filesystem", "params": {"path": str(repo)}}
                ],
                "backupDestinationId": "bench",
                "hashblocksLimitBufferMb": 1024,
            }
            (await api.post("/config", json=cfg)).raise_for_status()
            body = {"vmName": vm.name, "destinationId": "bench"}
            await asyncio.to_thread(peer.warm_image, vm.image)
            await asyncio.to_thread(peer.settle)
            full_s, full = await _timed_job(api, "/servers/local/backup", body)
            full_stored = _du(repo)
            # New content in every cycle, so that each incremental has new chunks to store.
            seed = 1000 + 10 * rep + workers
            await peer.guest_writes(conn, vm, 200 * MiB, offsets_seed=0, content_seed=seed)
            await asyncio.to_thread(peer.settle)
            inc_s, inc = await _timed_job(api, "/servers/local/backup", body)
            stored = _du(repo)
            reference = workdir / f"reference-{workers}-{rep}.qcow2"
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.image), str(reference)],
                check=True,
            )
            (
                await api.post(
                    "/servers/local/actions", json={"action": "forceOff", "vmName": vm.name}
                )
            ).raise_for_status()
            entries = (await api.get("/restore/entries")).json()
            latest = max(entries, key=lambda e: e["timestamp"])
            await asyncio.to_thread(peer.settle)
            restore_s, _ = await _timed_job(
                api,
                "/servers/local/restore/start",
                {"xmlPath": latest["xmlPath"], "decision": "overwrite", "destinationId": "bench"},
            )
            identical = peer.images_equal(vm.image, reference)
            reference.unlink()
            (
                await api.post(
                    "/servers/local/actions", json={"action": "start", "vmName": vm.name}
                )
            ).raise_for_status()
    shutil.rmtree(repo, ignore_errors=True)
    await peer.remove_checkpoints(conn, vm.name)
    return VbCycle(
        workers=workers,
        full_stored_bytes=full_stored,
        full_seconds=full_s,
        full_bytes_read=full["bytesTransferred"],
        inc_seconds=inc_s,
        inc_bytes_read=inc["bytesTransferred"],
        restore_seconds=restore_s,
        stored_bytes=stored,
        identical=identical,
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(report: Report) -> tuple[str, list[dict[str, Any]]]:
    data = report.vm["content_bytes"]
    peer_full = _median([c["full"]["seconds"] for c in report.peer])
    peer_inc = _median([c["inc"]["seconds"] for c in report.peer])
    peer_restore = _median([c["restore"]["seconds"] for c in report.peer])
    peer_stored = _median([float(c["full"]["bytes_stored"]) for c in report.peer])
    rows: list[dict[str, Any]] = []

    def vb(workers: int, key: str) -> float:
        return _median([getattr(c, key) for c in report.virtbackup if c.workers == workers])

    best = max({c.workers for c in report.virtbackup})
    for label, vb_s, peer_s, amount in (
        ("full backup (1 worker)", vb(1, "full_seconds"), peer_full, data),
        (f"full backup ({best} workers)", vb(best, "full_seconds"), peer_full, data),
        ("incremental (200 MiB written)", vb(best, "inc_seconds"), peer_inc, 200 * MiB),
        ("restore of the latest point", vb(best, "restore_seconds"), peer_restore, data),
    ):
        rows.append({
            "line": label, "virtbackup_s": round(vb_s, 2), "peer_s": round(peer_s, 2),
            "virtbackup_MBps": round(amount / MB / vb_s, 1),
            "peer_MBps": round(amount / MB / peer_s, 1), "speedup": round(peer_s / vb_s, 2),
        })  # fmt: skip
    vb_stored = vb(best, "full_stored_bytes")
    rows.append({
        "line": "bytes stored by the full backup", "virtbackup_s": None, "peer_s": None,
        "virtbackup_MBps": None, "peer_MBps": None,
        "virtbackup_bytes": int(vb_stored), "peer_bytes": int(peer_stored),
        "speedup": round(peer_stored / vb_stored, 2) if vb_stored else None,
    })  # fmt: skip
    header = f"{'VirtBackup':>12} {'virtnbdbackup':>14} {'VB MB/s':>9} {'peer MB/s':>10}"
    lines = [f"{'':40} {header} {'ratio':>6}"]
    for row in rows:
        if row["virtbackup_s"] is None:
            lines.append(
                f"{row['line']:40} {row['virtbackup_bytes'] / MB:>10.0f}MB "
                f"{row['peer_bytes'] / MB:>12.0f}MB {'':>9} {'':>10} {row['speedup']:>6}"
            )
        else:
            lines.append(
                f"{row['line']:40} {row['virtbackup_s']:>11.2f}s {row['peer_s']:>13.2f}s "
                f"{row['virtbackup_MBps']:>9} {row['peer_MBps']:>10} {row['speedup']:>6}"
            )
    return "\n".join(lines), rows


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "memory_gib": round(memory / GiB, 1),
        "kvm": os.path.exists("/dev/kvm"),
    }


async def amain(args: argparse.Namespace) -> int:
    peer.install_peer()
    workdir = Path(tempfile.mkdtemp(prefix="vb-bench-", dir="/var/tmp"))
    workdir.chmod(0o755)
    conn = await open_connection()
    vm = await peer.prepare_vm(
        conn,
        args.vm_name,
        disk_size=args.disk_gib * GiB,
        content_size=args.content_mib * MiB,
    )
    report = Report(
        machine=machine(),
        vm={"disk_bytes": vm.disk_size, "content_bytes": vm.content_bytes},
        peer_version=peer.peer_version(),
    )  # fmt: skip
    try:
        for rep in range(args.reps):
            cycle = await peer.peer_cycle(conn, vm, workdir, rep=rep, compress=args.peer_compress)
            if not cycle.identical:
                raise RuntimeError(f"virtnbdrestore's image differs: {cycle.compare}")
            report.peer.append(peer._jsonable(asdict(cycle)))
            for workers in (1, 2):
                result = await vb_cycle(conn, vm, workdir, workers, rep)
                if not result.identical:
                    raise RuntimeError("VirtBackup's restored image differs from the source")
                report.virtbackup.append(result)
            print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    finally:
        await peer.remove_prepared_vm(conn, vm)
        await conn.close()
        shutil.rmtree(workdir, ignore_errors=True)
    text, rows = table(report)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {**asdict(report), "table": rows}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vm-name", default="vb-bench-run")
    parser.add_argument("--disk-gib", type=int, default=4)
    parser.add_argument("--content-mib", type=int, default=2048)
    parser.add_argument("--peer-compress", action="store_true", help="virtnbdbackup -z")
    parser.add_argument("--json", default="bench/results/latest.json")
    return asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
