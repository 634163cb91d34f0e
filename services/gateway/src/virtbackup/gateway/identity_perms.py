"""Who may do what: the permission vocabulary, the built-in roles and the rule table
that maps every route of every listener to the permission it takes.

Permissions (a role is a set of them; an API token carries a subset of its user's):

====================  ==========================================================
``config:read``       the configuration (secrets masked), drivers, webhooks list
``config:write``      replace the configuration; webhooks, ntfy and SFTP tests,
                      Google tokens; import, reload and delete backup plans
``inventory:read``    servers' VM lists and VM details
``vms:control``       VM power actions, CD-ROM removal, overlay cleanup, server
                      refresh and SSH test
``backup:run``        start backups (agent API, HyperSDK jobs, plan runs)
``restore:run``       restore precheck and start, instant-access exports
``jobs:read``         jobs, their logs, artifacts and tests; SSE ``/events``, WS ``/ws``
``jobs:control``      cancel, rerun and delete jobs, clear the queue, flush history
                      (a rerun also takes what starting the job takes:
                      ``backend_jobs.RERUN_PERMISSIONS``)
``backups:read``      restore points and entries, destination stats, plans and runs,
                      anomalies
``lifecycle:run``     prune, GC, verify, sanity, copy; protect, annotate, delete points
``schedules:read``    schedules (HyperSDK ``/schedules``, ``/api/v1/task/schedulers``)
``schedules:write``   create, change, enable, disable, run and delete schedules
``agents:read``       remote agents
``agents:manage``     registration tokens, agent activation and removal
``vault:read``        vault connections (masked)
``vault:manage``      create, test and delete vault connections
``system:read``       services, runtime state, server info, monitor, metrics, status
``system:manage``     update checks, updates, rollbacks, restarts
``users:read``        users and roles
``users:manage``      create, change and delete users and roles
``logs:read``         login and operation logs
``logs:delete``       delete login and operation log entries
====================  ==========================================================

``*`` (:data:`ADMIN`) is held by the built-in ``admin`` role and the installation's
agent token only: a route that the table does not name takes it, so a route added
later is admin-only until it is given a rule here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

#: Every permission a role or an API token may name, with what it allows.
PERMISSIONS: Final[dict[str, str]] = {
    "config:read": "the configuration (secrets masked), drivers, webhooks list",
    "config:write": "replace the configuration, webhooks, tests of targets, plans",
    "inventory:read": "servers' VM lists and VM details",
    "vms:control": "VM power actions, CD-ROM removal, cleanup, server refresh and test",
    "backup:run": "start backups",
    "restore:run": "restores and instant-access exports",
    "jobs:read": "jobs, their logs, artifacts and tests; event streams",
    "jobs:control": "cancel, rerun and delete jobs, clear the queue, flush history",
    "backups:read": "restore points and entries, destination stats, plans, runs, anomalies",
    "lifecycle:run": "prune, GC, verify, sanity, copy; protect and delete restore points",
    "schedules:read": "schedules",
    "schedules:write": "create, change, run and delete schedules",
    "agents:read": "remote agents",
    "agents:manage": "registration tokens, agent activation and removal",
    "vault:read": "vault connections (masked)",
    "vault:manage": "create, test and delete vault connections",
    "system:read": "services, runtime state, server info, monitor, metrics",
    "system:manage": "updates and restarts",
    "users:read": "users and roles",
    "users:manage": "create, change and delete users and roles",
    "logs:read": "login and operation logs",
    "logs:delete": "delete log entries",
}

#: The permission of administrators: every route, including those not in the table.
ADMIN: Final = "*"
#: A rule's permission that any authenticated identity has (the handler may check more).
ANYONE: Final = ""

READS: Final = frozenset(
    {
        "config:read",
        "inventory:read",
        "jobs:read",
        "backups:read",
        "schedules:read",
        "agents:read",
        "vault:read",
        "system:read",
    }
)
ALL_PERMISSIONS: Final = frozenset(PERMISSIONS) | {ADMIN}


@dataclass(frozen=True)
class BuiltinRole:
    id: int
    name: str
    description: str
    permissions: frozenset[str]


#: The built-in roles (ids 1-4; custom roles get ids from 100). They cannot be changed.
BUILTIN_ROLES: Final = {
    r.name: r
    for r in (
        BuiltinRole(1, "admin", "everything", ALL_PERMISSIONS),
        BuiltinRole(
            2,
            "operator",
            "run backups, restores, prune, GC, verify and jobs; read all but secrets",
            READS
            | {
                "backup:run",
                "restore:run",
                "jobs:control",
                "lifecycle:run",
                "vms:control",
                "schedules:write",
                "users:read",
                "logs:read",
            },
        ),
        BuiltinRole(3, "viewer", "read only, no secrets", READS),
        BuiltinRole(
            4,
            "auditor",
            "read login and operation logs; read only",
            READS | {"users:read", "logs:read"},
        ),
    )
}

Listener = Literal["agent", "hypersdk"]


@dataclass(frozen=True)
class Rule:
    listener: Listener | None  # None: both listeners
    methods: frozenset[str]
    pattern: re.Pattern[str]
    permission: str


_P = r"[^/]+"


def _rule(listener: Listener | None, methods: str, path: str, permission: str) -> Rule:
    return Rule(listener, frozenset(methods.split()), re.compile(f"^{path}$"), permission)


A: Final = "agent"
H: Final = "hypersdk"

#: Method + path pattern -> permission, first match wins; a request no rule matches
#: takes :data:`ADMIN`. WebSocket upgrades count as ``GET``.
RULES: Final[tuple[Rule, ...]] = (
    # Both listeners
    _rule(None, "GET HEAD", r"/health", ANYONE),
    _rule(None, "GET HEAD", r"/schema(/.*)?", ANYONE),
    # Agent API (agent-api.md)
    _rule(A, "GET HEAD", r"/healthz", ANYONE),
    _rule(A, "GET", r"/drivers", "config:read"),
    _rule(A, "GET", r"/config", "config:read"),
    _rule(A, "POST", r"/config", "config:write"),
    _rule(A, "GET", r"/events", "jobs:read"),
    _rule(A, "GET", rf"/jobs(/{_P})?", "jobs:read"),
    _rule(A, "POST", rf"/jobs/{_P}/cancel", "jobs:control"),
    _rule(A, "GET", rf"/servers/{_P}/vms", "inventory:read"),
    _rule(A, "POST", rf"/servers/{_P}/(actions|cleanup|refresh|test)", "vms:control"),
    _rule(A, "POST", rf"/servers/{_P}/backup", "backup:run"),
    _rule(A, "POST", rf"/servers/{_P}/restore/(precheck|start)", "restore:run"),
    _rule(A, "GET", r"/restore/entries", "backups:read"),
    _rule(A, "POST", r"/restore/sanity", "lifecycle:run"),
    _rule(A, "GET", r"/restore/exports", "backups:read"),
    _rule(A, "POST", r"/restore/exports", "restore:run"),
    _rule(A, "DELETE", rf"/restore/exports/{_P}", "restore:run"),
    _rule(A, "POST", r"/(oauth/google|oauth/google/clear|sftp/test|ntfyme/test)", "config:write"),
    # Native API (backend-api.md)
    _rule(A, "GET", r"/api/v1/(services|runtime-state|server-info|update/(status|tags))",
          "system:read"),
    _rule(A, "POST", r"/api/v1/(update/(check|apply|rollback)|server/restart)", "system:manage"),
    _rule(A, "GET", rf"/api/v1/restore-points(/{_P})?", "backups:read"),
    _rule(A, "PATCH DELETE", rf"/api/v1/restore-points/{_P}", "lifecycle:run"),
    _rule(A, "GET", rf"/api/v1/destinations/{_P}/stats", "backups:read"),
    _rule(A, "POST", rf"/api/v1/destinations/{_P}/(prune|gc|verify|copy)", "lifecycle:run"),
    # A migration also takes vms:control (controllers/migrations.check_may_migrate).
    _rule(A, "POST", r"/api/v1/migrations", "restore:run"),
    _rule(A, "GET", rf"/api/v1/projects(/{_P}(/icon)?)?", "backups:read"),
    _rule(A, "POST", rf"/api/v1/projects/(import|{_P}/reload)", "config:write"),
    _rule(A, "DELETE", rf"/api/v1/projects/{_P}", "config:write"),
    _rule(A, "POST", rf"/api/v1/(pipelines/{_P}/run-selection|pipeline-chains/{_P}/run)",
          "backup:run"),
    _rule(A, "POST", rf"/api/v1/(pipelines|pipeline-chains)/{_P}/(dry-run-preview|eligible-agents)",
          "backups:read"),
    _rule(A, "GET", rf"/api/v1/(pipelines|pipeline-chains)/{_P}/(source-refs|version-resolve)",
          "backups:read"),
    _rule(A, "GET", rf"/api/v1/plan-runs/{_P}", "backups:read"),
    _rule(A, "GET", r"/api/v1/anomalies", "backups:read"),  # size anomalies, drift
    _rule(A, "GET", rf"/api/v1/agents(/{_P})?", "agents:read"),
    _rule(A, "DELETE", rf"/api/v1/agents/{_P}", "agents:manage"),
    _rule(A, "POST", rf"/api/v1/agents/{_P}/actions", "agents:manage"),
    _rule(A, "POST", r"/api/v1/agent/registration-tokens", "agents:manage"),
    _rule(A, "GET", r"/api/v1/vault/connections", "vault:read"),
    _rule(A, "POST", rf"/api/v1/vault/connections(/{_P}/test)?", "vault:manage"),
    _rule(A, "DELETE", rf"/api/v1/vault/connections/{_P}", "vault:manage"),
    _rule(A, "GET", rf"/api/v1/jobs(/{_P}(/artifacts(/{_P})?|/tests)?)?", "jobs:read"),
    _rule(A, "DELETE", rf"/api/v1/jobs/{_P}", "jobs:control"),
    _rule(A, "POST", rf"/api/v1/jobs/(clear-queue|flush-history|{_P}/(cancel|rerun))",
          "jobs:control"),
    # agents-backend-api.md (/api/v1/admin, /api/v1/task)
    _rule(A, "POST", r"/api/v1/admin/auth/logout", ANYONE),
    _rule(A, "GET", r"/api/v1/admin/sys/(users|roles)", "users:read"),
    _rule(A, "GET PUT", rf"/api/v1/admin/sys/users/{_P}", ANYONE),  # self, or users:* (handler)
    _rule(A, "GET POST", rf"/api/v1/admin/sys/users/{_P}/tokens", ANYONE),  # own (handler)
    _rule(A, "DELETE", rf"/api/v1/admin/sys/users/{_P}/tokens/{_P}", ANYONE),  # own (handler)
    _rule(A, "POST", r"/api/v1/admin/sys/users", "users:manage"),
    _rule(A, "DELETE", rf"/api/v1/admin/sys/users/{_P}", "users:manage"),
    _rule(A, "GET", r"/api/v1/admin/sys/permissions", ANYONE),
    _rule(A, "POST", r"/api/v1/admin/sys/roles", "users:manage"),
    _rule(A, "PUT DELETE", rf"/api/v1/admin/sys/roles/{_P}", "users:manage"),
    _rule(A, "GET", r"/api/v1/admin/log/.+", "logs:read"),
    _rule(A, "DELETE", r"/api/v1/admin/log/.+", "logs:delete"),
    _rule(A, "GET", r"/api/v1/admin/monitor/.+", "system:read"),
    _rule(A, "GET", r"/api/v1/task/schedulers(/.*)?", "schedules:read"),
    _rule(A, "POST PUT DELETE", r"/api/v1/task/schedulers(/.*)?", "schedules:write"),
    _rule(A, "GET", r"/api/v1/webhooks", "config:read"),
    _rule(A, "POST", r"/api/v1/webhooks(/test)?", "config:write"),
    _rule(A, "DELETE", rf"/api/v1/webhooks/{_P}", "config:write"),
    # HyperSDK API (hypersdk-api.md)
    _rule(H, "GET", r"/(status|metrics)", "system:read"),
    _rule(H, "GET", r"/vms/(list|info)", "inventory:read"),
    _rule(H, "POST", r"/vms/(shutdown|poweroff|remove-cdrom)", "vms:control"),
    _rule(H, "POST", r"/jobs/submit", "backup:run"),
    _rule(H, "POST", r"/jobs/query", "jobs:read"),
    _rule(H, "GET", rf"/jobs/{_P}", "jobs:read"),
    _rule(H, "POST", r"/jobs/cancel", "jobs:control"),
    _rule(H, "GET", rf"/schedules(/{_P})?", "schedules:read"),
    _rule(H, "POST", rf"/schedules(/{_P}/(enable|disable|trigger))?", "schedules:write"),
    _rule(H, "PUT DELETE", rf"/schedules/{_P}", "schedules:write"),
    _rule(H, "GET", r"/webhooks", "config:read"),
    _rule(H, "POST", r"/webhooks(/test)?", "config:write"),
    _rule(H, "DELETE", rf"/webhooks/{_P}", "config:write"),
    _rule(H, "GET", r"/ws", "jobs:read"),
)  # fmt: skip


def required_permission(listener: Listener, method: str, path: str) -> str:
    """The permission ``method path`` takes on ``listener``: the first rule of
    :data:`RULES` that matches, else :data:`ADMIN`. ``OPTIONS`` takes what ``GET``
    does; ``HEAD`` is ``GET``."""
    if method in ("OPTIONS", "HEAD"):
        method = "GET"
    for rule in RULES:
        if rule.listener not in (None, listener) or method not in rule.methods:
            continue
        if rule.pattern.match(path):
            return rule.permission
    return ADMIN


def allows(permissions: frozenset[str], required: str) -> bool:
    """Whether an identity holding ``permissions`` may do what takes ``required``."""
    return required == ANYONE or ADMIN in permissions or required in permissions
