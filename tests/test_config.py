"""GET/POST /config: strict validation, masked secrets, all-or-nothing, agent.yaml."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest
import yaml
from harness import System

from virtbackup.testing.nats import connect

FULL_CONFIG: dict[str, Any] = {
    "destinations": [
        {
            "id": "dest_filesystem_1739440000000000",
            "name": "Local filesystem",
            "driverId": "filesystem",
            "enabled": True,
            "params": {"path": "/var/backups/vb"},
        },
        {
            "id": "dest_sftp_1739440000000001",
            "name": "Remote SFTP",
            "driverId": "sftp",
            "enabled": True,
            "params": {
                "host": "sftp.example.com",
                "port": 22,
                "username": "backup",
                "password": "sftp-secret",
                "basePath": "/Backup",
            },
        },
    ],
    "backupDestinationId": "dest_filesystem_1739440000000000",
    "restoreDestinationId": None,
    "backup": {
        "driverId": "filesystem",
        "base_path": "/path/to/backups",
        "gdrive": {
            "scope": "https://www.googleapis.com/auth/drive.file",
            "rootPath": "/",
            "accessToken": "ya29.access",
            "refreshToken": "1//refresh",
            "accountEmail": "",
            "expiresAt": "2026-02-06T12:00:00Z",
        },
        "sftp": {
            "host": "sftp.example.com",
            "port": 22,
            "username": "backup",
            "password": "",
            "basePath": "/Backup",
        },
    },
    "hashblocksLimitBufferMb": 1024,
    "dummyDriverTmpWrites": False,
    "ntfymeToken": "ntfy-secret",
    "connectionVerified": False,
    "selectedServerId": "server-id",
    "listenAll": False,
    "servers": [
        {
            "id": "local",
            "name": "This host",
            "host": "",
            "port": 22,
            "username": "",
            "password": "",
            "privateKey": "",
            "uri": "",
        },
        {
            "id": "remote1",
            "name": "Remote",
            "host": "127.0.0.1",
            "port": 2,
            "username": "root",
            "password": "ssh-secret",
            "privateKey": "",
            "uri": "",
        },
    ],
}

SECRETS = ("sftp-secret", "ya29.access", "1//refresh", "ntfy-secret", "ssh-secret")


async def _post(api: httpx.AsyncClient, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await api.post("/config", content=content, headers={"content-type": "application/json"})


async def test_config_round_trip_masks_secrets_and_keeps_them(
    api: httpx.AsyncClient, system: System
) -> None:
    resp = await _post(api, FULL_CONFIG)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True}

    got = await api.get("/config")
    assert got.status_code == 200
    text = got.text
    for secret in SECRETS:
        assert secret not in text
    body = got.json()
    assert body["destinations"][1]["params"]["password"] == "********"
    assert body["servers"][1]["password"] == "********"
    assert body["servers"][0]["password"] == ""  # empty secrets stay empty
    assert body["backup"]["base_path"] == "/path/to/backups"
    assert body["backup"]["gdrive"]["expiresAt"] == "2026-02-06T12:00:00Z"

    # Posting the masked document back (a GET-edit-POST round trip) keeps every secret.
    body["servers"][1]["name"] = "Renamed"
    assert (await _post(api, body)).status_code == 200
    stored = yaml.safe_load((system.data_dir / "agent.yaml").read_text())
    assert stored["servers"][1]["name"] == "Renamed"
    assert stored["servers"][1]["password"] == "ssh-secret"
    assert stored["destinations"][1]["params"]["password"] == "sftp-secret"
    assert stored["ntfymeToken"] == "ntfy-secret"
    mode = (system.data_dir / "agent.yaml").stat().st_mode & 0o777
    assert mode == 0o600


BAD_BODIES: list[tuple[bytes | dict[str, Any], str]] = []


def _with(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(FULL_CONFIG)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _bad_cases() -> list[tuple[bytes | dict[str, Any], str]]:
    unknown = copy.deepcopy(FULL_CONFIG)
    unknown["servers"][0]["colour"] = "blue"
    return [
        (b"{not json", "malformed JSON"),
        (b"", "request body must be a JSON object"),
        (b"[]", "Expected `object`, got `array`"),
        ({**FULL_CONFIG, "surprise": 1}, "unknown field `surprise`"),
        (unknown, "unknown field `colour` - at `$.servers[0]`"),
        (
            _with(["hashblocksLimitBufferMb"], "lots"),
            "Expected `int`, got `str` - at `$.hashblocksLimitBufferMb`",
        ),
        (_with(["servers", 1, "port"], 70000), "at `$.servers[1].port`"),
        (_with(["destinations", 0, "driverId"], "tape"), "unknown driverId 'tape'"),
        (_with(["destinations", 1, "params", "port"], "22"), "at `$.destinations[1].params.port`"),
        (
            _with(["destinations", 0, "params"], {"path": "/x", "extra": 1}),
            "unknown field `extra` - at `$.destinations[0].params`",
        ),
        (_with(["backupDestinationId"], "nope"), "backupDestinationId 'nope' names no destination"),
        (_with(["servers", 1, "id"], "local"), "duplicate server id 'local'"),
        (
            _with(["servers", 1, "password"], "********")
            | {"servers": [{"id": "new", "password": "********"}]},
            "secret mask but no secret is stored",
        ),
        # Configuration that can only hurt (issue 11, items 2, 6 and 7).
        (
            _with(["servers", 1, "uri"], "qemu+ext:///system?command=/tmp/evil.sh"),
            "at `$.servers[1].uri`",
        ),
        (_with(["servers", 1, "uri"], "qemu+tcp://10.0.0.1/system"), "not supported"),
        (_with(["servers", 1, "password"], ""), "give a password or a privateKey"),
        (_with(["servers", 1, "host"], "kvm\x00evil"), "at `$.servers[1].host`"),
        (_with(["destinations", 0, "params", "path"], "/"), "system directory"),
        (_with(["destinations", 0, "params", "path"], "/etc"), "system directory"),
        (_with(["destinations", 0, "params", "path"], "backups"), "must be absolute"),
        (_with(["destinations", 0, "params", "path"], "/b\x00k"), ".params.path`"),
        (
            _with(["destinations", 1, "params", "username"], "backup\x00root"),
            "at `$.destinations[1].params.username`",
        ),
        (
            _with(["destinations", 1, "params", "password"], ""),
            "password or a privateKey - at `$.destinations[1].params.password`",
        ),
        (
            _with(["destinations", 0], {"id": "s3", "driverId": "s3", "params": S3_UP}),
            "at `$.destinations[0].params.prefix`",
        ),
        (
            _with(["backup", "gdrive", "expiresAt"], int("9" * 400)),
            "at `$.backup.gdrive.expiresAt`",
        ),
        # A pattern's `$` matches before a final newline: one-line fields ending with
        # one are refused too (a host, a topic, an SFTP host in a destination's params).
        (_with(["servers", 1, "host"], "kvm2\n"), "line break - at `$.servers[1].host`"),
        (_with(["ntfy"], {"topic": "alerts\n"}), "line break - at `$.ntfy.topic`"),
        (
            _with(["destinations", 1, "params", "host"], "sftp.example.com\n"),
            "line break - at `$.destinations[1].params.host`",
        ),
    ]


S3_UP = {"endpoint": "s3.example.com", "bucket": "bkt", "prefix": "../other"}


async def test_bad_config_is_a_400_naming_the_problem_and_changes_nothing(
    api: httpx.AsyncClient, system: System
) -> None:
    assert (await _post(api, FULL_CONFIG)).status_code == 200
    before = (await api.get("/config")).json()
    yaml_before = (system.data_dir / "agent.yaml").read_text()
    for body, message in _bad_cases():
        resp = await _post(api, body)
        assert resp.status_code == 400, (message, resp.text)
        assert message in resp.json()["error"], (message, resp.json())
        assert "Error" not in resp.json()["error"]  # no exception names
    assert (await api.get("/config")).json() == before
    assert (system.data_dir / "agent.yaml").read_text() == yaml_before


async def test_oversized_body_is_413(api: httpx.AsyncClient) -> None:
    before = (await api.get("/config")).json()
    huge = json.dumps({**FULL_CONFIG, "ntfymeToken": "x" * (2 << 20)}).encode()
    resp = await _post(api, huge)
    assert resp.status_code == 413
    assert "too large" in resp.json()["error"]
    assert (await api.get("/config")).json() == before


async def test_config_change_is_an_event(api: httpx.AsyncClient, system: System) -> None:
    nc = await connect(system.nats)
    try:
        js = nc.jetstream()
        assert (await _post(api, FULL_CONFIG)).status_code == 200
        msg = await js.get_last_msg("VB_EVENTS", "vb.evt.config.changed")
        assert msg.data is not None
        event = json.loads(msg.data)
        assert event["type"] == "config.changed"
        assert event["source"] == "gateway"
        assert event["payload"]["revision"] > 0
        for secret in SECRETS:
            assert secret not in msg.data.decode()
    finally:
        await nc.drain()


@pytest.mark.parametrize(
    ("path", "value", "field", "changed"),
    [
        (["servers", 1, "host"], "10.9.9.9", "$.servers[1].password", "host"),
        (["servers", 1, "port"], 2222, "$.servers[1].password", "port"),
        (["servers", 1, "username"], "admin", "$.servers[1].password", "username"),
        (["destinations", 1, "params", "host"], "evil.example", "params.password", "host"),
        (["destinations", 1, "params", "port"], 2200, "$.destinations[1].params.password", "port"),
        (["backup", "sftp", "host"], "evil.example", "$.backup.sftp.password", "host"),
    ],
)
async def test_a_masked_secret_does_not_follow_a_changed_host(
    api: httpx.AsyncClient,
    system: System,
    path: list[str | int],
    value: Any,
    field: str,
    changed: str,
) -> None:
    doc = _with(["backup", "sftp", "password"], "legacy-secret")
    assert (await _post(api, doc)).status_code == 200
    masked = (await api.get("/config")).json()
    target: Any = masked
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    resp = await _post(api, masked)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert f"the {changed} changed" in error
    assert "give the password again" in error
    assert f"{field}`" in error
    stored = yaml.safe_load((system.data_dir / "agent.yaml").read_text())
    assert stored["servers"][1]["host"] == "127.0.0.1"  # nothing changed
    # Given again, the secret goes to the new place.
    secret_at = [*path[:-1], "password"]
    target["password"] = "new-secret"
    assert (await _post(api, masked)).status_code == 200, secret_at
    stored = yaml.safe_load((system.data_dir / "agent.yaml").read_text())
    where: Any = stored
    for key in secret_at:
        where = where[key]
    assert where == "new-secret"


async def test_a_masked_ntfy_token_does_not_follow_a_changed_server(
    api: httpx.AsyncClient, system: System
) -> None:
    """A tester moved ``ntfy.serverUrl`` to another host with the masked token posted
    back: the stored token went to that host. It is kept only for the same server."""
    doc = _with(["ntfymeToken"], "tk_only_for_ntfy")
    doc["ntfy"] = {"serverUrl": "https://ntfy.example.com", "topic": "vb"}
    assert (await _post(api, doc)).status_code == 200
    masked = (await api.get("/config")).json()
    assert masked["ntfymeToken"] == "********"
    masked["ntfy"]["serverUrl"] = "http://127.0.0.1:9"
    resp = await _post(api, masked)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "give the ntfymeToken again: the serverUrl changed" in error
    assert "$.ntfymeToken`" in error
    stored = yaml.safe_load((system.data_dir / "agent.yaml").read_text())
    assert stored["ntfy"]["serverUrl"] == "https://ntfy.example.com"  # nothing changed
    # The same server keeps the token; a token given again goes to the new one.
    masked["ntfy"]["serverUrl"] = "https://ntfy.example.com"
    assert (await _post(api, masked)).status_code == 200
    masked["ntfy"]["serverUrl"] = "http://127.0.0.1:9"
    masked["ntfymeToken"] = "tk_for_the_new_server"
    assert (await _post(api, masked)).status_code == 200
