"""Who may do what on the bus: one NATS user per service, each with least privilege.

Every service connects as the NATS user named after it (``gateway``, ``inventory``,
``job-orchestrator``, ``transfer-worker``, ``notifier``); ``admin`` may do anything (tests,
operators, the ``nats`` CLI). Each service's permissions are derived here from what it
does, in one table (:func:`permissions`):

* commands: it subscribes to the commands it answers (and its ``ping``) and publishes the
  commands it sends; replies go out through ``allow_responses`` (only to a request it
  received, once), so no service may publish on another's inbox;
* its inbox is ``_INBOX.<service>.>`` (:func:`inbox_prefix`): replies, JetStream API
  answers and push-consumer deliveries to it cannot be read by the others;
* events: it publishes ``vb.evt.<aggregate>.>`` for the aggregates it owns only;
* key-value buckets: reading (``$JS.API.DIRECT.GET.KV_<b>``, a watch's consumer) and
  writing (``$KV.<b>.>``) are granted per bucket; e.g. the notifier cannot read
  ``VB_CONFIG`` at all, the inventory can read it but not write it;
* streams: creating and updating (provisioning) the streams it declares; purging
  ``VB_WORK`` is the orchestrator's alone.

A service that starts using a new subject, bucket or stream must be given it here;
otherwise nats-server refuses it ("Permissions Violation", logged by the broker) and the
call times out.

Credentials are user/password pairs. In the single-machine mode they are generated at
first start (:meth:`NatsAuth.load_or_create`, a 0600 file in a 0700 directory) and the
nats-server configuration holding them is written 0600 (:func:`server_config`). Elsewhere
(Kubernetes, compose) the passwords come from the environment of nats-server
(:func:`deploy_authorization`: ``$VIRTBACKUP_NATS_PASSWORD_<USER>`` references) and of
each service (``VIRTBACKUP_NATS_USER``/``VIRTBACKUP_NATS_PASSWORD``).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.contracts.buckets import BucketSpec
from virtbackup.contracts.streams import StreamSpec
from virtbackup.contracts.v1 import webhooks
from virtbackup.runtime.sealing import new_key

#: The identity that may do anything (tests, operators); no service runs as it.
ADMIN: Final = "admin"
#: Every NATS user of a VirtBackup system.
USERS: Final = (*subjects.SERVICES, ADMIN)

API: Final = "$JS.API"


def inbox_prefix(service: str) -> str:
    """The inbox prefix of ``service``'s connections (its replies arrive below it)."""
    return f"_INBOX.{service}"


