"""Which destination drivers exist, and what they can do (``GET /drivers``)."""

from __future__ import annotations

from virtbackup.contracts.v1.drivers import Capabilities, DriverInfo, DriverParam

FILESYSTEM = DriverInfo(
    id="filesystem",
    label="Filesystem",
    uses_path=True,
    capabilities=Capabilities(
        supports_range_read=True,
        supports_batch_delete=True,
        supports_multipart_upload=False,
        supports_server_side_copy=False,
        supports_conditional_write=False,
        supports_versioning=False,
        max_concurrent_writes=16,
        params=[DriverParam(name="path", type="string", required=True)],
    ),
)


def available_drivers() -> list[DriverInfo]:
    """Every driver this build can write to, with truthful capabilities."""
    return [FILESYSTEM]
