"""A stand-in for the Kubernetes API server, on loopback, for rendering the Helm chart.

**This is not Kubernetes.** No Kubernetes cluster can run on the machines these tests
run on (no kubelet, no container runtime, no registry that ships a kube-apiserver), and
no registry they reach ships a ``helm`` binary either. The chart is rendered instead by
Helm's real engine and client (helm-sdkpy, ``tools/helm_render.py``), installing into
this small HTTPS server, which answers what Helm's client asks during an install and
records every object Helm creates, as Helm sent it. It validates nothing and
runs nothing: checking the recorded objects is kubernetes-validate's job
(``tests/test_deploy_validate.py``), and whether a pod would start is not known here.

HTTPS on 127.0.0.1 with a certificate from a CA of its own (:attr:`KubeStandIn.ca_file`;
client-go sends a kubeconfig's token over TLS only); every request needs
``Authorization: Bearer <token>`` with :attr:`KubeStandIn.token`, else 401, as an API
server without anonymous access. Answers are JSON. Bodies are JSON, or, for Secrets and
ConfigMaps, Kubernetes' protobuf (client-go's typed clients, Helm's release storage among
them, send those so), read by :mod:`.kube_protobuf` into the same JSON form. What it
serves:

- ``GET /version``: Kubernetes :data:`KUBERNETES_VERSION`;
- discovery, the legacy (unaggregated) form, which every client falls back to:
  ``GET /api`` (``APIVersions``), ``GET /apis`` (``APIGroupList``), ``GET /api/v1`` and
  ``GET /apis/<group>/<version>`` (``APIResourceList``) for the kinds of
  :data:`RESOURCES`: those the chart renders with any of its values (core v1, apps/v1,
  policy/v1, networking.k8s.io/v1) and the custom resources it may use, as if their CRDs
  were installed (Prometheus Operator's ServiceMonitor, KEDA's ScaledObject and
  TriggerAuthentication). A kind not listed is unknown, as on a cluster without it,
  and Helm's install fails naming it;
- objects of those kinds, at the usual paths (``/api/v1/namespaces/<ns>/<plural>[/<name>]``,
  ``/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]``, ``/api/v1/namespaces[/<name>]``):
  ``GET`` one (or a 404 ``Status``), ``GET`` a collection (``labelSelector`` of
  ``key=value`` terms joined by commas; any other selector is a 400, so a client cannot
  drift into selectors this server does not honour), ``POST`` (201 with ``uid``,
  ``resourceVersion``, ``creationTimestamp`` and the namespace filled in, or 409
  ``AlreadyExists``), ``PUT`` (200, 404 for a missing object, 400 when the body's
  name is not the path's). A body of another kind or without a name is a 400. That
  covers Helm's release storage too: Secrets ``sh.helm.release.v1.<release>.v<n>``
  labelled ``owner=helm``, listed by label, created, then updated.

Anything else is answered 404 (an unknown path), 405 (another verb) or 415 (a protobuf
body it does not read) with a ``Status``, and kept in :attr:`KubeStandIn.unanswered`, so
a test can say what Helm asked that was not served. Everything lives in memory;
:meth:`KubeStandIn.reset` forgets it.

    with kube_stand_in() as kube:
        ...  # tools/helm_render.py CHART kube.url --ca kube.ca_file, token in its environment
        docs = kube.created("virtbackup")
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import shutil
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from virtbackup.testing import kube_protobuf
from virtbackup.virt.pki import Authority, write_file

LOOPBACK: Final = "127.0.0.1"
#: What ``/version`` reports: the release the manifests are validated against.
KUBERNETES_VERSION: Final = (1, 29, 0)
#: Helm's release storage (its ``secrets`` driver): Secrets carrying this label.
HELM_OWNER_LABEL: Final = ("owner", "helm")


@dataclass(frozen=True)
class Resource:
    """One kind the stand-in serves: its group ("" for core), version, kind, plural."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def discovery(self) -> dict[str, Any]:
        """Its entry of an ``APIResourceList``."""
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {
            "name": self.plural,
            "singularName": self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        }


