"""The operator's command line (``virtbackup login``, ``backup --wait``, ``restore``,
``points``, ``jobs``) driven in-process with typer's CliRunner against one real running
system (real services, libvirtd/QEMU, a filesystem destination) and one small VM. The
tests build on each other, in order; the last one swaps the gateway's certificate."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import stat
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from harness import System, local_config, running_system
from typer.testing import CliRunner, Result

from virtbackup.cli.client.app import build
from virtbackup.cli.client.output import short_point_id
from virtbackup.testing.images import create_image, images_equal
from virtbackup.testing.receiver import Receiver
from virtbackup.testing.vms import build_vm_xml, guest_write, remove_vm
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PID = os.getpid()
VM = f"vbt-cli-{PID}"
COPY = f"vbt-clicopy-{PID}"
BROKEN = f"vbt-clibad-{PID}"
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("cli"), orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
def xdg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture(scope="module")
async def vms(
    system: System, conn: Connection, repo_dir: Path, vm_dir: Path
) -> AsyncIterator[Path]:
    """``VM`` running with one 64 MiB qcow2 disk (its path), and ``BROKEN`` defined, shut
    off, on a network that does not exist (its offline backup cannot start it)."""
    disk = create_image(vm_dir / f"{VM}-vda.qcow2", 64 * MiB)
    bad_disk = create_image(vm_dir / f"{BROKEN}-vda.qcow2", 64 * MiB)
    root = ET.fromstring(build_vm_xml(BROKEN, [bad_disk]))
    devices = root.find("devices")
    assert devices is not None
    iface = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(iface, "source", network=f"vbt-nonet-{PID}")
    for name in (VM, COPY, BROKEN):
        await remove_vm(conn, name)
    try:
        dom = await conn.call(conn.raw.defineXML, build_vm_xml(VM, [disk]))
        await conn.call(dom.create, timeout=60)
        await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0xA5)
        await guest_write(conn, VM, "vda", 40 * MiB, 1 * MiB, pattern=0x5A)
        await conn.call(conn.raw.defineXML, ET.tostring(root, encoding="unicode"))
        async with httpx.AsyncClient(
            base_url=system.url, headers=system.auth(), verify=False, timeout=60
        ) as api:
            assert (await api.post("/config", json=local_config(repo_dir))).status_code == 200
            assert (await api.post("/servers/local/refresh")).status_code in {200, 202}
            resp = await api.post(
                "/api/v1/admin/sys/users",
                json={"username": "alice", "password": "a long passphrase", "roles": ["admin"]},
            )
            assert resp.status_code == 201, resp.text
        yield disk
    finally:
        for name in (VM, COPY, BROKEN):
            await remove_vm(conn, name)


def cli(xdg: Path, *args: str, **env: str) -> Result:
    runner = CliRunner()
    return runner.invoke(
        build(), list(args), env={"XDG_CONFIG_HOME": str(xdg), "COLUMNS": "200", **env}
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def test_login_with_the_token_pins_the_certificate(system: System, xdg: Path, vms: Path) -> None:
    result = cli(xdg, "login", system.url, "--token", system.token, "--name", "tok")
    ok(result)
    assert "SHA-256 fingerprint" in result.output
    assert system.token not in result.output
    folder, file = xdg / "virtbackup", xdg / "virtbackup" / "contexts.yaml"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    listed = json.loads(ok(cli(xdg, "context", "ls", "-o", "json")))
    assert [c["name"] for c in listed] == ["tok"] and listed[0]["current"] is True
    assert system.token not in json.dumps(listed)
    servers = json.loads(ok(cli(xdg, "servers", "-o", "json")))
    assert [s["id"] for s in servers] == ["local"]
    # A wrong token is the API's refusal, one line, no traceback.
    bad = cli(xdg, "login", system.url, "--token", "wrong-token", "--name", "bad")
    assert bad.exit_code == 1 and "unauthorized" in bad.output and "Traceback" not in bad.output
    # A CA given with --cacert (here the gateway's own self-signed certificate).
    cafile = system.data_dir / "tls" / "agent.crt"
    ok(
        cli(
            xdg,
            "login",
            system.url,
            "--token",
            system.token,
            "--cacert",
            str(cafile),
            "--name",
            "ca",
        )
    )
    assert json.loads(ok(cli(xdg, "servers", "-o", "json")))[0]["id"] == "local"
    ok(cli(xdg, "context", "use", "tok"))
    ok(cli(xdg, "context", "rm", "ca"))
    assert [c["name"] for c in json.loads(ok(cli(xdg, "context", "ls", "-o", "json")))] == ["tok"]


def test_login_as_a_user_renews_its_access_token(system: System, xdg: Path, vms: Path) -> None:
    ok(cli(xdg, "login", system.url, "--user", "alice", "--name", "alice",
           VIRTBACKUP_PASSWORD="a long passphrase"))  # fmt: skip
    path = xdg / "virtbackup" / "contexts.yaml"
    stored = yaml.safe_load(path.read_text())
    assert stored["current"] == "alice"
    first = stored["contexts"]["alice"]["refreshToken"]
    stored["contexts"]["alice"]["expiresAt"] = 0  # as if the access token had expired
    path.write_text(yaml.safe_dump(stored))
    vms_listed = json.loads(ok(cli(xdg, "vms", "ls", "--server", "local", "-o", "json")))
    assert VM in {v["vm"]["name"] for v in vms_listed}
    renewed = yaml.safe_load(path.read_text())["contexts"]["alice"]
    assert renewed["refreshToken"] != first and renewed["expiresAt"] > 0
    wrong = cli(xdg, "login", system.url, "--user", "alice", "--name", "x",
                VIRTBACKUP_PASSWORD="not it")  # fmt: skip
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
    ok(cli(xdg, "context", "use", "tok"))


def test_backup_wait_then_the_point_is_listed(xdg: Path, vms: Path) -> None:
    # No --server: the one server that has the VM.
    result = cli(xdg, "backup", VM, "--dest", "fs", "--wait")
    ok(result)
    assert "succeeded" in result.stdout
    # The bar (on stderr) reached the end, and the job's log lines came from /events.
    assert "100%" in result.stderr and "MiB" in result.stderr, result.stderr
    assert "committing" in result.stderr, result.stderr
    # The event reader ended with the command and closed its own connection: a socket
    # closed under a reading thread lets that thread read the next connection's bytes
    # (seen as "bad record mac" on a later request of the same process).
    assert not [t for t in threading.enumerate() if t.name == "virtbackup-events"]
    points = json.loads(ok(cli(xdg, "points", "ls", "--vm", VM, "--dest", "fs", "-o", "json")))
    assert len(points) == 1 and points[0]["vmName"] == VM and points[0]["serverId"] == "local"
    STATE["point"] = points[0]["id"]
    table = ok(cli(xdg, "points", "ls", "--vm", VM))
    assert "64.0 MiB" in table  # logicalBytes, in units
    protected = json.loads(ok(cli(xdg, "points", "protect", STATE["point"], "-o", "json")))
    assert protected["protected"] is True
    refused = cli(xdg, "points", "rm", STATE["point"])
    assert refused.exit_code == 1 and "protected" in refused.stderr, refused.output
    unprotected = json.loads(ok(cli(xdg, "points", "unprotect", STATE["point"], "-o", "json")))
    assert unprotected["protected"] is False


def test_restore_wait_makes_a_copy_with_the_same_disk(xdg: Path, vms: Path, vm_dir: Path) -> None:
    ok(cli(xdg, "restore", STATE["point"], "--as", COPY, "--wait"))
    copy = vm_dir / f"{COPY}-vda.qcow2"
    assert copy.exists(), sorted(p.name for p in vm_dir.iterdir())
    assert images_equal(copy, vms, second_format="qcow2")
    ok(cli(xdg, "vm", "start", COPY, "--server", "local"))
    ok(cli(xdg, "vm", "poweroff", COPY, "--server", "local"))
    again = cli(xdg, "vm", "poweroff", COPY, "--server", "local")
    assert again.exit_code == 1 and "409" in again.stderr and COPY in again.stderr, again.output


def test_a_failing_job_makes_wait_exit_non_zero_with_its_message(xdg: Path, vms: Path) -> None:
    result = cli(xdg, "backup", BROKEN, "--server", "local", "--wait")
    assert result.exit_code == 1, result.output
    assert "failure" in result.stderr and f"vbt-nonet-{PID}" in result.stderr, result.stderr
    assert "Traceback" not in result.output
    unknown = cli(xdg, "jobs", "watch", "no-such-job")
    assert unknown.exit_code == 1 and "no-such-job" in unknown.stderr, unknown.output


def test_jobs_ls_yaml_parses(xdg: Path, vms: Path) -> None:
    jobs = yaml.safe_load(ok(cli(xdg, "jobs", "ls", "--vm", VM, "-o", "yaml")))
    assert isinstance(jobs, list) and {j["type"] for j in jobs} >= {"backup"}
    assert all(j["vmName"] == VM for j in jobs)
    # Bad input: the API's message naming the field, exit 1.
    bad = cli(xdg, "points", "ls", "--dest", "no-such-dest")
    assert bad.exit_code == 1 and "no-such-dest" in bad.stderr, bad.output


def test_destinations_are_listed_and_errors_name_the_options_typed(xdg: Path, vms: Path) -> None:
    """A new user found no way to list destinations but `config get`, and errors named
    the API's fields (keepLast, $.targetDirectory), not the options they had typed."""
    listed = json.loads(ok(cli(xdg, "destinations", "-o", "json")))
    assert [(d["id"], d["driverId"], d["default"]) for d in listed] == [("fs", "filesystem", "yes")]
    table = ok(cli(xdg, "destinations"))
    assert "fs" in table and "filesystem" in table
    # A job that moves no bytes (GC) ends with a whole bar, not "0/? bytes".
    gc = cli(xdg, "gc", "fs", "--grace-seconds", "0", "--wait")
    bar = next(line for line in gc.output.splitlines() if "100%" in line)
    assert gc.exit_code == 0 and "?" not in bar and "bytes" not in bar, gc.output
    no_rules = cli(xdg, "prune", "fs", "--dry-run")
    assert no_rules.exit_code == 1 and "--keep-last (keepLast)" in no_rules.stderr, no_rules.output
    relative = cli(xdg, "restore", STATE["point"], "--as", f"vbt-rel-{PID}", "--dir", "rel/dir")
    assert relative.exit_code == 1, relative.output
    assert "--dir (targetDirectory)" in relative.stderr, relative.stderr


