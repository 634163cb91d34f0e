"""A fresh trial of the CLI's admin commands and the console's pages (issue 19), as a new
user and as an attacker: what it found, kept as tests. One real running system (one VM
defined and never started), the CLI in-process with typer's CliRunner, the console in
headless Debian Chromium through Playwright.

- A cross-site form (``text/plain``, no CORS preflight) posted to ``/ui/session`` logged
  the victim's browser in as the sender's own account (login CSRF).
- ``webhooks`` without ``--hypersdk-url`` sent the context's token in clear to
  ``http://127.0.0.1:8080``, whoever listens there.
- Tables wrote control characters set by another user (a schedule's name) to the
  reader's terminal: an operator's ``ESC [2J`` cleared an admin's screen.
- A role with ``jobs:control`` but not ``backup:run``, ``restore:run`` or
  ``lifecycle:run`` could start a backup, restore (overwriting a VM) or prune (deleting
  points) by rerunning a finished one (``POST /api/v1/jobs/{id}/rerun``), and the
  console offered it the button.
- ``mount`` printed the commands to attach an export with the VM's name in them as it
  is: a VM named ``web $(touch pwned)`` (a valid name; an operator may restore one under
  it, a session host's user may define one) ran that command in the shell of whoever
  pasted ``nbdinfo "..."``.
- A webhook's header values were shown to every reader of webhooks (``config:read``: a
  viewer) unless the header's name looked like a credential's: ``X-Honeycomb-Team``'s
  API key was not masked.
- ``config set`` of YAML values JSON cannot carry (an unquoted date, ``.nan``) said
  "unexpected answer from the server" instead of naming the place in the file, and a
  document of nested aliases (a "billion laughs") was expanded without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import chromium
from harness import System, local_config, running_system, wait_job
from typer.testing import CliRunner, Result

from virtbackup.cli.client.app import build
from virtbackup.testing.vms import create_vm, remove_vm
from virtbackup.virt import Connection

PID = os.getpid()
ADMIN = ("alice", "a long passphrase")
OPERATOR = ("otto", "an operator's passphrase")
#: An attacker's own account: a password ending in "=" is what a text/plain form can
#: send as JSON (the form's name holds the JSON up to the "=", its value the rest).
ATTACKER = ("eve", "eve long passphrase=")
#: A custom role's user who may cancel and rerun jobs, and start none.
JOBCTL = ("carl", "carl's long passphrase")
VM = f"vbt-t19-{PID}"
#: A valid VM name that is a command in a shell.
HOSTILE_VM = f"vbt-t19 $(touch t19-pwned)-{PID}"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, repo_dir: Path) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("trial19"), orchestrators=1) as system:
        with httpx.Client(
            base_url=system.url, headers=system.auth(), verify=False, timeout=60
        ) as api:
            assert api.post("/config", json=local_config(repo_dir)).status_code == 200
            for (username, password), role in (
                (ADMIN, "admin"),
                (OPERATOR, "operator"),
                (ATTACKER, "viewer"),
                (JOBCTL, "jobctl"),
            ):
                if role == "jobctl":
                    resp = api.post(
                        "/api/v1/admin/sys/roles",
                        json={"name": role, "permissions": ["jobs:read", "jobs:control"]},
                    )
                    assert resp.status_code == 201, resp.text
                resp = api.post(
                    "/api/v1/admin/sys/users",
                    json={"username": username, "password": password, "roles": [role]},
                )
                assert resp.status_code == 201, resp.text
        yield system


@pytest.fixture(scope="module")
def xdg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg")


def cli(xdg: Path, *args: str, **env: str) -> Result:
    return CliRunner().invoke(
        build(), list(args), env={"XDG_CONFIG_HOME": str(xdg), "COLUMNS": "200", **env}
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


# -- the console's login ---------------------------------------------------------------


def test_a_login_not_declared_json_is_refused_and_sets_nothing(system: System) -> None:
    body = json.dumps({"username": ADMIN[0], "password": ADMIN[1]})
    with httpx.Client(base_url=system.url, verify=False, timeout=30) as client:
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": kind} if kind else {}
            resp = client.post("/ui/session", content=body, headers=headers)
            assert resp.status_code == 415, (kind, resp.text)
            assert resp.json()["field"] == "body"
            assert "set-cookie" not in resp.headers
        resp = client.post(
            "/ui/session", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert resp.status_code == 200 and resp.json()["actor"] == ADMIN[0], resp.text


@contextlib.contextmanager
def attacker_site(page: str) -> Iterator[str]:
    """A plain-http site on another origin (another scheme and port: cross-site) that
    serves ``page`` at ``/``; its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = page.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