#: Every kind the chart (helm/virtbackup) renders with any of its values, plus Namespace
#: (``create_namespace``) and KEDA's TriggerAuthentication.
RESOURCES: Final = (
    Resource("", "v1", "Namespace", "namespaces", namespaced=False),
    Resource("", "v1", "ConfigMap", "configmaps"),
    Resource("", "v1", "Secret", "secrets"),
    Resource("", "v1", "Service", "services"),
    Resource("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Resource("apps", "v1", "Deployment", "deployments"),
    Resource("apps", "v1", "StatefulSet", "statefulsets"),
    Resource("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Resource("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies"),
    Resource("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"),
    Resource("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects"),
    Resource("keda.sh", "v1alpha1", "TriggerAuthentication", "triggerauthentications"),
)


class _Refused(Exception):
    """An answer other than success: HTTP status, Kubernetes reason, message."""

    def __init__(self, status: int, reason: str, message: str, *, unserved: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        #: Not a refusal of a served request: a path or verb this stand-in does not serve.
        self.unserved = unserved


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _selector(raw: str) -> list[tuple[str, str]]:
    """``a=b,c==d`` as pairs; 400 for set-based or negated terms (not served)."""
    terms = []
    for term in filter(None, raw.split(",")):
        key, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if not sep or not key or "!" in key or any(c in term for c in "() "):
            raise _Refused(400, "BadRequest", f"unsupported labelSelector term {term!r}")
        terms.append((key, value))
    return terms


class KubeStandIn:
    """The stand-in API server: start with :func:`kube_stand_in` (or :meth:`start`).

    ``url`` is ``https://127.0.0.1:<port>``, ``ca_file`` its CA, ``token`` the bearer
    token every request must carry. Objects are kept per (group/version, plural,
    namespace, name); thread-safe.
    """

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(24)
        self._dir = Path(tempfile.mkdtemp(prefix="kube-stand-in-"))
        authority = Authority.create("VirtBackup kube stand-in CA")
        issued = authority.issue_server([LOOPBACK])
        #: The CA (PEM) the server's certificate is issued by: the kubeconfig's
        #: ``certificate-authority``.
        self.ca_file = self._dir / "ca.crt"
        write_file(self.ca_file, authority.cert_pem, 0o644)
        write_file(self._dir / "tls.crt", issued.cert_pem, 0o600)
        write_file(self._dir / "tls.key", issued.key_pem, 0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._dir / "tls.crt", self._dir / "tls.key")
        self.unanswered: list[str] = []
        self._objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self._created: list[tuple[str, dict[str, Any]]] = []
        self._version = 0
        self._lock = threading.Lock()
        self._server = _TlsServer((LOOPBACK, 0), _handler_for(self), context)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kube-stand-in", daemon=True
        )

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def reset(self) -> None:
        """Forget every object, every record and :attr:`unanswered`."""
        with self._lock:
            self._objects.clear()
            self._created.clear()
            self.unanswered.clear()

    def created(
        self, namespace: str, *, include_helm_storage: bool = False
    ) -> list[dict[str, Any]]:
        """Deep copies of the objects POSTed into ``namespace``, in order, as their client
        sent them (a protobuf body in its JSON form), before the server filled in ``uid``
        and the like. Helm's own
        release Secrets (label ``owner=helm``) are left out unless ``include_helm_storage``."""
        key, value = HELM_OWNER_LABEL
        with self._lock:
            return [
                copy.deepcopy(obj)
                for ns, obj in self._created
                if ns == namespace
                and (include_helm_storage or obj["metadata"].get("labels", {}).get(key) != value)
            ]

    def stored(self, namespace: str) -> list[dict[str, Any]]:
        """Deep copies of the objects stored in ``namespace`` now (after any update)."""
        with self._lock:
            return [
                copy.deepcopy(o) for (_, _, ns, _), o in self._objects.items() if ns == namespace
            ]

    # -- serving ----------------------------------------------------------------------

    def serve(
        self, method: str, target: str, content_type: str, raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON answer to one authenticated request (the HTTP handler's)."""
        body: dict[str, Any] | None = None
        if raw and content_type.startswith(kube_protobuf.PROTOBUF):
            try:
                body = kube_protobuf.read(raw)
            except kube_protobuf.UnreadableBody as exc:
                with self._lock:
                    self.unanswered.append(f"{method} {target} ({exc})")
                return 415, _status(415, "UnsupportedMediaType", str(exc))
        elif raw:
            try:
                loaded = json.loads(raw)
            except ValueError:
                loaded = None
            if not isinstance(loaded, dict):
                return 400, _status(400, "BadRequest", "the body is not a JSON object")
            body = loaded
        return self.answer(method, target, body)

    def answer(
        self, method: str, target: str, body: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON answer for one request with its decoded body."""
        parts = urlsplit(target)
        path = [p for p in parts.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            return self._route(method, path, query, body)
        except _Refused as refused:
            if refused.unserved:
                with self._lock:
                    self.unanswered.append(f"{method} {target}")
            return refused.status, _status(refused.status, refused.reason, refused.message)

    def _route(
        self, method: str, path: list[str], query: dict[str, str], body: dict[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        if method == "GET":
            discovery = self._discovery(path)
            if discovery is not None:
                return 200, discovery
        if path[:1] == ["api"] and len(path) >= 3 and path[1] == "v1":
            group, version, rest = "", "v1", path[2:]
        elif path[:1] == ["apis"] and len(path) >= 4:
            group, version, rest = path[1], path[2], path[3:]
        else:
            raise _Refused(
                404, "NotFound", f"the server could not find /{'/'.join(path)}", unserved=True
            )
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        resource = self._resource(group, version, rest[0] if rest else "")
        if resource is None or len(rest) > 2 or resource.namespaced != bool(namespace):
            raise _Refused(
                404, "NotFound", f"the server could not find /{'/'.join(path)}", unserved=True
            )
        name = rest[1] if len(rest) == 2 else ""
        if method == "GET":
            return 200, self._get(resource, namespace, name, query)
        if method == "POST" and not name:
            return 201, self._create(resource, namespace, body)
        if method == "PUT" and name:
            return 200, self._update(resource, namespace, name, body)
        raise _Refused(
            405, "MethodNotAllowed", f"{method} is not served on /{'/'.join(path)}", unserved=True
        )

    def _discovery(self, path: list[str]) -> dict[str, Any] | None:
        if path == ["version"]:
            major, minor, patch = KUBERNETES_VERSION
            return {
                "major": str(major),
                "minor": str(minor),
                "gitVersion": f"v{major}.{minor}.{patch}",
                "platform": "linux/amd64",
            }
        if path == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == ["apis"]:
            groups: dict[str, list[str]] = {}
            for r in RESOURCES:
                if r.group and r.version not in groups.setdefault(r.group, []):
                    groups[r.group].append(r.version)
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": group,
                        "versions": [
                            {"groupVersion": f"{group}/{v}", "version": v} for v in versions
                        ],
                        "preferredVersion": {
                            "groupVersion": f"{group}/{versions[0]}",
                            "version": versions[0],
                        },
                    }
                    for group, versions in groups.items()
                ],
            }
        if path == ["api", "v1"] or (len(path) == 3 and path[0] == "apis"):
            group_version = "v1" if path[0] == "api" else f"{path[1]}/{path[2]}"
            served = [r for r in RESOURCES if r.group_version == group_version]
            if not served:
                return None
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": [r.discovery() for r in served],
            }
        return None

    @staticmethod
    def _resource(group: str, version: str, plural: str) -> Resource | None:
        for r in RESOURCES:
            if (r.group, r.version, r.plural) == (group, version, plural):
                return r
        return None

    def _get(
        self, resource: Resource, namespace: str, name: str, query: dict[str, str]
    ) -> dict[str, Any]:
        with self._lock:
            if name:
                found = self._objects.get(
                    (resource.group_version, resource.plural, namespace, name)
                )
                if found is None:
                    raise _Refused(404, "NotFound", f'{resource.plural} "{name}" not found')
                return copy.deepcopy(found)
            terms = _selector(query.get("labelSelector", ""))
            items = [
                copy.deepcopy(obj)
                for (gv, plural, ns, _), obj in self._objects.items()
                if gv == resource.group_version
                and plural == resource.plural
                and (not namespace or ns == namespace)
                and all(obj["metadata"].get("labels", {}).get(k) == v for k, v in terms)
            ]
            return {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.group_version,
                "metadata": {"resourceVersion": str(self._version)},
                "items": items,
            }

    def _checked(self, resource: Resource, namespace: str, body: dict[str, Any] | None) -> str:
        if body is None or not isinstance(body.get("metadata"), dict):
            raise _Refused(400, "BadRequest", "the body must be a JSON object with metadata")
        name = body["metadata"].get("name")
        if not isinstance(name, str) or not name:
            raise _Refused(400, "BadRequest", "metadata.name is required")
        if body.get("kind") != resource.kind or body.get("apiVersion") != resource.group_version:
            raise _Refused(
                400, "BadRequest", f"the body is not a {resource.group_version} {resource.kind}"
            )
        if body["metadata"].get("namespace", namespace) != namespace:
            raise _Refused(400, "BadRequest", "metadata.namespace does not match the path")
        return name

    def _create(
        self, resource: Resource, namespace: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        name = self._checked(resource, namespace, body)
        assert body is not None
        key = (resource.group_version, resource.plural, namespace, name)
        with self._lock:
            if key in self._objects:
                raise _Refused(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            self._created.append((namespace, copy.deepcopy(body)))
            stored = self._filled(copy.deepcopy(body), namespace)
            self._objects[key] = stored
            return copy.deepcopy(stored)

    def _update(
        self, resource: Resource, namespace: str, name: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        if self._checked(resource, namespace, body) != name:
            raise _Refused(400, "BadRequest", "metadata.name does not match the path")
        assert body is not None
        key = (resource.group_version, resource.plural, namespace, name)
        with self._lock:
            old = self._objects.get(key)
            if old is None:
                raise _Refused(404, "NotFound", f'{resource.plural} "{name}" not found')
            stored = self._filled(copy.deepcopy(body), namespace, old["metadata"])
            self._objects[key] = stored
            return copy.deepcopy(stored)

    def _filled(
        self, obj: dict[str, Any], namespace: str, old: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``obj`` with the metadata an API server sets (caller holds the lock)."""
        self._version += 1
        meta = obj["metadata"]
        if namespace:
            meta["namespace"] = namespace
        meta["uid"] = old["uid"] if old else str(uuid.uuid4())
        meta["creationTimestamp"] = (
            old["creationTimestamp"] if old else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        meta["resourceVersion"] = str(self._version)
        return obj


class _TlsServer(ThreadingHTTPServer):
    """HTTPS, the TLS handshake made in each connection's own thread."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a client that does not speak TLS, or trusts another CA
        super().finish_request(tls, client_address)


def _handler_for(kube: KubeStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # one write for the headers, one for the body

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.headers.get("Authorization") != f"Bearer {kube.token}":
                status, answer = 401, _status(401, "Unauthorized", "Unauthorized")
            else:
                status, answer = kube.serve(
                    self.command, self.path, self.headers.get("Content-Type") or "", raw
                )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def do_PATCH(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

    return Handler


@contextlib.contextmanager
def kube_stand_in() -> Iterator[KubeStandIn]:
    """A started :class:`KubeStandIn`, closed on exit."""
    kube = KubeStandIn()
    kube.start()
    try:
        yield kube
    finally:
        kube.close()
