"""Retention policies in the configuration document: a mistyped value is a 400 that
says what is wrong with which field, not that the (well-formed) JSON is malformed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, api_client, local_config


@pytest.fixture(scope="module")
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(system) as client:
        yield client


def with_retention(repo: Path, **fields: Any) -> dict[str, Any]:
    cfg = local_config(repo)
    cfg["destinations"][0].update(fields)
    return cfg


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"retention": {"keepLast": "3"}}, "$.destinations[0].retention.keepLast"),
        ({"retention": {"keepDaily": 1.5}}, "$.destinations[0].retention.keepDaily"),
        ({"retention": {"keepAll": "false"}}, "$.destinations[0].retention.keepAll"),
        # The VM the policy is for is named (msgspec says only `vmRetention[...]`).
        (
            {"vmRetention": {"web1": {"keepLast": 2}, "db ☃": {"keepLast": "3"}}},
            '$.destinations[0].vmRetention["db ☃"].keepLast',
        ),
    ],
)
async def test_a_mistyped_keep_value_is_not_called_malformed_json(
    api: httpx.AsyncClient, repo_dir: Path, fields: dict[str, Any], where: str
) -> None:
    resp = await api.post("/config", json=with_retention(repo_dir, **fields))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert where in error, error
    assert "Expected" in error and "malformed JSON" not in error, error
