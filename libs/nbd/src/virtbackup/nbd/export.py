"""What the handshake negotiated for one export."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .protocol import DEFAULT_MAX_PAYLOAD, TransmissionFlag


@dataclass(frozen=True, slots=True)
class BlockSize:
    """NBD_INFO_BLOCK_SIZE constraints.

    Requests should be aligned to ``minimum`` (offset and length); ``preferred``
    avoids read-modify-write on the server; no payload may exceed ``maximum``.
    """

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """The export a connection is bound to, as negotiated.

    ``meta_contexts`` maps each meta context the server granted to its id; a
    context that was asked for and is missing here is not offered by the export.
    """

    name: str
    size: int
    flags: TransmissionFlag
    structured_replies: bool
    block_size: BlockSize | None = None
    meta_contexts: Mapping[str, int] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        """Writes, trims and zeroing are refused."""
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        """Several connections see one consistent disk; a flush on one covers all."""
        return bool(self.flags & TransmissionFlag.CAN_MULTI_CONN)

    @property
    def can_flush(self) -> bool:
        """NBD_CMD_FLUSH is supported."""
        return bool(self.flags & TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        """The FUA (force unit access) request flag is supported."""
        return bool(self.flags & TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        """NBD_CMD_TRIM is supported."""
        return bool(self.flags & TransmissionFlag.SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        """NBD_CMD_WRITE_ZEROES is supported."""
        return bool(self.flags & TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        """NBD_CMD_WRITE_ZEROES accepts the FAST_ZERO flag."""
        return bool(self.flags & TransmissionFlag.SEND_FAST_ZERO)

    @property
    def can_df(self) -> bool:
        """Reads accept the DF (don't fragment) flag."""
        return bool(self.flags & TransmissionFlag.SEND_DF)

    @property
    def can_cache(self) -> bool:
        """NBD_CMD_CACHE is supported."""
        return bool(self.flags & TransmissionFlag.SEND_CACHE)

    @property
    def is_rotational(self) -> bool:
        """The server says the storage behaves like a rotational disk."""
        return bool(self.flags & TransmissionFlag.ROTATIONAL)

    @property
    def max_payload(self) -> int:
        """Largest read or write one request may carry (the server's maximum, at most 32 MiB)."""
        if self.block_size is None:
            return DEFAULT_MAX_PAYLOAD
        return min(self.block_size.maximum, DEFAULT_MAX_PAYLOAD)

    @property
    def min_block(self) -> int:
        """Alignment that offsets and lengths of requests should respect."""
        return 1 if self.block_size is None else self.block_size.minimum
