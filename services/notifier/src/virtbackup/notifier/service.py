"""The notifier's definition."""

from __future__ import annotations

from virtbackup.contracts import buckets, streams, subjects
from virtbackup.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name=subjects.NOTIFIER,
    streams=(streams.EVENTS,),
    buckets=(buckets.WEBHOOKS,),
)
