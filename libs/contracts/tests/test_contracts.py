"""Contracts: subject construction and strict config decoding (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from virtbackup.contracts import subjects
from virtbackup.contracts.v1.common import Fault, Reply
from virtbackup.contracts.v1.config import ConfigError, decode_config
from virtbackup.contracts.v1.jobs import Job


def test_event_subjects_are_broad_to_narrow() -> None:
    assert subjects.event("vm.lifecycle", "vm1") == "vb.evt.vm.lifecycle.vm1"
    assert subjects.event_type_of("vb.evt.vm.lifecycle.vm1") == "vm.lifecycle"
    assert subjects.command("job", "get") == "vb.cmd.job.get"
    assert subjects.ping("transfer-worker") == "vb.cmd.transfer-worker.ping"


@pytest.mark.parametrize("bad", ["vm", "a.b.c", "vm.", "vm.life cycle", "vm.*"])
def test_bad_event_types_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"event type|invalid subject token"):
        subjects.event(bad)


def test_keys_cannot_widen_a_subject() -> None:
    with pytest.raises(ValueError, match="invalid subject token"):
        subjects.event("vm.lifecycle", "a.>")


def test_reply_envelope_round_trip() -> None:
    raw = msgspec.json.encode(Reply[Job](error=Fault(code="not_found", message="gone")))
    assert raw == b'{"error":{"code":"not_found","message":"gone"}}'
    decoded = msgspec.json.decode(raw, type=Reply[Job])
    assert decoded.result is None
    assert decoded.error == Fault(code="not_found", message="gone")


def test_config_defaults_and_wire_names() -> None:
    cfg = decode_config(b"{}")
    wire = msgspec.json.decode(msgspec.json.encode(cfg))
    assert wire["hashblocksLimitBufferMb"] == 1024
    assert wire["backup"]["base_path"] == ""
    assert wire["backup"]["sftp"]["basePath"] == "/"


def test_config_errors_name_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.servers\[0\]\.port"):
        decode_config(b'{"servers":[{"id":"a","port":"22"}]}')
    with pytest.raises(ConfigError, match=r"\$\.destinations\[0\]\.params\.path"):
        decode_config(b'{"destinations":[{"id":"d","driverId":"filesystem","params":{"path":1}}]}')
    with pytest.raises(ConfigError, match="duplicate destination id"):
        decode_config(
            b'{"destinations":[{"id":"d","driverId":"dummy"},{"id":"d","driverId":"dummy"}]}'
        )


def test_yaml_mappings_are_strict_too() -> None:
    with pytest.raises(msgspec.ValidationError, match="Expected `bool`"):
        decode_config({"listenAll": "yes"})
