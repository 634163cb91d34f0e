"""Private webhook targets, when refused: loopback, private and link-local addresses are
refused before anything is sent (a real receiver on loopback shows nothing arrives)."""

from __future__ import annotations

import httpx
import pytest

from virtbackup.contracts.v1.webhooks import Webhook
from virtbackup.notifier import delivery, targets
from virtbackup.testing.receiver import Receiver


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata services
        ("100.64.0.1", False),  # carrier-grade NAT
        ("fd00::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        # IPv6 addresses that carry an IPv4 address: public only when that one is.
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("64:ff9b:1::a00:1", False),  # local-use NAT64
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ],
)
def test_which_addresses_are_public(address: str, public: bool) -> None:
    assert targets.is_public(address) is public


async def test_private_hosts_are_refused_and_nothing_is_sent() -> None:
    for url in ("http://127.0.0.1:9/x", "http://localhost/x", "https://[::1]/", "http://10.0.0.1/"):
        with pytest.raises(targets.PrivateTarget, match="not a public address"):
            await targets.check_public(url)
    with pytest.raises(targets.PrivateTarget, match="cannot be resolved"):
        await targets.check_public("http://no-such-host.invalid/x")

    async with Receiver() as rx, httpx.AsyncClient() as client:
        hook = Webhook(id="h", url=f"{rx.url}/hook", events=["job.failed"], retry_count=1)
        refused = await delivery.deliver(
            client, hook, "job.failed", "d1", b"{}", backoff_initial=0.01, allow_private=False
        )
        assert not refused.ok and refused.attempts == 2
        assert "not sent" in refused.error and "not a public address" in refused.error
        assert rx.to("/hook") == []
        # Allowed (the default): the same delivery arrives.
        sent = await delivery.deliver(client, hook, "job.failed", "d2", b"{}")
        assert sent.ok and len(rx.to("/hook")) == 1
