"""Typed settings, read in one place.

Precedence: environment variables prefixed ``VIRTBACKUP_``, then ``agent.yaml`` in the
data directory (only ``listenAll`` affects the runtime), then defaults. On Kubernetes the
environment comes from a ConfigMap and a Secret.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from virtbackup.contracts import streams


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "virtbackup"


class Settings(BaseSettings):
    """Runtime settings of every service."""

    model_config = SettingsConfigDict(env_prefix="VIRTBACKUP_", extra="ignore", frozen=True)

    data_dir: Path = Field(default_factory=_default_data_dir)
    nats_url: str = "nats://127.0.0.1:4222"
    #: The NATS user this process logs in as (its service's name; see ``nats_auth``) and
    #: its password. Without a user, it connects anonymously (a server without auth).
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    #: TLS to NATS (used when set, or when ``nats_url`` is ``tls://``): the CA that signed
    #: the server's certificate (PEM), and a client certificate and key when the server
    #: asks for one.
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    #: The key that encrypts secrets stored on the bus (base64 of 32 bytes). Without it,
    #: ``secret_key_file`` is read (created at first use, mode 0600).
    secret_key: SecretStr | None = None
    #: Earlier keys, comma-separated, still accepted for decrypting during a rotation.
    secret_key_previous: SecretStr | None = None
    #: The vault's key (base64 of 32 bytes; ``runtime.vault``), held by the gateway only.
    #: Without it, ``vault_key_file`` is read (a Kubernetes Secret mounted as a file), else
    #: ``<data_dir>/secrets/vault-key`` (created at first use, mode 0600).
    vault_key: SecretStr | None = None
    vault_key_file: Path | None = None
    #: Earlier vault keys, comma-separated, still opened during a rotation (the gateway
    #: seals every connection again under the current key when it starts).
    vault_key_previous: SecretStr | None = None
    token: SecretStr | None = None

    @field_validator("token", "nats_password", "secret_key", "vault_key")
    @classmethod
    def _not_a_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        """A secret still set to the ``change-me...`` placeholder of
        ``deploy/k8s/config.yaml`` is refused at start: a token or NATS password anyone
        can read in this repository would be let in."""
        if value is not None and value.get_secret_value().strip().lower().startswith("change-me"):
            raise ValueError(
                "still the change-me placeholder of deploy/k8s/config.yaml: set a random value"
            )
        return value

    #: The agent listener's TLS certificate and key (PEM files), e.g. a Kubernetes TLS
    #: Secret shared by every gateway replica. Unset: a self-signed pair made at first
    #: start under ``<data_dir>/tls`` (one per data directory).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    agent_host: str | None = None
    agent_port: int = 33551
    hypersdk_host: str = "127.0.0.1"
    hypersdk_port: int = 8080
    #: This process's own Prometheus endpoint (``runtime.metrics``): 0 is off. It has no
    #: authentication, so it binds loopback unless told otherwise (the pod's address on
    #: Kubernetes). Each process of a host needs a port of its own.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    #: How many JetStream servers keep a copy of each stream and bucket this process
    #: creates: 1 on a single nats-server, 3 on a 3-node JetStream cluster (the chart's
    #: bundled one). More than the cluster has servers makes the service fail at start.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str | None = None
    debug: bool = False
    instance: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    request_timeout: float = 10.0
    max_body_bytes: int = 1 << 20
    #: Seconds a transfer unit may go without a sign of life before it is redelivered
    #: (the transfer consumer's ack wait; its default is the consumer's definition).
    work_ack_wait: float = streams.TRANSFER_CONSUMER.ack_wait_seconds
    #: Seconds a delivery the notifier holds may go without a sign of life before it is
    #: redelivered (to a restarted notifier): the ack wait of its consumers.
    notifier_ack_wait: float = streams.NOTIFIER_EVENTS_CONSUMER.ack_wait_seconds
    #: Whether webhooks may point at loopback, private and link-local addresses (the
    #: notifier's ``targets``): allowed by default (a receiver on the same host or network
    #: is a common set-up, and every token holder is an administrator); ``false`` refuses
    #: them when a webhook is added or tested and at every delivery.
    webhooks_allow_private: bool = True
    #: The shortest time between two runs of a schedule, in seconds: a cron expression
    #: that fires more often is refused (400 naming ``schedule``). 0 allows any.
    schedule_min_interval: float = Field(default=300.0, ge=0)
    #: The most schedules kept: one more is refused (409). Every schedule is read at
    #: each scheduler tick; a glob in ``vm_path`` lets one schedule cover many VMs.
    max_schedules: int = Field(default=10000, ge=1)
    #: Jobs the gateway asks the job-orchestrator for in one request when it needs every
    #: matching job (``/status``, ``/jobs/query``, a cancel by status, ...): it pages
    #: through them, so this bounds one reply's size, never what is seen.
    job_list_page: int = Field(default=500, ge=1, le=1000)
    #: Admission control (``job_orchestrator/slots.py``): at most this many jobs hold one
    #: server (backups, restores onto it, migrations from or to it) and one destination
    #: (backups and copies writing it, restores, sanity checks, verifies and copies reading
    #: it) at once, across every orchestrator replica; more wait ``queued``, in submit
    #: order. 0: no limit.
    max_jobs_per_server: int = Field(default=4, ge=0)
    max_jobs_per_destination: int = Field(default=8, ge=0)
    #: For benchmarks only (``bench/fleet.py --run``): a backup of a VM on a *simulated*
    #: server (``test:///``) waits this many seconds and ends ``success`` marked
    #: ``simulated`` (no restore point, nothing written) instead of being refused.
    #: ``None`` (unset): off. Never affects a VM on a real server.
    simulate_transfer_seconds: float | None = Field(default=None, ge=0, le=86400)
    #: A job fails when no unit finishes for this many seconds (no worker, or all stuck).
    job_stall_timeout: float = 600.0
    #: A backup queued for a remote agent fails when the agent has not leased it within
    #: this many seconds (stopped, deactivated or cut off): it would hold the VM's lock.
    agent_lease_wait: float = Field(default=900.0, gt=0)
    #: Sessions of users (``/api/v1/admin/auth``): seconds an access token (a JWT) and a
    #: refresh token live.
    access_token_seconds: int = Field(default=900, ge=30, le=86400)
    refresh_token_seconds: int = Field(default=7 * 86400, ge=60)
    #: Login lockout: this many failed logins of one user name (or
    #: ``login_address_max_failures`` from one client address) within
    #: ``login_failure_window`` seconds refuse further logins (429 with ``Retry-After``)
    #: until the oldest of them is that old.
    login_max_failures: int = Field(default=5, ge=1)
    login_address_max_failures: int = Field(default=20, ge=1)
    login_failure_window: float = Field(default=900.0, gt=0)
    #: OAuth2 login (``/api/v1/admin/oauth2/<provider>``): a provider is offered when its
    #: client id and secret are set. ``*_base_url`` replaces the provider's endpoints by
    #: one base URL serving the same paths (the tests' stand-in); ``oauth2_redirect_base``
    #: is the gateway's public URL the callback is under (default: the request's own).
    oauth2_github_client_id: str = ""
    oauth2_github_client_secret: SecretStr | None = None
    oauth2_github_base_url: str = ""
    oauth2_google_client_id: str = ""
    oauth2_google_client_secret: SecretStr | None = None
    oauth2_google_base_url: str = ""
    oauth2_redirect_base: str = ""
    #: Units one transfer-worker process works on at once.
    worker_units: int = 2
    #: Threads for hashing, compression and encryption (default: one per core).
    worker_threads: int = 0
    #: Seconds to connect to a hypervisor (SSH and libvirt) before it counts as unreachable.
    server_timeout: float = 5.0
    #: Seconds between full refreshes of every server's VM list (events keep it current).
    refresh_interval: float = 300.0
    #: The NATS server's monitoring endpoint (``http://nats:8222``: its ``http_port``),
    #: read by ``GET /api/v1/admin/monitor/server`` for the server's own connection count,
    #: CPU and memory (``/varz``). Empty: not read (the monitor counts VirtBackup's own
    #: connections instead). It has no authentication: reach it over the cluster network.
    nats_monitor_url: str = ""
    #: Days the audit trail (``VB_AUDIT``: the operation log, login attempts) keeps an
    #: entry; older ones are dropped by JetStream (the stream's ``max_age``).
    audit_retention_days: float = Field(default=365.0, gt=0)
    #: Seconds a service may take to stop on SIGTERM before it exits regardless, naming
    #: what hung (Kubernetes sends SIGKILL 30 s after SIGTERM).
    stop_timeout: float = 12.0
    #: Fault injection for tests, honoured only with ``debug``: seconds a job waits
    #: ``before:<phase>`` or ``after:<phase>`` is entered (e.g. ``{"before:committing": 5}``
    #: holds a job whose units are all done), so a cancel can be aimed at that moment.
    debug_holds: dict[str, float] = Field(default_factory=dict)
    #: Directory on each hypervisor for backup scratch files.
    scratch_dir: str = "/var/lib/libvirt/images/virtbackup-scratch"
    #: The certificate authority of the NBD exports and the workers' client certificate
    #: (``ca/``, ``nbd-client/``; see ``virtbackup.virt.pki``); default ``<data_dir>/pki``.
    pki_dir: Path | None = None
    #: The user id (and group id, ``uid:gid``; default the same number) that is given the
    #: workers' ``nbd-client/`` folder (still 0700, its key 0600) when the inventory runs
    #: as another user than the workers (compose: the inventory is root for the local
    #: libvirt socket, the workers 10001). Unset: left to the inventory's own user.
    pki_client_owner: str | None = Field(default=None, pattern=r"^[0-9]{1,9}(:[0-9]{1,9})?$")
    #: Instant access to restore points (a transfer worker's read-only NBD server): the
    #: address it listens on, the host name or address clients are told to dial (its
    #: certificate names it; default: the bind address, or this host's name when binding
    #: every address), and the ports it may take (``first-last``; empty: any free port).
    instant_bind: str = "127.0.0.1"
    instant_host: str | None = None
    instant_ports: str = ""
    #: How many instant-access exports may be active at once: in all
    #: (``VIRTBACKUP_INSTANT_MAX_EXPORTS``, checked by the job-orchestrator) and on one
    #: transfer worker (``VIRTBACKUP_INSTANT_MAX_PER_WORKER``: each has its own listener,
    #: connections and chunk cache). A create beyond either is a 409 naming the cap.
    instant_max_exports: int = Field(default=32, ge=1)
    instant_max_per_worker: int = Field(default=8, ge=1)
    #: Backup plans: the directory ``POST /api/v1/projects/import`` with ``path`` reads
    #: project YAML files from (names relative to it; default ``<data_dir>/projects``).
    projects_dir: Path | None = None
    #: Where ``/api/v1/update/*`` reads the available releases: an HTTP(S) URL answering
    #: JSON ``{"releases": [{"version", "tag", "publishedAt", "notes", "url"}]}``
    #: (empty: no feed; checks answer that none is configured).
    release_feed_url: str = ""
    #: This build's identity (set by the image build; shown by ``/api/v1/server-info``).
    build_commit: str = ""
    build_date: str = ""
    #: Set by ``virtbackup up`` for its children: the launcher's pid, which restarts every
    #: service on SIGHUP (``POST /api/v1/server/restart``). Unset elsewhere.
    launcher_pid: int = 0

    @property
    def nbd_pki_dir(self) -> Path:
        """Where the NBD exports' CA and the client certificate are kept."""
        return self.pki_dir if self.pki_dir is not None else self.data_dir / "pki"

    @property
    def plan_projects_dir(self) -> Path:
        """Where project YAML files named by ``path`` on import are read from."""
        return self.projects_dir if self.projects_dir is not None else self.data_dir / "projects"

    @property
    def secret_key_file(self) -> Path:
        return self.data_dir / "secrets" / "secret-key"

    @property
    def vault_key_path(self) -> Path:
        """Where the vault key is read from (and made, when it is the default path)."""
        if self.vault_key_file is not None:
            return self.vault_key_file
        return self.data_dir / "secrets" / "vault-key"

    @property
    def agent_yaml(self) -> Path:
        return self.data_dir / "agent.yaml"

    def agent_yaml_values(self) -> dict[str, Any]:
        """The raw ``agent.yaml`` mapping, or ``{}`` when there is none or it is unreadable."""
        try:
            loaded = yaml.safe_load(self.agent_yaml.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def agent_bind_host(self) -> str:
        """Loopback unless ``VIRTBACKUP_AGENT_HOST`` or ``listenAll: true`` in agent.yaml."""
        if self.agent_host:
            return self.agent_host
        return "0.0.0.0" if self.agent_yaml_values().get("listenAll") is True else "127.0.0.1"


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
