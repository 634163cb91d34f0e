"""The agent configuration in the ``VB_CONFIG`` bucket, mirrored to ``agent.yaml``.

On first start (no configuration in the bucket) ``agent.yaml`` is imported if present;
after every change the configuration is exported back to ``agent.yaml`` (mode 0600:
it holds secrets). Secrets are masked on the way out; posting a mask back keeps the
stored secret, so a GET-edit-POST round trip never erases one, but only while the
secret would still go where it went (``host_keys.check_masked_secrets``): a changed
host, port, user or endpoint needs the secret again. Saving pins the SSH host keys of
new endpoints (``host_keys.pin_host_keys``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import yaml
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.buckets import CONFIG_KEY
from virtbackup.contracts.v1.config import (
    SECRET_KEYS,
    SECRET_MASK,
    AgentConfig,
    ConfigError,
    config_to_builtins,
    decode_config,
    encode_config,
)
from virtbackup.contracts.v1.readable import name_mapping_keys, readable
from virtbackup.gateway.host_keys import check_masked_secrets, forget_moved_pins, pin_host_keys
from virtbackup.runtime.agent_config import read_agent_config, update_agent_config
from virtbackup.runtime.errors import BadRequest, Conflict

log = logging.getLogger(__name__)


class _NoTimestampLoader(yaml.SafeLoader):
    """A safe loader that keeps ISO dates as strings (``expiresAt`` is a string)."""


_NoTimestampLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoTimestampLoader)  # noqa: S506
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` with every non-empty secret replaced by ``SECRET_MASK``."""
    if isinstance(value, dict):
        return {
            k: SECRET_MASK if k in SECRET_KEYS and isinstance(v, str) and v else mask_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def unmask_secrets(new: Any, old: Any, path: str = "$") -> Any:
    """``new`` with every ``SECRET_MASK`` replaced by the secret stored at the same place.

    List items are matched by their ``id`` when they have one, else by position.
    """
    if isinstance(new, dict):
        old_map = old if isinstance(old, dict) else {}
        out: dict[str, Any] = {}
        for key, value in new.items():
            where = f"{path}.{key}"
            if key in SECRET_KEYS and value == SECRET_MASK:
                stored = old_map.get(key)
                if not isinstance(stored, str) or not stored:
                    raise BadRequest(
                        f"{key} is the secret mask but no secret is stored - at `{where}`"
                    )
                out[key] = stored
            else:
                out[key] = unmask_secrets(value, old_map.get(key), where)
        return out
    if isinstance(new, list):
        old_list = old if isinstance(old, list) else []
        by_id = {o.get("id"): o for o in old_list if isinstance(o, dict) and "id" in o}
        result = []
        for i, item in enumerate(new):
            if isinstance(item, dict) and "id" in item:
                counterpart = by_id.get(item["id"])
            else:
                counterpart = old_list[i] if i < len(old_list) else None
            result.append(unmask_secrets(item, counterpart, f"{path}[{i}]"))
        return result
    return new


class StaleRevision(Exception):
    """The configuration changed after the client read it (``If-Match`` names another
    revision): the client must read it again and re-apply its change."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(
            f"the configuration changed since it was read (If-Match: revision {expected},"
            f" now {current}): read it again (GET /config) and re-apply the change"
        )
        self.expected = expected
        self.current = current


class ConfigStore:
    def __init__(self, kv: KeyValue, yaml_path: Path) -> None:
        self.kv = kv
        self.yaml_path = yaml_path
        #: Checks a posted configuration's references to the vault (``BadRequest``).
        #: Returns it with the host keys of the vault connections it names filled in.
        self.check: Callable[[AgentConfig], Awaitable[AgentConfig]] | None = None
        #: The gateway's own listeners that ``metrics.port`` may not name, port -> what
        #: listens there (the HyperSDK listener's port is allowed: it serves /metrics).
        self.reserved_ports: dict[int, str] = {}

    async def load(self) -> tuple[AgentConfig, int]:
        """The stored configuration and its revision (defaults and 0 when none is stored)."""
        return await read_agent_config(self.kv)

    async def initialize(self) -> AgentConfig:
        """Import ``agent.yaml`` when the bucket holds no configuration yet.

        An invalid ``agent.yaml`` stops the start with a message naming the field.
        """
        cfg, revision = await self.load()
        if revision:
            if not self.yaml_path.exists():
                self.export_yaml(cfg)
            return cfg
        if self.yaml_path.exists():
            try:
                cfg = decode_config(load_yaml(self.yaml_path))
            except (msgspec.ValidationError, ConfigError) as exc:
                raise SystemExit(f"invalid {self.yaml_path}: {exc}") from None
            log.info("configuration imported", extra={"path": str(self.yaml_path)})
        try:
            await self.kv.create(CONFIG_KEY, encode_config(cfg))
        except Exception as exc:  # another gateway replica won the race
            if type(exc).__name__ != "KeyWrongLastSequenceError":
                raise
            cfg, _ = await self.load()
        self.export_yaml(cfg)
        return cfg

    async def replace(self, body: bytes, *, expected_revision: int | None = None) -> int:
        """Validate ``body`` (a whole configuration), keep masked secrets, pin new host
        keys, and store it.

        Nothing is stored unless the whole document is valid; ``BadRequest`` names the
        field (also for a masked secret whose host, port, user or endpoint changed).
        With ``expected_revision`` (the revision the client read, ``If-Match``), nothing
        is stored if the configuration has changed since: ``StaleRevision``.
        Returns the new revision.
        """
        if not body.strip():
            raise BadRequest("request body must be a JSON object (the whole configuration)")
        try:
            posted_cfg = decode_config(body)
        except (msgspec.ValidationError, ConfigError) as exc:  # before its base class
            raise BadRequest(readable(_keyed(str(exc), body))) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        port = posted_cfg.metrics.port
        if port is not None and port in self.reserved_ports:
            raise BadRequest(
                f"metrics.port: {port} is the gateway's {self.reserved_ports[port]}; a"
                " listener of its own needs a free port (or the HyperSDK API's port, or"
                " none, to serve /metrics there)"
            )
        posted = msgspec.json.decode(body)
        for _ in range(5):
            current, revision = await self.load()
            if expected_revision is not None and revision != expected_revision:
                raise StaleRevision(expected_revision, revision)
            check_masked_secrets(posted_cfg, current)
            merged = unmask_secrets(posted, config_to_builtins(current))
            cfg = forget_moved_pins(decode_config(msgspec.json.encode(merged)), current)
            if self.check is not None:
                cfg = await self.check(cfg)
            cfg = await pin_host_keys(cfg)
            try:
                if revision:
                    new_revision = await self.kv.update(
                        CONFIG_KEY, encode_config(cfg), last=revision
                    )
                else:
                    new_revision = await self.kv.create(CONFIG_KEY, encode_config(cfg))
            except KeyWrongLastSequenceError:
                continue
            self.export_yaml(cfg)
            return new_revision
        raise Conflict("the configuration is being changed concurrently; try again")

    async def change(self, fn: Callable[[AgentConfig], AgentConfig]) -> AgentConfig:
        """Apply ``fn`` to the stored configuration (compare-and-swap) and export it."""
        cfg = await update_agent_config(self.kv, fn)
        self.export_yaml(cfg)
        return cfg

    async def follow(self) -> None:
        """Export ``agent.yaml`` whenever another service changes the configuration (a
        refreshed Google token, say), so the file always mirrors the bucket."""
        watcher = await self.kv.watch(CONFIG_KEY)
        async for entry in watcher:
            if entry is None or entry.value is None:
                continue
            try:
                self.export_yaml(decode_config(entry.value))
            except (msgspec.ValidationError, ConfigError, OSError):
                log.exception("exporting agent.yaml failed")

    def export_yaml(self, cfg: AgentConfig) -> None:
        """Write ``agent.yaml`` atomically, readable by the owner only."""
        self.yaml_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.yaml_path.with_name(f".{self.yaml_path.name}.tmp")
        text = yaml.safe_dump(config_to_builtins(cfg), sort_keys=False, allow_unicode=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        tmp.replace(self.yaml_path)


def _keyed(message: str, body: bytes) -> str:
    """``message`` with the VM name, network or header a ``[...]`` of its path stands
    for (``vmRetention["web1"]``): see ``readable.name_mapping_keys``."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return message
    return name_mapping_keys(
        message, document, lambda doc: msgspec.convert(doc, type=AgentConfig, strict=True)
    )
