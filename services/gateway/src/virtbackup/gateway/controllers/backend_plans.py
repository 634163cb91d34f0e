"""Native API (backend-api.md): backup plans as projects and pipelines, plan chains as
pipeline chains (``/api/v1/projects``, ``/api/v1/pipelines``, ``/api/v1/pipeline-chains``).

A project is imported from YAML (``plans_yaml``: strict, every refusal naming the line),
checked and kept by the job-orchestrator (``vb.cmd.plan.*``). Bodies and answers are
snake_case, as backend-api.md writes the run payload; a ``pipelineDbId`` is
``<projectId>.<pipelineId>``, a ``chainDbId`` ``<projectId>.<chainId>``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from virtbackup.contracts.subjects import PlanCmd
from virtbackup.contracts.v1.common import Empty
from virtbackup.contracts.v1.plans import (
    EligibleAgents,
    ExecutionMode,
    PlanRun,
    PlanRunRef,
    PlanRunRequest,
    PlanRunResult,
    PlanTargets,
    Preview,
    Project,
    ProjectImportRequest,
    ProjectList,
    ProjectRef,
    ProjectSource,
    RunOptions,
)
from virtbackup.gateway.bodies import NoBody, SnakeBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.plan_agents import eligible_view, refuse_deactivated
from virtbackup.gateway.plan_preview_pages import paged_preview, paged_source_refs
from virtbackup.gateway.plans_yaml import MAX_PROJECT_BYTES, MAX_YAML_CHARS, parse_project
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest, ServiceError

#: Seconds to wait for the orchestrator's answer to a plan command: an import or a
#: preview asks the inventory about every VM of the plan.
PLAN_TIMEOUT = 120.0
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.ya?ml(?![\s\S])")
_encoder = msgspec.json.Encoder()
#: An icon is served as an image, never as a document that runs anything.
ICON_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ImportBody(SnakeBody, kw_only=True):
    """Exactly one of ``yaml`` (the project document) and ``path`` (a file name in the
    gateway's projects directory, ``VIRTBACKUP_PROJECTS_DIR``)."""

    #: At most ``MAX_YAML_CHARS`` (checked by ``parse_project``, a 400; the gateway's
    #: body limit, a 413, comes first for a larger body).
    yaml: str | None = None
    path: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class RunBody(SnakeBody, kw_only=True):
    """backend-api.md's run payload (``v1.plans.RunOptions`` says what each field does)."""

    vms: (
        Annotated[
            list[Annotated[str, msgspec.Meta(min_length=3, max_length=512)]],
            msgspec.Meta(max_length=10000),
        ]
        | None
    ) = None
    source_ref: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    agent_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    dry_run: bool = False
    execution_mode: ExecutionMode = "online"
    offline_cached_only: bool = False


def _options(body: RunBody | None) -> RunOptions:
    if body is None:
        return RunOptions()
    return msgspec.convert(msgspec.to_builtins(body), RunOptions)


async def _checked(gw: Gateway, body: RunBody | None) -> RunOptions:
    """The run payload's options, refused (400) when pinned to a deactivated agent."""
    options = _options(body)
    await refuse_deactivated(gw, options)
    return options


def _out(value: msgspec.Struct) -> dict[str, Any]:
    out = msgspec.to_builtins(value)
    assert isinstance(out, dict)
    return out


def project_view(project: Project) -> dict[str, Any]:
    """A project as the API shows it: its plans and chains with their db ids, where it
    came from (not its YAML), and its schedules."""
    spec = project.spec
    return {
        "id": project.id,
        "name": project.name,
        "description": project.description,
        "source": {"kind": project.source.kind, "path": project.source.path},
        "icon_url": f"/api/v1/projects/{project.id}/icon",
        "pipelines": [
            {"pipeline_db_id": f"{project.id}.{p.id}", **_out(p)} for p in spec.pipelines
        ],
        "chains": [{"chain_db_id": f"{project.id}.{c.id}", **_out(c)} for c in spec.chains],
        "schedule_ids": project.schedule_ids,
        "imported_at": project.imported_at,
        "updated_at": project.updated_at,
    }


def read_source(gw: Gateway, name: str) -> str:
    """The text of project file ``name`` in the projects directory. ``BadRequest`` naming
    ``path`` for a name that is not a plain ``*.yaml``/``*.yml`` file name, a file that
    is missing, not a regular file inside the directory, too long or not UTF-8."""
    if not _FILE_NAME.match(name):
        raise BadRequest(
            "a file name in the projects directory (letters, digits, '_', '.', '-', ending "
            ".yaml or .yml; no directories) - at `$.path`"
        )
    directory = gw.settings.plan_projects_dir.resolve()
    path = (directory / name).resolve()
    if path.parent != directory or not path.is_file():
        raise BadRequest(f"no project file {name!r} in the projects directory - at `$.path`")
    raw = path.read_bytes()[: MAX_YAML_CHARS * 4 + 1]
    if len(raw) > MAX_YAML_CHARS * 4:
        raise BadRequest("the project file is too long - at `$.path`")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the project file is not UTF-8 - at `$.path`") from None


async def _import(gw: Gateway, source: ProjectSource, *, replace: bool) -> Project:
    spec, lines = parse_project(source.yaml)
    req = ProjectImportRequest(spec=spec, source=source, lines=lines, replace=replace)
    size = len(_encoder.encode(req))
    if size > MAX_PROJECT_BYTES:
        # One bus message and one VB_PLANS record carry the project: refuse what they
        # cannot, rather than fail on NATS's payload limit.
        raise BadRequest(
            f"the project takes {size} bytes once parsed, more than the {MAX_PROJECT_BYTES}"
            " a project may take; split it into several projects - at `$.yaml`"
        )
    return await gw.bus.request(PlanCmd.IMPORT, req, Project, timeout=PLAN_TIMEOUT)


def default_icon(project_id: str, name: str) -> str:
    """A generated SVG: the project's initials on a colour derived from its id."""
    hue = int(hashlib.sha256(project_id.encode()).hexdigest()[:4], 16) % 360
    initials = "".join(w[0] for w in re.split(r"[\s_.-]+", name or project_id) if w)[:2]
    text = html.escape(initials.upper() or "?")
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">'
        f'<rect width="64" height="64" rx="12" fill="hsl({hue},55%,45%)"/>'
        '<text x="32" y="41" font-family="sans-serif" font-size="26" fill="#fff" '
        f'text-anchor="middle">{text}</text></svg>'
    )


