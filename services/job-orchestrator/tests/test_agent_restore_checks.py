"""What a restore onto a remote agent's host is refused for before any job exists
(``agent_restore``): the placement the configuration rules out, and what the agent's
last heartbeat says of the VM."""

from __future__ import annotations

from typing import Any

import pytest

from virtbackup.contracts.v1.config import Server
from virtbackup.job_orchestrator.agent_restore import (
    check_host_domains,
    check_placement,
    leased_params,
)
from virtbackup.repository.records import RestorePoint
from virtbackup.runtime.errors import BadRequest, Conflict

SERVER = Server(
    id="site2", name="Site 2", host="", agent_id="a1", agent_destination_ids=["fs"],
    restore_directories=["/srv/restores"],
)  # fmt: skip
POINT = RestorePoint(
    vm_name="web1", timestamp="2026-11-30T02-00-00", source_server_id="site2",
    source_server_name="site2", kind="full", disks=[], created_at="2026-11-30T02:00:00Z",
)  # fmt: skip


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"targetDirectory": "/srv/other"}, "outside the directories"),
        ({"targetDirectory": "/srv/restores-x"}, "outside the directories"),
        ({"targetDirectory": "/srv/restores/../etc"}, "without '..'"),
        ({"targetDirectory": "relative"}, "absolute path"),
        ({"targetDirectory": "/srv/restores", "storagePool": "p"}, "not both"),
    ],
)
def test_a_placement_the_configuration_rules_out_is_400(
    params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        check_placement(SERVER, params)
    assert problem in refused.value.message
    text = refused.value.message
    assert text.startswith(("targetDirectory", "give targetDirectory")), text


def test_directories_the_server_allows_pass() -> None:
    for wanted in ("/srv/restores", "/srv/restores/", "/srv/restores/a/b"):
        check_placement(SERVER, {"targetDirectory": wanted})
    check_placement(SERVER, {"storagePool": "default"})  # the agent checks the pool
    # Without restoreDirectories the host's pools decide: its agent checks.
    open_server = Server(id="s", name="s", host="", agent_id="a1")
    check_placement(open_server, {"targetDirectory": "/anywhere"})


def test_the_heartbeat_refuses_as_the_bus_path_does() -> None:
    running = {"web1": "running", "copy": "shutoff"}
    with pytest.raises(Conflict, match="vm web1 is running"):
        check_host_domains(SERVER, POINT, {"decision": "overwrite"}, running)
    with pytest.raises(Conflict, match="vm copy already exists"):
        check_host_domains(SERVER, POINT, {"decision": "define", "vmName": "copy"}, running)
    # Overwriting a shut-off one, or a new name, is allowed; a precheck only says.
    params = {"decision": "overwrite", "vmName": "copy"}
    assert check_host_domains(SERVER, POINT, params, running) == (True, False)
    params = {"decision": "overwrite", "vmName": "new"}
    assert check_host_domains(SERVER, POINT, params, running) == (False, False)
    params = {"decision": "define"}
    assert check_host_domains(SERVER, POINT, params, running, refuse=False) == (True, True)


def test_only_a_restores_choices_are_leased() -> None:
    params = {"xmlPath": "x", "decision": "overwrite", "agentId": "a1", "prepared": []}
    assert leased_params("restore", params) == {"xmlPath": "x", "decision": "overwrite"}
    assert leased_params("backup", {"fresh": True}) == {}
