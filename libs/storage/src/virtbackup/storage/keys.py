"""Key rules shared by every driver.

A key is a relative, slash-separated path such as ``chunks/ab/ab12...``:

- not empty, no leading ``/``, no trailing ``/``, no empty segment (``a//b``);
- no ``.`` or ``..`` segment, no backslash, no NUL or other control character;
- no segment starting with ``.vbtmp-`` (reserved for the temporary files of
  temp + rename writes, which are therefore never listed as keys);
- each segment at most ``MAX_SEGMENT_BYTES`` bytes of UTF-8, the key at most
  ``MAX_KEY_BYTES``.

These rules confine every key to the driver's root: a key taken from a request can
never name a file outside the destination. A prefix (for ``list``) follows the same
rules, except that it may be empty and may end with ``/``.
"""

from __future__ import annotations

from typing import Final

from virtbackup.storage.errors import InvalidKeyError

#: Prefix of the temporary names used by temp + rename writes.
TEMP_PREFIX: Final = ".vbtmp-"
MAX_SEGMENT_BYTES: Final = 200
MAX_KEY_BYTES: Final = 1024


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid key, else raise ``InvalidKeyError``."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    if key.endswith("/"):
        raise InvalidKeyError(f"key must not end with '/': {key!r}")
    _check_path(key, what="key")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` unchanged if it is a valid list prefix (may be empty or end in ``/``)."""
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"prefix must be a string, not {type(prefix).__name__}")
    if not prefix:
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if not body:
        raise InvalidKeyError("prefix must not be '/'")
    _check_path(body, what="prefix")
    return prefix


def is_temp_name(name: str) -> bool:
    """True for the file name (last segment) of a temporary write."""
    return name.startswith(TEMP_PREFIX)


def _check_path(path: str, *, what: str) -> None:
    if path.startswith("/"):
        raise InvalidKeyError(f"{what} must be relative (no leading '/'): {path!r}")
    if "\\" in path:
        raise InvalidKeyError(f"{what} must not contain a backslash: {path!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidKeyError(f"{what} must not contain control characters: {path!r}")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"{what} is not valid Unicode text: {path!r}") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    for segment in path.split("/"):
        if not segment:
            raise InvalidKeyError(f"{what} must not contain an empty segment: {path!r}")
        if segment in (".", ".."):
            raise InvalidKeyError(f"{what} must not contain '.' or '..' segments: {path!r}")
        if segment.startswith(TEMP_PREFIX):
            raise InvalidKeyError(f"{what} segments must not start with {TEMP_PREFIX!r}: {path!r}")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidKeyError(f"{what} segment longer than {MAX_SEGMENT_BYTES} bytes")