async def console_login(context: Any, system: System, user: tuple[str, str]) -> Any:
    """A page of ``context`` logged in to the console as ``user`` (name, password)."""
    page = await context.new_page()
    page.set_default_timeout(30_000)
    await page.goto(f"{system.url}/ui/login")
    form = page.locator("#user-login")
    await form.locator("input[name=username]").fill(user[0])
    await form.locator("input[name=password]").fill(user[1])
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(f"{system.url}/ui/")
    return page


async def test_another_sites_form_cannot_swap_the_console_session(
    system: System, browser: Any
) -> None:
    """An admin logged in to the console opens an attacker's page, whose form posts the
    attacker's own login to ``/ui/session``: the admin must still be the admin (before:
    the browser was logged in as the attacker, whose session then saw what the admin
    typed)."""
    name, rest = json.dumps({"username": ATTACKER[0], "password": ATTACKER[1]}).rsplit("=", 1)
    page_html = (
        f'<form method="POST" action="{system.url}/ui/session" enctype="text/plain">'
        f"<input type=\"hidden\" name='{name}' value='{rest}'></form>"
        "<script>document.forms[0].submit()</script>"
    )
    context = await browser.new_context(ignore_https_errors=True)
    try:
        page = await console_login(context, system, ADMIN)
        with attacker_site(page_html) as evil:
            async with page.expect_navigation(url=f"{system.url}/ui/session"):
                await page.goto(evil)
        assert "application/json" in str(await page.evaluate("document.body.innerText"))
        await page.goto(f"{system.url}/ui/")
        who = page.locator("#who")
        await who.filter(has_text=ADMIN[0]).wait_for()
        assert await who.inner_text() == ADMIN[0]
    finally:
        await context.close()


async def test_a_rerun_takes_what_starting_the_job_takes(system: System, browser: Any) -> None:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as api:
        resp = await api.post("/api/v1/destinations/fs/gc", json={})
        assert resp.status_code in {200, 202}, resp.text
        gc_id = resp.json()["id"]
        await wait_job(api, gc_id)  # it fails (no repository yet): a rerun is of any end
        login = await api.post(
            "/api/v1/admin/auth/login", json={"username": JOBCTL[0], "password": JOBCTL[1]}
        )
        carl = {"Authorization": f"Bearer {login.json()['access_token']}"}
        before = (await api.get("/api/v1/jobs", params={"limit": 1000})).json()["total"]
        refused = await api.post(f"/api/v1/jobs/{gc_id}/rerun", headers=carl)
        assert refused.status_code == 403, refused.text
        assert "lifecycle:run" in refused.text
        assert (await api.get("/api/v1/jobs", params={"limit": 1000})).json()["total"] == before
        rerun = await api.post(f"/api/v1/jobs/{gc_id}/rerun")  # the agent token: admin
        assert rerun.status_code == 202, rerun.text
        await wait_job(api, rerun.json()["jobId"])
    # The console offers carl no Rerun (he still sees the job).
    context = await browser.new_context(ignore_https_errors=True)
    try:
        page = await console_login(context, system, JOBCTL)
        await page.goto(f"{system.url}/ui/jobs")
        await page.locator(f'tr[data-row="{gc_id}"]').wait_for()
        assert await page.locator("button.rerun").count() == 0
    finally:
        await context.close()


