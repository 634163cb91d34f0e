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


def test_each_service_logs_in_to_nats_as_itself_with_only_its_own_password() -> None:
    from virtbackup.contracts.subjects import SERVICES
    from virtbackup.runtime.nats_auth import password_variable

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in SERVICES:
        env = compose["services"][service]["environment"]
        assert env["VIRTBACKUP_NATS_USER"] == service
        assert env["VIRTBACKUP_NATS_PASSWORD"] == f"${{{password_variable(service)}}}"
        assert not any(k.startswith("VIRTBACKUP_NATS_PASSWORD_") for k in env)
        assert env["VIRTBACKUP_SECRET_KEY"].startswith("${VIRTBACKUP_SECRET_KEY")
    assert "/etc/nats/nats.conf" in compose["services"]["nats"]["command"]

    docs: list[Any] = []
    for name in ("gateway.yaml", "services.yaml"):
        docs += [d for d in yaml.safe_load_all((ROOT / "deploy/k8s" / name).read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == set(SERVICES)
    for service, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["VIRTBACKUP_NATS_USER"]["value"] == service
        ref = env["VIRTBACKUP_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "virtbackup-nats", "key": password_variable(service)}
        # The secret of every NATS password is not handed to the services whole.
        assert {"secretRef": {"name": "virtbackup-nats"}} not in container["envFrom"]


def test_the_inventory_and_the_workers_share_the_exports_pki() -> None:
    """Workers present the client certificate the inventory's CA issued: both must see
    one PKI folder, the workers read-only (compose and k8s)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, suffix in (("inventory", ""), ("transfer-worker", ":ro")):
        assert compose[name]["environment"]["VIRTBACKUP_PKI_DIR"] == "/pki"
        assert f"pki:/pki{suffix}" in compose[name]["volumes"]

    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/services.yaml").read_text()) if d]
    by_name = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs}
    for name, read_only in (("inventory", False), ("transfer-worker", True)):
        pod = by_name[name]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "pki")
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert claims["pki"] == "virtbackup-pki"
        assert env["VIRTBACKUP_PKI_DIR"] == mount["mountPath"]
        assert mount.get("readOnly", False) is read_only
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())
    assert "pki.yaml" in kustomization["resources"]


def test_only_the_gateway_gets_the_vault_key() -> None:
    """The vault's key opens every vault connection: compose, k8s and Helm give it to the
    gateway alone (runtime.vault), and ``virtbackup new-secrets`` makes one."""
    from virtbackup.contracts.subjects import GATEWAY, SERVICES
    from virtbackup.runtime.nats_auth import deploy_secrets

    assert len(deploy_secrets()["VIRTBACKUP_VAULT_KEY"]) == 44  # base64 of 32 bytes
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for service in SERVICES:
        has = "VIRTBACKUP_VAULT_KEY" in compose[service]["environment"]
        assert has == (service == GATEWAY), service
    docs: list[Any] = []
    for name in ("gateway.yaml", "services.yaml"):
        docs += [d for d in yaml.safe_load_all((ROOT / "deploy/k8s" / name).read_text()) if d]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        has = "VIRTBACKUP_VAULT_KEY" in env
        assert has == (deployment["metadata"]["name"] == GATEWAY), deployment["metadata"]
        assert {"secretRef": {"name": "virtbackup-vault"}} not in container["envFrom"]
    helm = (ROOT / "helm/virtbackup/templates/deployments.yaml").read_text()
    gateway_only = helm.split('{{- if eq $name "gateway" }}')
    assert helm.count("VIRTBACKUP_VAULT_KEY") == 2
    assert "VIRTBACKUP_VAULT_KEY" in gateway_only[1]


def test_helm_sets_whether_webhooks_may_target_private_addresses_on_the_notifier() -> None:
    """``webhooks.allowPrivate`` (default true, as the notifier's own default) reaches the
    notifier's pods, and only them, as ``VIRTBACKUP_WEBHOOKS_ALLOW_PRIVATE``."""
    from virtbackup.runtime.settings import Settings

    assert Settings.model_fields["webhooks_allow_private"].default is True
    values = yaml.safe_load((ROOT / "helm/virtbackup/values.yaml").read_text())
    assert values["webhooks"]["allowPrivate"] is True
    text = (ROOT / "helm/virtbackup/templates/deployments.yaml").read_text()
    line = (
        "- {name: VIRTBACKUP_WEBHOOKS_ALLOW_PRIVATE,"
        " value: {{ $.Values.webhooks.allowPrivate | toString | quote }}}"
    )
    assert text.count(line) == 1
    block = text[text.index(line) - 200 : text.index(line)]
    assert block.rstrip().rsplit("{{- if ", 1)[1].startswith('eq $name "notifier" }}')
