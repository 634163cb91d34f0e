"""Where the system is deployed, the job-orchestrator runs as (at least) two replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from virtbackup.contracts.subjects import JOB_ORCHESTRATOR

ROOT = Path(__file__).resolve().parents[1]


def test_the_orchestrator_runs_as_two_replicas_in_compose_k8s_and_helm() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"][JOB_ORCHESTRATOR]["deploy"]["replicas"] >= 2

    docs: list[Any] = list(yaml.safe_load_all((ROOT / "deploy/k8s/services.yaml").read_text()))
    orchestrator = next(d for d in docs if d and d["metadata"]["name"] == JOB_ORCHESTRATOR)
    assert orchestrator["spec"]["replicas"] >= 2

    values = yaml.safe_load((ROOT / "helm/virtbackup/values.yaml").read_text())
    assert values["replicas"]["jobOrchestrator"] >= 2
