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

import re
from typing import Final

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
