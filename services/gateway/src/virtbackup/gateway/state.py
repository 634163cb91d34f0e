"""What the gateway's handlers share."""

from __future__ import annotations

from dataclasses import dataclass

from virtbackup.gateway.agents_store import AgentStore
from virtbackup.gateway.audit_log import AuditTrail
from virtbackup.gateway.config_store import ConfigStore
from virtbackup.gateway.identity_store import IdentityStore
from virtbackup.gateway.login_log import LoginLog
from virtbackup.gateway.ntfy_mirror import NtfyMirror
from virtbackup.gateway.vault_store import VaultStore
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.sealing import SecretBox
from virtbackup.runtime.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    bus: Bus
    config: ConfigStore
    token: str
    #: Keeps the notifier's ntfy settings current (None in tests without a notifier).
    ntfy: NtfyMirror | None = None
    #: Seals secrets a handler sends to a service (None: sent as they are).
    secrets: SecretBox | None = None
    #: Remote agents and their keys (``VB_AGENTS``; None: no agent routes).
    agents: AgentStore | None = None
    #: The vault's connections (``vault_store``; None in tests without one).
    vault: VaultStore | None = None
    #: Why the listener of ``metrics.port`` could not start (None: it runs, or there is
    #: none); the HyperSDK listener's ``/metrics`` then answers 503 saying so.
    metrics_failure: str | None = None
    metrics_failed_port: int | None = None
    #: The operation log (``audit_log``; None: requests are not recorded, e.g. in tests
    #: without a bus).
    audit: AuditTrail | None = None
    #: Users, roles, sessions and API tokens (``VB_USERS``; None: the agent token only).
    identity: IdentityStore | None = None
    #: The login log (``VB_AUDIT``; None in tests without one).
    login_log: LoginLog | None = None
