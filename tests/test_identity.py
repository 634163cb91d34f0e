"""Users, roles, sessions and API tokens (agents-backend-api.md) on a real system.

One system for the module (real nats-server and every service). Users are made with the
installation token, as a new installation would; every route of both listeners is then
tried with every kind of identity, and the answers must be what the rule table says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
import websockets
from harness import System, running_system
from websockets.exceptions import InvalidStatus

from virtbackup.gateway.agent_auth import is_agent_route
from virtbackup.gateway.app import create_app
from virtbackup.gateway.hypersdk import create_hypersdk_asgi
from virtbackup.gateway.identity_perms import (
    ADMIN,
    ANYONE,
    BUILTIN_ROLES,
    Listener,
    required_permission,
)
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.settings import Settings
from virtbackup.testing.oauth2 import FakeOAuthProvider, fake_oauth_provider

PASSWORD = "correct horse battery"
PID = os.getpid()
#: Failed logins of one name before the lockout, in this module's system.
MAX_FAILURES = 3


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeOAuthProvider]:
    """A stand-in for GitHub's and Google's OAuth2 endpoints (the real ones cannot be
    reached from here): ``virtbackup.testing.oauth2``."""
    with fake_oauth_provider("vb-client", "vb-client-secret") as fake:
        yield fake


@pytest.fixture(scope="module")
def ident(
    tmp_path_factory: pytest.TempPathFactory, provider: FakeOAuthProvider
) -> Iterator[System]:
    data = tmp_path_factory.mktemp("ident")
    env = {
        "VIRTBACKUP_LOGIN_MAX_FAILURES": str(MAX_FAILURES),
        "VIRTBACKUP_LOGIN_ADDRESS_MAX_FAILURES": "1000",
        "VIRTBACKUP_LOGIN_FAILURE_WINDOW": "60",
    }
    for name in ("GITHUB", "GOOGLE"):
        env[f"VIRTBACKUP_OAUTH2_{name}_CLIENT_ID"] = provider.client_id
        env[f"VIRTBACKUP_OAUTH2_{name}_CLIENT_SECRET"] = provider.client_secret
        env[f"VIRTBACKUP_OAUTH2_{name}_BASE_URL"] = provider.base_url
    with running_system(data, orchestrators=1, **env) as system:  # type: ignore[arg-type]
        yield system


@pytest.fixture
async def root(ident: System) -> AsyncIterator[httpx.AsyncClient]:
    """A client with the installation token."""
    async with httpx.AsyncClient(
        base_url=ident.url, headers=ident.auth(), verify=False, timeout=30
    ) as client:
        yield client


async def make_user(root: httpx.AsyncClient, name: str, roles: list[str]) -> dict[str, Any]:
    resp = await root.post(
        "/api/v1/admin/sys/users",
        json={"username": name, "password": PASSWORD, "roles": roles, "nickname": name.title()},
    )
    assert resp.status_code == 201, resp.text
    user: dict[str, Any] = resp.json()
    assert "password" not in resp.text and "argon2" not in resp.text
    return user


async def login(url: str, name: str, password: str = PASSWORD) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, verify=False, timeout=30) as client:
        return await client.post(
            "/api/v1/admin/auth/login",
            json={"username": name, "password": password, "captcha_id": "", "captcha_code": ""},
        )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def people(ident: System) -> dict[str, dict[str, Any]]:
    """An admin, an operator, a viewer and an auditor (logged in), and an API token of
    the operator scoped to ``jobs:read``."""

    async def setup() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient(
            base_url=ident.url, headers=ident.auth(), verify=False, timeout=30
        ) as root:
            for role in ("admin", "operator", "viewer", "auditor"):
                name = f"{role}-{PID}"
                user = await make_user(root, name, [role])
                resp = await login(ident.url, name)
                assert resp.status_code == 200, resp.text
                out[role] = {**user, **resp.json()}
        op = out["operator"]
        async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
            resp = await client.post(
                f"/api/v1/admin/sys/users/{op['id']}/tokens",
                json={"name": "ci", "permissions": ["jobs:read"]},
                headers=bearer(op["access_token"]),
            )
        assert resp.status_code == 201, resp.text
        out["api-token"] = {"access_token": resp.json()["token"], "permissions": ["jobs:read"]}
        # A registered remote agent's bak_ key.
        async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
            resp = await client.post(
                "/api/v1/agent/registration-tokens",
                json={"expiresInSeconds": 600},
                headers=ident.auth(),
            )
            assert resp.status_code in (200, 201), resp.text
            resp = await client.post(
                "/api/v1/agent/register",
                json={"registrationToken": resp.json()["token"], "hostname": f"h-{PID}",
                      "os": "linux", "arch": "amd64", "agentVersion": "1"},
            )  # fmt: skip
            assert resp.status_code in (200, 201), resp.text
        out["agent"] = {"access_token": resp.json()["apiKey"]}
        return out

    return asyncio.run(setup())


# --- the matrix ----------------------------------------------------------------------


def route_table(listener: Listener) -> list[tuple[str, str]]:
    """(method, path template) of every route of the listener's Litestar app."""
    gw = Gateway(settings=Settings(), bus=None, config=None, token="x")  # type: ignore[arg-type]
    app: Any = create_app(gw)
    if listener == "hypersdk":
        app = create_hypersdk_asgi(gw)
        while not hasattr(app, "routes"):  # the middleware around its Litestar app
            app = app.app
    routes = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or ["GET"])  # a WebSocket: GET
        for method in methods:
            if method not in ("OPTIONS", "HEAD"):
                routes.append((method, route.path))
    assert len(routes) > 20
    return routes