def test_schedules_users_and_agents(system: System, xdg: Path, vms: Path) -> None:
    body = {
        "id": f"cli-{PID}",
        "schedule": "0 2 * * *",
        "jobTemplate": {
            "vmPath": f"local/{VM}",
            "source": {"type": "libvirt", "serverId": "local"},
            "destination": {"type": "backup", "destinationId": "fs"},
        },
    }
    resp = httpx.post(
        f"{system.url}/api/v1/task/schedulers",
        json=body,
        headers=system.auth(),
        verify=False,
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    listed = json.loads(ok(cli(xdg, "schedules", "ls", "-o", "json")))
    assert [s["id"] for s in listed] == [f"cli-{PID}"]
    run = cli(xdg, "schedules", "run", f"cli-{PID}", "--wait")
    assert "succeeded" in ok(run)
    ok(cli(xdg, "schedules", "rm", f"cli-{PID}"))
    assert json.loads(ok(cli(xdg, "schedules", "ls", "-o", "json"))) == []
    users = json.loads(ok(cli(xdg, "users", "ls", "-o", "json")))
    assert "alice" in {u["username"] for u in users}
    assert "a long passphrase" not in json.dumps(users)
    agents = json.loads(ok(cli(xdg, "agents", "ls", "-o", "json")))
    assert any(a.get("kind") == "worker" for a in agents), agents


def test_config_get_and_set_round_trip_and_refuse_bad_input(
    xdg: Path, vms: Path, tmp_path: Path
) -> None:
    text = ok(cli(xdg, "config", "get"))
    config = yaml.safe_load(text)
    assert [d["id"] for d in config["destinations"]] == ["fs"]
    good = tmp_path / "config.yaml"
    good.write_text(text)
    assert "configuration saved" in ok(cli(xdg, "config", "set", str(good)))
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**config, "backupDestinatonId": "fs"}))
    refused = cli(xdg, "config", "set", str(typo))
    assert refused.exit_code == 1 and "backupDestinatonId" in refused.stderr, refused.output
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "backupDestinationId: fs\n")
    refused = cli(xdg, "config", "set", str(twice))
    assert refused.exit_code == 1 and "given twice" in refused.stderr, refused.output
    assert yaml.safe_load(ok(cli(xdg, "config", "get"))) == config  # nothing changed


