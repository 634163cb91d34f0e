"""The Helm chart's metrics: every pod's own metrics port, a headless Service over them
and, behind ``metrics.serviceMonitor.enabled``, a ServiceMonitor for them and for the
gateway's HyperSDK ``/metrics`` (with the agent token).

No ``helm`` binary is installed here, so the chart is not rendered by Helm: the template
actions are checked for balance, and ``metrics.yaml`` is rendered by substituting the
few values it uses, then parsed and checked as Kubernetes objects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "virtbackup"
OPENERS = re.compile(r"\{\{-?\s*(if|range|with|define)\b")
ENDS = re.compile(r"\{\{-?\s*end\s*-?\}\}")


def test_every_template_action_is_closed() -> None:
    for template in CHART.glob("templates/*"):
        text = template.read_text()
        assert len(OPENERS.findall(text)) == len(ENDS.findall(text)), template.name


def test_metrics_values_default_to_on_without_a_service_monitor() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["metrics"]["enabled"] is True
    assert isinstance(values["metrics"]["port"], int)
    assert values["metrics"]["serviceMonitor"]["enabled"] is False


def render_metrics(values: dict[str, Any], release: str = "rel") -> list[dict[str, Any]]:
    """``templates/metrics.yaml`` with ``values`` (only the actions it uses)."""
    metrics = values["metrics"]
    lines: list[str] = []
    keep = [True]
    for line in (CHART / "templates" / "metrics.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("{{- if "):
            cond = stripped.removeprefix("{{- if ").removesuffix("}}").strip()
            truth = {
                ".Values.metrics.enabled": metrics["enabled"],
                ".Values.metrics.serviceMonitor.enabled": metrics["serviceMonitor"]["enabled"],
            }[cond]
            keep.append(keep[-1] and bool(truth))
            continue
        if stripped.startswith("{{- with "):
            keep.append(keep[-1] and bool(metrics["serviceMonitor"]["labels"]))
            continue
        if stripped == "{{- end }}":
            keep.pop()
            continue
        if not keep[-1]:
            continue
        if "toYaml" in stripped:
            for key, val in metrics["serviceMonitor"]["labels"].items():
                lines.append(f"    {key}: {val}")
            continue
        line = line.replace("{{ .Release.Name }}", release)
        line = line.replace("{{ .Values.metrics.port }}", str(metrics["port"]))
        line = line.replace(
            "{{ .Values.metrics.serviceMonitor.interval }}", metrics["serviceMonitor"]["interval"]
        )
        line = line.replace('{{ include "virtbackup.secretName" . }}', f"{release}-virtbackup")
        assert "{{" not in line, line
        lines.append(line)
    assert keep == [True]
    return [d for d in yaml.safe_load_all("\n".join(lines)) if d]


def test_the_service_monitor_scrapes_every_pod_and_the_gateway_with_the_token() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert [d["kind"] for d in render_metrics(values)] == ["Service"]
    values["metrics"]["serviceMonitor"].update(enabled=True, labels={"release": "prometheus"})
    service, monitor = render_metrics(values)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": values["metrics"]["port"], "targetPort": "metrics"}
    ]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    gateway_service = (CHART / "templates" / "service.yaml").read_text()
    assert "app.kubernetes.io/name: virtbackup" in gateway_service
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert set(endpoints) == {"metrics", "hypersdk"}
    assert endpoints["hypersdk"]["path"] == "/metrics"
    assert endpoints["hypersdk"]["authorization"]["credentials"] == {
        "name": "rel-virtbackup",
        "key": "VIRTBACKUP_TOKEN",
    }
    values["metrics"]["enabled"] = False
    assert render_metrics(values) == []


def test_each_pod_serves_its_metrics_on_the_pod_network() -> None:
    text = (CHART / "templates" / "deployments.yaml").read_text()
    assert "VIRTBACKUP_METRICS_HOST, value: 0.0.0.0" in text
    assert "{name: metrics, containerPort: {{ $.Values.metrics.port }}}" in text


def test_the_plain_manifests_give_every_pod_its_metrics_port() -> None:
    root = CHART.parents[1]
    config = next(
        d
        for d in yaml.safe_load_all((root / "deploy" / "k8s" / "config.yaml").read_text())
        if d and d["kind"] == "ConfigMap"
    )
    assert config["data"]["VIRTBACKUP_METRICS_HOST"] == "0.0.0.0"
    assert 0 < int(config["data"]["VIRTBACKUP_METRICS_PORT"]) < 65536
