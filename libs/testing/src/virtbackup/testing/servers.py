"""What the server harnesses (:mod:`.sshd`, :mod:`.seaweedfs`) share: their error, a port
probe, and stopping a process with everything it started.

Free ports come from :func:`virtbackup.runtime.ports.free_port` (the one definition).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

#: Every test server listens here only.
LOOPBACK: Final = "127.0.0.1"


class ServerError(RuntimeError):
    """A test server could not be started; the message includes the tail of its log."""


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (within ``timeout`` s)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), in no particular order; ``[]`` for a
    process without children or one that is gone."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_quietly(pid: int, sig: int) -> None:
    """``os.kill(pid, sig)``, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_process(process: subprocess.Popen[bytes], *, grace: float, tree: bool) -> None:
    """SIGTERM ``process`` (and, if ``tree``, every descendant), then SIGKILL whatever is
    left after ``grace`` seconds, and reap it. A no-op for a process that has exited."""
    if process.poll() is not None:
        return
    victims = [*descendants(process.pid), process.pid] if tree else [process.pid]
    for pid in victims:
        signal_quietly(pid, signal.SIGTERM)
        signal_quietly(pid, signal.SIGCONT)  # a paused process handles SIGTERM only once resumed
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    for pid in victims:
        signal_quietly(pid, signal.SIGKILL)
    process.wait(timeout=10)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
