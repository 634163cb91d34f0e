"""Three leftovers of issue 19 (CLI and web console), each a defect kept as a test that
failed before its fix, against one real running system (no VM):

- ``DELETE /api/v1/webhooks/{x}`` deleted by position, as the HyperSDK document's
  ``DELETE /webhooks/{index}`` does: two admins deleting at once (the console, the CLI's
  ``webhooks rm``) could remove a webhook neither meant. It deletes by the webhook's
  ``id`` now; the HyperSDK listener keeps its route by index.
- A wrong token posted to ``/ui/session`` was refused but left no record in the login
  log, where a wrong password leaves one.
- ``virtbackup config set`` posted without ``If-Match``: a change saved by another
  admin between its read and its post was silently replaced.

Another admin's change "in between" is made by a real request sent from inside the
CLI's own HTTP client, right after the answer the CLI acts on (``change_after``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from browser import chromium
from harness import System, running_system
from typer.testing import CliRunner, Result

from virtbackup.cli.client.app import build

PID = os.getpid()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    data = tmp_path_factory.mktemp("left19")
    repo = data / "repo"
    repo.mkdir()
    with running_system(data, orchestrators=1) as system:
        config = {
            "servers": [],
            "destinations": [
                {
                    "id": "fs",
                    "name": "Local",
                    "driverId": "filesystem",
                    "params": {"path": str(repo)},
                }
            ],
            "backupDestinationId": "fs",
        }
        with httpx.Client(
            base_url=system.url, headers=system.auth(), verify=False, timeout=60
        ) as api:
            assert api.post("/config", json=config).status_code == 200
        yield system


@pytest.fixture(scope="module")
def xdg(tmp_path_factory: pytest.TempPathFactory, system: System) -> Path:
    """A CLI configuration folder whose current context is ``system`` (its token)."""
    folder = tmp_path_factory.mktemp("xdg")
    ok(cli(folder, "login", system.url, "--token", system.token))
    return folder


def cli(xdg: Path, *args: str) -> Result:
    return CliRunner().invoke(
        build(), list(args), env={"XDG_CONFIG_HOME": str(xdg), "COLUMNS": "200"}
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


@contextlib.contextmanager
def change_after(
    monkeypatch: pytest.MonkeyPatch, method: str, path: str, change: Callable[[], None]
) -> Iterator[list[int]]:
    """Run ``change`` (another admin's real request) once, right after the first answer
    to ``method path`` that any ``httpx.Client`` of this process receives: between the
    CLI's read and what it does with it. Yields a list that holds 1 once it ran."""
    real = httpx.Client.request
    ran: list[int] = []

    def request(self: httpx.Client, m: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        resp = real(self, m, url, *args, **kwargs)
        if not ran and m == method and httpx.URL(str(url)).path == path:
            ran.append(1)
            change()
        return resp

    with monkeypatch.context() as patch:
        patch.setattr(httpx.Client, "request", request)
        yield ran


def admin(system: System) -> httpx.Client:
    return httpx.Client(base_url=system.url, headers=system.auth(), verify=False, timeout=30)


def add_hooks(api: httpx.Client, tag: str, count: int) -> list[dict[str, Any]]:
    """``count`` new webhooks (URLs ending in ``tag-N``), as listed."""
    urls = [f"https://hooks.example.com/left19-{PID}-{tag}-{n}" for n in range(count)]
    for url in urls:
        resp = api.post("/api/v1/webhooks", json={"url": url, "events": ["job.failed"]})
        assert resp.status_code == 201, resp.text
    listed = api.get("/api/v1/webhooks").json()["webhooks"]
    return [next(h for h in listed if h["url"] == url) for url in urls]


def other_admin_deletes(system: System, url: str) -> None:
    """Another admin deletes the webhook of ``url`` (by its index on the HyperSDK
    listener, a route the same before and after ids)."""
    with httpx.Client(base_url=system.hypersdk_url, headers=system.auth(), timeout=30) as hs:
        listed = [h["url"] for h in hs.get("/webhooks").json()["webhooks"]]
        resp = hs.delete(f"/webhooks/{listed.index(url)}")
        assert resp.status_code == 200, resp.text


def urls_left(api: httpx.Client, tag: str) -> set[str]:
    return {
        h["url"] for h in api.get("/api/v1/webhooks").json()["webhooks"] if f"-{tag}-" in h["url"]
    }


# -- webhooks deleted by id ---------------------------------------------------------------


async def test_deletes_that_would_race_by_index_each_remove_their_own(system: System) -> None:
    """Two admins listed A, B, C (#0, #1, #2). By position, the one who deletes B (#1)
    after A went removes C. By id, each removes what it names, also sent at once."""
    with admin(system) as api:
        a, b, c = add_hooks(api, "seq", 3)
        for hook in (a, b):  # the second as listed before the first delete
            resp = api.delete(f"/api/v1/webhooks/{hook['id']}")
            assert resp.status_code == 200, resp.text
        assert urls_left(api, "seq") == {c["url"]}
        # Gone already: 404 naming the id; nothing else removed.
        resp = api.delete(f"/api/v1/webhooks/{a['id']}")
        assert resp.status_code == 404 and a["id"] in resp.text, resp.text
        assert urls_left(api, "seq") == {c["url"]}
        for bad in ("0", "xyz", "A" * 32, c["id"][:-1]):
            resp = api.delete(f"/api/v1/webhooks/{bad}")
            assert resp.status_code == 400, (bad, resp.text)
            assert "is not a webhook id" in resp.text, resp.text
        assert urls_left(api, "seq") == {c["url"]}
        assert api.delete(f"/api/v1/webhooks/{c['id']}").status_code == 200
        hooks = add_hooks(api, "par", 4)
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as aapi:
        answers = await asyncio.gather(
            *(aapi.delete(f"/api/v1/webhooks/{h['id']}") for h in hooks[:3])
        )
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    with admin(system) as api:
        assert urls_left(api, "par") == {hooks[3]["url"]}
        assert api.delete(f"/api/v1/webhooks/{hooks[3]['id']}").status_code == 200


def test_the_hypersdk_listener_still_deletes_by_index(system: System) -> None:
    with admin(system) as api:
        first, second = add_hooks(api, "hs", 2)
        with httpx.Client(base_url=system.hypersdk_url, headers=system.auth(), timeout=30) as hs:
            listed = [h["url"] for h in hs.get("/webhooks").json()["webhooks"]]
            resp = hs.delete(f"/webhooks/{listed.index(first['url'])}")
            assert resp.status_code == 200, resp.text
            assert hs.delete(f"/webhooks/{first['id']}").status_code == 400  # not an index
        assert urls_left(api, "hs") == {second["url"]}
        assert api.delete(f"/api/v1/webhooks/{second['id']}").status_code == 200


def test_cli_rm_removes_the_webhook_it_named(
    system: System, xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``webhooks rm B`` lists the webhooks; another admin deletes A (before B) right
    after; B is removed and C kept (by position, #1 was C by then)."""
    with admin(system) as api:
        a, b, c = add_hooks(api, "cli", 3)

        def other_admin() -> None:
            other_admin_deletes(system, a["url"])

        with change_after(monkeypatch, "GET", "/api/v1/webhooks", other_admin) as ran:
            said = ok(cli(xdg, "webhooks", "rm", b["url"]))
        assert ran and f"webhook {b['url']} removed" in said
        assert urls_left(api, "cli") == {c["url"]}
        assert api.delete(f"/api/v1/webhooks/{c['id']}").status_code == 200


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


async def test_the_consoles_delete_removes_the_webhook_of_its_row(
    system: System, browser: Any
) -> None:
    """The webhooks page shows A, B, C; another admin deletes A; Delete on B's row
    removes B (by position, #1 was C by then)."""
    with admin(system) as api:
        a, b, c = add_hooks(api, "ui", 3)
    context = await browser.new_context(ignore_https_errors=True)
    try:
        page = await context.new_page()
        page.set_default_timeout(30_000)
        await page.goto(f"{system.url}/ui/login")
        form = page.locator("#token-login")
        await form.locator("input[name=token]").fill(system.token)
        await form.locator("button[type=submit]").click()
        await page.wait_for_url(f"{system.url}/ui/")
        await page.goto(f"{system.url}/ui/webhooks")
        row = page.locator(f'tr[data-webhook="{b["url"]}"]')
        await row.wait_for()
        other_admin_deletes(system, a["url"])
        page.once("dialog", lambda dialog: dialog.accept())
        async with page.expect_navigation():  # the page reloads once deleted
            await row.get_by_role("button", name="Delete").click()
    finally:
        await context.close()
    with admin(system) as api:
        assert urls_left(api, "ui") == {c["url"]}
        assert api.delete(f"/api/v1/webhooks/{c['id']}").status_code == 200


# -- failed token logins in the login log ---------------------------------------------------


def test_a_wrong_token_on_the_console_login_is_in_the_login_log(system: System) -> None:
    wrong = f"wrong-token-{PID}-Zq8x"
    agent = f"left19-browser-{PID}"
    with httpx.Client(base_url=system.url, verify=False, timeout=30) as client:
        resp = client.post("/ui/session", json={"token": wrong}, headers={"user-agent": agent})
        assert resp.status_code == 401 and resp.json()["field"] == "token", resp.text
        assert "set-cookie" not in resp.headers
    with admin(system) as api:
        resp = api.get("/api/v1/admin/log/login-logs", params={"status": "failure", "size": 100})
        assert resp.status_code == 200, resp.text
        mine = [i for i in resp.json()["items"] if i["user_agent"] == agent]
        assert len(mine) == 1, resp.json()
        (entry,) = mine
        assert entry["reason"] == "wrong token" and entry["username"] == ""
        assert entry["address"] == "127.0.0.1" and entry["kind"] == "login"
        assert "Zq8x" not in resp.text and "wrong-token" not in resp.text
        # The right token is still a login, and it is no failure.
        with httpx.Client(base_url=system.url, verify=False, timeout=30) as client:
            good = client.post(
                "/ui/session", json={"token": system.token}, headers={"user-agent": agent}
            )
            assert good.status_code == 200, good.text
        again = api.get("/api/v1/admin/log/login-logs", params={"status": "failure", "size": 100})
        assert [i for i in again.json()["items"] if i["user_agent"] == agent] == mine
        assert system.token not in again.text


# -- config set with If-Match ------------------------------------------------------------------


def test_config_set_keeps_a_change_made_since_its_read(
    system: System, xdg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another admin adds a destination between the CLI's read of ``/config`` and its
    post: nothing of the CLI's file is stored, the other change stays, exit 1 saying
    why; run again, it is stored."""
    config = yaml.safe_load(ok(cli(xdg, "config", "get")))
    mine = {**config, "destinations": [{**config["destinations"][0], "name": f"mine-{PID}"}]}
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump(mine))
    theirs = {
        **config,
        "destinations": [
            *config["destinations"],
            {
                "id": "other",
                "name": "Other",
                "driverId": "filesystem",
                "params": {"path": str(tmp_path)},
            },
        ],
    }
    with admin(system) as api:

        def other_admin() -> None:
            assert api.post("/config", json=theirs).status_code == 200

        with change_after(monkeypatch, "GET", "/config", other_admin) as ran:
            refused = cli(xdg, "config", "set", str(file))
        assert ran, "the CLI did not read /config before its post"
        assert refused.exit_code == 1, refused.output
        assert "changed since it was read" in refused.stderr
        assert "run the command again" in refused.stderr and refused.stderr.count("\n") == 1
        stored = api.get("/config").json()
        assert [d["id"] for d in stored["destinations"]] == ["fs", "other"]
        assert stored["destinations"][0]["name"] == "Local"
        # Nothing changes in between this time: stored.
        assert "configuration saved" in ok(cli(xdg, "config", "set", str(file)))
        stored = api.get("/config").json()
        assert [(d["id"], d["name"]) for d in stored["destinations"]] == [("fs", f"mine-{PID}")]
    assert json.loads(ok(cli(xdg, "config", "get", "-o", "json")))["destinations"][0]["name"] == (
        f"mine-{PID}"
    )