@dataclass(frozen=True)
class Permissions:
    """A NATS user's permissions: subjects it may publish and subscribe to."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: May answer the requests it receives (one reply each).
    allow_responses: bool = True

    def to_config(self) -> dict[str, Any]:
        """The ``permissions`` block of a nats-server user."""
        return {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
            "allow_responses": self.allow_responses,
        }


def _provision_stream(spec: StreamSpec) -> list[str]:
    name = spec.name
    return [
        f"{API}.STREAM.INFO.{name}",
        f"{API}.STREAM.CREATE.{name}",
        f"{API}.STREAM.UPDATE.{name}",
    ]


def _consume_stream(stream: str) -> list[str]:
    """Ephemeral (ordered) consumers of ``stream``: event feeds, key-value watches."""
    return [
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.INFO.{stream}.>",
        f"{API}.CONSUMER.DELETE.{stream}.>",
    ]


def _kv_stream(spec: BucketSpec) -> str:
    return f"KV_{spec.name}"


def _kv_create(spec: BucketSpec) -> list[str]:
    return [f"{API}.STREAM.CREATE.{_kv_stream(spec)}"]


def _kv_read(spec: BucketSpec) -> list[str]:
    """Open, get (direct or not), list keys and watch ``spec``."""
    stream = _kv_stream(spec)
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
        *_consume_stream(stream),
    ]


def _kv_write(spec: BucketSpec) -> list[str]:
    return [f"$KV.{spec.name}.>"]


@dataclass
class _Grants:
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)

    def owns(self, *specs: BucketSpec) -> None:
        """Create, read and write these buckets."""
        for spec in specs:
            self.publish += _kv_create(spec) + _kv_read(spec) + _kv_write(spec)

    def reads(self, *specs: BucketSpec, create: bool = True) -> None:
        """Read these buckets (and create them, when the service provisions them)."""
        for spec in specs:
            self.publish += (_kv_create(spec) if create else []) + _kv_read(spec)

    def answers(self, *subjects_: str) -> None:
        self.subscribe += subjects_

    def sends(self, *subjects_: str) -> None:
        self.publish += subjects_

    def events(self, *aggregates: str) -> None:
        """Publish events of these aggregates."""
        self.publish += [f"{subjects.EVT_ROOT}.{aggregate}.>" for aggregate in aggregates]

    def follows_events(self) -> None:
        self.publish += _consume_stream(streams.EVENTS.name)

    def freeze(self) -> Permissions:
        return Permissions(
            publish=tuple(dict.fromkeys(self.publish)),
            subscribe=tuple(dict.fromkeys(self.subscribe)),
        )


def _base(service: str) -> _Grants:
    """What every service does: its inbox, its ping, provisioning ``VB_EVENTS``."""
    return _Grants(
        publish=[f"{API}.INFO", "$JS.FC.>", *_provision_stream(streams.EVENTS)],
        subscribe=[f"{inbox_prefix(service)}.>", subjects.ping(service)],
    )


def _anomalies(g: _Grants) -> None:
    """Record anomalies (``VB_ANOMALIES``) and announce them and definition drifts."""
    g.owns(buckets.ANOMALIES)
    g.events("anomaly")
    g.sends(subjects.event(subjects.EventType.VM_DEFINITION_DRIFT) + ".>")


def _gateway() -> _Grants:
    g = _base(subjects.GATEWAY)
    g.sends(f"{subjects.CMD_ROOT}.>")  # the edge: every command, every ping
    g.events("config")
    g.follows_events()  # SSE, WebSocket
    g.owns(buckets.CONFIG)
    g.owns(buckets.AGENTS)  # remote agents and their keys' hashes
    g.sends("vb.log.job.>")  # remote agents' output lines, to their jobs' logs
    _anomalies(g)  # remote agents' anomalies and definition snapshots
    # The vault: its connections (sealed under the vault key, which only the gateway
    # holds), and the services' requests for the credentials they use (runtime.vault).
    g.owns(buckets.VAULT)
    g.answers(f"{subjects.CMD_ROOT}.vault.>")
    g.reads(buckets.WORKERS, create=False)
    # Users, roles, sessions, API tokens' hashes, the JWT key (sealed).
    g.owns(buckets.USERS)
    # The audit trail (VB_AUDIT): written, read and pruned (single records) by it alone.
    audit = streams.AUDIT.name
    g.publish += _provision_stream(streams.AUDIT) + _consume_stream(audit)
    g.sends(
        subjects.AUDIT_ALL,
        f"{API}.STREAM.MSG.GET.{audit}",
        f"{API}.STREAM.MSG.DELETE.{audit}",
    )
    # Job output logs: followed for /events (``job.log``).
    g.publish += [f"{API}.STREAM.INFO.{streams.JOB_LOGS.name}"]
    g.publish += _consume_stream(streams.JOB_LOGS.name)
    # /api/v1/runtime-state: the work queue's depth.
    work, durable = streams.WORK.name, streams.TRANSFER_CONSUMER.durable
    g.sends(f"{API}.STREAM.INFO.{work}", f"{API}.CONSUMER.INFO.{work}.{durable}")
    # The notifier's share of the configuration (ntfy settings): that key only.
    g.reads(buckets.WEBHOOKS)
    g.sends(f"$KV.{buckets.WEBHOOKS.name}.{webhooks.NTFY_KEY}")
    # The audit trail (VB_AUDIT): the gateway alone writes it (every mutating request,
    # login attempts), reads it (the log routes) and deletes single entries from it
    # (``DELETE /api/v1/admin/log/opera-logs/{id}``); nobody may purge it.
    audit = streams.AUDIT.name
    g.publish += _provision_stream(streams.AUDIT) + _consume_stream(audit)
    g.sends(
        subjects.AUDIT_ALL,
        f"{API}.STREAM.MSG.GET.{audit}",
        f"{API}.STREAM.MSG.DELETE.{audit}",
    )
    return g


def _inventory() -> _Grants:
    g = _base(subjects.INVENTORY)
    g.answers(f"{subjects.CMD_ROOT}.inventory.>")
    g.events("vm")
    g.owns(buckets.INVENTORY)
    # VB_LOCKS: cleanup refuses a VM that a backup or restore holds.
    g.reads(buckets.CONFIG, buckets.JOBS, buckets.LOCKS)
    g.sends(subjects.VaultCmd.OPEN_SSH)  # servers' SSH logins kept in the vault
    return g


def _job_orchestrator() -> _Grants:
    g = _base(subjects.JOB_ORCHESTRATOR)
    g.answers(f"{subjects.CMD_ROOT}.job.>")
    g.answers(f"{subjects.CMD_ROOT}.export.>")  # instant-access exports
    g.answers(f"{subjects.CMD_ROOT}.schedule.>")  # schedules (the scheduler runs here)
    g.sends(f"{subjects.CMD_ROOT}.inventory.>")
    g.sends(subjects.WorkerCmd.SERVE_EXPORT)
    g.sends(subjects.VaultCmd.OPEN_DESTINATION)  # destinations' credentials in the vault
    g.events("job", "agent", "schedule")
    g.follows_events()  # unit.done
    g.owns(buckets.JOBS, buckets.SCHEDULES, buckets.CONFIG, buckets.LOCKS, buckets.LEASES)
    g.owns(buckets.EXPORTS)
    g.answers(f"{subjects.CMD_ROOT}.plan.>")  # backup plans and chains
    g.owns(buckets.PLANS)
    g.reads(buckets.WORKERS, create=False)  # is the worker serving an export alive?
    g.publish += _provision_stream(streams.WORK)
    g.sends(subjects.WORK_TRANSFER_ALL, f"{API}.STREAM.PURGE.{streams.WORK.name}")
    g.sends(subjects.WORK_PINNED_ALL)  # units pinned to one worker (a plan's agent_id)
    # Job output logs: written, read (artifacts) and purged with their job; job files.
    logs = streams.JOB_LOGS.name
    g.publish += _provision_stream(streams.JOB_LOGS) + _consume_stream(logs)
    g.sends(subjects.JOB_LOGS_ALL, f"{API}.STREAM.PURGE.{logs}")
    g.owns(buckets.JOB_FILES)
    _anomalies(g)  # the checks after each backup: definition drift, size anomalies
    return g


def _transfer_worker() -> _Grants:
    g = _base(subjects.TRANSFER_WORKER)
    g.events("unit")
    g.follows_events()  # job.finished, job.canceled
    # VB_CONFIG: destinations' credentials, and a refreshed Google Drive token is kept.
    g.owns(buckets.WORKERS, buckets.CONFIG)
    g.reads(buckets.JOBS)
    g.sends(subjects.VaultCmd.OPEN_DESTINATION)  # destinations' credentials in the vault
    # Instant access: serve an export, activate and end its record.
    g.answers(subjects.WorkerCmd.SERVE_EXPORT)
    g.owns(buckets.EXPORTS)
    work, durable = streams.WORK.name, streams.TRANSFER_CONSUMER.durable
    g.publish += _provision_stream(streams.WORK)
    g.sends(
        f"{API}.CONSUMER.CREATE.{work}.{durable}",
        f"{API}.CONSUMER.CREATE.{work}.{durable}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{work}.{durable}",
        f"{API}.CONSUMER.INFO.{work}.{durable}",
        f"{API}.CONSUMER.MSG.NEXT.{work}.{durable}",
        f"$JS.ACK.{work}.{durable}.>",  # ack, nak, term and every in_progress
    )
    # Its own consumer of the units pinned to it, ``pinned-<worker name>``: a durable
    # name is one subject token, so the grant covers any consumer name of VB_WORK (all
    # workers share one NATS user, so NATS could not tell them apart anyway).
    g.sends(
        f"{API}.CONSUMER.CREATE.{work}.*",
        f"{API}.CONSUMER.CREATE.{work}.*.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{work}.*",
        f"{API}.CONSUMER.INFO.{work}.*",
        f"{API}.CONSUMER.MSG.NEXT.{work}.*",
        f"{API}.CONSUMER.DELETE.{work}.*",
        f"$JS.ACK.{work}.*.>",
    )
    return g


def _notifier() -> _Grants:
    g = _base(subjects.NOTIFIER)
    g.answers(f"{subjects.CMD_ROOT}.notify.>")  # webhooks, ntfy test
    g.events("notify")  # deliveries given up
    g.follows_events()
    g.owns(buckets.WEBHOOKS)
    # Not VB_CONFIG: the gateway copies the ntfy settings to VB_WEBHOOKS (key "ntfy").
    # Its durable cursor over VB_EVENTS, and VB_NOTIFY: a consumer per webhook.
    events, durable = streams.EVENTS.name, streams.NOTIFIER_EVENTS_CONSUMER.durable
    notify = streams.NOTIFY.name
    g.publish += _provision_stream(streams.NOTIFY)
    g.sends(
        f"{API}.CONSUMER.CREATE.{events}.{durable}",
        f"{API}.CONSUMER.CREATE.{events}.{durable}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{events}.{durable}",
        f"{API}.CONSUMER.INFO.{events}.{durable}",
        f"{API}.CONSUMER.MSG.NEXT.{events}.{durable}",
        f"$JS.ACK.{events}.{durable}.>",
        f"{API}.CONSUMER.CREATE.{notify}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{notify}.>",
        f"{API}.CONSUMER.INFO.{notify}.>",
        f"{API}.CONSUMER.DELETE.{notify}.>",
        f"{API}.CONSUMER.MSG.NEXT.{notify}.>",
        f"$JS.ACK.{notify}.>",
        f"{API}.STREAM.PURGE.{notify}",
        subjects.NOTIFY_ALL,
    )
    return g


_TABLE: Final = {
    subjects.GATEWAY: _gateway,
    subjects.INVENTORY: _inventory,
    subjects.JOB_ORCHESTRATOR: _job_orchestrator,
    subjects.TRANSFER_WORKER: _transfer_worker,
    subjects.NOTIFIER: _notifier,
}


def permissions(service: str) -> Permissions:
    """The permissions of ``service``'s NATS user; ``KeyError`` for an unknown service."""
    return _TABLE[service]().freeze()