async def test_no_header_value_of_a_webhook_is_shown(system: System) -> None:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        url = f"https://hooks.example.com/headers-{PID}"
        headers = {"X-Honeycomb-Team": "hc-api-key", "X-Pass": "pw", "Authorization": "Bearer t"}
        added = await api.post(
            "/api/v1/webhooks", json={"url": url, "events": ["job.failed"], "headers": headers}
        )
        assert added.status_code == 201, added.text
        try:
            login = await api.post(
                "/api/v1/admin/auth/login",
                json={"username": ATTACKER[0], "password": ATTACKER[1]},
            )
            viewer = {"Authorization": f"Bearer {login.json()['access_token']}"}
            for path, who in (("/api/v1/webhooks", viewer), ("/api/v1/webhooks", None)):
                listed = await api.get(path, headers=who)
                assert listed.status_code == 200, listed.text
                (hook,) = [h for h in listed.json()["webhooks"] if h["url"] == url]
                assert hook["headers"] == dict.fromkeys(headers, "********")
                assert "hc-api-key" not in listed.text and '"pw"' not in listed.text
        finally:
            hooks = (await api.get("/api/v1/webhooks")).json()["webhooks"]
            (gone,) = [h["id"] for h in hooks if h["url"] == url]
            assert (await api.delete(f"/api/v1/webhooks/{gone}")).status_code in {200, 204}


# -- the CLI -----------------------------------------------------------------------------


@contextlib.contextmanager
def listener_on_8080() -> Iterator[list[bytes]]:
    """What arrives at 127.0.0.1:8080 (the port the CLI used to guess), when that port
    is free here; nothing is recorded (and nothing asserted of it) when it is taken."""
    got: list[bytes] = []
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 8080))
    except OSError:
        sock.close()
        yield got
        return
    sock.listen()
    sock.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    got.append(conn.recv(65536))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join(5)
        sock.close()


async def test_webhooks_go_to_the_contexts_own_gateway_only(system: System, xdg: Path) -> None:
    """A context logged in without ``--hypersdk-url`` manages webhooks through its own
    gateway's ``/api/v1/webhooks`` (pinned TLS); before, its token went in clear to
    ``http://127.0.0.1:8080``, whichever program listens there."""
    ok(await asyncio.to_thread(cli, xdg, "login", system.url, "--token", system.token))
    url = f"https://hooks.example.com/trial19-{PID}"
    with listener_on_8080() as sniffed:
        added = json.loads(
            ok(await asyncio.to_thread(cli, xdg, "webhooks", "add", url, "-o", "json"))
        )
        assert added["url"] == url
        listed = json.loads(ok(await asyncio.to_thread(cli, xdg, "webhooks", "ls", "-o", "json")))
        assert url in {h["url"] for h in listed}
        ok(await asyncio.to_thread(cli, xdg, "webhooks", "rm", url))
    assert sniffed == []
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        hooks = (await api.get("/api/v1/webhooks")).json()["webhooks"]
    assert url not in {h["url"] for h in hooks}


@pytest.fixture(scope="module")
async def idle_vm(system: System, conn: Connection, vm_dir: Path) -> AsyncIterator[str]:
    """``VM`` defined on server ``local`` and never started (a schedule names it)."""
    await create_vm(conn, VM, vm_dir, [1 << 20], start=False)
    try:
        async with httpx.AsyncClient(
            base_url=system.url, headers=system.auth(), verify=False, timeout=60
        ) as api:
            assert (await api.post("/servers/local/refresh")).status_code in {200, 202}
        yield VM
    finally:
        await remove_vm(conn, VM)


