"""Reading key-value buckets without nats-py's exceptions for "nothing there".

The buckets themselves are nats-py ``KeyValue`` objects (from ``ServiceContext.bucket``
or ``Bus.key_value``); these helpers turn a missing key or an empty bucket into ``None``
and ``[]``, so callers need no ``nats`` imports.
"""

from __future__ import annotations

import asyncio
import re
from typing import Final, TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

T = TypeVar("T")

#: A key of a NATS KV bucket (ADR-8, as nats-py checks it): letters, digits and
#: ``-/_=.``, neither starting nor ending with a dot; at most 1024 characters here.
_KEY: Final = re.compile(r"[-/_=.A-Za-z0-9]{1,1024}")


def valid_key(key: str) -> bool:
    """Whether ``key`` can be a key of a bucket: a user-given id that cannot is unknown
    (a 404) or refused (a 400 naming the field), never passed to nats-py, which raises
    ``InvalidKeyError`` (and lets a trailing newline through its own ``$`` check)."""
    return bool(_KEY.fullmatch(key)) and key[0] != "." and key[-1] != "."


async def read_value(kv: KeyValue, key: str, value_type: type[T]) -> T | None:
    """The value of ``key`` decoded from JSON as ``value_type``; None when the key does not
    exist or was deleted, or cannot be a key (``valid_key``).
    ``msgspec.ValidationError``/``DecodeError`` when it does not decode; NATS errors
    (e.g. a timeout) pass through."""
    if not valid_key(key):
        return None
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # also KeyDeletedError
        return None
    if entry.value is None:
        return None
    return msgspec.json.decode(entry.value, type=value_type)


async def keys(kv: KeyValue, under: str = "") -> list[str]:
    """Every live key of the bucket (``[]`` for an empty bucket), sorted; with ``under``
    (a key prefix ending with ``.``), only the keys below it.

    Not nats-py's ``KeyValue.keys()``: its watch can announce "no more entries" before
    the ones already in the stream arrive, and then answers too few keys or none
    (nats-py issue #842, nats-py 2.x). Instead the bucket's stream lists its subjects
    (``STREAM.INFO`` with a subjects filter: one request), and each key is kept when its
    latest entry is a value, not a delete or purge marker (a get per key: for the small
    buckets this is used on). NATS errors pass through."""
    stream = kv._stream
    prefix = kv._pre
    info = await kv._js.stream_info(stream, subjects_filter=f"{prefix}{under}>")
    names = [s[len(prefix) :] for s in (info.state.subjects or {}) if s.startswith(prefix)]

    async def live(key: str) -> bool:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # also KeyDeletedError: a delete or purge marker
            return False
        return entry.value is not None

    alive = await asyncio.gather(*(live(k) for k in names))
    return sorted(k for k, ok in zip(names, alive, strict=True) if ok)


async def write_if(kv: KeyValue, key: str, value: bytes, revision: int | None) -> bool:
    """Compare-and-swap: create ``key`` (``revision`` None) or update it from
    ``revision``; False when another writer came first (the caller reads again)."""
    try:
        if revision is None:
            await kv.create(key, value)
        else:
            await kv.update(key, value, last=revision)
    except KeyWrongLastSequenceError:
        return False
    return True
