"""A plan's dry-run preview however many VMs it names: read from the job-orchestrator a
page at a time, so that no reply outgrows one bus message.

One ``vb.cmd.plan.targets`` request resolves the plan's VMs (refusals, 400 or 404, come
from it before anything else), then ``vb.cmd.plan.preview`` is asked for ``PREVIEW_PAGE``
of them at a time (``options.vms``: the orchestrator resolves only those VMs' servers),
``PAGES_IN_FLIGHT`` pages at once, and the pages are put together in the targets' order
into one ``Preview``, as the orchestrator would have answered it whole; the source refs
(``vb.cmd.plan.source-refs``) are read the same way. A plan of 10,000
VMs is a reply of some megabytes over HTTP, and pages of about 70 KB on the bus.
"""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec

from virtbackup.contracts.subjects import PlanCmd
from virtbackup.contracts.v1.plans import (
    PlanRunRequest,
    PlanTargets,
    Preview,
    PreviewVm,
    SourceRefs,
    VmSourceRefs,
)
from virtbackup.gateway.state import Gateway

#: VMs previewed per bus request: a VM's preview is a few hundred bytes (about 3 KB with
#: 20 disks and three destinations), so a page stays below NATS's default 1 MiB
#: ``max_payload``; fewer pages cost fewer round trips (each resolves its servers again).
PREVIEW_PAGE: Final = 200
#: Pages asked at once: the orchestrator's inventory requests stay bounded too.
PAGES_IN_FLIGHT: Final = 4
#: Seconds to wait for one page or the targets (each asks the inventory about its
#: servers; the targets about every server of the plan).
PAGE_TIMEOUT: Final = 120.0


async def _targets_in_pages(gw: Gateway, req: PlanRunRequest) -> list[PlanRunRequest]:
    """``req`` once per page of the VMs its plan matches now (``vb.cmd.plan.targets``:
    its refusals, 400 or 404, are raised here)."""
    found = await gw.bus.request(PlanCmd.TARGETS, req, PlanTargets, timeout=PAGE_TIMEOUT)
    names = found.vms
    return [
        PlanRunRequest(
            pipeline_db_id=req.pipeline_db_id,
            chain_db_id=req.chain_db_id,
            options=msgspec.structs.replace(req.options, vms=names[i : i + PREVIEW_PAGE]),
        )
        for i in range(0, len(names), PREVIEW_PAGE)
    ]


async def paged_preview(gw: Gateway, req: PlanRunRequest) -> Preview:
    """The preview of ``req``'s plan or chain (``Preview``: every VM, in ``<server>/<vm>``
    order, and the total ``estimated_bytes``, ``None`` when a VM's is unknown). Raises
    what the orchestrator answers: ``NotFound`` for an unknown plan, ``BadRequest``
    naming the field, ``Unavailable`` when it or the inventory does not answer."""
    gate = asyncio.Semaphore(PAGES_IN_FLIGHT)

    async def page(one: PlanRunRequest) -> list[PreviewVm]:
        async with gate:
            return (await gw.bus.request(PlanCmd.PREVIEW, one, Preview, timeout=PAGE_TIMEOUT)).vms

    pages = await _targets_in_pages(gw, req)
    vms = [vm for got in await asyncio.gather(*map(page, pages)) for vm in got]
    total: int | None = None
    if all(vm.estimated_bytes is not None for vm in vms):
        total = sum(vm.estimated_bytes or 0 for vm in vms)
    return Preview(
        pipeline_db_id=req.pipeline_db_id,
        chain_db_id=req.chain_db_id,
        execution_mode=req.options.execution_mode,
        vms=vms,
        estimated_bytes=total,
    )


async def paged_source_refs(gw: Gateway, req: PlanRunRequest) -> SourceRefs:
    """``vb.cmd.plan.source-refs`` of every VM of ``req``'s plan or chain, in
    ``<server>/<vm>`` order, read a page at a time as ``paged_preview`` reads a preview
    (the same errors)."""
    gate = asyncio.Semaphore(PAGES_IN_FLIGHT)

    async def page(one: PlanRunRequest) -> list[VmSourceRefs]:
        async with gate:
            return (
                await gw.bus.request(PlanCmd.SOURCE_REFS, one, SourceRefs, timeout=PAGE_TIMEOUT)
            ).vms

    pages = await _targets_in_pages(gw, req)
    return SourceRefs(vms=[vm for got in await asyncio.gather(*map(page, pages)) for vm in got])
