"""Which restore points a retention policy keeps: Proxmox Backup Server's prune rules.

The selection is PBS's (its documented prune simulator, ``pbs-datastore/src/prune.rs``),
applied to the points of one VM:

1. The points are taken newest first.
2. ``keepLast`` runs first, then ``keepHourly``, ``keepDaily``, ``keepWeekly``,
   ``keepMonthly``, ``keepYearly``, each over the whole list in that order.
3. A rule with count ``n`` gives every point a *bucket* (``keepLast``: the point itself;
   ``keepDaily``: its day; ...). Going newest first, it skips points an earlier rule
   already marked (kept or removed) and points whose bucket a point kept by an earlier
   rule already covers; the first point of each new bucket is kept, until ``n`` buckets
   have been taken (then the rule stops); later points of a taken bucket are marked
   removed.
4. A protected point is always kept, and never counts: it takes no bucket and does not
   cover one.
5. Every point no rule kept is removed.

Buckets are taken in **UTC** (restore point timestamps are UTC, and a policy must not
change its meaning with the time zone of the host that runs the prune; PBS uses the
server's local time). ``keepHourly`` buckets by ``YYYY/MM/DD/HH``, ``keepDaily`` by
``YYYY/MM/DD``, ``keepMonthly`` by ``YYYY/MM``, ``keepYearly`` by ``YYYY``;
``keepWeekly`` by the **ISO 8601 week** (``%G/%V``: weeks start on Monday, week 1 is the
week with the year's first Thursday, and the week's year is the ISO year, which for the
days around New Year may differ from the calendar year: 2024-12-30 is in week 2025/01).

An absent rule (``None``) is not run; a rule of ``0`` runs and keeps nothing, as in PBS.
A policy whose rules keep nothing removes every point that is not protected: callers
refuse such a policy unless it is acknowledged (``keepAll: false``, see the config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from virtbackup.contracts.v1.retention import KEEP_RULES, KeepRules, Rule

#: The rules in the order they run (``contracts.v1.retention.KEEP_RULES``).
RULES: Final[tuple[Rule, ...]] = KEEP_RULES
#: Why a point is kept: the rule that kept it, or ``protected``.
Reason = Rule | Literal["protected"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One restore point of a VM: ``key`` identifies it to the caller, ``timestamp`` is
    the repository's form (``2026-01-30T12-00-00``, UTC, optionally ``.ffffff``)."""

    key: str
    timestamp: str
    protected: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy does with one point: ``keep`` and, if kept, ``reason``."""

    candidate: Candidate
    keep: bool
    reason: Reason | None


def parse_timestamp(timestamp: str) -> datetime:
    """A repository timestamp as an aware UTC datetime. ``ValueError`` if malformed."""
    base, _, fraction = timestamp.partition(".")
    moment = datetime.strptime(base, "%Y-%m-%dT%H-%M-%S").replace(tzinfo=UTC)
    if fraction:
        moment = moment.replace(microsecond=int(fraction.ljust(6, "0")[:6]))
    return moment


def _bucket(rule: Rule) -> Callable[[Candidate], str]:
    if rule == "keepLast":
        return lambda c: c.timestamp
    pattern = {
        "keepHourly": "%Y/%m/%d/%H",
        "keepDaily": "%Y/%m/%d",
        "keepWeekly": "%G/%V",
        "keepMonthly": "%Y/%m",
        "keepYearly": "%Y",
    }[rule]
    return lambda c: parse_timestamp(c.timestamp).strftime(pattern)


def select(points: Sequence[Candidate], keep: KeepRules) -> list[Decision]:
    """Decide for every point of one VM by ``keep``'s counts (``keep_all`` is the
    caller's: it is not looked at; rules in the module docstring); the decisions come
    newest first. ``ValueError`` for a malformed timestamp."""
    ordered = sorted(points, key=lambda c: parse_timestamp(c.timestamp), reverse=True)
    marks: dict[str, tuple[bool, Reason | None]] = {}
    for rule in RULES:
        count = keep.count(rule)
        if count is None:
            continue
        bucket = _bucket(rule)
        # Buckets a point kept by an earlier rule covers (a protected point covers none).
        covered = {
            bucket(c)
            for c in ordered
            if (mark := marks.get(c.key)) is not None and mark[0] and mark[1] != "protected"
        }
        taken: set[str] = set()
        for c in ordered:
            if c.key in marks:
                continue
            if c.protected:
                marks[c.key] = (True, "protected")
                continue
            b = bucket(c)
            if b in covered:
                continue
            if b not in taken:
                if len(taken) >= count:
                    break
                taken.add(b)
                marks[c.key] = (True, rule)
            else:
                marks[c.key] = (False, None)
    decisions = []
    for c in ordered:
        if c.protected:
            decisions.append(Decision(c, True, "protected"))
            continue
        kept, reason = marks.get(c.key, (False, None))
        decisions.append(Decision(c, kept, reason if kept else None))
    return decisions
