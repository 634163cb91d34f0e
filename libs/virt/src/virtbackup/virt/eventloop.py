"""libvirt's default event loop, run once per process in a daemon thread.

libvirt needs an event loop implementation registered *before* a connection is opened
for keepalive, close callbacks and domain events to work on that connection.
:func:`ensure_event_loop` registers libvirt's own implementation
(``virEventRegisterDefaultImpl``) and starts a daemon thread that runs
``virEventRunDefaultImpl`` forever. Callbacks registered with libvirt (lifecycle events,
close callbacks) are invoked on that thread: they must not block and must hand their data
to asyncio with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import threading
from typing import Any

import libvirt

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _ignore_error(_ctx: Any, _err: Any) -> None:
    """Swallow libvirt's default error printing; errors reach callers as exceptions."""


def _run() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:  # pragma: no cover - libvirt internal failure
            continue


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and start its thread; idempotent, thread-safe.

    Also silences libvirt's habit of printing every error to stderr (the same errors are
    raised as exceptions).
    """
    global _thread
    with _lock:
        if _thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_error, None)
        libvirt.virEventRegisterDefaultImpl()
        _thread = threading.Thread(target=_run, name="libvirt-event-loop", daemon=True)
        _thread.start()
