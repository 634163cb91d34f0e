"""Remote agents in ``VB_AGENTS`` (owned by the gateway): registration tokens, agents,
their ``bak_`` API keys (kept only as SHA-256), state and heartbeats.

Keys of the bucket (every change a compare-and-swap on the revision, so gateway
replicas can race):

* ``regtoken.<sha256 hex of the token>``: a one-time registration token
  (:class:`RegistrationToken`); registering deletes it with the revision it was read
  at, so of two registrations with one token exactly one wins;
* ``agent.<id>``: the agent (:class:`AgentRecord`);
* ``key.<sha256 hex of the key>``: the id of the agent the key belongs to.

Neither a token nor a key is stored or logged in clear: each is shown once, in the
answer that made it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.common import shown
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, NotFound
from virtbackup.runtime.kv import keys

KEY_PREFIX: Final = "bak_"
TOKEN_PREFIX: Final = "vbreg_"  # noqa: S105 (a prefix, not a secret)
#: Compare-and-swap attempts before a busy record is given up on (409).
CAS_ATTEMPTS: Final = 20
#: What an agent id can be (a NATS KV key segment; ids are made by ``register``).
_AGENT_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")

AgentState = Literal["active", "deactivated"]


class RegistrationToken(msgspec.Struct, kw_only=True, rename="camel"):
    created_at: str
    expires_at: str


class DiscoveredDisk(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    target: str
    path: str = ""
    size: int = 0


class DiscoveredDomain(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """A VM of the agent's host as its heartbeat reports it."""

    name: str
    uuid: str = ""
    state: str = ""
    disks: list[DiscoveredDisk] = msgspec.field(default_factory=list)


class AgentRecord(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    hostname: str
    os: str
    arch: str
    version: str
    key_sha256: str
    registered_at: str
    state: AgentState = "active"
    status: str = ""
    last_heartbeat: str | None = None
    load: list[float] = msgspec.field(default_factory=list)
    config_hash: str = ""
    discovered_domains: list[DiscoveredDomain] = msgspec.field(default_factory=list)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


#: JetStream's error code for a write whose expected last sequence is not the subject's.
_WRONG_LAST_SEQUENCE: Final = 10071


class AgentStore:
    """Agents and registration tokens in ``kv`` (``VB_AGENTS``)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create_token(self, ttl_seconds: int) -> tuple[str, str]:
        """A new one-time registration token valid for ``ttl_seconds``; returns the token
        (shown once) and its expiry (ISO-8601 UTC)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = _now()
        record = RegistrationToken(
            created_at=_iso(now), expires_at=_iso(now + timedelta(seconds=ttl_seconds))
        )
        await self.kv.create(f"regtoken.{sha256_hex(token)}", msgspec.json.encode(record))
        return token, record.expires_at

    async def register(
        self, token: str, *, hostname: str, os: str, arch: str, version: str
    ) -> tuple[str, str]:
        """Trade a registration token for a new agent; returns its id and its API key
        (``bak_...``, shown once). Raises ``PermissionError`` for a token that is
        unknown, used already, or expired (an expired one is removed)."""
        key = f"regtoken.{sha256_hex(token)}"
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            raise PermissionError("registration token is unknown, used or expired") from None
        if entry.value is None or entry.revision is None:
            raise PermissionError("registration token is unknown, used or expired")
        record = msgspec.json.decode(entry.value, type=RegistrationToken)
        try:
            # Consumed whether it is still valid or not: exactly one caller gets past here.
            await self.kv.delete(key, last=entry.revision)
        except KeyWrongLastSequenceError:
            raise PermissionError("registration token is unknown, used or expired") from None
        except APIError as exc:
            # A conditional delete that lost the race is refused by JetStream as a bad
            # request (error code 10071, ``wrong last sequence``): another registration
            # consumed the token first. Anything else is an outage, not a refusal.
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise
            raise PermissionError("registration token is unknown, used or expired") from None
        if datetime.fromisoformat(record.expires_at.replace("Z", "+00:00")) <= _now():
            raise PermissionError("registration token is unknown, used or expired")
        agent_id = str(uuid.uuid4())
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = sha256_hex(api_key)
        agent = AgentRecord(
            id=agent_id,
            hostname=hostname,
            os=os,
            arch=arch,
            version=version,
            key_sha256=digest,
            registered_at=utcnow_iso(),
        )
        await self.kv.create(f"agent.{agent_id}", msgspec.json.encode(agent))
        await self.kv.create(f"key.{digest}", agent_id.encode())
        return agent_id, api_key

    async def authenticate(self, api_key: str) -> AgentRecord | None:
        """The agent whose key ``api_key`` is, or ``None`` (unknown or revoked)."""
        if not api_key.startswith(KEY_PREFIX):
            return None
        digest = sha256_hex(api_key)
        try:
            entry = await self.kv.get(f"key.{digest}")
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        agent = await self.get(entry.value.decode())
        if agent is None or not secrets.compare_digest(agent.key_sha256, digest):
            return None
        return agent

    async def get(self, agent_id: str) -> AgentRecord | None:
        """The agent, or ``None`` (also for an id that cannot be one: not a KV key)."""
        if not _AGENT_ID.fullmatch(agent_id):
            return None
        try:
            entry = await self.kv.get(f"agent.{agent_id}")
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return msgspec.json.decode(entry.value, type=AgentRecord)

    async def list(self) -> list[AgentRecord]:
        out = []
        for key in await keys(self.kv):
            if key.startswith("agent."):
                agent = await self.get(key.removeprefix("agent."))
                if agent is not None:
                    out.append(agent)
        return sorted(out, key=lambda a: (a.hostname, a.id))

    async def update(
        self, agent_id: str, change: Callable[[AgentRecord], AgentRecord]
    ) -> AgentRecord:
        """Apply ``change`` to the agent in a compare-and-swap (again on a race).
        ``NotFound`` for an unknown agent."""
        if not _AGENT_ID.fullmatch(agent_id):
            raise NotFound(f"agent {agent_id[:128]} not found")
        for _ in range(CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(f"agent.{agent_id}")
            except KeyNotFoundError:
                raise NotFound(f"agent {shown(agent_id)} not found") from None
            if entry.value is None or entry.revision is None:
                raise NotFound(f"agent {shown(agent_id)} not found")
            agent = change(msgspec.json.decode(entry.value, type=AgentRecord))
            try:
                await self.kv.update(
                    f"agent.{agent_id}", msgspec.json.encode(agent), last=entry.revision
                )
            except KeyWrongLastSequenceError:
                continue
            return agent
        raise Conflict(f"agent {agent_id} is being changed by others; try again")

    async def remove(self, agent_id: str) -> None:
        """Forget the agent and revoke its key; ``NotFound`` for an unknown agent."""
        agent = await self.get(agent_id)
        if agent is None:
            raise NotFound(f"agent {shown(agent_id)} not found")
        await self.kv.delete(f"key.{agent.key_sha256}")
        await self.kv.delete(f"agent.{agent_id}")


def agent_view(agent: AgentRecord) -> dict[str, Any]:
    """An agent as ``/api/v1/agents`` shows it (no key, not even its hash)."""
    return {
        "id": agent.id,
        "kind": "remote",
        "hostname": agent.hostname,
        "os": agent.os,
        "arch": agent.arch,
        "version": agent.version,
        "state": agent.state,
        "status": agent.status,
        "lastHeartbeat": agent.last_heartbeat,
        "load": agent.load,
        "registeredAt": agent.registered_at,
        "configHash": agent.config_hash,
        "discoveredDomains": msgspec.to_builtins(agent.discovered_domains),
    }
