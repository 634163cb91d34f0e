"""``free_port``: the one way a process here picks a port for a server it starts."""

from __future__ import annotations

import socket

import pytest

from virtbackup.runtime.ports import PORT_RANGE, free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    chosen: list[int] = []
    for _ in range(20):
        chosen.append(free_port(exclude=chosen))
    assert len(set(chosen)) == 20
    assert all(port in PORT_RANGE for port in chosen)
    assert max(chosen) < 32768  # Linux's ephemeral range starts here
    for port in chosen:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        everything_else = set(PORT_RANGE) - {taken}
        with pytest.raises(OSError, match="no free TCP port"):
            free_port(exclude=everything_else)
