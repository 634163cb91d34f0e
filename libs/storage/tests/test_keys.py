"""Key and prefix rules: everything that could leave the driver's root is rejected."""

from __future__ import annotations

import pytest

from virtbackup.storage import InvalidKeyError, validate_key, validate_prefix
from virtbackup.storage.keys import MAX_KEY_BYTES, MAX_SEGMENT_BYTES

GOOD_KEYS = [
    "a",
    "repository.json",
    "chunks/ab/ab12cd",
    "vms/vm 1/2026-01-01T00:00:00Z/domain.xml",
    ".hidden",
    "a/..b/c..",
    "ünïcode/ключ",
    "x" * MAX_SEGMENT_BYTES,
]
BAD_KEYS = [
    "",
    "/abs",
    "a/",
    "a//b",
    "//",
    "..",
    "../x",
    "a/../b",
    "a/..",
    ".",
    "./a",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    ".vbtmp-123-x",
    "d/.vbtmp-x",
    "x" * (MAX_SEGMENT_BYTES + 1),
    "/".join(["abcdefgh"] * (MAX_KEY_BYTES // 9 + 1)),
    "\udcff",
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_bad_key_errors_are_value_errors_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"'\.\.' segments"):
        validate_key("../etc/passwd")
    with pytest.raises(ValueError, match="relative"):
        validate_key("/etc/passwd")
    with pytest.raises(InvalidKeyError, match="must be a string"):
        validate_key(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "a", "a/", "chunks/0", "vms/vm-1/"])
def test_good_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/a", "a//", "../", "a/../", "a\\", "a//b/"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_prefix(prefix)