def icon_response(project: Project) -> Response[bytes]:
    icon = project.spec.icon
    if icon is None:
        body, media = default_icon(project.id, project.name).encode(), "image/svg+xml"
    elif icon.startswith("data:image/png;base64,"):
        body, media = base64.b64decode(icon.split(",", 1)[1]), "image/png"
    elif icon.startswith("data:image/svg+xml;base64,"):
        body, media = base64.b64decode(icon.split(",", 1)[1]), "image/svg+xml"
    else:
        body, media = icon.encode(), "image/svg+xml"
    return Response(body, media_type=media, headers=ICON_HEADERS)


PipelineId = Annotated[str, Parameter(description="<projectId>.<pipelineId>", max_length=200)]
ChainId = Annotated[str, Parameter(description="<projectId>.<chainId>", max_length=200)]


class ProjectsController(Controller):
    path = "/api/v1/projects"

    @get()
    async def list_projects(self, gw: Gateway) -> list[dict[str, Any]]:
        """Every project, by id."""
        found = await gw.bus.request(PlanCmd.LIST, Empty(), ProjectList)
        return [project_view(p) for p in found.projects]

    @post("/import", status_code=201, responses=responses(400, 409, 503))
    async def import_project(self, gw: Gateway, data: ImportBody) -> dict[str, Any]:
        """Import a project from YAML (``yaml``) or a file of the projects directory
        (``path``). 400 naming the line for bad YAML or anything the system cannot run
        (unknown server, destination or VM); 409 when the id is taken. Nothing is stored
        unless everything is accepted."""
        if (data.yaml is None) == (data.path is None):
            raise BadRequest("give exactly one of yaml and path - at `$`")
        if data.path is not None:
            source = ProjectSource(kind="path", path=data.path, yaml=read_source(gw, data.path))
        else:
            assert data.yaml is not None
            source = ProjectSource(kind="inline", yaml=data.yaml)
        return project_view(await _import(gw, source, replace=False))

    @get("/{project_id:str}", responses=responses(404))
    async def get_project(self, gw: Gateway, project_id: str) -> dict[str, Any]:
        """One project (404 for an unknown id)."""
        return project_view(await gw.bus.request(PlanCmd.GET, ProjectRef(id=project_id), Project))

    @delete("/{project_id:str}", status_code=200, responses=responses(404))
    async def delete_project(self, gw: Gateway, project_id: str) -> dict[str, Any]:
        """Remove a project and its schedules (its runs' jobs stay)."""
        await gw.bus.request(PlanCmd.DELETE, ProjectRef(id=project_id), Empty)
        return {"success": True, "id": project_id}

    @get("/{project_id:str}/icon", responses=responses(404))
    async def icon(self, gw: Gateway, project_id: str) -> Response[bytes]:
        """The project's icon: the one its YAML names (SVG or PNG), else a generated SVG."""
        return icon_response(await gw.bus.request(PlanCmd.GET, ProjectRef(id=project_id), Project))

    @post("/{project_id:str}/reload", status_code=200, responses=responses(400, 404, 503))
    async def reload(
        self, gw: Gateway, project_id: str, data: NoBody | None = None
    ) -> dict[str, Any]:
        """Read the project's source again (a ``path`` project: its file; an inline one:
        its YAML, checked again against today's servers, destinations and VMs) and replace
        it. A refusal (400 naming the line) leaves the stored project as it was."""
        old = await gw.bus.request(PlanCmd.GET, ProjectRef(id=project_id), Project)
        source = old.source
        if source.kind == "path" and source.path is not None:
            source = ProjectSource(kind="path", path=source.path, yaml=read_source(gw, source.path))
        spec, _ = parse_project(source.yaml)
        if spec.id != project_id:
            raise BadRequest(
                f"the source now holds project {spec.id!r}, not {project_id!r} - at `$.id`"
            )
        return project_view(await _import(gw, source, replace=True))


