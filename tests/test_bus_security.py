"""The bus refuses whoever has no credentials, each service may do only what it does, and
no secret of the configuration is stored on the bus in clear (issue 11, item 1)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import nats
import pytest
import yaml
from harness import System
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeoutError

from virtbackup.contracts import buckets, streams
from virtbackup.contracts.buckets import CONFIG_KEY
from virtbackup.runtime.nats_server import NatsServer
from virtbackup.runtime.provision import provision
from virtbackup.testing.nats import connect

#: Seconds a refused JetStream call waits before it counts as refused (nats-server sends
#: no answer to a request it refused; the client's error callback gets the violation).
REFUSED_WITHIN = 1.0


@pytest.fixture
async def admin(nats_server: NatsServer) -> AsyncIterator[Client]:
    """An admin connection, with the streams and buckets the services would provision
    and a configuration stored."""
    client = await connect(nats_server)
    js = client.jetstream()
    await provision(
        js,
        streams=(streams.EVENTS, streams.WORK, streams.AUDIT),
        consumers=(streams.TRANSFER_CONSUMER,),
        buckets=(buckets.CONFIG, buckets.JOBS, buckets.WORKERS, buckets.EXPORTS),
    )
    config = await js.key_value(buckets.CONFIG.name)
    await config.put(CONFIG_KEY, b'{"servers": []}')
    await js.publish("vb.work.transfer.j1", b"{}")
    try:
        yield client
    finally:
        await client.drain()


async def test_a_client_without_credentials_is_refused(nats_server: NatsServer) -> None:
    with pytest.raises((NatsError, NoServersError)) as refused:
        await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=0)
    assert "authorization violation" in str(refused.value).lower()
    wrong = nats_server.connect_options("gateway") | {"password": "not-the-password"}
    with pytest.raises((NatsError, NoServersError)):
        await nats.connect(**wrong, allow_reconnect=False, max_reconnect_attempts=0)
    ok = await connect(nats_server, "gateway")  # the right password is let in
    assert ok.is_connected
    await ok.close()


Attempt = Callable[[Client], Awaitable[Any]]


async def _read_config(nc: Client) -> Any:
    kv = await nc.jetstream(timeout=REFUSED_WITHIN).key_value(buckets.CONFIG.name)
    return await kv.get(CONFIG_KEY)


async def _read_config_directly(nc: Client) -> Any:
    # Skipping the bucket's stream info: straight to the direct-get API.
    return await nc.request(
        f"$JS.API.DIRECT.GET.KV_{buckets.CONFIG.name}.$KV.{buckets.CONFIG.name}.{CONFIG_KEY}",
        b"",
        timeout=REFUSED_WITHIN,
    )


async def _write_config(nc: Client) -> Any:
    js = nc.jetstream(timeout=REFUSED_WITHIN)
    return await js.publish(f"$KV.{buckets.CONFIG.name}.{CONFIG_KEY}", b'{"servers": "evil"}')


async def _write_webhooks(nc: Client) -> Any:
    js = nc.jetstream(timeout=REFUSED_WITHIN)
    return await js.publish(f"$KV.{buckets.WEBHOOKS.name}.webhooks", b"[]")


async def _write_job(nc: Client) -> Any:
    js = nc.jetstream(timeout=REFUSED_WITHIN)
    return await js.publish(f"$KV.{buckets.JOBS.name}.j1", b'{"state": "success"}')


async def _write_export(nc: Client) -> Any:
    js = nc.jetstream(timeout=REFUSED_WITHIN)
    return await js.publish(f"$KV.{buckets.EXPORTS.name}.e1", b'{"state": "active"}')


async def _serve_export(nc: Client) -> Any:
    return await nc.request("vb.cmd.worker.serve-export", b"{}", timeout=REFUSED_WITHIN)


async def _purge_work(nc: Client) -> Any:
    return await nc.jetstream(timeout=REFUSED_WITHIN).purge_stream(streams.WORK.name)


async def _publish_work(nc: Client) -> Any:
    return await nc.jetstream(timeout=REFUSED_WITHIN).publish("vb.work.transfer.j2", b"{}")


async def _inventory_command(nc: Client) -> Any:
    return await nc.request("vb.cmd.inventory.vms", b"{}", timeout=REFUSED_WITHIN)


async def _job_event(nc: Client) -> Any:
    js = nc.jetstream(timeout=REFUSED_WITHIN)
    return await js.publish("vb.evt.job.finished.j1", b'{"type": "job.finished"}')


async def _vault_ssh(nc: Client) -> Any:
    return await nc.request("vb.cmd.vault.open-ssh", b"{}", timeout=REFUSED_WITHIN)


async def _vault_destination(nc: Client) -> Any:
    return await nc.request("vb.cmd.vault.open-destination", b"{}", timeout=REFUSED_WITHIN)


async def _read_vault(nc: Client) -> Any:
    return await nc.request("$JS.API.DIRECT.GET.KV_VB_VAULT", b"{}", timeout=REFUSED_WITHIN)


async def _write_audit(nc: Client) -> Any:
    js = nc.jetstream(timeout=REFUSED_WITHIN)
    return await js.publish("vb.audit.opera", b'{"actor": "forged"}')


async def _delete_audit_entry(nc: Client) -> Any:
    return await nc.jetstream(timeout=REFUSED_WITHIN).delete_msg(streams.AUDIT.name, 1)


async def _purge_audit(nc: Client) -> Any:
    return await nc.jetstream(timeout=REFUSED_WITHIN).purge_stream(streams.AUDIT.name)


DENIED: list[tuple[str, str, Attempt]] = [
    ("notifier", "read the configuration", _read_config),
    ("notifier", "read the configuration through the direct-get API", _read_config_directly),
    ("inventory", "write the configuration", _write_config),
    ("notifier", "write the configuration", _write_config),
    # The gateway writes only the notifier's ntfy settings there (key ntfy).
    ("gateway", "write the webhooks", _write_webhooks),
    ("gateway", "purge the work queue", _purge_work),
    ("transfer-worker", "purge the work queue", _purge_work),
    ("gateway", "publish transfer units", _publish_work),
    ("transfer-worker", "write a job's record", _write_job),
    ("gateway", "write a job's record", _write_job),
    ("transfer-worker", "send an inventory command", _inventory_command),
    ("notifier", "send an inventory command", _inventory_command),
    ("transfer-worker", "publish a job event", _job_event),
    ("gateway", "write an instant-access export's record", _write_export),
    ("inventory", "write an instant-access export's record", _write_export),
    ("notifier", "write an instant-access export's record", _write_export),
    ("inventory", "ask a worker to serve an export", _serve_export),
    ("notifier", "ask a worker to serve an export", _serve_export),
    # The vault: only the gateway reads its bucket; the inventory may ask for SSH logins
    # only, the orchestrator and the workers for destinations' credentials only.
    ("inventory", "ask the vault for a destination's credentials", _vault_destination),
    ("transfer-worker", "ask the vault for an SSH login", _vault_ssh),
    ("job-orchestrator", "ask the vault for an SSH login", _vault_ssh),
    ("notifier", "ask the vault for an SSH login", _vault_ssh),
    ("notifier", "ask the vault for a destination's credentials", _vault_destination),
    ("inventory", "read the vault's bucket", _read_vault),
    ("transfer-worker", "read the vault's bucket", _read_vault),
    ("job-orchestrator", "read the vault's bucket", _read_vault),
    # The audit trail: the gateway alone writes it and deletes single entries; nobody
    # purges it.
    ("job-orchestrator", "write the audit trail", _write_audit),
    ("notifier", "write the audit trail", _write_audit),
    ("inventory", "delete an audit entry", _delete_audit_entry),
    ("gateway", "purge the audit trail", _purge_audit),
]


@pytest.mark.parametrize(
    ("user", "attempt"), [(u, a) for u, _, a in DENIED], ids=[f"{u}: {w}" for u, w, _ in DENIED]
)
async def test_a_service_may_not_do_what_it_does_not_do(
    nats_server: NatsServer, admin: Client, user: str, attempt: Attempt
) -> None:
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    refused = await connect(nats_server, user, error_cb=on_error)
    try:
        with pytest.raises((NatsTimeoutError, asyncio.TimeoutError)):
            await attempt(refused)
    finally:
        await refused.close()
    assert any("permissions violation" in v for v in violations), violations
    # Nothing changed: the admin still finds the stored state as it was.
    js = admin.jetstream()
    config = await (await js.key_value(buckets.CONFIG.name)).get(CONFIG_KEY)
    assert config.value == b'{"servers": []}'
    assert (await js.stream_info(streams.WORK.name)).state.messages == 1


async def test_each_service_may_do_what_it_does(nats_server: NatsServer, admin: Client) -> None:
    """The same calls succeed for the service whose work they are (the refusals above
    are permissions, not broken calls)."""
    inventory = await connect(nats_server, "inventory")
    worker = await connect(nats_server, "transfer-worker")
    gateway = await connect(nats_server, "gateway")
    orchestrator = await connect(nats_server, "job-orchestrator")
    try:
        assert (await _read_config(inventory)).value == b'{"servers": []}'
        assert (await _read_config(worker)).value == b'{"servers": []}'
        assert (await _write_job(orchestrator)).seq > 0
        assert (await _publish_work(orchestrator)).seq > 0
        assert (await _write_config(gateway)).seq > 0
        assert (await _write_export(orchestrator)).seq > 0
        assert (await _write_export(worker)).seq > 0
        await _purge_work(orchestrator)
        assert (await admin.jetstream().stream_info(streams.WORK.name)).state.messages == 0
        written = await _write_audit(gateway)
        assert await gateway.jetstream().delete_msg(streams.AUDIT.name, written.seq)
    finally:
        for client in (inventory, worker, gateway, orchestrator):
            await client.close()


async def test_a_service_cannot_read_another_services_replies(nats_server: NatsServer) -> None:
    """Replies go to the requester's own inbox prefix, which no other service may read."""
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    spy = await connect(nats_server, "notifier", error_cb=on_error)
    try:
        await spy.subscribe("_INBOX.gateway.>")
        await spy.subscribe("vb.cmd.job.>")  # nor answer another service's commands
        await spy.flush()
        await asyncio.sleep(0.3)
    finally:
        await spy.close()
    assert sum("permissions violation for subscription" in v for v in violations) == 2, violations