def test_a_new_system_without_servers_says_how_to_add_one(
    xdg: Path, vms: Path, tmp_path: Path
) -> None:
    """A new user's first steps: with no server configured, ``vms ls`` and ``backup``
    say how to add one with the CLI (not "give --server", which cannot help); with one,
    a VM no server has points to ``vms ls``."""
    missing = cli(xdg, "backup", f"vbt-nosuch-{PID}")
    assert missing.exit_code == 1 and "give --server" not in missing.stderr, missing.output
    assert "(servers: local)" in missing.stderr and "virtbackup vms ls" in missing.stderr
    text = ok(cli(xdg, "config", "get"))
    empty = tmp_path / "no-servers.yaml"
    empty.write_text(yaml.safe_dump({**yaml.safe_load(text), "servers": []}))
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    ok(cli(xdg, "config", "set", str(empty)))
    try:
        listed = cli(xdg, "vms", "ls")
        assert listed.exit_code == 0 and "no server is configured" in listed.stderr
        assert "virtbackup config set" in listed.stderr, listed.output
        refused = cli(xdg, "backup", VM, "--wait")
        assert refused.exit_code == 1 and "give --server" not in refused.stderr
        assert refused.stderr.count("\n") == 1 and "no server is configured" in refused.stderr
    finally:
        ok(cli(xdg, "config", "set", str(saved)))
    assert [s["id"] for s in json.loads(ok(cli(xdg, "servers", "-o", "json")))] == ["local"]


