"""Validation messages say what a text field expects in words, never as a regex."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

import virtbackup.contracts.v1 as v1
from virtbackup.contracts.v1.config import AgentConfig, decode_config
from virtbackup.contracts.v1.readable import PATTERN_MEANINGS, UNDECLARED, readable
from virtbackup.contracts.v1.webhooks import WebhookAdd


def _patterns(t: mi.Type, seen: set[int]) -> Iterator[str]:
    if id(t) in seen:
        return
    seen.add(id(t))
    if isinstance(t, mi.StrType) and t.pattern is not None:
        yield t.pattern
    for name in ("item_type", "key_type", "value_type"):
        if isinstance(getattr(t, name, None), mi.Type):
            yield from _patterns(getattr(t, name), seen)
    for sub in getattr(t, "types", ()) or ():
        yield from _patterns(sub, seen)
    if isinstance(t, mi.StructType):
        for field in t.fields:
            yield from _patterns(field.type, seen)


def every_pattern() -> set[str]:
    found: set[str] = set()
    for module_info in pkgutil.iter_modules(v1.__path__):
        module = importlib.import_module(f"{v1.__name__}.{module_info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, msgspec.Struct) and obj.__module__ == module.__name__:
                found |= set(_patterns(mi.type_info(obj), set()))
    return found


def test_every_pattern_of_the_contracts_is_said_in_words() -> None:
    patterns = every_pattern()
    assert len(patterns) >= 10
    assert patterns - set(PATTERN_MEANINGS) == set()


def error_of(raw: bytes, kind: type[Any]) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(raw, type=kind)
    return readable(str(caught.value))


def test_messages_name_the_field_and_what_it_expects() -> None:
    bad_header = b'{"url": "http://h/", "events": ["job.failed"], "headers": {"A B": "x"}}'
    message = error_of(bad_header, WebhookAdd)
    assert "regex" not in message and "a header name" in message and "$.headers" in message
    message = error_of(b'{"url": "http://h/", "events": ["job.failed"], '
                       b'"headers": {"X": "a\\u0001"}}', WebhookAdd)  # fmt: skip
    assert "one line of text" in message and "regex" not in message
    with pytest.raises(msgspec.ValidationError) as caught:
        decode_config(b'{"destinations": [{"id": "a b", "driverId": "filesystem"}]}')
    message = readable(str(caught.value))
    assert message.startswith("Expected an id (letters, digits"), message
    assert "$.destinations[0].id" in message
    assert isinstance(AgentConfig(), AgentConfig)


def test_an_undeclared_pattern_never_shows() -> None:
    message = "Expected `str` matching regex '^[q]+$' - at `$.x`"
    assert readable(message) == f"Expected {UNDECLARED} - at `$.x`"
    quoted = """Expected `str` matching regex "^[']+$" - at `$.y`"""
    assert readable(quoted) == f"Expected {UNDECLARED} - at `$.y`"


def test_a_mapping_value_error_names_its_key() -> None:
    """msgspec says ``[...]`` for a mapping's value; the key is found and named, and a
    message it cannot place (no ``[...]``, two keys failing alike) is left as it is."""
    import msgspec

    from virtbackup.contracts.v1.config import AgentConfig
    from virtbackup.contracts.v1.readable import name_mapping_keys

    def check(doc: object) -> object:
        return msgspec.convert(doc, type=AgentConfig, strict=True)

    def error(doc: dict[str, object]) -> str:
        try:
            check(doc)
        except msgspec.ValidationError as exc:
            return str(exc)
        raise AssertionError("valid")

    def dest(vm_retention: dict[str, object]) -> dict[str, object]:
        return {"destinations": [{"id": "fs", "driverId": "filesystem",
                "params": {"path": "/x"}, "vmRetention": vm_retention}]}  # fmt: skip

    doc = dest({"web1": {"keepLast": 2}, "db.1": {"keepDaily": -1}})
    raw = error(doc)
    assert "vmRetention[...]" in raw
    named = name_mapping_keys(raw, doc, check)
    assert named == raw.replace("[...]", '["db.1"]')
    twice = dest({"a": {"keepLast": "x"}, "b": {"keepLast": "x"}})
    assert name_mapping_keys(error(twice), twice, check) == error(twice)
    plain = {"destinations": [{"id": 7}]}
    assert name_mapping_keys(error(plain), plain, check) == error(plain)