def concrete(template: str) -> str:
    """A path of the template: int parameters an id no one has, others a name none has."""
    out = []
    for part in template.split("/"):
        if part.startswith("{") and part.endswith("}"):
            out.append("999999" if part.endswith(":int}") else f"no-such-{PID}")
        else:
            out.append(part)
    return "/".join(out)


def handler_checked(method: str, template: str, path: str) -> bool:
    """Routes whose handler checks the caller further, so that it may answer 403 to an
    identity the middleware let through: a user's own record and tokens (oneself, or
    ``users:*``), migrations (``vms:control`` too), and the remote agents' routes (a
    ``bak_`` key only)."""
    if template.startswith("/api/v1/admin/sys/users/{user_id:int}"):
        return True
    if template == "/api/v1/migrations":  # restore:run, and vms:control in the handler
        return True
    return is_agent_route(method, path)


#: Routes the matrix does not call with a valid identity: their effect would end the
#: test's sessions (checked in their own tests).
NOT_CALLED = {("POST", "/api/v1/admin/auth/logout")}
PUBLIC = {
    ("POST", "/api/v1/admin/auth/login"),
    ("POST", "/api/v1/admin/auth/token/refresh"),
    ("POST", "/api/v1/agent/register"),
    ("GET", "/api/v1/admin/oauth2/{provider:str}/authorize"),
    ("GET", "/api/v1/admin/oauth2/{provider:str}/callback"),
}


@pytest.mark.parametrize("listener", ["agent", "hypersdk"])
async def test_every_route_answers_as_the_rule_table_says(
    listener: Listener, ident: System, people: dict[str, dict[str, Any]]
) -> None:
    base = ident.url if listener == "agent" else ident.hypersdk_url
    identities: dict[str, tuple[dict[str, str], frozenset[str] | None]]
    identities = {
        "none": ({}, None),
        "wrong token": (bearer("wrong-token"), None),
        "forged jwt": (bearer(jwt.encode({"sub": "1"}, "other-key", algorithm="HS256")), None),
        "revoked bak_ key": (bearer("bak_no-such-key"), None),
        "installation token": (bearer(ident.token), frozenset({ADMIN})),
    }
    for role in ("admin", "operator", "viewer", "auditor"):
        held = BUILTIN_ROLES[role].permissions
        identities[role] = (bearer(people[role]["access_token"]), held)
    token = people["api-token"]
    identities["scoped API token"] = (
        bearer(token["access_token"]),
        frozenset(token["permissions"]),
    )
    agent_key = bearer(people["agent"]["access_token"])
    checked = 0
    async with httpx.AsyncClient(base_url=base, verify=False, timeout=30) as client:
        for method, template in route_table(listener):
            if (method, template) in PUBLIC:
                continue
            path = concrete(template)
            wanted = required_permission(listener, method, path)
            # A remote agent's bak_ key opens its own routes (agent_auth) and nothing else.
            async with client.stream(method, path, headers=agent_key) as resp:
                own = listener == "agent" and is_agent_route(method, path)
                assert (resp.status_code == 401) != bool(own), (path, resp.status_code)
                if resp.status_code == 401:  # in the path's format, as for any wrong token
                    refused = json.loads(await resp.aread())
                    if path.startswith(("/api/v1/admin/", "/api/v1/task/")):
                        assert refused == {"detail": "unauthorized", "code": "UNAUTHORIZED"}
                    else:
                        assert refused == {"error": "unauthorized"}, (path, refused)
                checked += 1
            for who, (headers, perms) in identities.items():
                if perms is not None and (method, template) in NOT_CALLED:
                    continue
                async with client.stream(method, path, headers=headers) as resp:
                    status = resp.status_code
                    body = await resp.aread() if status in (401, 403) else b""
                where = (listener, method, path, who, status, body[:200])
                if perms is None:
                    assert status == 401, where
                    if status == 401 and not path.startswith(("/api/v1/admin/", "/api/v1/task/")):
                        assert json.loads(body) == {"error": "unauthorized"}, where
                    checked += 1
                    continue
                granted = wanted == ANYONE or ADMIN in perms or wanted in perms
                if granted:
                    assert status != 401, where
                    if not handler_checked(method, template, path):
                        assert status != 403, where
                else:
                    assert status == 403, where
                    shape = json.loads(body)
                    if path.startswith(("/api/v1/admin/", "/api/v1/task/")):
                        assert shape["code"] == "FORBIDDEN" and wanted in shape["detail"], where
                    elif template != "/ws":
                        assert "forbidden" in shape["error"], where
                checked += 1
    assert checked > 100


