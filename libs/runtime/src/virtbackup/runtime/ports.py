"""Choosing a free TCP port for a server this process starts (the embedded nats-server, the
all-in-one launcher's HTTP ports, the servers the tests run).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from typing import Final

#: Where :func:`free_port` looks: below Linux's ephemeral range (32768-60999 by default),
#: so the kernel never hands one of these out as the source port of an outgoing
#: connection, and a server that is stopped can bind its port again when it restarts.
PORT_RANGE: Final = range(20000, 32768)
#: How many random ports :func:`free_port` tries before giving up.
ATTEMPTS: Final = 1000


def free_port(host: str = "127.0.0.1", *, exclude: Collection[int] = ()) -> int:
    """A TCP port in :data:`PORT_RANGE` that could be bound on ``host`` a moment ago and is
    not in ``exclude``.

    Nothing holds the port afterwards: bind it soon. To choose several distinct ports at
    once, pass those chosen so far as ``exclude``. Raises ``OSError`` when no port is free
    after :data:`ATTEMPTS` random tries.
    """
    rng = random.SystemRandom()
    for _ in range(ATTEMPTS):
        port = rng.choice(PORT_RANGE)
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(f"no free TCP port on {host} in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")
