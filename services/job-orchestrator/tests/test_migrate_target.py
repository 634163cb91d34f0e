"""A migration's ``destination.libvirt_uri`` resolved to the configured server it names,
or refused naming the field (no server needed: the configuration alone decides)."""

from __future__ import annotations

import pytest

from virtbackup.contracts.v1.config import Server
from virtbackup.job_orchestrator.migrate_target import resolve_libvirt_uri
from virtbackup.runtime.errors import BadRequest

SERVERS = [
    Server(id="local"),
    Server(id="kvm2", host="kvm2.example.org", username="admin", private_key="k"),
    Server(id="kvm3", host="10.0.0.3", port=2222, private_key="k"),
    Server(id="tls4", host="kvm4", uri="qemu+tls://kvm4/system", private_key="k"),
]


@pytest.mark.parametrize(
    ("uri", "server"),
    [
        ("qemu:///system", "local"),
        ("qemu+ssh://admin@kvm2.example.org/system", "kvm2"),
        ("qemu+ssh://admin@KVM2.example.org:22/system", "kvm2"),
        ("qemu+ssh://kvm2.example.org/system", "kvm2"),  # the user is the server's
        ("qemu+libssh2://admin@kvm2.example.org/system", "kvm2"),
        ("qemu+ssh://root@10.0.0.3:2222/system", "kvm3"),  # empty username: root
        ("qemu+tls://kvm4/system", "tls4"),
        ("qemu://kvm4:16514/system", "tls4"),  # libvirt's default transport: TLS
        ("qemu+ssh://root@kvm4/system", "tls4"),  # its SSH settings
    ],
)
def test_a_uri_names_the_configured_server(uri: str, server: str) -> None:
    assert resolve_libvirt_uri(uri, SERVERS) == server


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("qemu+ssh://admin@unknown.example.org/system", "add the server"),
        ("qemu+ssh://root@kvm2.example.org/system", "add the server"),  # another user
        ("qemu+ssh://admin@kvm2.example.org:2200/system", "add the server"),  # another port
        ("qemu+ssh://admin@kvm2.example.org/session", "add the server"),  # another daemon
        ("qemu+ssh://10.0.0.3/system", "add the server"),  # port 22, not 2222
        ("qemu:///session", "add the server"),  # no server is this host's session
        ("qemu+tls://kvm2.example.org/system", "add the server"),
        ("qemu+ssh://admin@kvm2.example.org/system?keyfile=/k", "parameters"),
        ("qemu:///system?socket=/tmp/other", "parameters"),
        ("qemu+ssh://admin@kvm2.example.org/", "/system or /session"),
        ("qemu+tcp://kvm2.example.org/system", "transport"),
        ("qemu+ext:///system", "transport"),
        ("qemu+ssh:///system", "names no host"),
        ("qemu+ssh://admin@kvm2.example.org:x/system", "cannot be parsed"),
        ("qemu+ssh://admin:hunter2@kvm2.example.org/system", "password"),
        ("", "expected a libvirt URI"),
    ],
)
def test_anything_else_is_refused_naming_the_field(uri: str, needle: str) -> None:
    with pytest.raises(BadRequest) as caught:
        resolve_libvirt_uri(uri, SERVERS)
    assert caught.value.message.startswith("destination.libvirt_uri: "), caught.value.message
    assert needle in caught.value.message, caught.value.message
    assert "hunter2" not in caught.value.message


def test_a_uri_naming_two_servers_asks_for_one() -> None:
    twins = [*SERVERS, Server(id="kvm2b", host="kvm2.example.org", private_key="k")]
    with pytest.raises(BadRequest, match=r"\(kvm2, kvm2b\): name one with destination.server_id"):
        resolve_libvirt_uri("qemu+ssh://kvm2.example.org/system", twins)
    assert resolve_libvirt_uri("qemu+ssh://kvm2.example.org/system", twins, "kvm2b") == "kvm2b"
    assert resolve_libvirt_uri("qemu+ssh://admin@kvm2.example.org/system", twins) == "kvm2"


def test_a_server_id_given_too_must_be_the_server_the_uri_names() -> None:
    uri = "qemu+ssh://admin@kvm2.example.org/system"
    assert resolve_libvirt_uri(uri, SERVERS, "kvm2") == "kvm2"
    with pytest.raises(
        BadRequest, match=r"^destination\.libvirt_uri: .* not destination.server_id 'kvm3'"
    ):
        resolve_libvirt_uri(uri, SERVERS, "kvm3")
    with pytest.raises(BadRequest, match="add the server"):
        resolve_libvirt_uri("qemu+ssh://nowhere/system", SERVERS, "kvm2")
