"""``virtbackup agent``: a remote agent on a hypervisor host, reaching only the gateway.

It holds no NATS credential: everything goes over HTTPS to the gateway's ``/api/v1``
with its ``bak_`` key (``Authorization: Bearer``). With ``--registration-token`` it
first trades a one-time token for its id and key (``POST /api/v1/agent/register``) and
keeps them in ``--key-file`` (0600, in a 0700 directory); later starts read the key
from there (or ``--api-key`` / ``VIRTBACKUP_AGENT_KEY``).

Then, until SIGTERM or SIGINT: a heartbeat every ``--heartbeat-seconds`` with the
host's VMs (name, UUID, state, disks), its load and the hash of the configuration it
holds; when the answer says ``configChanged`` it pulls ``GET /api/v1/agent/config``
(kept in ``config.json`` beside the key file, 0600) and sends each VM's domain
definition once it differs from what it sent last (``POST /api/v1/agent/schema-snapshot``:
the gateway compares it with the VM's last backup). A lease every ``--poll-seconds``;
a leased backup runs here (``agent.backup``), a leased restore onto this host too
(``agent.restore``), reporting its stages, progress and each
stage's duration (``POST /api/v1/agent/jobs/{id}/status``) and stopping when an answer
says ``cancel``. ``--backup VM[@TARGET]`` starts backups itself at start
(``POST /api/v1/agent/jobs/start``), which it then leases and runs. At start it first
ends a backup or restore a previous run left behind (``agent.inflight``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, Final

import httpx
import msgspec

from virtbackup.cli.agent.backup import Cancelled, run_backup
from virtbackup.cli.agent.inflight import InFlight, recover
from virtbackup.cli.agent.restore import run_restore
from virtbackup.contracts.v1.config import Destination
from virtbackup.runtime import __version__
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.virt import list_disks, list_domains, open_connection
from virtbackup.virt.domains import domain_xml
from virtbackup.virt.errors import NotFound as VirtNotFound

log = logging.getLogger("virtbackup.agent")

DEFAULT_KEY_FILE: Final = "/var/lib/virtbackup-agent/agent.json"
#: As the inventory's (``VIRTBACKUP_SCRATCH_DIR``): QEMU must be able to traverse it.
DEFAULT_SCRATCH: Final = "/var/lib/libvirt/images/virtbackup-scratch"


class AgentClient:
    """The gateway's agent routes over HTTPS (``ca_file``: the gateway's certificate or
    its CA; default: the system's trust store)."""

    def __init__(self, gateway: str, api_key: str | None, ca_file: str | None) -> None:
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=gateway.rstrip("/"), verify=verify, headers=headers, timeout=30.0
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body``; the answer's JSON. Raises ``httpx.HTTPStatusError`` on a 4xx/5xx
        (its message is the gateway's ``error``)."""
        res = await self.http.post(path, json=body)
        if res.status_code >= 400:
            try:
                reason = res.json().get("error", res.text)
            except ValueError:
                reason = res.text
            raise httpx.HTTPStatusError(
                f"{path}: {res.status_code} {reason}", request=res.request, response=res
            )
        answer = res.json()
        assert isinstance(answer, dict)
        return answer

    async def get(self, path: str) -> dict[str, Any]:
        """GET ``path``; the answer's JSON (``httpx.HTTPStatusError`` on a 4xx/5xx)."""
        res = await self.http.get(path)
        res.raise_for_status()
        answer = res.json()
        assert isinstance(answer, dict)
        return answer


def config_hash(doc: dict[str, Any]) -> str:
    """The gateway's hash of a configuration document: SHA-256 of its canonical JSON
    (without ``configHash``, keys sorted, no whitespace, UTF-8)."""
    body = {k: v for k, v in doc.items() if k != "configHash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_key_file(path: Path, agent_id: str, api_key: str) -> None:
    """Keep the agent's id and key in ``path`` (0600; its directory 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"agentId": agent_id, "apiKey": api_key}, out)
    os.chmod(path, 0o600)


async def register(
    gateway: str, ca_file: str | None, token: str, key_file: Path
) -> tuple[str, str]:
    """Register with a one-time token; keeps and returns the agent id and key."""
    client = AgentClient(gateway, None, ca_file)
    try:
        answer = await client.post(
            "/api/v1/agent/register",
            {
                "registrationToken": token,
                "hostname": socket.gethostname(),
                "os": platform.system().lower() or "linux",
                "arch": platform.machine() or "unknown",
                "agentVersion": __version__,
            },
        )
    finally:
        await client.close()
    agent_id, api_key = str(answer["agentId"]), str(answer["apiKey"])
    write_key_file(key_file, agent_id, api_key)
    return agent_id, api_key


async def discovered(uri: str) -> list[dict[str, Any]]:
    """The VMs of this host as a heartbeat reports them. A VM undefined between the
    listing and the reading of its disks is left out (it is gone), not an error of the
    whole listing (which made the heartbeat report no VM at all)."""
    conn = await open_connection(uri)
    try:
        out = []
        for dom in await list_domains(conn):
            try:
                disks = await list_disks(conn, dom.name)
            except VirtNotFound:
                continue
            out.append(
                {
                    "name": dom.name,
                    "uuid": dom.uuid,
                    "state": str(dom.power_state),
                    "disks": [
                        {"target": d.target, "path": d.source or "", "size": d.capacity or 0}
                        for d in disks
                    ],
                }
            )
        return out
    finally:
        await conn.close()


class Agent:
    def __init__(self, client: AgentClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.stop = asyncio.Event()
        self.inflight = InFlight(Path(args.key_file).with_name("inflight.json"))
        self.config_file = Path(args.key_file).with_name("config.json")
        self.config: dict[str, Any] = {}
        self.config_hash = ""
        #: SHA-256 of each VM's domain XML as last sent to schema-snapshot.
        self.sent_definitions: dict[str, str] = {}
        #: The host's VMs as last listed (reported again when a listing fails).
        self.domains: list[dict[str, Any]] = []

    async def recover(self) -> None:
        """End what a previous run left mid-backup (``agent.inflight``)."""

        async def report(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
            return await self.client.post(f"/api/v1/jobs/{job_id}/status", body)

        await recover(self.inflight, report)

    async def heartbeat(self) -> None:
        while not self.stop.is_set():
            try:
                domains = await discovered(self.args.libvirt_uri)
                self.domains = domains
            except Exception as exc:  # report what was last seen, not a host without VMs
                log.warning("listing the host's VMs failed: %s", exc)
                domains = self.domains
            try:
                answer = await self.client.post(
                    "/api/v1/heartbeat",
                    {
                        "status": "online",
                        "agentVersion": __version__,
                        "configHash": self.config_hash,
                        "load": list(os.getloadavg()),
                        "discoveredDomains": domains,
                    },
                )
                if answer.get("configChanged"):
                    await self.pull_config()
                await self.send_definitions(domains)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.heartbeat_seconds)

    async def pull_config(self) -> None:
        """Fetch the configuration (schedules, targets, alert channels) and keep it."""
        doc = await self.client.get("/api/v1/agent/config")
        digest = config_hash(doc)
        if doc.get("configHash") not in (None, digest):
            log.warning("the configuration's hash is not what it says (%s)", doc["configHash"])
        self.config, self.config_hash = doc, digest
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out)
        log.info(
            "configuration %s: %d schedules, %d targets, %d alert channels",
            digest[:12],
            len(doc.get("schedules", [])),
            len(doc.get("targets", [])),
            len(doc.get("alertChannels", [])),
        )

    async def send_definitions(self, domains: list[dict[str, Any]]) -> None:
        """Post each VM's domain definition when it changed since it was last sent (the
        gateway compares it with the definition of the VM's last backup)."""
        servers = self.config.get("servers") or []
        if len(servers) != 1:
            return  # which server a VM is on is not for this agent to guess
        conn = await open_connection(self.args.libvirt_uri)
        try:
            for dom in domains:
                name = str(dom["name"])
                try:
                    xml = await domain_xml(conn, name, inactive=True)
                except Exception as exc:  # gone meanwhile
                    log.debug("no definition of %s: %s", name, exc)
                    continue
                digest = hashlib.sha256(xml.encode()).hexdigest()
                if self.sent_definitions.get(name) == digest:
                    continue
                answer = await self.client.post(
                    "/api/v1/agent/schema-snapshot",
                    {"vmName": name, "serverId": servers[0]["id"], "snapshot": xml},
                )
                self.sent_definitions[name] = digest
                if answer.get("drift"):
                    log.warning("%s: definition drift: %s", name, "; ".join(answer["changes"]))
        finally:
            await conn.close()

    async def start_backups(self) -> None:
        """``--backup VM[@TARGET]``: start those backups (queued for this agent)."""
        for spec in self.args.backup or []:
            vm, _, target = spec.partition("@")
            body: dict[str, Any] = {"vmName": vm}
            if target:
                body["targetId"] = target
            try:
                answer = await self.client.post("/api/v1/agent/jobs/start", body)
            except Exception as exc:
                log.warning("starting a backup of %s failed: %s", vm, exc)
                continue
            log.info("started backup job %s of %s", answer["jobId"], vm)

    async def leases(self) -> None:
        while not self.stop.is_set():
            try:
                lease = await self.client.post("/api/v1/agent/lease", {})
            except Exception as exc:
                log.warning("lease failed: %s", exc)
                lease = {"assigned": False}
            if lease.get("assigned"):
                await self.run(lease)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.poll_seconds)

    async def run(self, lease: dict[str, Any]) -> None:
        job = {**lease["job"], "libvirtUri": self.args.libvirt_uri}
        job_id = str(job["id"])
        destination = msgspec.convert(lease["destination"], Destination)

        stage: dict[str, Any] = {"name": "", "since": time.monotonic()}

        async def report(body: dict[str, Any]) -> dict[str, Any]:
            if body.get("status") != stage["name"]:
                # Entering a new stage: how long the one being left took.
                now = time.monotonic()
                if stage["name"]:
                    body = {**body, "durationMs": round(1000 * (now - float(stage["since"])))}
                stage.update(name=str(body.get("status")), since=now)
            return await self.client.post(f"/api/v1/agent/jobs/{job_id}/status", body)

        kind = str(job.get("type") or "backup")
        log.info("job %s: %s of %s leased", job_id, kind, job.get("vmName"))
        try:
            if kind == "restore":
                message = await run_restore(job, destination, report, inflight=self.inflight)
            else:
                message = await run_backup(
                    job,
                    destination,
                    report,
                    scratch_dir=self.args.scratch_dir,
                    inflight=self.inflight,
                )
        except Cancelled:
            log.info("job %s: stopped (cancelled or ended by the server)", job_id)
            return
        except Exception as exc:
            log.warning("job %s failed: %s", job_id, exc)
            with contextlib.suppress(Exception):
                await report(
                    {
                        "status": "failed",
                        "errorMessage": str(exc) or type(exc).__name__,
                        "output": [{"level": "error", "line": f"failed: {exc}"}],
                    }
                )
            return
        with contextlib.suppress(Exception):
            await report(
                {
                    "status": "completed",
                    "message": message,
                    "output": [{"level": "info", "line": message, "ts": utcnow_iso()}],
                }
            )
        log.info("job %s: %s", job_id, message)


async def serve(args: argparse.Namespace, api_key: str | None) -> int:
    if args.registration_token:
        key_file = Path(args.key_file)
        agent_id, api_key = await register(
            args.gateway, args.ca_file, args.registration_token, key_file
        )
        log.info("registered as agent %s (key kept in %s)", agent_id, key_file)
    if not api_key:
        print("virtbackup agent: no --api-key, key file or --registration-token", file=sys.stderr)
        return 2
    client = AgentClient(args.gateway, api_key, args.ca_file)
    agent = Agent(client, args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop.set)
    try:
        await agent.recover()
        with contextlib.suppress(Exception):
            await agent.pull_config()
        await agent.start_backups()
        await asyncio.gather(agent.heartbeat(), agent.leases())
    finally:
        await client.close()
    return 0


def add_parser(sub: Any) -> None:
    """The ``agent`` subcommand's arguments."""
    p = sub.add_parser("agent", help="run a remote agent on this hypervisor host (no NATS)")
    p.add_argument("--gateway", required=True, help="the gateway's URL, https://host:33551")
    p.add_argument("--api-key", default=None, help="the agent's bak_ key")
    p.add_argument("--registration-token", default=None, help="register first with this token")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="where the key is kept (0600)")
    p.add_argument("--ca-file", default=None, help="the gateway's certificate or CA (PEM)")
    p.add_argument("--libvirt-uri", default="qemu:///system", help="this host's libvirt")
    p.add_argument("--scratch-dir", default=DEFAULT_SCRATCH, help="backup scratch files")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="between two leases")
    p.add_argument("--heartbeat-seconds", type=float, default=10.0, help="between heartbeats")
    p.add_argument(
        "--backup",
        action="append",
        metavar="VM[@TARGET]",
        help="start a backup of VM (into destination TARGET) at start; repeatable",
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    api_key = args.api_key or os.environ.get("VIRTBACKUP_AGENT_KEY")
    key_file = Path(args.key_file)
    if not api_key and not args.registration_token and key_file.exists():
        api_key = str(json.loads(key_file.read_text())["apiKey"])
    return int(asyncio.run(serve(args, api_key)))
