"""The web console (``/ui``) in headless Chromium (Debian's, driven by Playwright) against
one real running system (real services, libvirtd/QEMU, a filesystem destination) and one
64 MiB VM: log in, see the VM, back it up and watch the progress reach 100%, see the
point, restore it under a new name, run a prune dry run; power the VM off and on, add
and remove a server; add a destination from its form (a bad path shown at the field),
see its statistics and plot, run a GC; add a schedule and run it now, import a plan;
mount a disk of a point (instant access) and unmount it; rerun a job; add a webhook and
test it against a local receiver; add a role and a user and find these changes in the
audit log; see a disk resize as definition drift; a viewer sees no action button (also
on a phone-sized screen, without horizontal scrolling) and the API refuses them anyway;
a cookie session's change without the CSRF header is refused. The tests build on each
other, in order. Screenshots of the main pages go to the module's temporary directory
(``console-shots``)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
from browser import chromium
from harness import System, local_config, running_system

from virtbackup.testing.images import create_image
from virtbackup.testing.receiver import Receiver
from virtbackup.testing.vms import build_vm_xml, guest_write, remove_vm
from virtbackup.virt import Connection

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PID = os.getpid()
VM = f"vbt-ui-{PID}"
COPY = f"vbt-uicopy-{PID}"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = ("alice", "a long passphrase")
VIEWER = ("victor", "another long passphrase")
WAIT_MS = 90_000


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("console"), orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-shots")


@pytest.fixture(scope="module")
async def vm(system: System, conn: Connection, repo_dir: Path, vm_dir: Path) -> AsyncIterator[str]:
    """``VM`` running with one 64 MiB qcow2 disk; users alice (admin), victor (viewer)."""
    disk = create_image(vm_dir / f"{VM}-vda.qcow2", 64 * MiB)
    for name in (VM, COPY):
        await remove_vm(conn, name)
    try:
        dom = await conn.call(conn.raw.defineXML, build_vm_xml(VM, [disk]))
        await conn.call(dom.create, timeout=60)
        await guest_write(conn, VM, "vda", 0, 4 * MiB, pattern=0xA5)
        async with httpx.AsyncClient(
            base_url=system.url, headers=system.auth(), verify=False, timeout=60
        ) as api:
            assert (await api.post("/config", json=local_config(repo_dir))).status_code == 200
            assert (await api.post("/servers/local/refresh")).status_code in {200, 202}
            for (username, password), role in ((ADMIN, "admin"), (VIEWER, "viewer")):
                resp = await api.post(
                    "/api/v1/admin/sys/users",
                    json={"username": username, "password": password, "roles": [role]},
                )
                assert resp.status_code == 201, resp.text
        yield VM
    finally:
        for name in (VM, COPY):
            await remove_vm(conn, name)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium(CHROMIUM_ARGS) as launched:
        yield launched


async def new_page(browser: Any, width: int = 1280, height: int = 800) -> Any:
    context = await browser.new_context(
        ignore_https_errors=True, viewport={"width": width, "height": height}
    )
    page = await context.new_page()
    page.set_default_timeout(30_000)
    return page


async def log_in(page: Any, system: System, username: str, password: str) -> None:
    await page.goto(f"{system.url}/ui/login")
    form = page.locator("#user-login")
    await form.locator("input[name=username]").fill(username)
    await form.locator("input[name=password]").fill(password)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(f"{system.url}/ui/")
    # The page has read its session (and removed what the user may not use) once it
    # shows who is logged in: before that, every link is still there.
    await page.locator("#who").filter(has_text=username).wait_for()


@pytest.fixture(scope="module")
async def admin(browser: Any, system: System, vm: str) -> AsyncIterator[Any]:
    page = await new_page(browser)
    try:
        yield page
    finally:
        await page.context.close()


async def test_pages_need_a_session_and_a_wrong_password_is_shown_at_its_field(
    admin: Any, system: System
) -> None:
    await admin.goto(f"{system.url}/ui/jobs")
    assert admin.url == f"{system.url}/ui/login"  # redirected: no session
    form = admin.locator("#user-login")
    await form.locator("input[name=username]").fill(ADMIN[0])
    await form.locator("input[name=password]").fill("not the password")
    await form.locator("button[type=submit]").click()
    error = form.locator('[data-error-for="password"]')
    await error.filter(has_text="wrong user name or password").wait_for()
    assert await admin.context.cookies() == []  # a refusal sets nothing
    token_form = admin.locator("#token-login")
    await token_form.locator("input[name=token]").fill("wrong-token")
    await token_form.locator("button[type=submit]").click()
    await token_form.locator('[data-error-for="token"]').filter(has_text="unauthorized").wait_for()


async def test_login_sets_a_strict_httponly_session_and_shows_the_vm(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await log_in(admin, system, *ADMIN)
    cookies = {c["name"]: c for c in await admin.context.cookies()}
    session = cookies["vb_session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert cookies["vb_refresh"]["httpOnly"] and cookies["vb_refresh"]["path"] == "/ui/session"
    assert not cookies["vb_csrf"]["httpOnly"] and cookies["vb_csrf"]["sameSite"] == "Strict"
    # The page's scripts cannot read the credential.
    assert "vb_session" not in await admin.evaluate("document.cookie")
    row = admin.locator(f'tr[data-vm="{vm}"]')
    await row.wait_for()
    assert "never" in await row.locator("td.age").inner_text()
    assert "old" in (await row.locator("td.age").get_attribute("class") or "")
    assert await admin.locator("#who").inner_text() == ADMIN[0]


async def test_a_new_system_shows_where_to_add_a_server_and_a_destination(
    admin: Any, system: System, vm: str, repo_dir: Path
) -> None:
    """With no server and no destination (a new system), the dashboard says where to add
    them, not just "No VMs."; once configured, it says nothing of it."""
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=60
    ) as api:
        empty = {**local_config(repo_dir), "servers": [], "destinations": []}
        empty["backupDestinationId"] = None
        assert (await api.post("/config", json=empty)).status_code == 200, "empty config"
        try:
            await admin.goto(f"{system.url}/ui/")
            steps = admin.locator("#first-steps")
            await steps.locator('li[data-step="server"]', has_text="Servers").wait_for()
            await steps.locator('li[data-step="destination"]', has_text="Destinations").wait_for()
            await steps.get_by_role("link", name="Servers").click()
            await admin.wait_for_url(f"{system.url}/ui/servers")
            await admin.locator("#add-server").wait_for()
        finally:
            assert (await api.post("/config", json=local_config(repo_dir))).status_code == 200
    await admin.goto(f"{system.url}/ui/")
    await admin.locator(f'tr[data-vm="{vm}"]').wait_for()
    assert await admin.locator("#first-steps").count() == 0


async def test_a_change_without_the_csrf_header_is_refused(admin: Any, system: System) -> None:
    status, text = await admin.evaluate(
        """async () => {
            const r = await fetch('/servers/local/backup', {method: 'POST',
                headers: {'content-type': 'application/json'}, body: '{"vmName": "x"}'});
            return [r.status, await r.text()];
        }"""
    )
    assert status == 403 and "x-csrf-token" in text
    # The cookie alone opens reads for the page (same authentication as a header).
    status = await admin.evaluate("async () => (await fetch('/jobs')).status")
    assert status == 200


async def test_back_up_now_reaches_100_percent_and_the_point_is_listed(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/vm?server=local&vm={vm}")
    await admin.get_by_role("button", name="Back up now").click()
    status = admin.locator("#backup-status")
    await status.locator(".state", has_text="success").wait_for(timeout=WAIT_MS)
    assert await status.locator(".pct").inner_text() == "100%"
    assert await status.locator("progress").get_attribute("value") == "100"
    points = admin.locator("#points li")
    await points.first.wait_for()
    assert await points.count() == 1
    assert "full" in await points.first.inner_text()
    await admin.screenshot(path=str(shots / "vm.png"), full_page=True)
    await admin.goto(f"{system.url}/ui/")
    await admin.locator(f'tr[data-vm="{vm}"] td.age.ok').wait_for()
    await admin.screenshot(path=str(shots / "dashboard.png"), full_page=True)


async def test_restore_under_a_new_name(
    admin: Any, system: System, vm: str, conn: Connection, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/vm?server=local&vm={vm}")
    form = admin.locator("#restore")
    # Refused before sending: the field says why.
    await form.locator("input[name=targetDirectory]").fill("relative/dir")
    await form.get_by_role("button", name="Restore").click()
    await form.locator('[data-error-for="targetDirectory"]').filter(has_text="absolute").wait_for()
    await form.locator("input[name=targetDirectory]").fill("")
    await form.locator("input[name=vmName]").fill(COPY)
    await form.get_by_role("button", name="Restore").click()
    status = admin.locator("#restore-status")
    await status.locator(".state", has_text="success").wait_for(timeout=WAIT_MS)
    assert await status.locator(".pct").inner_text() == "100%"
    names = await conn.call(conn.raw.listDefinedDomains)
    running = [d.name() for d in await conn.call(conn.raw.listAllDomains)]
    assert COPY in names or COPY in running
    await admin.goto(f"{system.url}/ui/jobs")
    await admin.locator("#jobs tbody tr").nth(1).wait_for()
    assert await admin.locator("#jobs tbody tr").count() >= 2
    await admin.locator("#jobs tbody tr a").first.click()
    await admin.locator("#job-log").filter(has_text="restore").wait_for()
    await admin.screenshot(path=str(shots / "jobs.png"), full_page=True)


async def test_prune_dry_run_is_shown_and_deletes_nothing(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/destinations")
    card = admin.locator('article[data-destination="fs"]')
    # Rules that would keep nothing (the API refuses them): said at the field, not sent.
    await card.locator("input[name=keepLast]").fill("0")
    await card.get_by_role("button", name="Prune dry run").click()
    await card.locator('[data-error-for="keepLast"]').filter(has_text="keeps nothing").wait_for()
    assert await card.locator(".prune-result").inner_text() == ""
    # Another VM's name: the API's refusal is shown in the form.
    await card.locator("input[name=vmName]").fill("bad/name")
    await card.locator("input[name=keepLast]").fill("1")
    await card.get_by_role("button", name="Prune dry run").click()
    await card.locator('[data-error-for="vmName"]').filter(has_text="vmName").wait_for()
    await card.locator("input[name=vmName]").fill("")
    await card.locator("input[name=keepLast]").fill("1")
    await card.get_by_role("button", name="Prune dry run").click()
    result = card.locator(".prune-result")
    await result.get_by_text("Dry run: nothing was deleted").wait_for()
    rows = result.locator("tbody tr")
    assert await rows.count() == 1
    assert vm in await rows.first.inner_text()
    await admin.screenshot(path=str(shots / "destinations.png"), full_page=True)
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        points = (await api.get("/api/v1/restore-points", params={"vmName": vm})).json()
    assert len(points) == 1


# ---- the rest of the pages: servers, destinations, schedules, webhooks, users, audit ----


async def test_servers_show_state_and_vm_actions_and_a_server_is_added_and_removed(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/servers")
    card = admin.locator('article[data-server="local"]')
    row = card.locator(f'tr[data-vm="{vm}"]')
    await row.locator("td.power", has_text="running").wait_for()
    assert await card.locator(".state-success", has_text="reachable").count() == 1
    await admin.locator("section", has_text="Definition drift").wait_for()
    await admin.screenshot(path=str(shots / "servers.png"))
    # Power off, then start: each is the API's action, and the state follows.
    await row.get_by_role("button", name="Power off").click()
    await row.locator("td.power", has_text="shutoff").wait_for(timeout=WAIT_MS)
    await row.get_by_role("button", name="Start").click()
    await row.locator("td.power", has_text="running").wait_for(timeout=WAIT_MS)
    # Add a server (this host's libvirt again, under another id), then remove it.
    form = admin.locator("#add-server")
    await form.locator("input[name=id]").fill("local")
    await form.get_by_role("button", name="Add server").click()
    await form.locator('[data-error-for="id"]').filter(has_text="exists").wait_for()
    await form.locator("input[name=id]").fill("spare")
    await form.get_by_role("button", name="Add server").click()
    spare = admin.locator('article[data-server="spare"]')
    await spare.locator(f'tr[data-vm="{vm}"]').wait_for()
    admin.once("dialog", lambda dialog: dialog.accept())
    await spare.get_by_role("button", name="Remove server").click()
    await spare.wait_for(state="detached")
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        config = (await api.get("/config")).json()
    assert [s["id"] for s in config["servers"]] == ["local"]


async def test_a_destination_is_added_and_tested_from_its_form(
    admin: Any, system: System, vm: str, shots: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("console-second")
    await admin.goto(f"{system.url}/ui/destinations")
    form = admin.locator("#add-destination")
    path_error = form.locator('[data-error-for="path"]')
    await form.locator("input[name=id]").fill("second")
    # A system directory: the API's refusal (400 naming the destination's path) is
    # shown at the path field.
    await form.locator("input[name=path]").fill("/etc/virtbackup")
    await form.get_by_role("button", name="Add and test").click()
    await path_error.filter(has_text="system directory").wait_for()
    # A directory that is not there: the API's test fails, said at the field, and the
    # destination is not kept.
    await form.locator("input[name=path]").fill(str(base / "missing"))
    await form.get_by_role("button", name="Add and test").click()
    await path_error.filter(has_text="does not exist").wait_for()
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        for _ in range(50):
            ids = [d["id"] for d in (await api.get("/config")).json()["destinations"]]
            if ids == ["fs"]:
                break
            await admin.wait_for_timeout(100)
        assert ids == ["fs"]
    await form.locator("input[name=path]").fill(str(base))
    await form.get_by_role("button", name="Add and test").click()
    await admin.locator("#add-destination-test", has_text="reachable").wait_for()
    second = admin.locator('article[data-destination="second"]')  # the page reloads
    await second.locator("dd.dedup").wait_for()
    # Statistics of the destination that holds the VM's point: figures and the plot.
    fs = admin.locator('article[data-destination="fs"]')
    plot = fs.locator("svg.plot")
    await plot.wait_for()
    label = await plot.get_attribute("aria-label") or ""
    assert re.fullmatch(r"logical [1-9][\d.]* \S+, stored [1-9][\d.]* \S+ over 1 points", label), (
        label
    )
    assert await plot.locator("path.logical").count() == 1
    assert await plot.locator("path.stored").count() == 1
    assert (await fs.locator("dd.dedup").inner_text()).endswith("x")
    await fs.screenshot(path=str(shots / "destination-stats.png"))
    # GC starts a job, followed to its end.
    await fs.get_by_role("button", name="GC").click()
    await fs.locator(".job-status .state", has_text="success").wait_for(timeout=WAIT_MS)
    # The Google account of gdrive destinations: tokens stored (never shown), then forgotten.
    google = admin.locator("#google-tokens")
    await google.locator("input[name=accessToken]").fill("ya29.access")
    await google.get_by_role("button", name="Store tokens").click()
    await google.locator('[data-error-for="refreshToken"]').filter(has_text="required").wait_for()
    await google.locator("input[name=refreshToken]").fill("1//refresh")
    await google.locator("input[name=accountEmail]").fill("ops@example.com")
    await google.locator("input[name=expiresAt]").fill("2030-01-01T00:00:00Z")
    await google.get_by_role("button", name="Store tokens").click()
    await google.locator("#google-status", has_text="stored for ops@example.com").wait_for()
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        stored = (await api.get("/config")).json()["backup"]["gdrive"]
        assert stored["refreshToken"] == "********" and stored["accountEmail"] == "ops@example.com"
        await google.get_by_role("button", name="Forget tokens").click()
        await google.locator("#google-status", has_text="no account stored").wait_for()
        assert (await api.get("/config")).json()["backup"]["gdrive"]["refreshToken"] == ""


async def test_a_schedule_is_added_and_run_now(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/schedules")
    form = admin.locator("#add-schedule")
    await form.locator("input[name=name]").fill("nightly")
    await form.locator("input[name=vmPath]").fill(vm)
    # Every minute is more often than the minimum interval: the API's refusal, at the field.
    await form.locator("input[name=schedule]").fill("* * * * *")
    await form.get_by_role("button", name="Add schedule").click()
    await form.locator('[data-error-for="schedule"]').filter(has_text="apart").wait_for()
    await form.locator("input[name=schedule]").fill("0 3 * * *")
    await form.get_by_role("button", name="Add schedule").click()
    row = admin.locator('tr[data-schedule="nightly"]')  # the page reloads
    await row.locator("td.enabled", has_text="yes").wait_for()
    await row.get_by_role("button", name="Run now").click()
    status = admin.locator("#schedule-status")
    await status.locator(".state", has_text="success").wait_for(timeout=WAIT_MS)
    await admin.screenshot(path=str(shots / "schedules.png"))
    await row.get_by_role("button", name="Disable").click()
    await admin.locator('tr[data-schedule="nightly"] td.enabled', has_text="no").wait_for()
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        items = (await api.get("/api/v1/task/schedulers")).json()["items"]
        points = (await api.get("/api/v1/restore-points", params={"vmName": vm})).json()
    (nightly,) = [s for s in items if s["name"] == "nightly"]
    assert nightly["enabled"] is False and nightly["runCount"] == 1
    assert nightly["jobTemplate"]["vmPath"] == f"local/{vm}"
    assert len(points) == 2  # the run's backup
    # A backup plan imported from its YAML: a refusal names its line.
    plan = (
        "id: ui-plan\nname: UI plan\npipelines:\n  - id: yearly\n    vms:\n"
        f'      - server: local\n        vm: "{vm}"\n    destination: DEST\n'
        '    schedule:\n      cron: "0 3 1 1 *"\n      timezone: UTC\n'
    )
    form = admin.locator("#import-plan")
    await form.locator("textarea[name=yaml]").fill(plan.replace("DEST", "nowhere"))
    await form.get_by_role("button", name="Import").click()
    error = form.locator('[data-error-for="yaml"]')
    await error.filter(has_text="nowhere").wait_for()
    assert "line 8" in await error.inner_text()
    await form.locator("textarea[name=yaml]").fill(plan.replace("DEST", "fs"))
    await form.get_by_role("button", name="Import").click()
    await admin.locator('tr[data-project="ui-plan"]', has_text="yearly").wait_for()


async def test_instant_access_mounts_a_disk_shows_how_to_attach_it_and_unmounts(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/vm?server=local&vm={vm}")
    form = admin.locator("#mount")
    await form.locator("select[name=disk]").wait_for()
    assert await form.locator("select[name=disk] option").all_inner_texts() == ["vda (64.0 MiB)"]
    await form.locator("input[name=ttlSeconds]").fill("90000")
    await form.get_by_role("button", name="Mount").click()
    await form.locator('[data-error-for="ttlSeconds"]').filter(has_text="86400").wait_for()
    await form.locator("input[name=ttlSeconds]").fill("600")
    await form.get_by_role("button", name="Mount").click()
    url = await admin.locator("#export-result code.nbd-url").inner_text()
    assert re.fullmatch(r"nbds://[\w.]+:\d+/vda", url), url
    how = await admin.locator("#export-result pre.attach").inner_text()
    assert "qemu-nbd -r -c /dev/nbd0" in how and "PRIVATE KEY" in how and "umask 077" in how
    row = admin.locator("#exports tr[data-export]", has_text=url)
    await row.locator(".export-state", has_text="active").wait_for()
    await admin.locator("section", has=form).screenshot(path=str(shots / "instant-access.png"))
    await row.get_by_role("button", name="Unmount").click()
    await row.locator(".export-state", has_text="stopped").wait_for()
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        exports = (await api.get("/restore/exports")).json()
    assert [e["state"] for e in exports if e["nbdUrl"] == url] == ["stopped"]


async def test_a_finished_job_is_rerun_from_the_jobs_page(
    admin: Any, system: System, vm: str
) -> None:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        jobs = (await api.get("/jobs")).json()
        done = [j for j in jobs if j["type"] == "backup" and j["state"] == "success"]
        await admin.goto(f"{system.url}/ui/jobs")
        row = admin.locator(f'tr[data-row="{done[0]["id"]}"]')
        await row.get_by_role("button", name="Rerun").click()
        link = row.locator("a.rerun-of")
        await link.wait_for()
        new_id = (await link.get_attribute("href") or "#")[1:]
        new_row = admin.locator(f'tr[data-row="{new_id}"]')
        await new_row.locator(".state", has_text="success").wait_for(timeout=WAIT_MS)
        job = (await api.get(f"/jobs/{new_id}")).json()
    assert job["type"] == "backup" and job["vmName"] == vm


async def test_a_webhook_is_added_and_tested_against_a_local_receiver(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    async with Receiver() as rx:
        await admin.goto(f"{system.url}/ui/webhooks")
        form = admin.locator("#add-webhook")
        await form.locator("input[name=url]").fill("ftp://127.0.0.1/hook")
        await form.get_by_role("button", name="Add webhook").click()
        await form.locator('[data-error-for="url"]').filter(has_text="url").wait_for()
        await form.locator("input[name=url]").fill(f"{rx.url}/hook")
        await form.get_by_role("button", name="Add webhook").click()
        row = admin.locator(f'tr[data-webhook="{rx.url}/hook"]')  # the page reloads
        await row.get_by_role("button", name="Test").click()
        await row.locator(".test-result.ok", has_text="test webhook sent").wait_for()
        (received,) = await rx.wait_for("/hook", 1, timeout=15)
        assert received.headers["x-virtbackup-event"] == "test"
        await admin.screenshot(path=str(shots / "webhooks.png"))


async def test_a_role_and_a_user_are_added_and_the_audit_log_shows_the_changes(
    admin: Any, system: System, vm: str, shots: Path
) -> None:
    await admin.goto(f"{system.url}/ui/users")
    roles = admin.locator("#add-role")
    await roles.locator("input[name=name]").fill("night-ops")
    for permission in ("jobs:read", "backups:read"):
        await roles.locator(f'input[name=permissions][value="{permission}"]').check()
    await roles.get_by_role("button", name="Add role").click()
    await admin.locator('tr[data-role="night-ops"]', has_text="backups:read").wait_for()
    form = admin.locator("#add-user")
    await form.locator("input[name=username]").fill("olga")
    await form.locator("input[name=password]").fill("short")
    await form.locator("select[name=roles]").select_option("night-ops")
    await form.get_by_role("button", name="Add user").click()
    await form.locator('[data-error-for="password"]').filter(has_text="password").wait_for()
    await form.locator("input[name=password]").fill("a third long passphrase")
    await form.get_by_role("button", name="Add user").click()
    await admin.locator('tr[data-user="olga"]', has_text="night-ops").wait_for()
    await admin.goto(f"{system.url}/ui/audit")
    log = admin.locator("main table")
    await log.wait_for()
    for path in (
        "/api/v1/admin/sys/users",
        "/api/v1/admin/sys/roles",
        "/config",
        "/api/v1/task/schedulers",
        "/api/v1/webhooks",
        "/api/v1/webhooks/test",
        "/servers/local/actions",
    ):
        row = log.locator(f'tr[data-method="POST"][data-path="{path}"]')
        assert await row.count() >= 1, path
        assert ADMIN[0] in await row.first.inner_text()
    await admin.screenshot(path=str(shots / "audit.png"))


async def test_definition_drift_is_shown_on_the_vm_and_servers_pages(
    admin: Any, system: System, vm: str, conn: Connection
) -> None:
    dom = await conn.lookup(vm)
    await conn.call(dom.blockResize, "vda", 80 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    await admin.goto(f"{system.url}/ui/vm?server=local&vm={vm}")
    await admin.locator("#drift p", has_text="No definition drift").wait_for()
    await admin.get_by_role("button", name="Back up now").click()
    await admin.locator("#backup-status .state", has_text="success").wait_for(timeout=WAIT_MS)
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as api:
        for _ in range(100):  # the check runs after the backup's success
            found = await api.get("/api/v1/anomalies", params={"type": "schema_drift"})
            if found.json()["anomalies"]:
                break
            await admin.wait_for_timeout(100)
    change = "disk vda resized from 64.0 MiB to 80.0 MiB"
    await admin.reload()
    await admin.locator("#drift li", has_text=change).wait_for()
    await admin.goto(f"{system.url}/ui/servers")
    await admin.locator(f'tr[data-drift="{vm}"]', has_text=change).wait_for()


async def test_a_viewer_sees_no_action_and_the_api_refuses_them(
    browser: Any, system: System, vm: str, shots: Path
) -> None:
    page = await new_page(browser, 390, 844)  # a phone-sized screen
    try:
        await log_in(page, system, *VIEWER)
        await page.locator(f'tr[data-vm="{vm}"] td.age.ok').wait_for()
        await page.screenshot(path=str(shots / "dashboard-phone.png"), full_page=True)
        await page.goto(f"{system.url}/ui/vm?server=local&vm={vm}")
        await page.locator("#points li").first.wait_for()
        assert await page.locator("#backup").count() == 0
        assert await page.locator("#restore").count() == 0
        assert await page.get_by_role("button", name="Back up now").count() == 0
        await page.goto(f"{system.url}/ui/destinations")
        await page.locator('article[data-destination="fs"]').wait_for()
        assert await page.get_by_role("button", name="Prune dry run").count() == 0
        await page.goto(f"{system.url}/ui/jobs")
        await page.locator("#jobs tbody tr").first.wait_for()
        assert await page.locator("button.cancel").count() == 0
        status = await page.evaluate(
            """async (vm) => {
                const csrf = /vb_csrf=([^;]*)/.exec(document.cookie)[1];
                const r = await fetch('/servers/local/backup', {method: 'POST',
                    headers: {'content-type': 'application/json', 'x-csrf-token': csrf},
                    body: JSON.stringify({vmName: vm})});
                return r.status;
            }""",
            vm,
        )
        assert status == 403
        # Logging out ends the session: the pages send the browser to the login again.
        await page.get_by_role("button", name="Log out").click()
        await page.wait_for_url(f"{system.url}/ui/login")
        await page.goto(f"{system.url}/ui/")
        assert page.url == f"{system.url}/ui/login"
    finally:
        await page.context.close()


async def test_the_agent_token_logs_in(browser: Any, system: System, vm: str) -> None:
    page = await new_page(browser)
    try:
        await page.goto(f"{system.url}/ui/login")
        form = page.locator("#token-login")
        await form.locator("input[name=token]").fill(system.token)
        await form.locator("button[type=submit]").click()
        await page.wait_for_url(f"{system.url}/ui/")
        await page.locator(f'tr[data-vm="{vm}"]').wait_for()
        assert await page.locator("#who").inner_text() == "token"
    finally:
        await page.context.close()


async def test_the_new_pages_fit_a_phone_and_a_viewer_sees_no_action_there(
    browser: Any, system: System, vm: str, shots: Path
) -> None:
    page = await new_page(browser, 390, 844)
    try:
        await log_in(page, system, *VIEWER)
        # The users and audit pages are not offered to a viewer (the API refuses them too).
        assert await page.locator('nav a[href="/ui/audit"]').count() == 0
        assert await page.locator('nav a[href="/ui/users"]').count() == 0
        for path, ready in (
            ("/ui/servers", f'article[data-server="local"] tr[data-vm="{vm}"]'),
            ("/ui/destinations", 'article[data-destination="fs"] svg.plot'),
            ("/ui/schedules", 'tr[data-schedule="nightly"]'),
            ("/ui/webhooks", "tr[data-webhook]"),
            ("/ui/agents", "tr[data-agent]"),
            (f"/ui/vm?server=local&vm={vm}", "#drift li"),
        ):
            await page.goto(f"{system.url}{path}")
            await page.locator(ready).first.wait_for()
            assert await page.locator("main button").count() == 0, path
            assert await page.locator("main form").count() == 0, path
            fits = "document.documentElement.scrollWidth <= window.innerWidth"
            assert await page.evaluate(fits), path  # no horizontal scroll
            if path == "/ui/destinations":
                await page.screenshot(path=str(shots / "destinations-phone.png"), full_page=True)
        await page.goto(f"{system.url}/ui/audit")
        await page.locator("main .error", has_text="forbidden").wait_for()
    finally:
        await page.context.close()
    # An administrator's pages, with their forms and action buttons, fit a phone too.
    page = await new_page(browser, 390, 844)
    try:
        await log_in(page, system, *ADMIN)
        for path, ready in (
            ("/ui/servers", "#add-server"),
            ("/ui/destinations", "#google-tokens"),
            ("/ui/schedules", "#import-plan"),
            ("/ui/webhooks", "#add-webhook"),
            ("/ui/users", "#add-role"),
            ("/ui/audit", "main table"),
            (f"/ui/vm?server=local&vm={vm}", "#mount"),
        ):
            await page.goto(f"{system.url}{path}")
            await page.locator(ready).wait_for()
            fits = "document.documentElement.scrollWidth <= window.innerWidth"
            assert await page.evaluate(fits), path
    finally:
        await page.context.close()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"not json", 400, "body"),
        (b'["alice"]', 400, "body"),
        (b'{"username": "alice", "password": "x", "extra": 1}', 400, "body"),
        (b'{"username": 7, "password": "x"}', 400, "username"),
        (b'{"username": "alice"}', 400, "password"),
        (b'{"token": ""}', 400, "token"),
        (b'{"token": "t", "username": "alice"}', 400, "token"),
        (b'{"token": "wrong"}', 401, "token"),
        (b'{"username": "nobody", "password": "wrong"}', 401, "password"),
    ],
)
async def test_bad_logins_are_4xx_naming_the_field(
    system: System, vm: str, body: bytes, status: int, field: str
) -> None:
    async with httpx.AsyncClient(base_url=system.url, verify=False, timeout=30) as client:
        resp = await client.post(
            "/ui/session", content=body, headers={"content-type": "application/json"}
        )
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field
    assert "set-cookie" not in resp.headers


async def test_the_pages_name_their_icon_so_browsers_ask_no_refused_favicon(
    system: System, vm: str
) -> None:
    """Without a declared icon, every browser asked ``/favicon.ico`` of each page before
    login and got a 401 (noise in its console and in the gateway's log)."""
    async with httpx.AsyncClient(base_url=system.url, verify=False, timeout=30) as client:
        login = (await client.get("/ui/login")).text
        assert '<link rel="icon" type="image/svg+xml" href="/ui/static/icon.svg">' in login
        icon = await client.get("/ui/static/icon.svg")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
        assert icon.text.startswith("<svg")


async def test_the_console_routes_keep_the_apis_authentication(system: System, vm: str) -> None:
    async with httpx.AsyncClient(base_url=system.url, verify=False, timeout=30) as client:
        # An unknown path under /ui is the API's: 401 without a credential, 404 with one.
        assert (await client.get("/ui/nothing-here")).status_code == 401
        assert (await client.get("/ui/nothing-here", headers=system.auth())).status_code == 404
        assert (await client.get("/ui/static/../app.py")).status_code in {401, 404}
        assert (await client.get("/ui/session")).status_code == 401
        page = await client.get("/ui/")
        assert page.status_code == 303 and page.headers["location"] == "/ui/login"
        for name in ("servers", "schedules", "webhooks", "agents", "users", "audit"):
            page = await client.get(f"/ui/{name}")
            assert page.status_code == 303 and page.headers["location"] == "/ui/login", name
        login = await client.get("/ui/login")
        assert (
            login.status_code == 200
            and "frame-ancestors 'none'" in login.headers["content-security-policy"]
        )
        assert (await client.get("/ui/static/console.js")).status_code == 200
        resp = await client.post("/ui/session", json={"token": system.token})
        assert resp.status_code == 200 and resp.json()["actor"] == "token"
        assert system.token not in resp.text
        # Refresh and logout are changes too: the CSRF header is needed.
        assert (await client.post("/ui/session/refresh")).status_code == 403
        assert (await client.delete("/ui/session")).status_code == 403
        csrf = client.cookies["vb_csrf"]
        out = await client.delete("/ui/session", headers={"x-csrf-token": csrf})
        assert out.status_code == 200
        assert all("Max-Age=0" in c for c in out.headers.get_list("set-cookie"))
    async with httpx.AsyncClient(base_url=system.url, verify=False, timeout=30) as client:
        resp = await client.post("/ui/session", json={"username": ADMIN[0], "password": ADMIN[1]})
        assert resp.status_code == 200 and resp.json()["actor"] == ADMIN[0]
        first = client.cookies["vb_session"]
        again = await client.post(
            "/ui/session/refresh", headers={"x-csrf-token": client.cookies["vb_csrf"]}
        )
        assert again.status_code == 200, again.text
        assert client.cookies["vb_session"] != first
        assert (await client.get("/jobs")).status_code == 200  # the new cookie works