async def _run(gw: Gateway, req: PlanRunRequest) -> dict[str, Any]:
    """A run (``vb.cmd.plan.run``), or with ``dry_run`` its preview read page by page
    (``paged_preview``: a plan's whole preview may not fit in one bus message)."""
    if req.options.dry_run:
        return _out(PlanRunResult(dry_run=True, preview=await paged_preview(gw, req)))
    return _out(await gw.bus.request(PlanCmd.RUN, req, PlanRunResult, timeout=PLAN_TIMEOUT))


async def _preview_sse(gw: Gateway, db_id: str, options: RunOptions) -> ServerSentEvent:
    # The targets first (404 / 400 before the stream starts), then one preview per VM.
    found_targets = await gw.bus.request(
        PlanCmd.TARGETS,
        PlanRunRequest(pipeline_db_id=db_id, options=options),
        PlanTargets,
        timeout=PLAN_TIMEOUT,
    )
    targets = found_targets.vms

    async def stream() -> AsyncGenerator[ServerSentEventMessage, None]:
        total: int | None = 0
        yield ServerSentEventMessage(
            event="resolve.start",
            data=_encoder.encode({"pipeline_db_id": db_id, "vms": targets}).decode(),
        )
        for index, target in enumerate(targets):
            one = msgspec.structs.replace(options, vms=[target])
            try:
                found = await gw.bus.request(
                    PlanCmd.PREVIEW,
                    PlanRunRequest(pipeline_db_id=db_id, options=one),
                    Preview,
                    timeout=PLAN_TIMEOUT,
                )
            except ServiceError as exc:
                total = None
                yield ServerSentEventMessage(
                    event="resolve.error",
                    data=_encoder.encode({"vm": target, "error": exc.message}).decode(),
                )
                continue
            for vm in found.vms:
                for disk in vm.disks:
                    yield ServerSentEventMessage(
                        event="resolve.disk",
                        data=_encoder.encode(
                            {"vm": target, "destination_id": vm.destination_id, **_out(disk)}
                        ).decode(),
                    )
                if total is not None and vm.estimated_bytes is not None:
                    total += vm.estimated_bytes
                else:
                    total = None
                yield ServerSentEventMessage(
                    event="resolve.vm",
                    data=_encoder.encode({"index": index, "of": len(targets), **_out(vm)}).decode(),
                )
        yield ServerSentEventMessage(
            event="resolve.done",
            data=_encoder.encode({"vms": len(targets), "estimated_bytes": total}).decode(),
        )

    return ServerSentEvent(stream())


