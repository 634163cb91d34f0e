"""The AsyncAPI document of the bus (``docs/asyncapi.json``, ``task asyncapi``) is current
and lists every subject the services use: the commands they answer (from FastStream's
subscribers), each service's ping, the events they store and the transfer work queue."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from virtbackup.contracts import subjects
from virtbackup.contracts.subjects import ExportCmd, InventoryCmd, JobCmd, WorkerCmd

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asyncapi_tool", ROOT / "tools" / "asyncapi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _addresses(document: dict[str, Any]) -> set[str]:
    return {channel["address"] for channel in document["channels"].values()}


def test_the_committed_document_is_current() -> None:
    tool = _generator()
    fresh = tool.render(asyncio.run(tool.build()))
    committed = (ROOT / "docs" / "asyncapi.json").read_text()
    assert fresh == committed, "docs/asyncapi.json is stale: run `task asyncapi`"


def test_it_lists_every_subject_the_services_use() -> None:
    document = json.loads((ROOT / "docs" / "asyncapi.json").read_text())
    assert document["asyncapi"].startswith("3.")
    addresses = _addresses(document)
    commands = {
        value
        for group in (JobCmd, InventoryCmd, ExportCmd, WorkerCmd)
        for name, value in vars(group).items()
        if name.isupper()
    }
    assert commands <= addresses, sorted(commands - addresses)
    assert {subjects.ping(s) for s in subjects.SERVICES} <= addresses
    # Every event type a service publishes (found in their sources), and the schedule
    # events of the scheduler.
    published: set[str] = set()
    for source in ROOT.glob("services/*/src/**/*.py"):
        for name in re.findall(r"publish_event\(\s*EventType\.([A-Z_]+)", source.read_text()):
            published.add(getattr(subjects.EventType, name))
    published |= {"schedule.triggered", "schedule.completed", "schedule.failed"}
    assert {"job.created", "job.finished", "vm.lifecycle", "unit.done"} <= published
    events = {f"{subjects.event(t)}.{{key}}" for t in published}
    assert events <= addresses, sorted(events - addresses)
    assert f"{subjects.WORK_TRANSFER}.{{job_id}}" in addresses
