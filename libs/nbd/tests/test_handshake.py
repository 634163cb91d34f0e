"""Handshake against qemu-nbd, cross-checked with nbdinfo."""

from __future__ import annotations

from typing import Any

import pytest

from virtbackup.nbd import (
    BASE_ALLOCATION,
    BlockSize,
    NbdClient,
    NbdConnectionError,
    NbdHandshakeError,
    NbdUnsupportedError,
    TransmissionFlag,
)

MiB = 1024 * 1024


async def test_export_matches_nbdinfo(qemu: Any, nbdinfo: Any) -> None:
    server = qemu.serve(qemu.image(48 * MiB, [(0xAB, MiB, 4 * MiB)]))
    ref = nbdinfo.info(server.uri)
    async with await NbdClient.connect_uri(
        server.uri, meta_contexts=[BASE_ALLOCATION, "qemu:dirty-bitmap:nope"]
    ) as nbd:
        info = nbd.info
        assert info.name == "export"
        assert nbd.size == 48 * MiB == ref["export-size"]
        assert info.structured_replies is True
        assert info.flags & TransmissionFlag.HAS_FLAGS
        assert info.read_only is ref["is_read_only"] is False
        assert info.can_multi_conn is ref["can_multi_conn"]
        assert info.can_flush is ref["can_flush"] is True
        assert info.can_fua is ref["can_fua"]
        assert info.can_trim is ref["can_trim"] is True
        assert info.can_write_zeroes is ref["can_zero"] is True
        assert info.can_fast_zero is ref["can_fast_zero"]
        assert info.can_df is ref["can_df"]
        assert info.can_cache is ref["can_cache"]
        assert info.is_rotational is ref["is_rotational"]
        assert info.block_size == BlockSize(
            ref["block_size_minimum"], ref["block_size_preferred"], ref["block_size_maximum"]
        )
        assert info.max_payload == min(32 * MiB, ref["block_size_maximum"])
        # The server grants base:allocation and ignores the bitmap it does not have.
        assert set(info.meta_contexts) == {BASE_ALLOCATION}
        with pytest.raises(NbdUnsupportedError, match="not negotiated"):
            await nbd.block_status(0, MiB, "qemu:dirty-bitmap:nope")


async def test_read_only_export(qemu: Any, nbdinfo: Any) -> None:
    server = qemu.serve(qemu.image(8 * MiB), read_only=True)
    async with await NbdClient.connect_uri(server.uri) as nbd:
        assert nbd.info.read_only is True
        assert nbdinfo.info(server.uri)["is_read_only"] is True
        assert nbd.info.can_trim is False
        with pytest.raises(NbdUnsupportedError, match="read-only"):
            await nbd.write(0, b"x" * 512)
        with pytest.raises(NbdUnsupportedError):
            await nbd.write_zeroes(0, 4096)
        # Still usable for reads afterwards.
        assert await nbd.read(0, 512) == bytes(512)


async def test_without_structured_replies(qemu: Any) -> None:
    server = qemu.serve(qemu.image(8 * MiB, [(0x5A, 0, MiB)]))
    async with await NbdClient.connect_uri(server.uri, structured_replies=False) as nbd:
        assert nbd.info.structured_replies is False
        assert nbd.meta_contexts == {}
        assert await nbd.read(0, 2 * MiB) == b"\x5a" * MiB + bytes(MiB)


async def test_meta_contexts_need_structured_replies() -> None:
    with pytest.raises(ValueError, match="structured"):
        await NbdClient.connect(
            host="127.0.0.1", meta_contexts=[BASE_ALLOCATION], structured_replies=False
        )


async def test_unknown_export_is_refused(qemu: Any) -> None:
    server = qemu.serve(qemu.image(MiB))
    with pytest.raises(NbdHandshakeError, match="GO") as info:
        await NbdClient.connect(host="127.0.0.1", port=server.port, export="nope")
    assert info.value.option == 7
    assert info.value.reply is not None
    assert info.value.reply & (1 << 31)
    # The server is fine: the right name still connects.
    async with await NbdClient.connect(host="127.0.0.1", port=server.port, export="export"):
        pass


async def test_connection_refused(qemu: Any) -> None:
    server = qemu.serve(qemu.image(MiB))
    server.stop()
    with pytest.raises(NbdConnectionError, match="cannot connect") as info:
        await NbdClient.connect_uri(server.uri)
    assert info.value.retryable is True


async def test_unix_socket(qemu: Any, nbdinfo: Any) -> None:
    server = qemu.serve(qemu.image(16 * MiB, [(0x77, 3 * MiB, MiB)]), unix=True)
    assert server.uri.startswith("nbd+unix:///export?socket=/")
    async with await NbdClient.connect_uri(server.uri, meta_contexts=[BASE_ALLOCATION]) as nbd:
        assert nbd.size == 16 * MiB == nbdinfo.info(server.uri)["export-size"]
        assert await nbd.read(3 * MiB - 4, 8) == bytes(4) + b"\x77" * 4
        extents = await nbd.block_status()
        assert [(e.offset, e.length, e.is_zero) for e in extents] == [
            (0, 3 * MiB, True),
            (3 * MiB, MiB, False),
            (4 * MiB, 12 * MiB, True),
        ]