def _user_entry(user: str, password: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"user": user, "password": password}
    if user != ADMIN:
        entry["permissions"] = permissions(user).to_config()
    return entry


def password_variable(user: str) -> str:
    """The environment variable nats-server reads ``user``'s password from in a deployed
    configuration (:func:`deploy_authorization`): ``VIRTBACKUP_NATS_PASSWORD_<USER>``."""
    return "VIRTBACKUP_NATS_PASSWORD_" + user.upper().replace("-", "_")


def deploy_authorization() -> str:
    """The nats-server ``authorization`` block for a deployment (Kubernetes, compose), as
    nats-server configuration text to ``include``: every user of :data:`USERS` with its
    permissions, each password a reference to the environment variable
    :func:`password_variable` names (nats-server substitutes it at start).

    ``deploy/k8s/nats/auth.conf`` and ``helm/virtbackup/files/nats-auth.conf`` are this
    text (``virtbackup nats-auth`` prints it; a test keeps them equal).
    """
    users = [_user_entry(user, f"@@{password_variable(user)}@@") for user in USERS]
    text = json.dumps({"users": users}, indent=2)
    for user in USERS:  # unquoted $VAR: nats-server substitutes it from its environment
        variable = password_variable(user)
        text = text.replace(f'"@@{variable}@@"', f"${variable}")
    header = (
        "# Generated by `virtbackup nats-auth` from virtbackup.runtime.nats_auth: VirtBackup's\n"
        "# NATS users and their permissions. Passwords come from nats-server's environment.\n"
    )
    return f"{header}authorization: {text}\n"


