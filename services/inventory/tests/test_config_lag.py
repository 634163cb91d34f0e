"""A server added to the configuration a moment ago is found by a request that reaches
the inventory before the configuration's watch does (``Inventory.entry_fresh``): the
request applies the configuration itself rather than answering "server not found".
Against a real nats-server (JetStream key-value buckets) and libvirt's test driver."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from virtbackup.contracts import buckets
from virtbackup.contracts.v1.config import AgentConfig, Server
from virtbackup.inventory.inventory import Inventory
from virtbackup.runtime.errors import NotFound
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import ensure_bucket
from virtbackup.runtime.service import ServiceContext
from virtbackup.runtime.settings import Settings
from virtbackup.testing.nats import connect
from virtbackup.testing.pki import shared_pki_dir


async def test_a_server_added_a_moment_ago_is_found_before_the_watch_applies_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    client = await connect(nats_server)
    inventory = None
    try:
        js = client.jetstream()
        config = await ensure_bucket(js, buckets.CONFIG)
        ctx = ServiceContext(
            name="inventory",
            settings=Settings(scratch_dir=str(tmp_path), pki_dir=shared_pki_dir()),
            bus=None,  # type: ignore[arg-type]  # a test:/// server needs no bus
            tracer_provider=None,  # type: ignore[arg-type]
            buckets={
                buckets.CONFIG.name: config,
                buckets.INVENTORY.name: await ensure_bucket(js, buckets.INVENTORY),
            },
        )
        inventory = Inventory(ctx)
        await inventory.sync_config()  # nothing configured yet
        # What POST /config stores; the inventory's watch (not running here) is late.
        added = AgentConfig(servers=[Server(id="sim", name="Sim", uri="test:///default")])
        await config.put(buckets.CONFIG_KEY, msgspec.json.encode(added))
        with pytest.raises(NotFound):
            inventory.entry("sim")
        entry = await inventory.entry_fresh("sim")
        assert entry.host.id == "sim"
        with pytest.raises(NotFound, match="'nowhere' not found"):
            await inventory.entry_fresh("nowhere")
    finally:
        if inventory is not None:
            await inventory.close()
        await client.drain()
