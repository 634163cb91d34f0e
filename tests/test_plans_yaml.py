"""Project YAML is read strictly: each refusal is a 400 naming its line and field."""

from __future__ import annotations

import pytest

from virtbackup.contracts.v1.plans import BackupStep, VerifyStep
from virtbackup.gateway.plans_yaml import parse_project
from virtbackup.runtime.errors import BadRequest

GOOD = """\
id: nightly
name: Nightly
pipelines:
  - id: web
    vms:
      - server: local
        vm: "web-*"
    destination: fs
    schedule:
      cron: "0 2 * * *"
    retention:
      keepLast: 3
chains:
  - id: c1
    steps:
      - type: backup
        pipeline: web
      - type: verify
        mode: sample
        samplePercent: 10
"""


def test_a_good_project_parses_with_the_line_of_every_field() -> None:
    spec, lines = parse_project(GOOD)
    assert spec.id == "nightly"
    assert spec.pipelines[0].vms[0].vm == "web-*"
    assert spec.pipelines[0].retention is not None
    assert spec.pipelines[0].retention.keep_last == 3
    steps = spec.chains[0].steps
    assert isinstance(steps[0], BackupStep) and isinstance(steps[1], VerifyStep)
    assert steps[1].sample_percent == 10
    assert lines["$.pipelines[0].destination"] == 8
    assert lines["$.chains[0].steps[1]"] == 18


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    [
        (
            "unknown key",
            GOOD.replace("    destination: fs", "    destination: fs\n    destinaton: x"),
            "line 9: unknown key 'destinaton' - at `$.pipelines[0].destinaton`",
        ),
        ("tab", GOOD.replace("  - id: web", "\t- id: web"), "line 4: a tab character"),
        (
            "duplicate key",
            GOOD.replace("    destination: fs", "    destination: fs\n    destination: y"),
            "line 9: the key 'destination' is given twice - at `$.pipelines[0].destination`",
        ),
        (
            "string for an integer",
            GOOD.replace("keepLast: 3", "keepLast: '3'"),
            "line 12: Expected `int | null`, got `str` - at `$.pipelines[0].retention.keepLast`",
        ),
        (
            "integer for a string",
            GOOD.replace('vm: "web-*"', "vm: 5"),
            "line 7: Expected `str`, got `int` - at `$.pipelines[0].vms[0].vm`",
        ),
        (
            "unknown step type",
            GOOD.replace("type: verify", "type: verfy"),
            "line 18: Invalid value 'verfy' - at `$.chains[0].steps[1].type`",
        ),
        (
            "alias",
            GOOD.replace('vm: "web-*"', 'vm: &a "x"\n      - server: *a\n        vm: y'),
            "line 8: aliases (*name) are not allowed",
        ),
        (
            "alias in a list, a line below its anchor",
            GOOD.replace("keepLast: 3", "keepLast: &n 3\n      keepDaily: [*n]"),
            "line 13: aliases (*name) are not allowed - at `$.pipelines[0].retention.keepDaily[0]`",
        ),
        ("syntax", GOOD.replace("name: Nightly", "name: [Nightly"), "line 3: not valid YAML"),
        (
            "missing field",
            GOOD.replace("    destination: fs\n", ""),
            "line 4: Object missing required field `destination` - at `$.pipelines[0]`",
        ),
        ("not a mapping", "- a\n- b\n", "line 1: the top level must be a mapping"),
        ("empty", "", "line 1: the project is empty"),
    ],
)
def test_bad_yaml_is_refused_naming_the_line(case: str, text: str, expected: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_project(text)
    assert expected in refused.value.message, case
