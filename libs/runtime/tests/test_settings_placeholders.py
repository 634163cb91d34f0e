"""A secret left at deploy/k8s/config.yaml's ``change-me`` placeholder stops the service
at start, naming it (before: a forgotten token or NATS password ran as it was, and anyone
who read this repository had it)."""

from __future__ import annotations

import pydantic
import pytest

from virtbackup.runtime.settings import load_settings


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("VIRTBACKUP_TOKEN", "token"),
        ("VIRTBACKUP_NATS_PASSWORD", "nats_password"),
        ("VIRTBACKUP_SECRET_KEY", "secret_key"),
        ("VIRTBACKUP_VAULT_KEY", "vault_key"),
    ],
)
def test_a_placeholder_secret_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, field: str
) -> None:
    monkeypatch.setenv(variable, "change-me-gateway")
    with pytest.raises(pydantic.ValidationError) as refused:
        load_settings()
    assert refused.value.errors()[0]["loc"] == (field,)
    assert "change-me placeholder" in str(refused.value)
    monkeypatch.setenv(variable, "Zk3q9Xw0rTt1uV2y")
    assert load_settings() is not None
