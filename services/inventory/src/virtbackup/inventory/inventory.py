"""The inventory's state: servers from the configuration, their VM caches, their events.

The VM cache of a server is filled by a refresh (on first use, on ``refresh``, and every
``refresh_interval`` to repair drift) and kept current by libvirt lifecycle events, which
are also published as ``vm.lifecycle``. Each server has its own watcher task, so an
unreachable server never holds up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.config import Server
from virtbackup.contracts.v1.events import VmLifecycle
from virtbackup.contracts.v1.inventory import PowerState, ServerState, ServerVms, Vm, VmStatus
from virtbackup.inventory import ownership
from virtbackup.inventory.credentials import ExportCredentials
from virtbackup.inventory.hosts import HostServer
from virtbackup.inventory.reconcile import reconcile
from virtbackup.runtime.agent_config import read_agent_config
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import Conflict, NotFound, Unavailable
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.vault import resolve_server, service_box
from virtbackup.virt import get_domain, list_domains
from virtbackup.virt.errors import NotFound as VirtNotFound
from virtbackup.virt.errors import VirtError
from virtbackup.virt.events import ConnectionLost, LifecycleEvent, LifecycleKind, LifecycleWatcher
from virtbackup.virt.leftovers import find_leftovers

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()

#: The key in ``VB_INVENTORY`` naming this installation (see :mod:`.ownership`).
INSTALLATION_KEY = "_installation"


@dataclass
class ServerEntry:
    host: HostServer
    vms: dict[str, VmStatus] = field(default_factory=dict)
    refreshed_at: str = ""
    refreshed: bool = False
    watcher: asyncio.Task[None] | None = None
    refresh_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reconciler: asyncio.Task[list[str]] | None = None


class Inventory:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.entries: dict[str, ServerEntry] = {}
        #: Servers a remote agent backs up (``agentId``): not reached from here.
        self.agent_servers: dict[str, str] = {}
        self.timeout = ctx.settings.server_timeout
        #: The CA and client certificate of the NBD exports (made at first start).
        self.creds = ExportCredentials.load(ctx.settings.nbd_pki_dir, ctx.settings.pki_client_owner)
        #: This installation's id, set by :meth:`load_installation`.
        self.installation = ""
        self._vm_locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: One application of the configuration at a time (its watch, a request for a
        #: server not known yet).
        self._syncing = asyncio.Lock()

    def vm_lock(self, server_id: str, vm_name: str) -> asyncio.Lock:
        """The lock that serialises, per VM, what creates, deletes or sizes its
        checkpoints here (backup begin and end, checkpoint forget, cleanup, a checkpoint's
        size): libvirt 9.0 reads a freed checkpoint when its size is asked while another
        call deletes it (see ``virt.leftovers.find_leftovers``), and libvirtd dies."""
        key = (server_id, vm_name)
        lock = self._vm_locks.get(key)
        if lock is None:
            lock = self._vm_locks[key] = asyncio.Lock()
        return lock

    @property
    def kv(self) -> KeyValue:
        return self.ctx.bucket(buckets.INVENTORY)

    async def load_installation(self) -> str:
        """This installation's id: kept in ``VB_INVENTORY``, made by the first inventory
        that starts (a create: concurrent replicas agree)."""
        kv = self.kv
        while True:
            with contextlib.suppress(KeyNotFoundError):
                entry = await kv.get(INSTALLATION_KEY)
                if entry.value:
                    self.installation = entry.value.decode()
                    return self.installation
            with contextlib.suppress(KeyWrongLastSequenceError, BadRequestError):
                await kv.create(INSTALLATION_KEY, secrets.token_hex(8).encode())

    # -- servers ---------------------------------------------------------------------

    def entry(self, server_id: str) -> ServerEntry:
        entry = self.entries.get(server_id)
        if entry is None and server_id in self.agent_servers:
            raise Conflict(
                f"server {server_id!r} is served by remote agent "
                f"{self.agent_servers[server_id]}: the inventory does not reach its host"
            )
        if entry is None:
            raise NotFound(f"server {server_id!r} not found")
        return entry

    async def entry_fresh(self, server_id: str) -> ServerEntry:
        """:meth:`entry`, after applying the configuration once more when ``server_id`` is
        not known yet: a server added a moment ago (``POST /config`` has answered, the
        configuration's watch has not reached this process yet) is found, not a 404.
        ``NotFound`` (or ``Conflict`` for an agent's server) as :meth:`entry` after that."""
        if server_id not in self.entries and server_id not in self.agent_servers:
            async with self._syncing:
                if server_id not in self.entries:
                    await self._sync_config()
        return self.entry(server_id)

    async def sync_config(self) -> None:
        """Bring the servers in line with the configuration (added, changed, removed)."""
        async with self._syncing:
            await self._sync_config()

    async def _sync_config(self) -> None:
        cfg, _ = await read_agent_config(self.ctx.bucket(buckets.CONFIG))
        # A server a remote agent backs up is that agent's to reach (``virtbackup agent``).
        self.agent_servers = {s.id: s.agent_id for s in cfg.servers if s.agent_id}
        wanted: dict[str, Server] = {s.id: s for s in cfg.servers if not s.agent_id}
        for server_id in list(self.entries):
            entry = self.entries[server_id]
            server = wanted.get(server_id)
            if server is None:
                await self._remove(server_id)
            elif _connection(server) == _connection(entry.host.config):
                # A new name or new restore directories: the connection stays.
                entry.host.config = server
            else:
                # Another host, user or key: a new connection. The new entry answers
                # from now on (no request sees "server not found" meanwhile); the old
                # one is closed behind it.
                self._add(server)
                await self._close(entry)
        for server_id, server in wanted.items():
            if server_id not in self.entries:
                self._add(server)

    async def _resolve(self, server: Server) -> Server:
        return await resolve_server(self.ctx.bus, service_box(self.ctx), server)

    def _add(self, server: Server) -> None:
        entry = ServerEntry(
            host=HostServer(config=server, timeout=self.timeout, resolve=self._resolve)
        )
        self.entries[server.id] = entry
        entry.watcher = asyncio.create_task(self._watch(entry), name=f"watch-{server.id}")

    async def _remove(self, server_id: str) -> None:
        entry = self.entries.pop(server_id)
        await self._close(entry)
        with contextlib.suppress(Exception):
            await self.kv.delete(server_id)

    @staticmethod
    async def _close(entry: ServerEntry) -> None:
        for task in (entry.watcher, entry.reconciler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await entry.host.close()

    async def follow_config(self) -> None:
        """Re-sync whenever the configuration changes."""
        watcher = await self.ctx.bucket(buckets.CONFIG).watch(buckets.CONFIG_KEY)
        async for update in watcher:
            if update is None:
                continue
            try:
                await self.sync_config()
            except Exception:
                log.exception("applying the configuration failed")

    async def close(self) -> None:
        for server_id in list(self.entries):
            await self._remove(server_id)

    def states(self) -> list[ServerState]:
        return [
            ServerState(
                id=e.host.id,
                name=e.host.config.name,
                uri=e.host.uri,
                reachable=e.host.reachable,
                error=e.host.error,
                vm_count=len(e.vms),
                refreshed_at=e.refreshed_at,
            )
            for e in self.entries.values()
        ]

    # -- VM cache --------------------------------------------------------------------

    async def vms(self, server_id: str) -> ServerVms:
        entry = await self.entry_fresh(server_id)
        if not entry.refreshed:
            await self.refresh(server_id)
        return self._snapshot(entry)

    def _snapshot(self, entry: ServerEntry) -> ServerVms:
        return ServerVms(
            server_id=entry.host.id,
            vms=sorted(entry.vms.values(), key=lambda v: v.vm.name),
            reachable=entry.host.reachable,
            error=entry.host.error,
            refreshed_at=entry.refreshed_at,
        )

    async def refresh(self, server_id: str) -> ServerVms:
        """Re-read every VM of the server (``Unavailable`` with the reason if unreachable)."""
        entry = await self.entry_fresh(server_id)
        async with entry.refresh_lock:
            conn = await entry.host.connection()
            try:
                domains = await list_domains(conn)
                vms = {}
                for dom in domains:
                    try:
                        vms[dom.name] = await self._status(
                            entry, dom.name, dom.uuid, str(dom.power_state)
                        )
                    except VirtNotFound:  # undefined while the list was read: it is gone
                        continue
            except VirtError as exc:
                entry.host.reachable, entry.host.error = False, f"server {server_id}: {exc}"
                raise Unavailable(entry.host.error) from None
            entry.vms = vms
            entry.refreshed = True
            entry.refreshed_at = utcnow_iso()
            await self._store(entry)
            return self._snapshot(entry)

    async def _status(self, entry: ServerEntry, name: str, uuid: str, power: str) -> VmStatus:
        if entry.host.is_simulated:  # no QEMU, no scratch files: nothing left over
            return VmStatus(vm=Vm(id=uuid, name=name, power_state=_power(power)))
        conn = await entry.host.connection()
        try:
            # No stale-checkpoint check here: this runs on every lifecycle event and
            # refresh, for every domain of the host, and libvirt 9.0 crashes when a
            # checkpoint's size is asked while another client deletes that checkpoint
            # (see find_leftovers). The cleanup route still checks them.
            leftovers = await find_leftovers(
                conn,
                name,
                scratch_dir=await entry.host.scratch_dir(self.ctx.settings.scratch_dir),
                host=await entry.host.host(),
                check_bitmaps=False,
            )
            if leftovers.backup_job is not None and await ownership.in_progress(
                conn, name, self.ctx.bucket(buckets.JOBS)
            ):
                # A backup in progress: its job and scratch files are not leftovers.
                has_overlay = bool(leftovers.overlays)
            else:
                has_overlay = leftovers.has_overlay
        except VirtNotFound:
            raise
        except VirtError as exc:
            log.warning("leftover check of %s on %s failed: %s", name, entry.host.id, exc)
            has_overlay = False
        return VmStatus(
            vm=Vm(id=uuid, name=name, power_state=_power(power)), has_overlay=has_overlay
        )

    async def refresh_vm(self, server_id: str, name: str) -> VmStatus | None:
        """Re-read one VM (after an action or event); ``None`` once it is gone."""
        entry = await self.entry_fresh(server_id)
        conn = await entry.host.connection()
        try:
            dom = await get_domain(conn, name)
            status = await self._status(entry, name, dom.uuid, str(dom.power_state))
        except VirtNotFound:
            entry.vms.pop(name, None)
            await self._store(entry)
            return None
        entry.vms[name] = status
        await self._store(entry)
        return status

    async def _store(self, entry: ServerEntry) -> None:
        with contextlib.suppress(Exception):
            await self.kv.put(entry.host.id, _encoder.encode(self._snapshot(entry)))

    # -- events ----------------------------------------------------------------------

    async def _watch(self, entry: ServerEntry) -> None:
        """Follow the server's lifecycle events for as long as it is configured."""
        delay = 1.0
        interval = self.ctx.settings.refresh_interval
        while True:
            watcher = LifecycleWatcher(entry.host.open_new)
            try:
                await watcher.start()
            except (Unavailable, VirtError, OSError) as exc:
                entry.host.reachable = False
                entry.host.error = getattr(exc, "message", str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            delay = 1.0
            if not entry.host.is_simulated and (  # a simulated server has no backup jobs
                entry.reconciler is None
                or (entry.reconciler.done() and entry.reconciler.exception() is not None)
            ):
                scratch = self.ctx.settings.scratch_dir
                with contextlib.suppress(Unavailable):
                    scratch = await entry.host.scratch_dir(scratch)
                entry.reconciler = asyncio.create_task(
                    reconcile(
                        entry.host,
                        self.ctx.bucket(buckets.JOBS),
                        self.installation,
                        scratch,
                    ),
                    name=f"reconcile-{entry.host.id}",
                )
            try:
                with contextlib.suppress(Unavailable, VirtError):
                    await self.refresh(entry.host.id)
                next_refresh = time.monotonic() + interval
                while True:
                    timeout = max(0.1, next_refresh - time.monotonic())
                    try:
                        item = await asyncio.wait_for(watcher.queue.get(), timeout)
                    except TimeoutError:
                        with contextlib.suppress(Unavailable, VirtError):
                            await self.refresh(entry.host.id)
                        next_refresh = time.monotonic() + interval
                        continue
                    if isinstance(item, LifecycleEvent):
                        await self._on_event(entry, item)
                    elif isinstance(item, ConnectionLost):
                        entry.host.reachable = False
                        entry.host.error = (
                            f"server {entry.host.id}: connection lost ({item.reason})"
                        )
                    else:  # reconnected: events may have been missed
                        with contextlib.suppress(Unavailable, VirtError):
                            await self.refresh(entry.host.id)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.close()

    async def _on_event(self, entry: ServerEntry, event: LifecycleEvent) -> None:
        status: VmStatus | None = None
        if event.event != LifecycleKind.UNDEFINED:
            with contextlib.suppress(Unavailable, VirtError):
                status = await self.refresh_vm(entry.host.id, event.domain)
        else:
            entry.vms.pop(event.domain, None)
            await self._store(entry)
        payload = VmLifecycle(
            server_id=entry.host.id,
            vm_name=event.domain,
            vm_id=event.uuid,
            event=str(event.event),
            detail=event.detail,
            power_state=status.vm.power_state if status else "unknown",
        )
        await self.ctx.bus.publish_event(EventType.VM_LIFECYCLE, payload, key=entry.host.id)


_POWER: dict[str, PowerState] = {
    "running": "running",
    "blocked": "running",
    "shutoff": "shutoff",
    "paused": "paused",
    "shutdown": "shutdown",
    "crashed": "crashed",
    "pmsuspended": "suspended",
}


def _connection(server: Server) -> Server:
    """What of a server's configuration its connection depends on (all but its display
    name and the restore directories)."""
    return msgspec.structs.replace(server, name="", restore_directories=None)


def _power(value: str) -> PowerState:
    """libvirt's state word as the API shows it."""
    return _POWER.get(value, "unknown")
