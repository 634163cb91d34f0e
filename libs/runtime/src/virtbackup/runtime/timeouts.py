"""How long a caller waits for a command's answer, in seconds: one home for each kind.

A command that is not answered in time is ``Unavailable`` to the caller (see ``bus``).
"""

from __future__ import annotations

from typing import Final

#: Inventory reads and quick actions (VM lists, VM info, precheck, SSH test, power actions):
#: bounded by one server's connect timeout plus libvirt's answer.
INVENTORY_QUERY: Final = 30.0
#: Inventory steps of a job that touch disks (begin or end a libvirt backup, create or
#: move restore images, define a domain): creating a large sparse image can take minutes.
INVENTORY_JOB_STEP: Final = 300.0
#: Orchestrator commands answered after asking inventory or reading a destination (submit
#: a backup, restore or sanity check; restore precheck; restore entries): longer than an
#: inventory query, so that the caller hears the orchestrator's answer, not a timeout.
JOB_COMMAND: Final = 60.0
