"""The inventory service's definition."""

from __future__ import annotations

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name=subjects.INVENTORY,
    streams=(streams.EVENTS,),
    buckets=(buckets.INVENTORY, buckets.CONFIG),
)
