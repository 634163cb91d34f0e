"""Reading key-value buckets without nats-py's exceptions for "nothing there".

The buckets themselves are nats-py ``KeyValue`` objects (from ``ServiceContext.bucket``
or ``Bus.key_value``); these helpers turn a missing key or an empty bucket into ``None``
and ``[]``, so callers need no ``nats`` imports.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

T = TypeVar("T")


async def read_value(kv: KeyValue, key: str, value_type: type[T]) -> T | None:
    """The value of ``key`` decoded from JSON as ``value_type``; None when the key does not
    exist or was deleted. ``msgspec.ValidationError``/``DecodeError`` when it does not
    decode; NATS errors (e.g. a timeout) pass through."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # also KeyDeletedError
        return None
    if entry.value is None:
        return None
    return msgspec.json.decode(entry.value, type=value_type)


async def keys(kv: KeyValue) -> list[str]:
    """Every live key of the bucket (``[]`` for an empty bucket)."""
    try:
        found: list[str] = await kv.keys()
    except NoKeysError:
        return []
    return found
