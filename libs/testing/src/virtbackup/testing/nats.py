"""Connecting to the tests' nats-server, which requires credentials like a deployed one.

``start_nats_server(..., auth=True)`` gives every service its own user
(``server.credentials("gateway")``) and an ``admin`` that may do anything; a test that
talks to NATS directly connects as ``admin`` with :func:`connect`, or as a service to
show what that service may not do.
"""

from __future__ import annotations

from typing import Any

import nats
from nats.aio.client import Client

from virtbackup.runtime.nats_auth import ADMIN, inbox_prefix
from virtbackup.runtime.nats_server import NatsServer


async def connect(server: NatsServer, user: str = ADMIN, **options: Any) -> Client:
    """A nats-py client logged in to ``server`` as ``user`` (with that service's inbox
    prefix, as the service itself connects). Close it with ``drain()``."""
    opts = server.connect_options(user)
    if user != ADMIN:
        options.setdefault("inbox_prefix", inbox_prefix(user))
    client: Client = await nats.connect(**opts, **options)
    return client
