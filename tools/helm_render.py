"""Render the Helm chart with Helm's real engine and client, by installing it into a
Kubernetes API server: the stand-in of ``virtbackup.testing.kube_stand_in`` in tests.

Helm's ``template`` action is not in helm-sdkpy (Helm's Go library in a wheel; no
registry this project's machines reach ships a ``helm`` binary), but its install is:
Helm renders every template (``lookup`` included, against that server), maps each
document's kind through the server's discovery, checks that none exists yet, and
creates them one by one, with its release stored as a Secret, as against a cluster.
The server records what it was sent; the caller validates that.

Run under ``.tools/helm-sdkpy/bin/python`` (``dev.py install`` makes it; helm-sdkpy
needs Python 3.12 or newer), like tools/helm_lint.py.
Usage: ``helm_render.py CHART URL --ca CA_FILE [--release vb] [--namespace virtbackup]
[dotted.key=YAML ...]`` with the server's bearer token in ``VIRTBACKUP_KUBE_TOKEN``
(never on the command line). The kubeconfig is written to a temporary file (0600),
removed after. Exit 0 with one JSON line ``{"name", "namespace", "version", "status"}``
of the installed release; 1 with Helm's error on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from helm_sdkpy import Configuration, Install
from helm_sdkpy.exceptions import HelmError

#: Seconds the whole install may take (Helm's own timeout; nothing is waited for).
TIMEOUT = 60


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        values = values.setdefault(key, {})
    values[last] = value


def kubeconfig(url: str, ca_file: Path, token: str, namespace: str) -> dict[str, Any]:
    """A kubeconfig with one cluster (``url``, its CA ``ca_file``), one user (bearer
    ``token``), one context."""
    cluster = {"server": url, "certificate-authority": str(ca_file)}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": cluster}],
        "users": [{"name": "helm", "user": {"token": token}}],
        "contexts": [
            {
                "name": "stand-in",
                "context": {"cluster": "stand-in", "user": "helm", "namespace": namespace},
            }
        ],
        "current-context": "stand-in",
    }


async def render(
    chart: Path,
    url: str,
    ca_file: Path,
    token: str,
    release: str,
    namespace: str,
    overrides: list[str],
) -> dict[str, Any]:
    """Install ``chart`` as ``release`` into ``namespace`` of the server at ``url`` (HTTPS,
    its certificate issued by ``ca_file``, bearer ``token``), with ``overrides``
    (``dotted.key=YAML``) over the chart's values; Helm's release record. Raises
    ``HelmError`` when Helm fails (a template, a kind the server lacks, ...)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        _set(values, key, yaml.safe_load(raw))
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "kubeconfig"
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(kubeconfig(url, ca_file, token, namespace), out)
        config = Configuration(namespace=namespace, kubeconfig=str(config_file))
        result: dict[str, Any] = await Install(config).run(
            release, str(chart), values=values, wait=False, timeout=TIMEOUT
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chart", type=Path)
    parser.add_argument("url")
    parser.add_argument("--ca", type=Path, required=True, help="the server's CA (PEM)")
    parser.add_argument("--release", default="vb")
    parser.add_argument("--namespace", default="virtbackup")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=YAML")
    args = parser.parse_intermixed_args()
    token = os.environ.get("VIRTBACKUP_KUBE_TOKEN", "")
    try:
        release = asyncio.run(
            render(
                args.chart,
                args.url,
                args.ca,
                token,
                args.release,
                args.namespace,
                args.overrides,
            )
        )
    except HelmError as exc:
        print(f"helm install failed: {exc}", file=sys.stderr)
        return 1
    info = release.get("info") or {}
    summary = {
        "name": release.get("name"),
        "namespace": release.get("namespace"),
        "version": release.get("version"),
        "status": info.get("status") if isinstance(info, dict) else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
