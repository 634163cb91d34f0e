"""Contracts: subject construction and strict config decoding (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from virtbackup.contracts import subjects
from virtbackup.contracts.v1.common import Fault, Reply
from virtbackup.contracts.v1.config import (
    ConfigError,
    check_libvirt_uri,
    decode_config,
    host_key_fingerprint,
    is_simulated_uri,
)
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


def _server(**fields: object) -> bytes:
    return msgspec.json.encode({"servers": [{"id": "s", **fields}]})


def _destination(driver: str, **params: object) -> bytes:
    dest = {"id": "d", "driverId": driver, "params": params}
    return msgspec.json.encode({"destinations": [dest]})


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("qemu+ext:///system?command=/tmp/evil.sh", "not accepted ('command')"),
        ("qemu+ssh://root@h/system?netcat=/tmp/nc", "not accepted ('netcat')"),
        ("qemu+tls://h/system?pkipath=/tmp/pki", "not accepted ('pkipath')"),
        ("qemu+tls://h/system?no_verify=1", "not accepted ('no_verify')"),
        ("qemu:///system?socket=/tmp/sock", "not accepted ('socket')"),
        ("qemu+unix:///system", "transport 'qemu+unix' is not supported"),
        ("qemu+ssh://root@h/system", "transport 'qemu+ssh' is not supported"),
        ("qemu+tcp://h/system", "transport 'qemu+tcp' is not supported"),
        ("test+tls://h/default", "transport 'test+tls' is not supported"),
        ("test://h/default", "a simulated server is local"),
        ("test:///etc/passwd", "test driver XML file"),
        ("test:///srv/../etc/x.xml", "no '..'"),
        ("test:///default?x=1", "not accepted ('x')"),
        ("qemu://h/system", "qemu:///system or qemu:///session"),
        ("qemu+tls:///system", "needs a host"),
        ("qemu+tls://h/other", "/system or /session"),
        ("qemu:///system\x00", "Expected `str` matching regex"),
    ],
)
def test_a_libvirt_uri_that_could_run_a_program_is_refused(uri: str, why: str) -> None:
    with pytest.raises((ConfigError, msgspec.ValidationError), match=r"\$\.servers\[0\]\.uri"):
        decode_config(_server(uri=uri))
    with pytest.raises((ConfigError, msgspec.ValidationError)) as info:
        decode_config(_server(uri=uri))
    assert why in str(info.value)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "qemu:///system",
        "qemu:///session",
        "qemu+tls://h:16514/system",
        "test:///default",
        "test:///var/tmp/fleet/server-1.xml",
    ],
)
def test_supported_libvirt_uris_are_accepted(uri: str) -> None:
    assert decode_config(_server(uri=uri)).servers[0].uri == uri


@pytest.mark.parametrize("uri", ["", "qemu:///system", "qemu:///session"])
def test_a_server_over_ssh_names_its_system_or_session_daemon(uri: str) -> None:
    server = decode_config(_server(host="h", privateKey="k", uri=uri)).servers[0]
    assert (server.host, server.uri) == ("h", uri)


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("qemu:///embed", "qemu:///system or qemu:///session"),
        ("qemu+ssh://h/session", "not supported"),
        ("qemu:///session?socket=/tmp/s", "not accepted ('socket')"),
    ],
)
def test_a_server_over_ssh_takes_no_other_uri(uri: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"\$\.servers\[0\]\.uri") as info:
        decode_config(_server(host="h", privateKey="k", uri=uri))
    assert why in str(info.value)


def test_a_simulated_server_has_no_host() -> None:
    with pytest.raises(ConfigError, match=r"\$\.servers\[0\]\.host") as info:
        decode_config(_server(host="h", privateKey="k", uri="test:///default"))
    assert "simulated server" in str(info.value)
    assert is_simulated_uri("test:///default") and not is_simulated_uri("qemu:///system")


def test_a_session_server_over_ssh_needs_a_login() -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]\.password"):
        decode_config(_server(host="h", uri="qemu:///session"))


def test_check_libvirt_uri_is_usable_alone() -> None:
    assert check_libvirt_uri("qemu:///system") is None
    problem = check_libvirt_uri("qemu+ext:///system?command=/bin/sh")
    assert problem is not None and "command" in problem


BAD_FIELDS: list[tuple[bytes, str, str]] = [
    (_destination("filesystem", path="/"), "destinations[0].params.path", "system directory"),
    (_destination("filesystem", path="/etc"), "destinations[0].params.path", "system directory"),
    (_destination("filesystem", path="//etc/x"), "destinations[0].params.path", "system dir"),
    (_destination("filesystem", path="/usr/../proc"), "destinations[0].params.path", "system"),
    (_destination("filesystem", path="backups"), "destinations[0].params.path", "absolute"),
    (_destination("filesystem", path="./b"), "destinations[0].params.path", "absolute"),
    (_destination("filesystem", path="/b\x00x"), "destinations[0].params.path", "regex"),
    (_destination("s3", endpoint="e:9000", bucket="bkt", prefix=".."), "params.prefix", "'..'"),
    (_destination("s3", endpoint="e:9000", bucket="bkt", prefix="a/../b"), "params.prefix", ".."),
    (_destination("s3", endpoint="e:9000", bucket="bkt", prefix="a//b"), "params.prefix", "empty"),
    (_destination("s3", endpoint="e\n:9000", bucket="bkt"), "params.endpoint", "regex"),
    (_destination("sftp", host="h", username="u"), "params.password", "password or a privateKey"),
    (_destination("sftp", host="h", username="u\x00x", password="p"), "params.username", "regex"),
    (_destination("sftp", host="-oProxyCommand=x", username="u", password="p"), "params.host", ""),
    (_destination("sftp", host="h", username="u", password="p", basePath="/a\x00"), "basePath", ""),
    (
        _destination("sftp", host="h", username="u", password="p", hostKey="ssh-ed25519 nope"),
        "params.hostKey",
        "OpenSSH public key",
    ),
    (_server(host="h\x00"), "servers[0].host", "regex"),
    (_server(host="h", username="r\x07", password="p"), "servers[0].username", "regex"),
    (_server(host="h", username="root"), "servers[0].password", "password or a privateKey"),
    (_server(host="h", password="p", uri="qemu:///embed"), "servers[0].uri", "qemu:///session"),
    (_server(name="a\x00b"), "servers[0].name", "regex"),
    (
        msgspec.json.encode({"backup": {"gdrive": {"expiresAt": int("9" * 400)}}}),
        "backup.gdrive.expiresAt",
        "",
    ),
    (
        msgspec.json.encode({"backup": {"gdrive": {"expiresAt": "9" * 400}}}),
        "backup.gdrive.expiresAt",
        "length",
    ),
]


@pytest.mark.parametrize(("body", "field", "why"), BAD_FIELDS)
def test_configuration_that_can_only_hurt_is_refused_naming_the_field(
    body: bytes, field: str, why: str
) -> None:
    with pytest.raises((ConfigError, msgspec.ValidationError)) as info:
        decode_config(body)
    assert f"{field}`" in str(info.value)
    assert why in str(info.value)


def test_sensible_destinations_are_accepted() -> None:
    for body in (
        _destination("filesystem", path="/var/backups/vb"),
        _destination("filesystem", path="/mnt/usb"),
        _destination("s3", endpoint="s3.example.com:9000", bucket="bkt", prefix="site1/vm"),
        _destination("sftp", host="::1", username="u", privateKey="k", basePath="Backup"),
    ):
        decode_config(body)


def test_host_key_fingerprints() -> None:
    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBQyk9pm0cmVUuKRoqe/44ytZcRL+wypJ8hHV1GkLTlw"
    fingerprint = host_key_fingerprint(line)
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 50
    assert host_key_fingerprint(f"[h]:2222 {line} comment") == fingerprint
    assert host_key_fingerprint(fingerprint) == fingerprint
    with pytest.raises(ValueError, match="SHA256 fingerprint"):
        host_key_fingerprint("SHA256:short")


def test_a_stored_config_that_breaks_a_newer_rule_still_loads() -> None:
    from virtbackup.contracts.v1.config import ConfigError, decode_config, decode_stored_config

    raw = (
        b'{"servers": [{"id": "s1", "name": "old", "host": "",'
        b' "uri": "qemu+ext:///system?command=/tmp/x"}]}'
    )
    cfg, problem = decode_stored_config(raw)
    assert cfg.servers[0].id == "s1"
    assert problem is not None and "servers[0].uri" in problem
    with pytest.raises(ConfigError):
        decode_config(raw)
