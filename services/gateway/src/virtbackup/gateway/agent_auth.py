"""Authentication of remote agents (``bak_`` keys) in front of the token check.

* ``POST /api/v1/agent/register`` takes no header: its body's one-time registration
  token is its credential (checked by the handler).
* An ``Authorization: Bearer bak_...`` key opens only the agent routes
  (:data:`AGENT_ROUTES`: ``POST`` of the heartbeats, the lease and a job's status,
  artifacts and tests, and backupagent-api.md's jobs/start, a job's status,
  verification and logs, schema-snapshot and anomaly; ``GET`` of
  :data:`AGENT_GET_ROUTES` (``/api/v1/agent/config``) and :data:`AGENT_READS` (a job,
  its artifact list and an artifact, which backend-api.md shares between the agent and
  the frontend: the agent's own jobs only)),
  and only while the key belongs to a registered agent; the agent's id is put in the
  ASGI scope (:data:`AGENT_SCOPE_KEY`) for the handler, which acts for that agent only
  (``backend_agents.calling_agent``). Anywhere else, or unknown or revoked, it is a 401
  like any wrong token (``{"detail", "code"}`` under ``/api/v1/admin`` and
  ``/api/v1/task``). A route added here must check the agent itself: a job's artifacts
  and tests join once their handlers do.
* Every other request goes to ``identity_auth.IdentityAuth`` (the agent token, users'
  access tokens, API tokens; roles).
"""

from __future__ import annotations

import json
import re
from typing import Final

from virtbackup.gateway.agents_store import KEY_PREFIX, AgentStore
from virtbackup.gateway.auth import UNAUTHORIZED, ASGIApp, Receive, Scope, Send
from virtbackup.gateway.errors import detail_code_family, error_body

#: Where the handlers find the id of the agent whose key authenticated the request.
AGENT_SCOPE_KEY: Final = "virtbackup.agent_id"
REGISTER_PATH: Final = "/api/v1/agent/register"
AGENT_ROUTES: Final = re.compile(
    r"^/api/v1/(heartbeat|agent/heartbeat|agent/lease|jobs/[^/]+/(status|artifacts|tests)"
    r"|agent/jobs/start|agent/jobs/[^/]+/(status|verification|logs)"
    r"|agent/schema-snapshot|agent/anomaly)$"
)
#: The agent routes read with ``GET`` (every other one is a ``POST``).
AGENT_GET_ROUTES: Final = frozenset({"/api/v1/agent/config"})
AGENT_READS: Final = re.compile(r"^/api/v1/jobs/[^/]+(/artifacts(/[^/]+)?)?$")


def is_agent_route(method: str, path: str) -> bool:
    """Whether a ``bak_`` key may call ``method`` ``path`` (:data:`AGENT_ROUTES`,
    :data:`AGENT_GET_ROUTES`, :data:`AGENT_READS`)."""
    if method == "GET":
        return path in AGENT_GET_ROUTES or bool(AGENT_READS.match(path))
    return method == "POST" and bool(AGENT_ROUTES.match(path))


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text: str = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return None


async def _unauthorized(send: Send, path: str) -> None:
    """401 in the path's error format (``{"detail", "code"}`` under ``/api/v1/admin``)."""
    body = UNAUTHORIZED
    if detail_code_family(path):
        body = json.dumps(error_body(path, 401, "unauthorized"), separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AgentKeyAuth:
    """ASGI middleware: agent keys and registration before ``token_auth`` (see module)."""

    def __init__(self, app: ASGIApp, token_auth: ASGIApp, store: AgentStore | None) -> None:
        self.app = app
        self.token_auth = token_auth
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.store is None:
            await self.token_auth(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == REGISTER_PATH and scope.get("method") == "POST":
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if presented is None or not presented.startswith(KEY_PREFIX):
            await self.token_auth(scope, receive, send)
            return
        agent_route = is_agent_route(str(scope.get("method", "")), path)
        agent = await self.store.authenticate(presented) if agent_route else None
        if agent is None:
            await _unauthorized(send, path)
            return
        scope[AGENT_SCOPE_KEY] = agent.id
        await self.app(scope, receive, send)
