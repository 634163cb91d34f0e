"""Liveness ping answered by every service instance."""

from __future__ import annotations

from virtbackup.contracts.v1.common import Message


class Ping(Message, frozen=True, kw_only=True):
    """Ask a service to identify itself."""


class Pong(Message, frozen=True, kw_only=True):
    """A service instance's answer. ``trace_id`` is the trace the handler ran in."""

    service: str
    instance: str
    version: str
    pid: int
    started_at: str
    trace_id: str = ""
