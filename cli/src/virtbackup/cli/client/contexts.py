"""Named contexts (kubectl's): where a gateway is, how to authenticate, which certificate
to trust; one of them current.

They are kept in ``$XDG_CONFIG_HOME/virtbackup/contexts.yaml`` (``~/.config`` when
``XDG_CONFIG_HOME`` is unset), the file 0600 in a 0700 directory, written atomically
(a temporary file renamed over it). The file holds secrets (tokens): nothing here prints
them.

Shape::

    current: prod
    contexts:
      prod:
        url: https://backup.example.com:33551
        fingerprint: "AB:CD:..."   # SHA-256 of the server certificate pinned on first use
        cacert: "-----BEGIN CERTIFICATE-----..."  # or a CA given with --cacert
        token: "..."               # an agent/API token, or:
        user: alice
        accessToken: "eyJ..."
        refreshToken: "eyJ..."
        expiresAt: 1764530000.0    # when the access token expires (epoch seconds)
        hypersdkUrl: http://127.0.0.1:8080  # the HyperSDK listener (webhooks), optional;
        hypersdkFingerprint: "..."  # with https://: its certificate, pinned as above,
        hypersdkCacert: "..."       # or the --cacert CA
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The keys of one context in the file (anything else is refused when loading).
CONTEXT_KEYS = frozenset(
    {
        "url",
        "fingerprint",
        "cacert",
        "token",
        "user",
        "accessToken",
        "refreshToken",
        "expiresAt",
        "hypersdkUrl",
        "hypersdkFingerprint",
        "hypersdkCacert",
    }
)


class ContextError(Exception):
    """A context that does not exist, or a contexts file that cannot be read."""


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/virtbackup`` (``~/.config/virtbackup`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "virtbackup"


@dataclass
class Contexts:
    """The contents of ``contexts.yaml``: ``contexts`` by name, and the ``current`` one."""

    path: Path
    current: str | None = None
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> Contexts:
        """The stored contexts (none when the file does not exist yet).

        Raises ``ContextError`` when the file is not a mapping of that shape."""
        path = path or config_dir() / "contexts.yaml"
        if not path.exists():
            return cls(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ContextError(f"{path} cannot be read: {exc}") from exc
        contexts = data.get("contexts") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(contexts or {}, dict):
            raise ContextError(f"{path} is not a contexts file (a mapping with 'contexts')")
        for name, ctx in (contexts or {}).items():
            if not isinstance(ctx, dict) or not isinstance(ctx.get("url"), str):
                raise ContextError(f"{path}: context {name!r} has no url")
            unknown = set(ctx) - CONTEXT_KEYS
            if unknown:
                raise ContextError(f"{path}: context {name!r} has unknown keys {sorted(unknown)}")
        current = data.get("current")
        return cls(path, current if isinstance(current, str) else None, dict(contexts or {}))

    def save(self) -> None:
        """Write the file (0600, in a 0700 directory), atomically."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        text = yaml.safe_dump({"current": self.current, "contexts": self.contexts}, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".contexts-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """(name, context): ``name``'s, else the current one.

        Raises ``ContextError`` naming what is missing (no login yet, unknown name)."""
        chosen = name or self.current
        if not chosen:
            raise ContextError("no current context: run `virtbackup login URL` first")
        if chosen not in self.contexts:
            raise ContextError(f"no context named {chosen!r} (see `virtbackup context ls`)")
        return chosen, self.contexts[chosen]
