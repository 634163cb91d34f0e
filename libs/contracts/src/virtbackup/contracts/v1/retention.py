"""The keep rules of a retention policy, in one struct: the configuration's policies
(``contracts.v1.config.RetentionPolicy``), the prune command
(``contracts.v1.points.PruneRequest``), the prune HTTP body and the prune itself
(``virtbackup.repository.retention``) all use :class:`KeepRules`, so a rule is added,
limited or named in one place.

The rules are Proxmox Backup Server's: ``keepLast``, ``keepHourly``, ``keepDaily``,
``keepWeekly``, ``keepMonthly``, ``keepYearly``, each a count (an integer from 0 to
1,000,000; absent: the rule is not used), run in that order. ``keepAll``: ``true`` keeps
every point (no rule may be given with it), ``false`` acknowledges a policy that keeps
nothing. Classes that take the rules inherit them, so on the wire they stay top-level
fields (``{"keepLast": 3, "vmName": ...}``) and a bad value is a validation error naming
the field (``Expected `int` >= 0 - at `$.keepLast```).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

#: A retention rule's count: how many buckets (points, hours, days, ...) it keeps.
KeepCount = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
#: A rule by its wire name.
Rule = Literal["keepLast", "keepHourly", "keepDaily", "keepWeekly", "keepMonthly", "keepYearly"]
#: The keep rules of a policy, in the order a prune runs them (PBS's).
KEEP_RULES: Final[tuple[Rule, ...]] = (
    "keepLast", "keepHourly", "keepDaily", "keepWeekly", "keepMonthly", "keepYearly",
)  # fmt: skip


class KeepRules(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """Counts per rule (``None``: the rule is not used) and ``keep_all`` (see the
    module docstring). Subclasses add their own base (strict config, bus message, HTTP
    body) and fields."""

    keep_last: KeepCount | None = None
    keep_hourly: KeepCount | None = None
    keep_daily: KeepCount | None = None
    keep_weekly: KeepCount | None = None
    keep_monthly: KeepCount | None = None
    keep_yearly: KeepCount | None = None
    keep_all: bool | None = None

    def counts(self) -> dict[Rule, int | None]:
        """The rules by their wire name, in the order they run; ``None`` when unused."""
        return {
            "keepLast": self.keep_last,
            "keepHourly": self.keep_hourly,
            "keepDaily": self.keep_daily,
            "keepWeekly": self.keep_weekly,
            "keepMonthly": self.keep_monthly,
            "keepYearly": self.keep_yearly,
        }

    def count(self, rule: Rule) -> int | None:
        """One rule's count (``None``: unused)."""
        return self.counts()[rule]

    def keeps_something(self) -> bool:
        """Whether any rule keeps at least one point (PBS's ``keeps_something``)."""
        return any((count or 0) > 0 for count in self.counts().values())

    def given(self) -> bool:
        """Whether any rule or ``keep_all`` is set (else the configured policy applies)."""
        return self.keep_all is not None or any(c is not None for c in self.counts().values())

    def rules(self) -> KeepRules:
        """Just the rules (and ``keep_all``), without a subclass's other fields."""
        return KeepRules(
            keep_last=self.keep_last,
            keep_hourly=self.keep_hourly,
            keep_daily=self.keep_daily,
            keep_weekly=self.keep_weekly,
            keep_monthly=self.keep_monthly,
            keep_yearly=self.keep_yearly,
            keep_all=self.keep_all,
        )

    def wire(self) -> dict[str, int | bool | None]:
        """The rules and ``keepAll`` that are set, by wire name (as a plan shows them)."""
        out: dict[str, int | bool | None] = {
            k: v for k, v in self.counts().items() if v is not None
        }
        if self.keep_all is not None:
            out["keepAll"] = self.keep_all
        return out

    def problem(self) -> tuple[str, str] | None:
        """What makes this set of rules unusable, as ``(message, field)`` (the field
        relative to the policy: ``keepAll`` or empty for the policy itself), or ``None``:
        ``keepAll: true`` together with a rule, or a set that keeps nothing without
        ``keepAll: false``."""
        if self.keep_all is True:
            given = [name for name, count in self.counts().items() if count is not None]
            if given:
                return (
                    f"keepAll: true keeps every point; it cannot be combined with {given[0]}",
                    "keepAll",
                )
            return None
        if not self.keeps_something() and self.keep_all is not False:
            return (
                "this retention policy keeps nothing (a prune would remove every point that "
                "is not protected): give at least one keep rule above 0 ("
                + ", ".join(KEEP_RULES)
                + "), or acknowledge with keepAll: false",
                "",
            )
        return None
