"""A plan's dry-run preview however many VMs it names: read from the job-orchestrator a
page at a time, so that no reply outgrows one bus message.

One ``vb.cmd.plan.targets`` request resolves the plan's VMs (refusals, 400 or 404, come
from it before anything else), then ``vb.cmd.plan.preview`` is asked for ``PREVIEW_PAGE``
of them at a time (``options.vms``: the orchestrator resolves only those VMs' servers),
``PAGES_IN_FLIGHT`` pages at once, and the pages are put together in the targets' order
into one ``Preview``, as the orchestrator would have answered it whole. A plan of 10,000
VMs is a reply of some megabytes over HTTP, and pages of about 50 KB on the bus.
"""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec

from virtbackup.contracts.subjects import PlanCmd
from virtbackup.contracts.v1.plans import PlanRunRequest, PlanTargets, Preview, PreviewVm
from virtbackup.gateway.state import Gateway

#: VMs previewed per bus request: a VM's preview is a few hundred bytes (a kilobyte or
#: two with many disks), so a page stays far below NATS's default 1 MiB ``max_payload``.
PREVIEW_PAGE: Final = 100
#: Pages asked at once: the orchestrator's inventory requests stay bounded too.
PAGES_IN_FLIGHT: Final = 4
#: Seconds to wait for one page or the targets (each asks the inventory about its
#: servers; the targets about every server of the plan).
PAGE_TIMEOUT: Final = 120.0


async def paged_preview(gw: Gateway, req: PlanRunRequest) -> Preview:
    """The preview of ``req``'s plan or chain (``Preview``: every VM, in ``<server>/<vm>``
    order, and the total ``estimated_bytes``, ``None`` when a VM's is unknown). Raises
    what the orchestrator answers: ``NotFound`` for an unknown plan, ``BadRequest``
    naming the field, ``Unavailable`` when it or the inventory does not answer."""
    found = await gw.bus.request(PlanCmd.TARGETS, req, PlanTargets, timeout=PAGE_TIMEOUT)
    names = found.vms
    pages = [names[i : i + PREVIEW_PAGE] for i in range(0, len(names), PREVIEW_PAGE)]
    gate = asyncio.Semaphore(PAGES_IN_FLIGHT)

    async def page(vms: list[str]) -> list[PreviewVm]:
        one = PlanRunRequest(
            pipeline_db_id=req.pipeline_db_id,
            chain_db_id=req.chain_db_id,
            options=msgspec.structs.replace(req.options, vms=vms),
        )
        async with gate:
            return (await gw.bus.request(PlanCmd.PREVIEW, one, Preview, timeout=PAGE_TIMEOUT)).vms

    vms = [vm for got in await asyncio.gather(*(page(p) for p in pages)) for vm in got]
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
