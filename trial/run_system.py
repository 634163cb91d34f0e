"""Keep one VirtBackup system running on loopback, as tests/harness.py starts it.

Usage: .venv/bin/python trial/run_system.py DATA_DIR
Writes DATA_DIR/urls.json (agent URL, HyperSDK URL, token) and runs until SIGTERM.
Never `virtbackup up`: this starts only what the tests start.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import System
from virtbackup.runtime.nats_server import start_nats_server
from virtbackup.runtime.ports import free_port


def main() -> None:
    data = Path(sys.argv[1])
    data.mkdir(parents=True, exist_ok=True)
    system = System(
        data_dir=data,
        nats=start_nats_server(data / "nats", auth=True),
        agent_port=free_port(),
        extra_env={"VIRTBACKUP_LOGIN_FAILURE_WINDOW": "120"},
    )
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        system.start_all_with_own_token()
        (data / "urls.json").write_text(
            json.dumps(
                {
                    "url": system.url,
                    "hypersdk": system.hypersdk_url,
                    "token": system.token,
                    "nats": system.nats.url,
                }
            )
        )
        print("up", system.url, system.hypersdk_url, flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        system.stop_all()
        system.nats.stop()


if __name__ == "__main__":
    main()