def test_mount_exports_a_disk_that_nbdinfo_reads(xdg: Path, vms: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    export = json.loads(
        ok(
            cli(
                xdg,
                "mount",
                STATE["point"],
                "vda",
                "--dir",
                str(folder),
                "--ttl",
                "300",
                "-o",
                "json",
            )
        )
    )
    assert "tls" not in export and export["tlsDirectory"] == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "client-key.pem").stat().st_mode) == 0o600
    size = subprocess.run(
        ["nbdinfo", "--size", f"{export['nbdUrl']}?tls-certificates={folder}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert int(size) == 64 * MiB
    stopped = json.loads(ok(cli(xdg, "umount", export["id"], "-o", "json")))
    assert stopped["state"] == "stopped"


def one_line_rows(result: Result, rows: int) -> list[str]:
    """The table's lines at COLUMNS=80: a heading and ``rows`` rows, each on one line."""
    lines = ok(result).rstrip("\n").split("\n")
    assert len(lines) == 1 + rows, lines
    assert all(len(line.rstrip()) <= 80 for line in lines), lines
    return lines


def test_tables_fit_80_columns_one_line_a_row(xdg: Path, vms: Path) -> None:
    narrow = {"COLUMNS": "80"}
    points = json.loads(ok(cli(xdg, "points", "ls", "-o", "json")))
    lines = one_line_rows(cli(xdg, "points", "ls", **narrow), len(points))
    assert lines[0].split()[:3] == ["ID", "VM", "DEST"], lines[0]
    # The short id (first column) is taken wherever a point is: the full one shows wide.
    short = short_point_id(STATE["point"])
    assert [line for line in lines[1:] if line.startswith(f"{short}  vbt-cli-")], lines
    assert STATE["point"] not in "".join(lines) and len(short) == 8
    assert STATE["point"] in ok(cli(xdg, "points", "ls", "--vm", VM, "-o", "wide", **narrow))
    protected = json.loads(ok(cli(xdg, "points", "protect", short, "-o", "json")))
    assert protected["id"] == STATE["point"] and protected["protected"] is True
    ok(cli(xdg, "points", "unprotect", short))
    unknown = cli(xdg, "points", "protect", "ffffffff")
    assert unknown.exit_code == 1 and "ffffffff" in unknown.stderr, unknown.output
    jobs = json.loads(ok(cli(xdg, "jobs", "ls", "-o", "json")))
    lines = one_line_rows(cli(xdg, "jobs", "ls", **narrow), len(jobs))
    assert lines[0].split()[:3] == ["ID", "TYPE", "STATUS"], lines[0]
    tail = lines[1].split()[0]
    assert len(tail) == 8 and jobs[0]["id"].endswith(tail)
    assert jobs[0]["id"] in ok(cli(xdg, "jobs", "ls", "-o", "wide", **narrow))
    assert "queued" in ok(cli(xdg, "jobs", "logs", tail))  # the short id is taken
    for args in (("vms", "ls"), ("servers",), ("users", "ls"), ("agents", "ls"),
                 ("roles", "ls"), ("context", "ls"), ("audit", "ls", "--limit", "30")):  # fmt: skip
        rows = json.loads(ok(cli(xdg, *args, "-o", "json")))
        one_line_rows(cli(xdg, *args, **narrow), len(rows))


async def test_webhooks_add_test_rm_against_a_receiver(
    system: System, xdg: Path, vms: Path, tmp_path: Path
) -> None:
    # Plain http to another host would carry the token in clear: refused at login.
    refused = await asyncio.to_thread(
        cli, xdg, "login", system.url, "--token", system.token, "--name", "x",
        "--hypersdk-url", "http://192.0.2.1:8080",
    )  # fmt: skip
    assert refused.exit_code == 1 and "in clear" in refused.stderr, refused.output
    # This context has none yet, and the default (port 8080) is not this system's.
    ok(await asyncio.to_thread(cli, xdg, "login", system.url, "--token", system.token,
                               "--name", "tok", "--hypersdk-url", system.hypersdk_url))  # fmt: skip
    stored = yaml.safe_load((xdg / "virtbackup" / "contexts.yaml").read_text())
    assert stored["contexts"]["tok"]["hypersdkUrl"] == system.hypersdk_url
    secret = tmp_path / "secret"
    secret.write_text("a webhook secret\n")
    async with Receiver() as rx:
        url = f"{rx.url}/hook-{PID}"
        added = json.loads(
            ok(
                await asyncio.to_thread(
                    cli,
                    xdg,
                    "webhooks",
                    "add",
                    url,
                    "-e",
                    "job.failed",
                    "--header",
                    "Authorization: Bearer hdr-secret",
                    "--secret-file",
                    str(secret),
                    "-o",
                    "json",
                )
            )
        )
        assert added["url"] == url and added["has_secret"] is True
        assert added["headers"] == {"Authorization": "********"}
        assert "a webhook secret" not in json.dumps(added)
        listed = await asyncio.to_thread(cli, xdg, "webhooks", "ls", COLUMNS="80")
        assert url[:20] in ok(listed) and "hdr-secret" not in listed.output
        sent = ok(await asyncio.to_thread(cli, xdg, "webhooks", "test", added["id"][:8]))
        assert "delivered" in sent
        (delivery,) = await rx.wait_for(f"/hook-{PID}", 1, timeout=20)
        assert delivery.headers["x-virtbackup-event"] == "test"
        assert delivery.headers["authorization"] == "Bearer hdr-secret"
        expected = hmac.new(b"a webhook secret", delivery.body, hashlib.sha256).hexdigest()
        assert delivery.headers["x-virtbackup-signature"] == f"sha256={expected}"
        # A receiver that answers 500: exit 1 naming its answer.
        rx.script(f"/hook-{PID}", 500)
        failed = await asyncio.to_thread(cli, xdg, "webhooks", "test", url)
        assert failed.exit_code == 1 and "500" in failed.stderr, failed.output
        bad = await asyncio.to_thread(cli, xdg, "webhooks", "add", url, "-e", "job.nope")
        assert bad.exit_code == 1 and "events" in bad.stderr, bad.output
        ok(await asyncio.to_thread(cli, xdg, "webhooks", "rm", url))
        left = json.loads(ok(await asyncio.to_thread(cli, xdg, "webhooks", "ls", "-o", "json")))
        assert url not in {h["url"] for h in left}


def test_schedules_add_update_disable(xdg: Path, vms: Path, tmp_path: Path) -> None:
    sid = f"cli2-{PID}"
    added = json.loads(
        ok(
            cli(
                xdg,
                "schedules",
                "add",
                "--id",
                sid,
                "--cron",
                "0 3 * * *",
                "--vm",
                f"local/{VM}",
                "--dest",
                "fs",
                "--name",
                "nightly",
                "-o",
                "json",
            )
        )
    )
    assert added["schedule"] == "0 3 * * *" and added["enabled"] is True
    assert added["jobTemplate"]["vmPath"] == f"local/{VM}"
    assert added["jobTemplate"]["destination"]["destinationId"] == "fs"
    change = tmp_path / "change.yaml"
    change.write_text("schedule: '30 1 * * *'\ntimezone: Europe/Berlin\n")
    updated = json.loads(ok(cli(xdg, "schedules", "update", sid, "-f", str(change), "-o", "json")))
    assert updated["schedule"] == "30 1 * * *" and updated["timezone"] == "Europe/Berlin"
    assert updated["jobTemplate"]["vmPath"] == f"local/{VM}"  # kept
    disabled = json.loads(ok(cli(xdg, "schedules", "disable", sid, "-o", "json")))
    assert disabled["enabled"] is False
    refused = cli(xdg, "schedules", "run", sid)
    assert refused.exit_code == 1 and "409" in refused.stderr, refused.output
    assert f"virtbackup schedules enable {sid}" in refused.stderr, refused.stderr
    assert json.loads(ok(cli(xdg, "schedules", "enable", sid, "-o", "json")))["enabled"] is True
    bad = cli(xdg, "schedules", "update", sid, "--cron", "61 * * * *")
    assert bad.exit_code == 1 and "schedule" in bad.stderr, bad.output
    # A file's id is the schedule's or refused (ids never change), never silently dropped.
    other_id = tmp_path / "other-id.yaml"
    other_id.write_text("id: another\nschedule: '0 4 * * *'\n")
    moved = cli(xdg, "schedules", "update", sid, "-f", str(other_id))
    assert moved.exit_code == 1 and "cannot change" in moved.stderr, moved.output
    only_id = tmp_path / "only-id.yaml"
    only_id.write_text(f"id: {sid}\n")
    empty = cli(xdg, "schedules", "update", sid, "-f", str(only_id))
    assert empty.exit_code == 1 and "no field but id" in empty.stderr, empty.output
    assert json.loads(ok(cli(xdg, "schedules", "ls", "-o", "json")))[0]["schedule"] == "30 1 * * *"
    ok(cli(xdg, "schedules", "rm", sid))


def test_users_add_login_passwd_rm_and_agents_token(system: System, xdg: Path, vms: Path) -> None:
    user = f"bob{PID}"
    added = json.loads(ok(cli(xdg, "users", "add", user, "--role", "viewer", "-o", "json",
                              VIRTBACKUP_NEW_PASSWORD="bob's first passphrase")))  # fmt: skip
    assert added["username"] == user and added["roles"] == ["viewer"]
    ok(cli(xdg, "login", system.url, "--user", user, "--name", "bob",
           VIRTBACKUP_PASSWORD="bob's first passphrase"))  # fmt: skip
    assert VM in {v["vm"]["name"] for v in json.loads(ok(cli(xdg, "vms", "ls", "-o", "json")))}
    # A viewer may not add users: the API's 403, one line.
    refused = cli(xdg, "users", "add", "eve", VIRTBACKUP_NEW_PASSWORD="x" * 20)
    assert refused.exit_code == 1 and "403" in refused.stderr, refused.output
    # One's own password: the current one too, then the context logs in again.
    ok(cli(xdg, "users", "passwd", VIRTBACKUP_PASSWORD="bob's first passphrase",
           VIRTBACKUP_NEW_PASSWORD="bob's second passphrase"))  # fmt: skip
    assert json.loads(ok(cli(xdg, "servers", "-o", "json")))[0]["id"] == "local"
    ok(cli(xdg, "context", "use", "tok"))
    wrong = cli(xdg, "login", system.url, "--user", user, "--name", "bob",
                VIRTBACKUP_PASSWORD="bob's first passphrase")  # fmt: skip
    assert wrong.exit_code == 1, wrong.output
    changed = json.loads(ok(cli(xdg, "users", "update", user, "--role", "operator",
                                "--disable", "-o", "json")))  # fmt: skip
    assert changed["roles"] == ["operator"] and changed["enabled"] is False
    ok(cli(xdg, "users", "rm", user))
    assert user not in {
        u["username"] for u in json.loads(ok(cli(xdg, "users", "ls", "-o", "json")))
    }
    gone = cli(xdg, "users", "rm", user)
    assert gone.exit_code == 1 and user in gone.stderr, gone.output
    # A registration token: shown once, stored nowhere, and it registers an agent.
    shown = ok(cli(xdg, "agents", "add", "--expires-in", "300"))
    token = shown.split("\n")[1].strip()
    assert token and "shown once" in shown
    assert token not in (xdg / "virtbackup" / "contexts.yaml").read_text()
    resp = httpx.post(
        f"{system.url}/api/v1/agent/register",
        json={
            "registrationToken": token,
            "hostname": f"h{PID}",
            "os": "linux",
            "arch": "x86_64",
            "agentVersion": "1",
        },
        verify=False,
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    agent_id = resp.json()["agentId"]
    assert token not in ok(cli(xdg, "agents", "ls", "-o", "json"))
    ok(cli(xdg, "agents", "rm", agent_id[:8]))
    assert agent_id not in ok(cli(xdg, "agents", "ls", "-o", "json"))
    # Each change above is in the audit trail, with who made it.
    trail = json.loads(ok(cli(xdg, "audit", "ls", "--route", "/api/v1/admin/sys/users",
                              "--limit", "100", "-o", "json")))  # fmt: skip
    assert {("POST", "token"), ("DELETE", "token")} <= {(e["method"], e["actor"]) for e in trail}
    assert any(e["actor"] == user and e["status"] == 403 for e in trail), trail


def test_every_command_has_an_example_in_its_help() -> None:
    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])
        if not hasattr(command, "commands"):
            yield path, command

    commands = list(walk(typer.main.get_command(build()), []))
    paths = [path for path, _ in commands]
    assert len(paths) > 50 and ["webhooks", "add"] in paths and ["audit", "ls"] in paths
    assert not [path for path, command in commands if "Example: " not in (command.help or "")]
    # As --help shows it (markdown: a glob's * stays).
    shown = CliRunner().invoke(build(), ["schedules", "add", "--help"], env={"COLUMNS": "120"})
    assert "Example: virtbackup schedules add --id nightly --cron '0 2 * * *'" in shown.output


def test_shell_completion(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"HOME": str(tmp_path), "SHELL": "/bin/bash"}
    script = runner.invoke(build(), ["--show-completion", "bash"], prog_name="virtbackup", env=env)
    assert script.exit_code == 0, script.output
    assert "_virtbackup_completion" in script.output and "complete " in script.output
    words = runner.invoke(
        build(),
        [],
        prog_name="virtbackup",
        env={
            **env,
            "_VIRTBACKUP_COMPLETE": "complete_bash",
            "COMP_WORDS": "virtbackup webh",
            "COMP_CWORD": "1",
        },
    )
    assert words.output.split() == ["webhooks"], words.output
    installed = runner.invoke(build(), ["--install-completion", "bash"], prog_name="virtbackup",
                              env=env)  # fmt: skip
    assert installed.exit_code == 0, installed.output
    assert (
        "_virtbackup_completion" in (tmp_path / ".bash_completions" / "virtbackup.sh").read_text()
    )


def test_a_changed_certificate_is_refused(system: System, xdg: Path, vms: Path) -> None:
    system.stop("gateway")
    for name in ("agent.crt", "agent.key"):
        (system.data_dir / "tls" / name).unlink()
    system.start("gateway")
    system.wait_ready()
    result = cli(xdg, "servers")
    assert result.exit_code == 1
    assert "certificate" in result.stderr and "changed" in result.stderr, result.stderr
    assert "refusing" in result.stderr
    again = cli(xdg, "login", system.url, "--token", system.token, "--name", "tok")
    assert again.exit_code == 1 and "changed" in again.stderr, again.output
    ok(cli(xdg, "login", system.url, "--token", system.token, "--name", "tok", "--trust-new-cert"))
    assert json.loads(ok(cli(xdg, "servers", "-o", "json")))[0]["id"] == "local"
