"""NBD URI parsing."""

from __future__ import annotations

import pytest

from virtbackup.nbd import NbdUri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("nbd://example.org:10810/vda", NbdUri(export="vda", host="example.org", port=10810)),
        ("nbd://10.0.0.5/vda", NbdUri(export="vda", host="10.0.0.5", port=10809)),
        ("nbd://host", NbdUri(export="", host="host")),
        ("nbd://host:1/", NbdUri(export="", host="host", port=1)),
        ("nbd://[::1]:1234/a%20b", NbdUri(export="a b", host="::1", port=1234)),
        ("nbd://host/a/b", NbdUri(export="a/b", host="host")),
        (
            "nbd+unix:///backup-vda?socket=/run/libvirt/nbd.sock",
            NbdUri(export="backup-vda", socket="/run/libvirt/nbd.sock"),
        ),
        ("nbd+unix://?socket=/tmp/s", NbdUri(export="", socket="/tmp/s")),
        ("nbds://10.0.0.5:10810/vda", NbdUri(export="vda", host="10.0.0.5", port=10810, tls=True)),
        (
            "nbds+unix:///vda?socket=/s&tls-hostname=kvm1",
            NbdUri(export="vda", socket="/s", tls=True, tls_hostname="kvm1"),
        ),
    ],
)
def test_parse(uri: str, expected: NbdUri) -> None:
    assert NbdUri.parse(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "nbds://host/x?tls-hostname=a",
        "nbd+unix:///x?socket=/s&tls-hostname=a",
        "http://host/x",
        "nbd:///x",
        "nbd+unix:///x",
        "nbd+unix:///x?socket=",
        "nbd+unix://host/x?socket=/s",
        "nbd+unix:///x?socket=/s&tls=on",
        "nbd://host:99999/x",
        "nbd://host/x?socket=/s",
    ],
)
def test_parse_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        NbdUri.parse(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "nbd://host:10809/vda",
        "nbd://[::1]:1234/a%20b",
        "nbd+unix:///backup-vda?socket=/run/x.sock",
        "nbd+unix:///?socket=/tmp/s",
        "nbds://127.0.0.1:10809/vda",
        "nbds+unix:///vda?socket=/s&tls-hostname=kvm1",
    ],
)
def test_round_trip(uri: str) -> None:
    parsed = NbdUri.parse(uri)
    assert NbdUri.parse(str(parsed)) == parsed
    assert str(parsed) == uri


def test_needs_exactly_one_address() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        NbdUri(export="x")
    with pytest.raises(ValueError, match="exactly one"):
        NbdUri(export="x", host="h", socket="/s")
