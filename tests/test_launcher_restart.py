"""``POST /api/v1/server/restart`` in the single-machine mode: the gateway sends the
``virtbackup up`` launcher SIGHUP, and the launcher restarts every child it supervises
(``restart_children``). The children here are small processes of the test's own, since
``virtbackup up`` itself must not run beside other tests (it rewrites QEMU's TLS CA)."""

from __future__ import annotations

import os
from pathlib import Path

from virtbackup.cli.__main__ import Child, restart_children


def test_restart_children_stops_and_starts_each_child(tmp_path: Path) -> None:
    (tmp_path / "vbt_sleeper.py").write_text("import time\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    children = [
        Child(f"child-{i}", "vbt_sleeper", tmp_path / f"child-{i}.log", env) for i in range(2)
    ]
    for child in children:
        child.start()
    before = [child.process for child in children]
    try:
        restart_children(children)
        for old, child in zip(before, children, strict=True):
            assert old is not None and old.poll() is not None  # stopped
            assert child.process is not None and child.process is not old
            assert child.process.poll() is None  # started again, running
            assert child.restarts == 0
    finally:
        for child in children:
            if child.process is not None:
                child.process.kill()
                child.process.wait(5)