def test_the_table_names_what_matters() -> None:
    """Spot checks of the table itself (what the matrix above enforces)."""
    assert required_permission("agent", "GET", "/config") == "config:read"
    assert required_permission("agent", "POST", "/config") == "config:write"
    assert required_permission("agent", "POST", "/servers/local/backup") == "backup:run"
    assert required_permission("agent", "DELETE", "/api/v1/admin/log/login-logs/3") == (
        "logs:delete"
    )
    assert required_permission("agent", "GET", "/api/v1/admin/monitor/server") == "system:read"
    assert required_permission("agent", "PUT", "/api/v1/task/schedulers/x") == "schedules:write"
    assert required_permission("hypersdk", "GET", "/ws") == "jobs:read"
    assert required_permission("hypersdk", "POST", "/jobs/query") == "jobs:read"
    # Anomalies are read by every role (the #17 trial found them admin-only).
    assert required_permission("agent", "GET", "/api/v1/anomalies") == "backups:read"
    assert required_permission("agent", "GET", "/api/v1/webhooks") == "config:read"
    assert required_permission("agent", "POST", "/api/v1/webhooks/test") == "config:write"
    assert required_permission("agent", "DELETE", "/api/v1/webhooks/0") == "config:write"
    # Anything the table does not name is for administrators only.
    assert required_permission("agent", "POST", "/api/v1/some/new/route") == ADMIN
    assert required_permission("agent", "GET", "/api/v1/some/new/route") == ADMIN
    viewer = BUILTIN_ROLES["viewer"].permissions
    assert "config:write" not in viewer and "logs:read" not in viewer
    assert {"backup:run", "restore:run", "lifecycle:run"} <= BUILTIN_ROLES["operator"].permissions
    assert "users:manage" not in BUILTIN_ROLES["operator"].permissions


# --- what a viewer sees ----------------------------------------------------------------


