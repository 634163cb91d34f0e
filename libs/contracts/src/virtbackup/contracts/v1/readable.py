"""Validation messages in plain words: what a text field expects, never its regex.

msgspec says of a string that does not match its field's pattern "Expected `str`
matching regex '^[A-Za-z0-9_.:-]+$' - at `$.id`": correct, but a regex is no answer for
a person. Every pattern a contracts field uses is declared with :func:`described`, which
records what it means; :func:`readable` puts that meaning in place of the regex
("Expected an id (letters, digits, '_', '.', ':' or '-') - at `$.id`"). A pattern that was
not declared (a bug this module's test catches) still never shows: it reads "a text of
the form this field allows".

Every edge that turns a validation error into a message for a client (the gateway's
bodies and parameters, the configuration, a command's request on the bus) passes it
through :func:`readable`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Final

import msgspec

#: What each declared pattern means, by the pattern.
PATTERN_MEANINGS: dict[str, str] = {}

#: msgspec's wording (the pattern as ``repr`` gives it: in single quotes, or in double
#: quotes when it holds a single quote).
_MATCHING: Final = re.compile(r"""`str` matching regex (?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
UNDECLARED: Final = "a text of the form this field allows"


def described(pattern: str, meaning: str) -> str:
    """Record that ``pattern`` means ``meaning`` (a noun phrase: "a VM name (1 to 247
    characters, ...)"), and return ``pattern`` (for ``msgspec.Meta(pattern=...)``)."""
    PATTERN_MEANINGS[pattern] = meaning
    return pattern


def readable(message: str) -> str:
    """``message`` with every "`str` matching regex '...'" said in words."""

    def meaning(match: re.Match[str]) -> str:
        quoted = match.group(0)[len("`str` matching regex ") :]
        for pattern, words in PATTERN_MEANINGS.items():
            if quoted == repr(pattern):
                return words
        return UNDECLARED

    return _MATCHING.sub(meaning, message)


#: One step of a msgspec error path: ``.field``, ``[index]``, or ``[...]`` (a mapping's
#: value: msgspec does not say which key).
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|(\[\.\.\.\])")
_AT = re.compile(r" - at `(\$[^`]*)`$")


def name_mapping_keys(message: str, document: object, check: Callable[[object], object]) -> str:
    """``message``, a msgspec validation error of ``document`` (decoded JSON), with the
    ``[...]`` of its path (a mapping's value) replaced by the key it is about: ``$.
    destinations[0].vmRetention["web1"].keepLast`` instead of ``vmRetention[...]``. The
    key is found by checking (``check`` raises ``msgspec.ValidationError``) the document
    with that mapping cut down to one of its keys at a time. ``message`` unchanged when
    its path has no ``[...]`` or no single key gives the same error."""
    found = _AT.search(message)
    if found is None or "[...]" not in found.group(1):
        return message
    path = found.group(1)
    steps = list(_STEP.finditer(path, 1))
    if "".join(m.group(0) for m in steps) != path[1:]:
        return message  # a path this does not understand (a key with dots, say)
    mapping: object = document
    trail: list[str | int] = []
    for step in steps:
        if step.group(3):
            break
        key: str | int = step.group(1) if step.group(1) else int(step.group(2))
        trail.append(key)
        try:
            mapping = mapping[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return message
    if not trail or not isinstance(mapping, dict):
        return message
    culprits: list[str] = []
    for key in [k for k in mapping if isinstance(k, str)]:
        copy = json.loads(json.dumps(document))
        holder = copy
        for part in trail[:-1]:
            holder = holder[part]
        holder[trail[-1]] = {key: mapping[key]}
        try:
            check(copy)
        except msgspec.ValidationError as exc:
            if str(exc) == message:
                culprits.append(key)
        if len(culprits) > 1:
            return message
    if len(culprits) != 1:
        return message
    named = path.replace("[...]", f"[{json.dumps(culprits[0], ensure_ascii=False)}]", 1)
    return message[: found.start(1)] + named + message[found.end(1) :]
