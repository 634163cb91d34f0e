"""Shared fixtures of the orchestrator's tests: a real nats-server (with the services'
authorization) and two orchestrator instances started in this process on it.

Each test module gets its own server and pair (module scope), so the state one module
leaves in the buckets never reaches another.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from virtbackup.contracts.subjects import JOB_ORCHESTRATOR
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.job_orchestrator.service import SPEC, job_context
from virtbackup.runtime.nats_server import NatsServer, start_nats_server
from virtbackup.runtime.service import ServiceContext, start_service, stop_service
from virtbackup.runtime.settings import load_settings


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream and the per-service accounts, stopped after the module."""
    server = start_nats_server(tmp_path_factory.mktemp("nats"), auth=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def replicas(
    nats_server: NatsServer, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[JobContext, JobContext]]:
    """Two orchestrator replicas (instances ``<module>-a`` and ``<module>-b``) on one bus."""
    stem = request.module.__name__.rsplit(".", 1)[-1]
    contexts: list[ServiceContext] = []
    for suffix in ("a", "b"):
        settings = load_settings(
            **nats_server.client_settings(JOB_ORCHESTRATOR), instance=f"{stem}-{suffix}"
        )
        contexts.append(await start_service(SPEC, settings))
    try:
        yield job_context(contexts[0]), job_context(contexts[1])
    finally:
        for ctx in contexts:
            await stop_service(SPEC, ctx)