class PipelinesController(Controller):
    path = "/api/v1/pipelines"

    @post(
        "/{pipeline_db_id:str}/run-selection", status_code=200, responses=responses(400, 404, 409)
    )
    async def run_selection(
        self, gw: Gateway, pipeline_db_id: PipelineId, data: RunBody | None = None
    ) -> dict[str, Any]:
        """Run the plan for ``vms`` (default: all of them): ``run_id`` and ``job_ids``
        (``dry_run``: the preview instead, nothing created)."""
        req = PlanRunRequest(pipeline_db_id=pipeline_db_id, options=await _checked(gw, data))
        return await _run(gw, req)

    @post("/{pipeline_db_id:str}/dry-run-preview", status_code=200, responses=responses(400, 404))
    async def dry_run_preview(
        self, gw: Gateway, pipeline_db_id: PipelineId, data: RunBody | None = None
    ) -> dict[str, Any]:
        """Per VM and disk: full or incremental, the parent point and checkpoint, the bytes
        the run would read (libvirt's dirty sizes; nothing is read)."""
        req = PlanRunRequest(pipeline_db_id=pipeline_db_id, options=await _checked(gw, data))
        return _out(await paged_preview(gw, req))

    @get("/{pipeline_db_id:str}/source-refs", responses=responses(400, 404))
    async def source_refs(
        self,
        gw: Gateway,
        pipeline_db_id: PipelineId,
        execution_mode: ExecutionMode = "online",
    ) -> dict[str, Any]:
        """Per VM: its restore points (``latest`` is what a run builds on) and libvirt's
        checkpoints of it."""
        req = PlanRunRequest(
            pipeline_db_id=pipeline_db_id, options=RunOptions(execution_mode=execution_mode)
        )
        return _out(await paged_source_refs(gw, req))

    @post("/{pipeline_db_id:str}/eligible-agents", status_code=200, responses=responses(404))
    async def eligible_agents(
        self, gw: Gateway, pipeline_db_id: PipelineId, data: RunBody | None = None
    ) -> dict[str, Any]:
        """The agents that can run the plan (live transfer workers, remote agents)."""
        req = PlanRunRequest(pipeline_db_id=pipeline_db_id, options=_options(data))
        return await eligible_view(
            gw, await gw.bus.request(PlanCmd.ELIGIBLE_AGENTS, req, EligibleAgents)
        )

    @get("/{pipeline_db_id:str}/version-resolve", responses=responses(400, 404))
    async def version_resolve(
        self,
        gw: Gateway,
        pipeline_db_id: PipelineId,
        execution_mode: ExecutionMode = "online",
        source_ref: Annotated[str | None, Parameter(max_length=64)] = None,
    ) -> ServerSentEvent:
        """SSE: ``resolve.start`` (the VMs), per VM its disks (``resolve.disk``) and its
        result (``resolve.vm``; ``resolve.error`` when it cannot be resolved), then
        ``resolve.done`` with the total bytes the run would read."""
        options = RunOptions(execution_mode=execution_mode, source_ref=source_ref)
        return await _preview_sse(gw, pipeline_db_id, options)


class PipelineChainsController(Controller):
    path = "/api/v1/pipeline-chains"

    @post("/{chain_db_id:str}/run", status_code=200, responses=responses(400, 404, 409))
    async def run(
        self, gw: Gateway, chain_db_id: ChainId, data: RunBody | None = None
    ) -> dict[str, Any]:
        """Run the chain: its backup step's jobs now, the next steps as each one succeeds
        (``GET /api/v1/plan-runs/{run_id}`` shows the steps and their jobs)."""
        req = PlanRunRequest(chain_db_id=chain_db_id, options=await _checked(gw, data))
        return await _run(gw, req)

    @post("/{chain_db_id:str}/dry-run-preview", status_code=200, responses=responses(400, 404))
    async def dry_run_preview(
        self, gw: Gateway, chain_db_id: ChainId, data: RunBody | None = None
    ) -> dict[str, Any]:
        """The preview of the chain's backup step (as a plan's)."""
        req = PlanRunRequest(chain_db_id=chain_db_id, options=await _checked(gw, data))
        return _out(await paged_preview(gw, req))

    @get("/{chain_db_id:str}/source-refs", responses=responses(400, 404))
    async def source_refs(
        self, gw: Gateway, chain_db_id: ChainId, execution_mode: ExecutionMode = "online"
    ) -> dict[str, Any]:
        """The source refs of the chain's backup step (as a plan's)."""
        req = PlanRunRequest(
            chain_db_id=chain_db_id, options=RunOptions(execution_mode=execution_mode)
        )
        return _out(await paged_source_refs(gw, req))

    @post("/{chain_db_id:str}/eligible-agents", status_code=200, responses=responses(404))
    async def eligible_agents(
        self, gw: Gateway, chain_db_id: ChainId, data: RunBody | None = None
    ) -> dict[str, Any]:
        """The agents that can run the chain."""
        req = PlanRunRequest(chain_db_id=chain_db_id, options=_options(data))
        return await eligible_view(
            gw, await gw.bus.request(PlanCmd.ELIGIBLE_AGENTS, req, EligibleAgents)
        )


class PlanRunsController(Controller):
    path = "/api/v1/plan-runs"

    @get("/{run_id:str}", responses=responses(404))
    async def get_run(self, gw: Gateway, run_id: str) -> dict[str, Any]:
        """A plan or chain run: its state and each step's state and jobs."""
        return _out(await gw.bus.request(PlanCmd.RUN_GET, PlanRunRef(id=run_id), PlanRun))


PLAN_CONTROLLERS = [
    ProjectsController,
    PipelinesController,
    PipelineChainsController,
    PlanRunsController,
]
