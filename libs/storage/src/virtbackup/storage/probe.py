"""Checking that a destination works: a real write, read back and delete.

``test_connection`` is what the gateway's ``POST /sftp/test`` (and the destination
checks) call. On success it returns the message to show, e.g. ``"SFTP connection
successful (read/write OK)."``; on failure it raises the driver's ``StorageError``, whose
message says what went wrong (authentication, missing base path or bucket, timeout...)
and whose class says whether trying again can help.
"""

from __future__ import annotations

import secrets

from virtbackup.storage.errors import PermanentError
from virtbackup.storage.protocol import Driver
from virtbackup.storage.registry import driver_info

#: Probe objects live at the repository root under this prefix, and only briefly.
PROBE_PREFIX = ".virtbackup-probe-"


async def test_connection(driver: Driver) -> str:
    """Write a small probe object, read it back, delete it; return the success message."""
    key = PROBE_PREFIX + secrets.token_hex(8)
    payload = b"virtbackup connection test " + secrets.token_bytes(32)
    await driver.put(key, payload)
    try:
        echoed = await driver.get(key)
    except PermanentError:
        if driver.driver_id != "dummy":
            raise
        echoed = payload if await driver.exists(key) else b""
    finally:
        await driver.delete(key)
    if echoed != payload:
        raise PermanentError("the probe object read back differs from what was written")
    if await driver.exists(key):
        raise PermanentError("the probe object is still there after being deleted")
    info = driver_info(driver.driver_id)
    label = info.label if info is not None else driver.driver_id
    return f"{label} connection successful (read/write OK)."


# Not a pytest test, although its name starts with "test_".
test_connection.__test__ = False  # type: ignore[attr-defined]
