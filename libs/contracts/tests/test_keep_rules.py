"""The keep rules are one struct: the configuration's policy and the prune command take
the same fields, limits and checks, and their errors name the field."""

from __future__ import annotations

import msgspec
import pytest

from virtbackup.contracts.v1.config import ConfigError, RetentionPolicy, check_retention
from virtbackup.contracts.v1.points import PruneRequest
from virtbackup.contracts.v1.retention import KEEP_RULES, KeepRules


@pytest.mark.parametrize("kind", [RetentionPolicy, PruneRequest])
def test_every_user_of_keep_rules_shares_the_struct(kind: type[KeepRules]) -> None:
    assert issubclass(kind, KeepRules)
    fields = {f.encode_name for f in msgspec.structs.fields(kind)}
    assert set(KEEP_RULES) | {"keepAll"} <= fields


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"keepLast": -1}', "$.keepLast"),
        (b'{"keepDaily": 1.5}', "$.keepDaily"),
        (b'{"keepYearly": 1000001}', "$.keepYearly"),
        (b'{"keepAll": "no"}', "$.keepAll"),
    ],
)
def test_bad_counts_name_the_field_everywhere(body: bytes, field: str) -> None:
    for kind in (RetentionPolicy, PruneRequest):
        payload = body if kind is RetentionPolicy else body[:-1] + b', "destinationId": "d"}'
        with pytest.raises(msgspec.ValidationError, match=rf"at `{field.replace('$', '[$]')}`"):
            msgspec.json.decode(payload, type=kind)


def test_a_policy_that_keeps_nothing_is_refused_naming_where() -> None:
    with pytest.raises(ConfigError, match=r"keeps nothing.*at `\$.destinations\[0\].retention`"):
        check_retention(RetentionPolicy(keep_last=0), "$.destinations[0].retention")
    with pytest.raises(ConfigError, match=r"cannot be combined with keepDaily - at `\$.keepAll`"):
        check_retention(PruneRequest(destination_id="d", keep_daily=1, keep_all=True), "$")
    check_retention(RetentionPolicy(keep_last=0, keep_all=False), "$")
    rules = PruneRequest(destination_id="d", keep_daily=7, dry_run=True)
    assert rules.given() and rules.rules() == KeepRules(keep_daily=7)
    assert rules.wire() == {"keepDaily": 7}
    assert not PruneRequest(destination_id="d").given()
