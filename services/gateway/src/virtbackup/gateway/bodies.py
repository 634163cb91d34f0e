"""The base of every JSON request body the gateway decodes (both listeners).

A body names exactly the fields its API document gives it: an unknown or mistyped field
(``vmname`` for ``vmName``, ``target_directory`` for ``targetDirectory``) is a 400 naming
the field, never silently ignored, so that a typo cannot turn a restore under a new name
into one over the original VM, or send a backup to the default destination. The
configuration (``POST /config``) is strict the same way (``contracts.v1.config.Strict``).
"""

from __future__ import annotations

import msgspec


class Body(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """A camelCase request body: unknown fields are refused (400 naming the field)."""


class SnakeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A snake_case request body (the HyperSDK API): unknown fields are refused."""


class NoBody(Body, kw_only=True):
    """The body of a route that takes none: absent, or ``{}`` (the agent API documents
    ``{}`` for some); any field is refused."""
