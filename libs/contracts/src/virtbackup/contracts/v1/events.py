"""The event envelope stored in ``VB_EVENTS`` and streamed over SSE and WebSocket."""

from __future__ import annotations

from typing import Any

import msgspec

from virtbackup.contracts.v1.common import Message


class Event(Message, frozen=True, kw_only=True):
    """One fact. ``type`` is ``<aggregate>.<event>``; ``payload`` is type-specific.

    On SSE an event is sent as ``event: <type>`` / ``data: {"type": ..., "payload": ...}``.
    """

    type: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str
    time: str
    source: str


class VmLifecycle(Message, frozen=True, kw_only=True):
    """Payload of ``vm.lifecycle``: a libvirt domain event on a server."""

    server_id: str
    vm_name: str
    vm_id: str
    event: str
    detail: str
    power_state: str


class JobFailure(Message, frozen=True, kw_only=True):
    """Payload of ``agent.job_failure``."""

    job_id: str
    type: str
    message: str