async def test_a_viewer_reads_the_configuration_without_secrets_and_cannot_post_it(
    ident: System, root: httpx.AsyncClient, people: dict[str, dict[str, Any]]
) -> None:
    secret = f"sftp-secret-{PID}"
    cfg = {
        "servers": [{"id": "local", "name": "This host", "host": ""}],
        "destinations": [
            {"id": "off", "name": "off", "driverId": "sftp",
             "params": {"host": "127.0.0.1", "port": 1, "username": "u", "password": secret,
                        "basePath": "/b"}},
        ],
    }  # fmt: skip
    assert (await root.post("/config", json=cfg)).status_code == 200
    viewer = bearer(people["viewer"]["access_token"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        resp = await client.get("/config", headers=viewer)
        assert resp.status_code == 200, resp.text
        assert secret not in resp.text and "********" in resp.text
        before = resp.json()
        resp = await client.post("/config", json={"servers": []}, headers=viewer)
        assert resp.status_code == 403, resp.text
        assert "config:write" in resp.json()["error"]
        assert (await client.get("/config", headers=viewer)).json() == before
        # On the HyperSDK listener too: reading jobs yes, submitting no.
    async with httpx.AsyncClient(base_url=ident.hypersdk_url, timeout=30) as hyper:
        assert (await hyper.get("/schedules", headers=viewer)).status_code == 200
        resp = await hyper.post("/jobs/submit", json={"vm_path": "local/x"}, headers=viewer)
        assert resp.status_code == 403 and "backup:run" in resp.json()["error"]


def protocols(token: str) -> list[Any]:
    return ["virtbackup.v1", f"virtbackup.bearer.{token}"]


async def test_websocket_takes_a_role_that_reads_jobs(
    ident: System, people: dict[str, dict[str, Any]]
) -> None:
    url = f"ws://127.0.0.1:{ident.hypersdk_port}/ws"
    viewer = people["viewer"]["access_token"]
    async with websockets.connect(url, subprotocols=protocols(viewer), open_timeout=10) as sock:
        first = json.loads(await asyncio.wait_for(sock.recv(), 10))
        assert first["type"] == "jobs"
    # A token that may not read jobs is refused before the upgrade is accepted.
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        aud = people["auditor"]
        resp = await client.post(
            f"/api/v1/admin/sys/users/{aud['id']}/tokens",
            json={"name": "logs-only", "permissions": ["logs:read"]},
            headers=bearer(aud["access_token"]),
        )
        assert resp.status_code == 201, resp.text
        logs_only = resp.json()["token"]
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            url,
            subprotocols=protocols(logs_only),
            open_timeout=10,
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_streams_end_once_their_credential_no_longer_allows_them(
    ident: System, root: httpx.AsyncClient
) -> None:
    """An open ``/events`` stream ends once its session is logged out, and an open
    ``/ws`` is closed with 4401 once its user is disabled (found by the #17 trial: a
    viewer's stream kept delivering events after both)."""
    name = f"streamer-{PID}"
    user = await make_user(root, name, ["viewer"])
    sse_auth = bearer((await login(ident.url, name)).json()["access_token"])
    ws_token = (await login(ident.url, name)).json()["access_token"]
    async with (
        httpx.AsyncClient(base_url=ident.url, verify=False, timeout=60) as client,
        client.stream("GET", "/events", headers=sse_auth) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.aiter_lines()
        assert await anext(lines) == "event: ready"
        resp2 = await client.post("/api/v1/admin/auth/logout", headers=sse_auth)
        assert resp2.status_code == 200, resp2.text

        async def drain() -> None:
            async for _ in lines:
                pass

        await asyncio.wait_for(drain(), 40)  # ended by the server
    url = f"ws://127.0.0.1:{ident.hypersdk_port}/ws"
    async with websockets.connect(url, subprotocols=protocols(ws_token), open_timeout=10) as sock:
        assert json.loads(await asyncio.wait_for(sock.recv(), 10))["type"] == "jobs"
        resp = await root.put(f"/api/v1/admin/sys/users/{user['id']}", json={"enabled": False})
        assert resp.status_code == 200, resp.text

        async def until_closed() -> None:
            while True:
                await sock.recv()

        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(until_closed(), 30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


# --- sessions ----------------------------------------------------------------------------


async def test_login_refresh_rotation_reuse_and_logout(
    ident: System, root: httpx.AsyncClient
) -> None:
    name = f"sess-{PID}"
    user = await make_user(root, name, ["viewer"])
    resp = await login(ident.url, name)
    assert resp.status_code == 200, resp.text
    first = resp.json()
    assert first["token_type"] == "Bearer" and first["expires_in"] == 900
    assert first["user"] == {"id": user["id"], "username": name, "nickname": name.title()}
    claims = jwt.decode(first["access_token"], options={"verify_signature": False})
    assert {"sub", "jti", "exp", "iat", "typ", "sid"} <= set(claims)
    assert claims["typ"] == "access" and claims["exp"] - claims["iat"] == 900
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        me = await client.get(
            f"/api/v1/admin/sys/users/{user['id']}", headers=bearer(first["access_token"])
        )
        assert me.status_code == 200 and me.json()["username"] == name
        # A refresh token is no access token.
        resp = await client.get("/jobs", headers=bearer(first["refresh_token"]))
        assert resp.status_code == 401
        # Rotation: the pair is new, the old refresh token is spent.
        resp = await client.post(
            "/api/v1/admin/auth/token/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert resp.status_code == 200, resp.text
        second = resp.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert (
            await client.get("/jobs", headers=bearer(second["access_token"]))
        ).status_code == 200
        # Reuse of the spent one: refused, and the whole family is revoked.
        resp = await client.post(
            "/api/v1/admin/auth/token/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert resp.status_code == 401 and resp.json()["code"] == "UNAUTHORIZED"
        assert "reused" in resp.json()["detail"]
        resp = await client.post(
            "/api/v1/admin/auth/token/refresh", json={"refresh_token": second["refresh_token"]}
        )
        assert resp.status_code == 401
        assert (
            await client.get("/jobs", headers=bearer(second["access_token"]))
        ).status_code == 401
        # Logout revokes the access token and its refresh token.
        third = (await login(ident.url, name)).json()
        resp = await client.post("/api/v1/admin/auth/logout", headers=bearer(third["access_token"]))
        assert resp.status_code == 200, resp.text
        assert (await client.get("/jobs", headers=bearer(third["access_token"]))).status_code == 401
        resp = await client.post(
            "/api/v1/admin/auth/token/refresh", json={"refresh_token": third["refresh_token"]}
        )
        assert resp.status_code == 401
        # The installation token is no session.
        resp = await client.post("/api/v1/admin/auth/logout", headers=ident.auth())
        assert resp.status_code == 400 and resp.json()["code"] == "BAD_REQUEST"
        # Ended sessions are tidied away (any replica, every hour); live ones stay.
        live = (await login(ident.url, name)).json()
        assert await tidy(ident) >= 2  # the reused family's and the logged-out one
        assert (await client.get("/jobs", headers=bearer(live["access_token"]))).status_code == 200
        assert (await client.get("/jobs", headers=bearer(third["access_token"]))).status_code == 401
        # The captcha is not served.
        assert (
            await client.get("/api/v1/admin/auth/captcha", headers=ident.auth())
        ).status_code == 404


async def tidy(system: System) -> int:
    """What ``IdentityStore.tidy`` removes from the system's ``VB_USERS`` now."""
    from virtbackup.gateway.identity_store import IdentityStore
    from virtbackup.testing.nats import connect

    nc = await connect(system.nats)
    try:
        kv = await nc.jetstream().key_value("VB_USERS")
        return await IdentityStore(kv, None).tidy(60.0)
    finally:
        await nc.drain()


def _forged(claims: dict[str, Any], header: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part(header)}.{part(claims)}."


async def test_alg_none_foreign_keys_and_expired_tokens_are_refused(
    ident: System, root: httpx.AsyncClient
) -> None:
    name = f"forge-{PID}"
    await make_user(root, name, ["admin"])
    real = (await login(ident.url, name)).json()["access_token"]
    claims = jwt.decode(real, options={"verify_signature": False})
    now = int(time.time())
    forged = [
        _forged(claims, {"alg": "none", "typ": "JWT"}),
        jwt.encode(claims, "another key of 32 bytes or more!!", algorithm="HS256"),
        jwt.encode(claims, "another key of 32 bytes or more!!", algorithm="HS512"),
        real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB"),
    ]
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        assert (await client.get("/jobs", headers=bearer(real))).status_code == 200
        for token in forged:
            resp = await client.get("/jobs", headers=bearer(token))
            assert resp.status_code == 401, token
            assert resp.json() == {"error": "unauthorized"}
            resp = await client.post("/config", json={"servers": []}, headers=bearer(token))
            assert resp.status_code == 401
    # Expired: signed with the installation's real key (read from the bucket as the
    # gateway does), but past its exp.
    from virtbackup.gateway.identity_store import IdentityStore
    from virtbackup.runtime.sealing import SecretBox
    from virtbackup.testing.nats import connect

    nc = await connect(ident.nats)
    try:
        kv = await nc.jetstream().key_value("VB_USERS")
        box = SecretBox.from_settings(Settings(data_dir=ident.data_dir))
        key = await IdentityStore(kv, box).jwt_key()
    finally:
        await nc.drain()
    expired = jwt.encode({**claims, "iat": now - 100, "exp": now - 10}, key, algorithm="HS256")
    assert jwt.decode(expired, key, algorithms=["HS256"], options={"verify_exp": False})
    refresh_typed = jwt.encode({**claims, "typ": "refresh"}, key, algorithm="HS256")
    fine = jwt.encode({**claims, "exp": now + 60}, key, algorithm="HS256")
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        assert (await client.get("/jobs", headers=bearer(fine))).status_code == 200
        assert (await client.get("/jobs", headers=bearer(expired))).status_code == 401
        assert (await client.get("/jobs", headers=bearer(refresh_typed))).status_code == 401


async def test_lockout_after_repeated_failures_and_the_login_log(
    ident: System, root: httpx.AsyncClient, people: dict[str, dict[str, Any]]
) -> None:
    name = f"lock-{PID}"
    await make_user(root, name, ["viewer"])
    for _ in range(MAX_FAILURES):
        resp = await login(ident.url, name, "wrong password!")
        assert resp.status_code == 401, resp.text
        assert resp.json() == {"detail": "wrong user name or password", "code": "UNAUTHORIZED"}
    # Locked: even the right password is refused, with when to try again.
    resp = await login(ident.url, name)
    assert resp.status_code == 429, resp.text
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert resp.json()["code"] == "TOO_MANY_REQUESTS"
    # Another user is not locked by it.
    assert (await login(ident.url, people["viewer"]["username"])).status_code == 200
    # Every attempt is in the login log, newest first.
    auditor = bearer(people["auditor"]["access_token"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        resp = await client.get(
            "/api/v1/admin/log/login-logs", params={"username": name}, headers=auditor
        )
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert page["total"] == MAX_FAILURES + 1
        reasons = [item["reason"] for item in page["items"]]
        assert reasons[0].startswith("locked out")
        assert reasons[1:] == ["wrong user name or password"] * MAX_FAILURES
        assert all(i["status"] == "failure" and i["address"] == "127.0.0.1" for i in page["items"])
        resp = await client.get(
            "/api/v1/admin/log/login-logs",
            params={"status": "success", "size": 2, "page": 1},
            headers=auditor,
        )
        ok = resp.json()
        assert ok["size"] == 2 and len(ok["items"]) == 2 and ok["total"] >= 5
        assert all(i["status"] == "success" for i in ok["items"])
        resp = await client.get(
            "/api/v1/admin/log/login-logs", params={"since": "yesterday"}, headers=auditor
        )
        assert resp.status_code == 400 and "since" in resp.json()["detail"]
        # Deleting an entry takes logs:delete, which the auditor lacks; an admin has it.
        entry = page["items"][-1]["id"]
        resp = await client.delete(f"/api/v1/admin/log/login-logs/{entry}", headers=auditor)
        assert resp.status_code == 403 and resp.json()["code"] == "FORBIDDEN"
        admin = bearer(people["admin"]["access_token"])
        resp = await client.delete(f"/api/v1/admin/log/login-logs/{entry}", headers=admin)
        assert resp.status_code == 204, resp.text
        resp = await client.delete(f"/api/v1/admin/log/login-logs/{entry}", headers=admin)
        assert resp.status_code == 404 and resp.json()["code"] == "NOT_FOUND"
        resp = await client.get(
            "/api/v1/admin/log/login-logs", params={"username": name}, headers=auditor
        )
        assert resp.json()["total"] == MAX_FAILURES


async def test_a_burst_of_wrong_passwords_gets_no_more_tries_than_the_limit(
    ident: System, root: httpx.AsyncClient
) -> None:
    """Attempts sent at once are counted before their passwords are checked, so a burst
    gets at most the limit of tries; the others are 429 (found by the #17 trial: every
    one of 40 wrong passwords sent at once was tried, the lockout coming only after)."""
    name = f"burst-{PID}"
    await make_user(root, name, ["viewer"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=60) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/admin/auth/login",
                    json={"username": name, "password": f"wrong guess {i}"},
                )
                for i in range(12)
            )
        )
    statuses = [a.status_code for a in answers]
    assert 1 <= statuses.count(401) <= MAX_FAILURES, statuses
    assert statuses.count(429) == len(statuses) - statuses.count(401), statuses
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
    # The burst locked the name: the right password is refused too.
    resp = await login(ident.url, name)
    assert resp.status_code == 429, resp.text


async def test_a_forwarded_for_header_is_not_the_clients_address(
    ident: System, root: httpx.AsyncClient
) -> None:
    """The gateway is behind no proxy: ``X-Forwarded-For`` is the client's word, so it
    must not become the address the lockout counts and the logs record (found by the
    #17 trial: uvicorn trusted it from 127.0.0.1, so a local client could name any
    address, and a fresh one per try escaped the per-address lockout)."""
    name = f"xff-{PID}"
    forged = {"X-Forwarded-For": "10.9.8.7", "Forwarded": "for=10.9.8.7"}
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        resp = await client.post(
            "/api/v1/admin/auth/login",
            json={"username": name, "password": "no such user"},
            headers=forged,
        )
        assert resp.status_code == 401, resp.text
    resp = await root.get("/api/v1/admin/log/login-logs", params={"username": name})
    assert [i["address"] for i in resp.json()["items"]] == ["127.0.0.1"], resp.text
    async with httpx.AsyncClient(base_url=ident.hypersdk_url, timeout=30) as hs:
        marker = f"xff-{PID}-{time.monotonic_ns()}"
        resp = await hs.post(
            "/schedules/no-such/trigger",
            headers={**ident.auth(), **forged, "x-request-id": marker},
        )
        assert resp.status_code == 404, resp.text
    deadline = time.monotonic() + 15
    while True:
        items = (await root.get("/api/v1/admin/log/opera-logs", params={"size": 200})).json()
        found = [i for i in items["items"] if i["requestId"] == marker]
        if found:
            assert found[0]["clientAddress"] == "127.0.0.1", found
            break
        assert time.monotonic() < deadline, "no operation log entry"
        await asyncio.sleep(0.2)


# --- users, roles and tokens ---------------------------------------------------------


async def test_no_privilege_escalation(
    ident: System, root: httpx.AsyncClient, people: dict[str, dict[str, Any]]
) -> None:
    op = people["operator"]
    op_auth = bearer(op["access_token"])
    other = people["viewer"]
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        resp = await client.put(
            f"/api/v1/admin/sys/users/{op['id']}", json={"roles": ["admin"]}, headers=op_auth
        )
        assert resp.status_code == 403 and "users:manage" in resp.json()["detail"]
        resp = await client.put(
            f"/api/v1/admin/sys/users/{other['id']}", json={"nickname": "x"}, headers=op_auth
        )
        assert resp.status_code == 403
        resp = await client.post(
            "/api/v1/admin/sys/users",
            json={"username": f"sneaky-{PID}", "password": PASSWORD, "roles": ["admin"]},
            headers=op_auth,
        )
        assert resp.status_code == 403
        resp = await client.post(
            "/api/v1/admin/sys/roles",
            json={"name": "mine", "permissions": ["users:manage"]},
            headers=op_auth,
        )
        assert resp.status_code == 403
        resp = await client.post(
            f"/api/v1/admin/sys/users/{op['id']}/tokens",
            json={"name": "too-much", "permissions": ["config:write"]},
            headers=op_auth,
        )
        assert resp.status_code == 403 and "config:write" in resp.json()["detail"]
        resp = await client.post(
            f"/api/v1/admin/sys/users/{other['id']}/tokens",
            json={"name": "theirs"},
            headers=op_auth,
        )
        assert resp.status_code == 403
        # The operator may change its own nickname, not with its scoped API token.
        resp = await client.put(
            f"/api/v1/admin/sys/users/{op['id']}", json={"nickname": "Op"}, headers=op_auth
        )
        assert resp.status_code == 200 and resp.json()["nickname"] == "Op"
        resp = await client.put(
            f"/api/v1/admin/sys/users/{op['id']}",
            json={"password": "new password 1"},
            headers=bearer(people["api-token"]["access_token"]),
        )
        assert resp.status_code == 403
        # A custom role with users:manage cannot hand out admin.
        resp = await root.post(
            "/api/v1/admin/sys/roles",
            json={"name": f"helpdesk-{PID}", "description": "d",
                  "permissions": ["users:read", "users:manage"]},
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        helper = f"helper-{PID}"
        await make_user(root, helper, [f"helpdesk-{PID}"])
        help_auth = bearer((await login(ident.url, helper)).json()["access_token"])
        resp = await client.put(
            f"/api/v1/admin/sys/users/{other['id']}", json={"roles": ["admin"]}, headers=help_auth
        )
        assert resp.status_code == 403, resp.text
        resp = await client.delete(
            f"/api/v1/admin/sys/users/{people['admin']['id']}", headers=help_auth
        )
        assert resp.status_code == 403
        # Nor revoke an administrator's API token (the #17 trial: it could).
        admin_auth = bearer(people["admin"]["access_token"])
        resp = await client.post(
            f"/api/v1/admin/sys/users/{people['admin']['id']}/tokens",
            json={"name": f"admin-script-{PID}", "permissions": ["jobs:read"]},
            headers=admin_auth,
        )
        assert resp.status_code == 201, resp.text
        admin_token = resp.json()
        resp = await client.delete(
            f"/api/v1/admin/sys/users/{people['admin']['id']}/tokens/{admin_token['id']}",
            headers=help_auth,
        )
        assert resp.status_code == 403, resp.text
        assert (await client.get("/jobs", headers=bearer(admin_token["token"]))).status_code == 200
    # Nothing changed.
    resp = await root.get(f"/api/v1/admin/sys/users/{other['id']}")
    assert resp.json()["roles"] == ["viewer"] and resp.json()["nickname"] == other["nickname"]


async def test_changing_ones_own_password_or_email_takes_the_current_password(
    ident: System, root: httpx.AsyncClient
) -> None:
    """A stolen access token cannot make itself a lasting login: a new password or an
    e-mail address (OAuth2 login) of one's own takes ``current_password`` (found by the
    #17 trial: a viewer's access token alone changed its password and e-mail)."""
    name = f"selfpw-{PID}"
    user = await make_user(root, name, ["viewer"])
    me = f"/api/v1/admin/sys/users/{user['id']}"
    auth = bearer((await login(ident.url, name)).json()["access_token"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        for body in ({"password": "taken over!"}, {"email": "thief@example.com"}):
            resp = await client.put(me, json=body, headers=auth)
            assert resp.status_code == 400, resp.text
            assert "current_password" in resp.json()["detail"], resp.text
        resp = await client.put(
            me, json={"password": "taken over!", "current_password": "a wrong guess"}, headers=auth
        )
        assert resp.status_code == 403 and "current_password" in resp.json()["detail"]
        # Nothing changed: the old password still logs in, the address is still empty.
        assert (await login(ident.url, name)).status_code == 200
        assert (await client.get(me, headers=auth)).json()["email"] == ""
        # With the current password it works, and ends the sessions.
        resp = await client.put(
            me,
            json={"password": "my new passphrase", "current_password": PASSWORD},
            headers=auth,
        )
        assert resp.status_code == 200, resp.text
        assert (await client.get(me, headers=auth)).status_code == 401
        assert (await login(ident.url, name, "my new passphrase")).status_code == 200
    # An administrator changing someone else needs no password of theirs.
    resp = await root.put(me, json={"password": PASSWORD, "email": f"{name}@example.com"})
    assert resp.status_code == 200 and resp.json()["email"] == f"{name}@example.com"
    # An address is one user's: OAuth2 login finds the user by it.
    resp = await root.post(
        "/api/v1/admin/sys/users",
        json={
            "username": f"{name}-2",
            "password": PASSWORD,
            "email": f"{name.upper()}@example.com",
        },
    )
    assert resp.status_code == 409 and "email" in resp.json()["detail"], resp.text
    other = await make_user(root, f"{name}-3", ["viewer"])
    resp = await root.put(
        f"/api/v1/admin/sys/users/{other['id']}", json={"email": f"{name}@Example.com"}
    )
    assert resp.status_code == 409 and "email" in resp.json()["detail"], resp.text


async def test_give_a_colleague_a_read_only_role(
    ident: System, root: httpx.AsyncClient, people: dict[str, dict[str, Any]]
) -> None:
    admin = bearer(people["admin"]["access_token"])
    name = f"colleague-{PID}"
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        resp = await client.post(
            "/api/v1/admin/sys/users",
            json={"username": name, "password": PASSWORD, "roles": ["operator"]},
            headers=admin,
        )
        assert resp.status_code == 201, resp.text
        uid = resp.json()["id"]
        colleague = bearer((await login(ident.url, name)).json()["access_token"])
        assert (await client.post("/jobs/x/cancel", headers=colleague)).status_code == 404
        resp = await client.put(
            f"/api/v1/admin/sys/users/{uid}", json={"roles": ["viewer"]}, headers=admin
        )
        assert resp.status_code == 200 and resp.json()["roles"] == ["viewer"]
        # The same session now has the viewer's permissions.
        resp = await client.post("/jobs/x/cancel", headers=colleague)
        assert resp.status_code == 403
        assert (await client.get("/jobs", headers=colleague)).status_code == 200
        # Listing, bad input, duplicates.
        resp = await client.get(
            "/api/v1/admin/sys/users", params={"username": name, "size": 5}, headers=admin
        )
        assert resp.status_code == 200
        assert [u["username"] for u in resp.json()["items"]] == [name]
        # Every list of /api/v1/admin pages with size 1-1000 (the #17 trial found 200 here).
        for path in ("/api/v1/admin/sys/users", "/api/v1/admin/log/login-logs"):
            resp = await client.get(path, params={"size": 1000}, headers=admin)
            assert resp.status_code == 200 and resp.json()["size"] == 1000, resp.text
            resp = await client.get(path, params={"size": 1001}, headers=admin)
            assert resp.status_code == 400 and "size" in resp.json()["detail"], resp.text
        resp = await client.post(
            "/api/v1/admin/sys/users",
            json={"username": name.upper(), "password": PASSWORD},
            headers=admin,
        )
        assert resp.status_code == 409 and resp.json()["code"] == "CONFLICT"
        for body, field in (
            ({"username": "a b", "password": PASSWORD}, "username"),
            ({"username": "token", "password": PASSWORD}, "username"),
            ({"username": f"short-{PID}", "password": "short"}, "password"),
            ({"username": f"r-{PID}", "password": PASSWORD, "roles": ["nope"]}, "roles"),
            ({"username": f"x-{PID}", "password": PASSWORD, "bogus": 1}, "bogus"),
        ):
            resp = await client.post("/api/v1/admin/sys/users", json=body, headers=admin)
            assert resp.status_code == 400, (body, resp.text)
            assert field in resp.json()["detail"] and resp.json()["code"] == "BAD_REQUEST"
        resp = await client.put("/api/v1/admin/sys/roles/viewer", json={}, headers=admin)
        assert resp.status_code == 409
        roles = (await client.get("/api/v1/admin/sys/roles", headers=admin)).json()
        assert {"admin", "operator", "viewer", "auditor"} <= {r["name"] for r in roles}


async def test_api_tokens_are_shown_once_scoped_and_revocable(
    ident: System, people: dict[str, dict[str, Any]]
) -> None:
    op = people["operator"]
    op_auth = bearer(op["access_token"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        resp = await client.post(
            f"/api/v1/admin/sys/users/{op['id']}/tokens",
            json={"name": "reader", "permissions": ["jobs:read", "backup:run"],
                  "expires_in_seconds": 3600},
            headers=op_auth,
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        made = resp.json()
        token = made["token"]
        assert token.startswith("vbt_") and made["expires_at"]
        listed = (
            await client.get(f"/api/v1/admin/sys/users/{op['id']}/tokens", headers=op_auth)
        ).json()
        assert "reader" in {t["name"] for t in listed} and token not in json.dumps(listed)
        scoped = bearer(token)
        assert (await client.get("/jobs", headers=scoped)).status_code == 200
        assert (await client.get("/config", headers=scoped)).status_code == 403
        # Revoked: refused at once.
        resp = await client.delete(
            f"/api/v1/admin/sys/users/{op['id']}/tokens/{made['id']}", headers=op_auth
        )
        assert resp.status_code == 204
        assert (await client.get("/jobs", headers=scoped)).status_code == 401
    # Only its hash is stored.
    from virtbackup.testing.nats import connect

    nc = await connect(ident.nats)
    try:
        kv = await nc.jetstream().key_value("VB_USERS")
        for key in await kv.keys():
            entry = await kv.get(key)
            assert token.encode() not in (entry.value or b""), key
            assert PASSWORD.encode() not in (entry.value or b""), key
    finally:
        await nc.drain()


async def oauth_login(system: System, provider: str) -> httpx.Response:
    """The browser's way through: authorize, the provider's consent, the callback."""
    async with httpx.AsyncClient(verify=False, timeout=30) as browser:
        start = await browser.get(f"{system.url}/api/v1/admin/oauth2/{provider}/authorize")
        assert start.status_code == 302, start.text
        consent = await browser.get(start.headers["location"])
        assert consent.status_code == 302, consent.text
        callback = consent.headers["location"]
        assert callback.startswith(f"{system.url}/api/v1/admin/oauth2/{provider}/callback?")
        return await browser.get(callback)


async def test_oauth2_login_against_a_stand_in_provider(
    ident: System,
    root: httpx.AsyncClient,
    provider: FakeOAuthProvider,
    people: dict[str, dict[str, Any]],
) -> None:
    """GitHub and Google cannot be reached from here: ``provider`` stands in for both."""
    name = f"oauth-{PID}"
    resp = await root.post(
        "/api/v1/admin/sys/users",
        json={"username": name, "password": PASSWORD, "roles": ["viewer"],
              "email": f"{name}@example.com"},
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    for which in ("github", "google"):
        provider.account = {"email": f"{name.upper()}@example.com", "verified": True,
                            "login": name}  # fmt: skip
        async with httpx.AsyncClient(verify=False, timeout=30) as browser:
            start = await browser.get(f"{ident.url}/api/v1/admin/oauth2/{which}/authorize")
            assert start.status_code == 302
            assert start.headers["location"].startswith(provider.base_url)
            consent = await browser.get(start.headers["location"])
            callback = consent.headers["location"]
            resp = await browser.get(callback)
            assert resp.status_code == 200, resp.text
            tokens = resp.json()
            assert tokens["user"]["username"] == name and tokens["token_type"] == "Bearer"
            me = await browser.get(f"{ident.url}/jobs", headers=bearer(tokens["access_token"]))
            assert me.status_code == 200
            # The state is good once.
            again = await browser.get(callback)
            assert again.status_code == 401 and "state" in again.json()["detail"]
    # An unverified address, or one no user has, logs nobody in.
    provider.account = {"email": f"{name}@example.com", "verified": False, "login": name}
    resp = await oauth_login(ident, "google")
    assert resp.status_code == 401 and "verified" in resp.json()["detail"]
    provider.account = {"email": f"stranger-{PID}@example.com", "verified": True, "login": "x"}
    resp = await oauth_login(ident, "github")
    assert resp.status_code == 401 and resp.json()["code"] == "UNAUTHORIZED"
    # A provider that is not configured is not there.
    async with httpx.AsyncClient(verify=False, timeout=30) as browser:
        resp = await browser.get(f"{ident.url}/api/v1/admin/oauth2/gitlab/authorize")
        assert resp.status_code == 404 and resp.json()["code"] == "NOT_FOUND"
        resp = await browser.get(
            f"{ident.url}/api/v1/admin/oauth2/github/callback",
            params={"code": "forged", "state": "forged"},
        )
        assert resp.status_code == 401
    # Each attempt is in the login log.
    auditor = bearer(people["auditor"]["access_token"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        page = (
            await client.get("/api/v1/admin/log/login-logs", params={"size": 50}, headers=auditor)
        ).json()
    reasons = [i["reason"] for i in page["items"] if i["reason"].startswith("oauth2")]
    assert "oauth2 github" in reasons and "oauth2 google" in reasons
    assert any("no enabled user" in r for r in reasons)
    assert provider.exchanges >= 4


async def test_users_get_503_not_500_while_the_bus_is_down(
    ident: System, people: dict[str, dict[str, Any]]
) -> None:
    """Last in the module: it stops NATS. A user's token cannot be checked without the
    bucket: 503 (retry), never a 500 or a 401 that would log the user out."""
    ident.nats.stop()
    viewer = bearer(people["viewer"]["access_token"])
    async with httpx.AsyncClient(base_url=ident.url, verify=False, timeout=30) as client:
        deadline = time.monotonic() + 30
        while (resp := await client.get("/config", headers=viewer)).status_code != 503:
            assert resp.status_code == 200, resp.text
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
        assert "try again" in resp.json()["error"]
        resp = await client.get("/api/v1/admin/sys/roles", headers=viewer)
        assert resp.status_code == 503 and resp.json()["code"] == "SERVICE_UNAVAILABLE"
