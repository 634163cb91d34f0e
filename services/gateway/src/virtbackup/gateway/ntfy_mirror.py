"""Keeps the notifier's share of the configuration (``NtfyProjection``) in ``VB_WEBHOOKS``.

The notifier sends ntfy notifications with the configuration's ``ntfy`` settings and
``ntfymeToken``, but may not read ``VB_CONFIG`` (every server's and destination's
secrets are there). The gateway, which owns the configuration, writes just those two
fields to ``VB_WEBHOOKS`` key ``ntfy`` (the token sealed as in ``VB_CONFIG``) at start
and after every change, from a watch of ``VB_CONFIG``; every gateway replica writes the
same value.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import CONFIG_KEY
from virtbackup.contracts.v1.config import AgentConfig, ConfigError, decode_stored_config
from virtbackup.contracts.v1.webhooks import NTFY_KEY, NtfyProjection
from virtbackup.runtime.agent_config import read_agent_config
from virtbackup.runtime.sealing import SecretBox

log = logging.getLogger(__name__)


class NtfyMirror:
    def __init__(self, config_kv: KeyValue, webhooks_kv: KeyValue, box: SecretBox) -> None:
        self.config_kv = config_kv
        self.webhooks_kv = webhooks_kv
        self.box = box
        self._written: NtfyProjection | None = None

    async def write(self, cfg: AgentConfig) -> None:
        """Store ``cfg``'s projection unless it is the one last stored."""
        doc = NtfyProjection(ntfy=cfg.ntfy, ntfyme_token=cfg.ntfyme_token)
        if doc == self._written:
            return
        await self.webhooks_kv.put(NTFY_KEY, self.box.seal_json(msgspec.json.encode(doc)))
        self._written = doc

    async def sync(self) -> None:
        """Store the projection of the configuration stored now."""
        cfg, _ = await read_agent_config(self.config_kv)
        await self.write(cfg)

    async def follow(self) -> None:
        """Forever: store the projection after every change of the configuration."""
        watcher = await self.config_kv.watch(CONFIG_KEY)
        async for entry in watcher:
            if entry is None or entry.value is None:
                continue
            try:
                cfg, _ = decode_stored_config(entry.value)
                await self.write(cfg)
            except (msgspec.ValidationError, msgspec.DecodeError, ConfigError):
                log.exception("the configuration does not decode; ntfy settings not updated")
            except Exception:
                log.exception("storing the ntfy settings for the notifier failed")
