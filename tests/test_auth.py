"""Every route needs the token: 401 {"error":"unauthorized"} without it or with a wrong one."""

from __future__ import annotations

import re

import httpx
from harness import System


def _routes(system: System) -> list[tuple[str, str]]:
    schema = httpx.get(f"{system.url}/schema/openapi.json", headers=system.auth(), verify=False)
    assert schema.status_code == 200
    routes = []
    for path, item in schema.json()["paths"].items():
        for method in item:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            routes.append((method.upper(), concrete))
    return routes


def test_every_route_requires_the_token(system: System) -> None:
    routes = _routes(system)
    # The agent API routes of this issue are all in the OpenAPI document.
    for expected in [
        ("GET", "/health"),
        ("GET", "/drivers"),
        ("GET", "/config"),
        ("POST", "/config"),
        ("GET", "/events"),
        ("GET", "/jobs"),
        ("GET", "/jobs/x"),
        ("POST", "/jobs/x/cancel"),
    ]:
        assert expected in routes
    # An agent registers with a one-time registration token in its body, not a header
    # (backupagent-api.md): that route alone takes no token; an unknown token is a 401.
    routes.remove(("POST", "/api/v1/agent/register"))
    # A user logs in (and refreshes) with what the body carries (agents-backend-api.md).
    routes.remove(("POST", "/api/v1/admin/auth/login"))
    routes.remove(("POST", "/api/v1/admin/auth/token/refresh"))
    # OAuth2 login: a browser's redirects, without a credential.
    routes.remove(("GET", "/api/v1/admin/oauth2/x/authorize"))
    routes.remove(("GET", "/api/v1/admin/oauth2/x/callback"))
    routes += [("GET", "/schema/openapi.json"), ("GET", "/no-such-route")]
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"x-agent-token": "wrong"},
        {"Authorization": f"Basic {system.token}"},
        {"Authorization": "Bearer"},
    ]
    with httpx.Client(base_url=system.url, verify=False, timeout=10) as client:
        for method, path in routes:
            for headers in bad_headers:
                resp = client.request(method, path, headers=headers)
                assert resp.status_code == 401, (method, path, headers)
                if path.startswith(("/api/v1/admin/", "/api/v1/task/")):  # the document's shape
                    assert resp.json() == {"detail": "unauthorized", "code": "UNAUTHORIZED"}
                else:
                    assert resp.json() == {"error": "unauthorized"}
        register = {"registrationToken": "vbreg_wrong", "hostname": "h", "os": "linux",
                    "arch": "amd64", "agentVersion": "1"}  # fmt: skip
        resp = client.post("/api/v1/agent/register", json=register)
        assert resp.status_code == 401, resp.text


def test_both_token_headers_are_accepted(system: System) -> None:
    with httpx.Client(base_url=system.url, verify=False, timeout=10) as client:
        bearer = client.get("/health", headers={"Authorization": f"Bearer {system.token}"})
        agent = client.get("/health", headers={"x-agent-token": system.token})
    assert bearer.status_code == agent.status_code == 200
    assert bearer.json() == {"ok": True, "nativeSftpAvailable": True}
