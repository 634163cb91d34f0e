"""``virtbackup up``: an embedded NATS server and every service as its own process.

Everything is kept under the data directory (``VIRTBACKUP_DATA_DIR``): the NATS store,
the token, the certificate, ``agent.yaml``, the services' logs, and in ``secrets/``
(0700) the NATS users' passwords, the nats-server configuration, the key that seals
secrets on the bus and the vault's key (read by the gateway only) (files 0600,
generated at first start). NATS requires a login: each
service gets its own user and password in its environment, with only the permissions
it needs (``virtbackup.runtime.nats_auth``). Ctrl-C (or SIGTERM) stops the services,
then NATS. A service that dies is started again; so is nats-server, on the same port
and store (the services reconnect).

``virtbackup nats-auth`` prints the nats-server ``authorization`` block for a deployment
(passwords from the environment), as kept in ``deploy/k8s/nats/auth.conf``;
``virtbackup new-secrets`` prints fresh passwords, a secret key and a token for one.
``virtbackup agent`` runs a remote agent on a hypervisor host (``cli.agent``).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_urlsafe
from typing import BinaryIO

from virtbackup.cli.agent.process import add_parser as add_agent_parser
from virtbackup.cli.agent.process import main as agent_main
from virtbackup.cli.services import MODULES
from virtbackup.contracts.subjects import JOB_ORCHESTRATOR, TRANSFER_WORKER
from virtbackup.runtime.nats_auth import NatsAuth, deploy_authorization, deploy_secrets
from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.runtime.ports import free_port
from virtbackup.runtime.sealing import load_or_create_key_file
from virtbackup.runtime.settings import load_settings

DEFAULT_NATS_PORT = 4222


@dataclass
class Child:
    name: str
    module: str
    log_path: Path
    #: The environment it runs with (its own NATS credentials among it).
    env: dict[str, str] = field(default_factory=dict, repr=False)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = field(default=0.0)
    #: When a child that exited is started again (0: it is running).
    restart_at: float = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with private_log(self.log_path) as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=self.env, stdout=log, stderr=log
            )
        self.started = time.monotonic()
        self.restart_at = 0.0


def private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, created 0600 (an older, wider one is narrowed)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


@dataclass
class NatsSupervisor:
    """Keeps the embedded nats-server running: started again (same port, store, users)
    when it exits, at once and then with a growing delay while it keeps failing."""

    server: NatsServer
    restarts: int = 0
    next_try: float = 0.0

    def check(self) -> None:
        if self.server.alive or time.monotonic() < self.next_try:
            return
        code = self.server.process.returncode
        print(f"nats-server exited with {code}; restarting it", flush=True)
        try:
            self.server.restart()
        except (RuntimeError, TimeoutError, OSError) as exc:
            self.restarts += 1
            delay = min(30.0, 2.0**self.restarts)
            print(f"nats-server did not start again ({exc}); next try in {delay:.0f}s", flush=True)
            self.next_try = time.monotonic() + delay
            return
        self.restarts = 0
        print(f"nats-server is back at {self.server.url}", flush=True)


def restart_children(children: list[Child]) -> None:
    """Stop every service (SIGTERM, then SIGKILL after 20 s) and start each again at
    once: ``POST /api/v1/server/restart`` (the gateway sends the launcher SIGHUP)."""
    print("restart requested: restarting every service", flush=True)
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.terminate()
    for child in children:
        if child.process:
            try:
                child.process.wait(20)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)
        child.restarts = 0
        child.start()


def _wait_health(url: str, token: str, timeout: float) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(  # noqa: S310
            url, headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def up(workers: int, nats_port: int, orchestrators: int = 2) -> int:
    settings = load_settings()
    data = settings.data_dir.resolve()
    # The token, the configuration (secrets sealed), the NATS store and the logs (job
    # messages name VMs and paths): the owner's only, whatever the umask.
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    logs = data / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    os.chmod(logs, 0o700)
    secrets = data / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets, 0o700)
    env = dict(os.environ)
    env["VIRTBACKUP_DATA_DIR"] = str(data)
    # POST /api/v1/server/restart: the gateway sends this launcher SIGHUP.
    env["VIRTBACKUP_LAUNCHER_PID"] = str(os.getpid())
    if not settings.secret_key:
        load_or_create_key_file(settings.secret_key_file)  # before any service reads it
    nats: NatsServer | None = None
    auth: NatsAuth | None = None
    if "VIRTBACKUP_NATS_URL" not in os.environ:
        auth = NatsAuth.load_or_create(secrets / "nats-users.json")
        start = functools.partial(
            start_nats_server,
            data / "nats",
            log_file=logs / "nats.log",
            auth=auth,
            config_path=secrets / "nats-server.conf",
        )
        try:
            nats = start(port=nats_port or free_port())
        except (RuntimeError, TimeoutError):  # the port is taken: any free one will do
            nats = start(port=free_port())
        env["VIRTBACKUP_NATS_URL"] = nats.url
        print(f"NATS (JetStream) at {nats.url}, store {data / 'nats'}", flush=True)
        print(f"  its users' passwords: {secrets / 'nats-users.json'}", flush=True)

    replicas = {TRANSFER_WORKER: workers, JOB_ORCHESTRATOR: orchestrators}
    children: list[Child] = []
    for name, module in MODULES.items():
        child_env = env | auth.credentials(name).env() if auth else env
        for i in range(1, replicas.get(name, 1) + 1):
            label = f"{name}-{i}" if name in replicas else name
            children.append(Child(label, module, logs / f"{label}.log", child_env))
    supervisor = NatsSupervisor(nats) if nats else None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    restart_requested = False

    def on_hangup(signum: int, _frame: object) -> None:
        nonlocal restart_requested
        restart_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    for child in children:
        child.start()

    token_file = data / "agent-token"
    url = f"https://127.0.0.1:{settings.agent_port}"
    deadline = time.monotonic() + 60
    while not token_file.exists() and not settings.token and time.monotonic() < deadline:
        time.sleep(0.1)
    token = settings.token.get_secret_value() if settings.token else token_file.read_text().strip()
    if _wait_health(f"{url}/health", token, 60):
        print(f"VirtBackup is up: {url}  (token: {token})", flush=True)
        print(f"  token file {token_file}, logs {logs}, Ctrl-C to stop", flush=True)
    else:
        print(f"the gateway did not answer on {url}; see {logs}/gateway.log", flush=True)

    try:
        while not stopping:
            if restart_requested:
                restart_requested = False
                restart_children(children)
            if supervisor:
                supervisor.check()
            for child in children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or stopping:
                    continue
                now = time.monotonic()
                if not child.restart_at:  # it has just exited: start it again after a delay
                    delay = min(30.0, 2.0**child.restarts)
                    print(
                        f"{child.name} exited with {code}; restarting in {delay:.0f}s", flush=True
                    )
                    child.restart_at = now + delay
                    child.restarts = child.restarts + 1 if now - child.started < 60 else 0
                elif now >= child.restart_at:
                    child.start()
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.terminate()
        for child in children:
            if child.process:
                try:
                    child.process.wait(20)
                except subprocess.TimeoutExpired:
                    child.process.kill()
        if nats:
            nats.stop()
    return 0


#: The launcher's own commands, parsed by argparse as always (same options, outputs and
#: exit codes); everything else is the operator's client (``virtbackup.cli.client.app``).
LAUNCHER_COMMANDS = frozenset({"up", "nats-auth", "new-secrets", "agent"})


def main() -> None:
    """``virtbackup``: the launcher's commands, else the operator's command line."""
    if len(sys.argv) > 1 and sys.argv[1] in LAUNCHER_COMMANDS:
        launcher_main()
        return
    from virtbackup.cli.client import app  # the launcher does not need it

    app.main()


def launcher_main() -> None:
    parser = argparse.ArgumentParser(prog="virtbackup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="run NATS and every service on this machine")
    up_parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("VIRTBACKUP_WORKERS", "2")),
        help="number of transfer-worker processes (default 2)",
    )
    up_parser.add_argument(
        "--orchestrators",
        type=int,
        default=int(os.environ.get("VIRTBACKUP_ORCHESTRATORS", "2")),
        help="number of job-orchestrator replicas (default 2; any of them can run any job)",
    )
    up_parser.add_argument(
        "--nats-port",
        type=int,
        default=DEFAULT_NATS_PORT,
        help=f"port of the embedded NATS server (default {DEFAULT_NATS_PORT}; 0: any free port)",
    )
    sub.add_parser(
        "nats-auth",
        help="print the nats-server authorization block for a deployment (deploy/nats/auth.conf)",
    )
    sub.add_parser(
        "new-secrets",
        help="print fresh secrets for a deployment as KEY=value lines (compose .env, "
        "kubectl create secret --from-env-file)",
    )
    add_agent_parser(sub)
    args = parser.parse_args()
    if args.command == "agent":
        sys.exit(agent_main(args))
    if args.command == "new-secrets":
        values = {**deploy_secrets(), "VIRTBACKUP_TOKEN": token_urlsafe(32)}
        print("".join(f"{key}={value}\n" for key, value in values.items()), end="")
    if args.command == "up":
        sys.exit(up(args.workers, args.nats_port, args.orchestrators))
    if args.command == "nats-auth":
        print(deploy_authorization(), end="")


if __name__ == "__main__":
    main()