@pytest.mark.libvirt
def test_tables_do_not_send_another_users_control_characters(
    system: System, xdg: Path, idle_vm: str
) -> None:
    """An operator names a schedule with terminal escapes (clear the screen, set the
    title); an admin's ``schedules ls`` shows them as text, not as escapes."""
    hostile = "night\x1b]0;owned\x07\x1b[2J\u202eyl"
    with httpx.Client(base_url=system.url, verify=False, timeout=30) as client:
        login = client.post(
            "/api/v1/admin/auth/login", json={"username": OPERATOR[0], "password": OPERATOR[1]}
        )
        assert login.status_code == 200, login.text
        resp = client.post(
            "/api/v1/task/schedulers",
            headers={"Authorization": f"Bearer {login.json()['access_token']}"},
            json={
                "id": f"t19-{PID}",
                "name": hostile,
                "schedule": "0 2 * * *",
                "jobTemplate": {
                    "vmPath": f"local/{idle_vm}",
                    "source": {"type": "libvirt", "serverId": "local"},
                    "destination": {"type": "backup", "destinationId": "fs"},
                },
            },
        )
        assert resp.status_code == 201, resp.text
    ok(cli(xdg, "login", system.url, "--token", system.token))
    for fmt in ("table", "wide"):
        shown = ok(cli(xdg, "schedules", "ls", "-o", fmt))
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, shown
        assert "night\\x1b]0;owned" in shown
    # Scripts still get the value itself.
    listed = json.loads(ok(cli(xdg, "schedules", "ls", "-o", "json")))
    assert hostile in {s["name"] for s in listed}
    from virtbackup.cli.client.output import printable

    assert printable("a\tb\x9bc\u2066") == "a\\x09b\\x9bc\\u2066"


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        ("servers: []\nnote: 2026-01-01\n", "$.note is a YAML date"),
        ("servers: []\nnote: !!binary aGVsbG8=\n", "$.note is a YAML bytes"),
        ("servers: [{id: a, port: .nan}]\n", "$.servers[0].port is not a JSON number"),
        ("? [a]\n: 1\n", "a key must be a string"),
        ("1: x\n", "the key 1 at $ must be a string"),
        # Ten nested aliases of ten expand to 10^10 values once sent as JSON.
        ("servers: &s []\nbackup: *s\n", "aliases (*name) are not allowed"),
    ],
)
def test_config_set_names_yaml_values_json_cannot_carry(
    system: System, xdg: Path, tmp_path: Path, yaml_text: str, said: str
) -> None:
    ok(cli(xdg, "login", system.url, "--token", system.token))
    file = tmp_path / "config.yaml"
    file.write_text(yaml_text)
    result = cli(xdg, "config", "set", str(file))
    assert result.exit_code == 1, result.output
    assert said in result.stderr and str(file) in result.stderr, result.stderr
    assert "unexpected answer" not in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ("https://[::1", "--token", "t"),
        ("https://127.0.0.1:99999", "--token", "t"),
    ],
)
def test_a_malformed_url_is_said_to_be_one(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Before: "unexpected answer from the server: ValueError: ..." (no server was asked)."""
    result = cli(tmp_path, "login", *args)
    assert result.exit_code == 1, result.output
    assert "the URL must be https://HOST[:PORT]" in result.stderr, result.stderr
    assert "unexpected answer" not in result.stderr and "Traceback" not in result.output


@pytest.fixture(scope="module")
async def hostile_point(system: System, conn: Connection, vm_dir: Path) -> AsyncIterator[str]:
    """A restore point of ``HOSTILE_VM`` (running, one 4 MiB disk): its id."""
    await create_vm(conn, HOSTILE_VM, vm_dir, [4 << 20])
    try:
        async with httpx.AsyncClient(
            base_url=system.url, headers=system.auth(), verify=False, timeout=60
        ) as api:
            assert (await api.post("/servers/local/refresh")).status_code in {200, 202}
            resp = await api.post("/servers/local/backup", json={"vmName": HOSTILE_VM})
            assert resp.status_code in {200, 202}, resp.text
            job = await wait_job(api, resp.json()["jobId"])
            assert job["state"] == "success", job
            points = (await api.get("/api/v1/restore-points", params={"vmName": HOSTILE_VM})).json()
            yield points[0]["id"]
    finally:
        await remove_vm(conn, HOSTILE_VM)


@pytest.mark.libvirt
def test_mount_prints_commands_that_stay_commands(
    system: System,
    xdg: Path,
    hostile_point: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    ok(cli(xdg, "login", system.url, "--token", system.token))
    shown = ok(cli(xdg, "mount", hostile_point, "vda", "--ttl", "120"))
    export_id = re.search(r"virtbackup umount (\S+)", shown)
    assert export_id, shown
    try:
        (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        assert re.fullmatch(r"[\w.-]+", folder.name), folder.name
        (line,) = [x.strip() for x in shown.splitlines() if x.strip().startswith("nbdinfo ")]
        run = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, (line, run.stderr)
        assert not (tmp_path / "t19-pwned").exists(), line
    finally:
        ok(cli(xdg, "umount", export_id[1]))


# -- read-modify-write of the configuration (the console's server and destination forms) --


async def test_a_config_change_with_if_match_is_stored_only_at_that_revision(
    system: System,
) -> None:
    """``GET /config`` gives its revision as an ETag; a POST with ``If-Match`` of an older
    one is a 412 and stores nothing; a bad ``If-Match`` is a 400 naming it."""
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        read = await api.get("/config")
        etag = read.headers["etag"]
        assert re.fullmatch(r'"[0-9]+"', etag), etag
        config = read.json()
        # Somebody else changes it in between (no If-Match: as agent-api.md's POST).
        other = {**config, "servers": [*config["servers"], {"id": "t19-bystander", "host": ""}]}
        assert (await api.post("/config", json=other)).status_code == 200
        mine = {**config, "backupDestinationId": config["backupDestinationId"]}
        stale = await api.post("/config", json=mine, headers={"if-match": etag})
        assert stale.status_code == 412, stale.text
        assert "changed since it was read" in stale.json()["error"]
        now = await api.get("/config")
        assert "t19-bystander" in [s["id"] for s in now.json()["servers"]]  # not overwritten
        assert now.headers["etag"] != etag
        for bad in ("*", "12", '"1", "2"', '"x"'):
            refused = await api.post("/config", json=mine, headers={"if-match": bad})
            assert refused.status_code == 400 and "If-Match" in refused.text, (bad, refused.text)
        current = now.json()
        current["servers"] = [s for s in current["servers"] if s["id"] != "t19-bystander"]
        stored = await api.post("/config", json=current, headers={"if-match": now.headers["etag"]})
        assert stored.status_code == 200, stored.text


async def test_the_consoles_server_form_keeps_a_change_made_meanwhile(
    system: System, browser: Any
) -> None:
    """The form reads the configuration, adds the server and posts it back: a change made
    by someone else between the read and the post must survive (before: the post
    replaced the whole configuration with the one read, and the change was lost)."""
    context = await browser.new_context(ignore_https_errors=True)
    api = httpx.AsyncClient(base_url=system.url, headers=system.auth(), verify=False, timeout=30)
    try:
        page = await console_login(context, system, ADMIN)
        await page.goto(f"{system.url}/ui/servers")
        meddled: list[str] = []

        async def meddle(route: Any) -> None:
            if route.request.method == "POST" and not meddled:
                config = (await api.get("/config")).json()
                config["servers"].append({"id": "t19-meanwhile", "host": ""})
                assert (await api.post("/config", json=config)).status_code == 200
                meddled.append("t19-meanwhile")
            await route.continue_()

        await page.route(f"{system.url}/config", meddle)
        add = page.locator("#add-server")
        await add.locator("input[name=id]").fill("t19-added")
        await add.get_by_role("button", name="Add server").click()
        await page.locator('article[data-server="t19-added"]').wait_for()
        servers = [s["id"] for s in (await api.get("/config")).json()["servers"]]
        assert meddled and "t19-meanwhile" in servers and "t19-added" in servers, servers
        config = (await api.get("/config")).json()
        config["servers"] = [s for s in config["servers"] if not s["id"].startswith("t19-")]
        assert (await api.post("/config", json=config)).status_code == 200
    finally:
        await api.aclose()
        await context.close()