def deploy_secrets() -> dict[str, str]:
    """Fresh values for a deployment's secrets, by environment variable: every NATS
    user's password (:func:`password_variable`), ``VIRTBACKUP_SECRET_KEY`` and
    ``VIRTBACKUP_VAULT_KEY`` (the vault's key: for the gateway only, ``runtime.vault``)."""
    out = {password_variable(user): pw for user, pw in NatsAuth.generate().passwords.items()}
    out["VIRTBACKUP_SECRET_KEY"] = new_key()
    out["VIRTBACKUP_VAULT_KEY"] = new_key()
    return out


@dataclass(frozen=True)
class NatsCredentials:
    """How one NATS user connects."""

    user: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """The settings a service process reads them from."""
        return {"VIRTBACKUP_NATS_USER": self.user, "VIRTBACKUP_NATS_PASSWORD": self.password}


@dataclass(frozen=True)
class NatsAuth:
    """The passwords of every user of :data:`USERS`."""

    passwords: Mapping[str, str] = field(repr=False)

    @classmethod
    def generate(cls) -> NatsAuth:
        """Fresh random passwords (256 bits each)."""
        return cls({user: secrets.token_urlsafe(32) for user in USERS})

    @classmethod
    def load_or_create(cls, path: Path) -> NatsAuth:
        """The passwords stored in ``path`` (JSON ``{user: password}``), generating and
        storing them (file 0600, its directory 0700) when the file does not exist; users
        missing from an existing file are added. ``ValueError`` when it does not parse."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        stored: dict[str, str] = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not JSON: {exc}") from None
            if not isinstance(loaded, dict) or not all(
                isinstance(v, str) and v for v in loaded.values()
            ):
                raise ValueError(f"{path}: expected an object of user -> password")
            stored = dict(loaded)
        auth = cls({**cls.generate().passwords, **stored})
        if set(stored) != set(auth.passwords):
            write_private(path, json.dumps(dict(auth.passwords), indent=2) + "\n")
        return auth

    def credentials(self, user: str) -> NatsCredentials:
        """``user``'s credentials; ``KeyError`` for a user not in :data:`USERS`."""
        return NatsCredentials(user, self.passwords[user])

    def authorization(self) -> dict[str, Any]:
        """The nats-server ``authorization`` block with these passwords."""
        return {"users": [_user_entry(user, self.passwords[user]) for user in USERS]}


def server_config(*, host: str, port: int, store_dir: Path, auth: NatsAuth | None) -> str:
    """A nats-server configuration (JSON, which nats-server reads): JetStream storing in
    ``store_dir``, listening on ``host:port``, with ``auth``'s users when given. It holds
    passwords: write it with :func:`write_private`."""
    config: dict[str, Any] = {
        "host": host,
        "port": port,
        "jetstream": {"store_dir": str(store_dir)},
    }
    if auth is not None:
        config["authorization"] = auth.authorization()
    return json.dumps(config, indent=2) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    tmp.replace(path)