# -- secrets at rest, through the real services -------------------------------------------

SECRET_CONFIG: dict[str, Any] = {
    "destinations": [
        {
            "id": "sftp",
            "name": "Remote SFTP",
            "driverId": "sftp",
            "enabled": True,
            "params": {
                "host": "sftp.example.com",
                "port": 22,
                "username": "backup",
                "password": "sftp-password-6d1f",
                "basePath": "/Backup",
            },
        }
    ],
    "servers": [
        {
            "id": "remote",
            "name": "Remote",
            "host": "kvm.example.com",
            "port": 22,
            "username": "root",
            "password": "ssh-password-93ab",
        }
    ],
    "ntfymeToken": "ntfy-token-77c2",
}
SECRETS = ("sftp-password-6d1f", "ssh-password-93ab", "ntfy-token-77c2")


async def test_secrets_are_stored_on_the_bus_as_ciphertext(
    api: httpx.AsyncClient, system: System
) -> None:
    resp = await api.post("/config", json=SECRET_CONFIG)
    assert resp.status_code == 200, resp.text
    try:
        await _check_sealed(api, system)
    finally:  # the inventory need not keep trying to reach kvm.example.com
        await api.post("/config", json={})


async def _check_sealed(api: httpx.AsyncClient, system: System) -> None:
    nc = await connect(system.nats)
    try:
        kv = await nc.jetstream().key_value(buckets.CONFIG.name)
        stored = (await kv.get(CONFIG_KEY)).value
        history = [e.value or b"" for e in await kv.history(CONFIG_KEY)]
    finally:
        await nc.drain()
    assert stored is not None
    for value in (stored, *history):
        for secret in SECRETS:
            assert secret.encode() not in value
    doc = json.loads(stored)
    assert doc["servers"][0]["password"].startswith("vbsec:v1:")
    assert doc["destinations"][0]["params"]["password"].startswith("vbsec:v1:")
    assert doc["servers"][0]["host"] == "kvm.example.com"  # the rest stays readable

    # The services read them in clear: the gateway mirrors the configuration to
    # agent.yaml (0600) with the secrets opened, and keeps them across a masked POST.
    exported = yaml.safe_load((system.data_dir / "agent.yaml").read_text())
    assert exported["servers"][0]["password"] == "ssh-password-93ab"
    masked = (await api.get("/config")).json()
    assert masked["servers"][0]["password"] == "********"
    assert (await api.post("/config", json=masked)).status_code == 200
    exported = yaml.safe_load((system.data_dir / "agent.yaml").read_text())
    assert exported["destinations"][0]["params"]["password"] == "sftp-password-6d1f"
