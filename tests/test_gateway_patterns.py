"""Every text pattern a gateway body or parameter declares is said in words when it is
refused (``contracts.v1.readable``): a client never reads a regex."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Iterator

import msgspec
import msgspec.inspect as mi

import virtbackup.gateway as gateway
from virtbackup.contracts.v1.readable import PATTERN_MEANINGS, readable


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


def gateway_patterns() -> dict[str, str]:
    """Each pattern of the gateway's Structs and of its Litestar parameters (an
    ``Annotated[..., Parameter(pattern=...)]`` at module level), with where it is."""
    found: dict[str, str] = {}
    for info in pkgutil.walk_packages(gateway.__path__, f"{gateway.__name__}."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, msgspec.Struct):
                if obj.__module__ == module.__name__:
                    for pattern in _patterns(mi.type_info(obj), set()):
                        found.setdefault(pattern, f"{info.name}.{name}")
            elif typing.get_origin(obj) is typing.Annotated:
                for meta in typing.get_args(obj)[1:]:
                    value = getattr(meta, "pattern", None)
                    if isinstance(value, str):
                        found.setdefault(value, f"{info.name}.{name}")
    return found


def test_every_pattern_of_the_gateway_is_said_in_words() -> None:
    patterns = gateway_patterns()
    assert len(patterns) >= 3
    undeclared = {where: p for p, where in patterns.items() if p not in PATTERN_MEANINGS}
    assert undeclared == {}


def test_an_agent_name_with_a_control_character_is_refused_in_words() -> None:
    from virtbackup.gateway.controllers.backupagent import Name

    try:
        msgspec.json.decode(b'["a\\u0001b"]', type=list[Name])
    except msgspec.ValidationError as exc:
        message = readable(str(exc))
    else:
        raise AssertionError("a control character was accepted")
    assert "regex" not in message and "one line of text" in message, message
    assert "$[0]" in message
