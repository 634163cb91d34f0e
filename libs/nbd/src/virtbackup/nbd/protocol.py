"""NBD wire protocol: magic numbers, enumerations and packed structs.

Everything here follows the NBD protocol document
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md). All
integers on the wire are big-endian. Only the fixed newstyle handshake and the
compact (non-extended) headers are described: that is what QEMU's NBD server and
``qemu-nbd`` speak to a client that does not ask for extended headers.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Final

# --- magic numbers ----------------------------------------------------------------

NBD_MAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation
OLDSTYLE_MAGIC: Final = 0x00420281861253  # oldstyle negotiation (not supported)
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

DEFAULT_PORT: Final = 10809

# --- handshake ---------------------------------------------------------------------


class HandshakeFlag(IntFlag):
    """Flags the server sends in the 16-bit handshake flags field."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Flags the client answers with (32-bit client flags field)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """Per-export transmission flags negotiated with NBD_OPT_GO."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(IntEnum):
    """Option codes of the newstyle negotiation."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT: Final = 1 << 31


class OptionReply(IntEnum):
    """Reply types to an option; values with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10


class Info(IntEnum):
    """Information items of NBD_OPT_INFO / NBD_OPT_GO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# --- transmission ------------------------------------------------------------------


class Command(IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(IntFlag):
    """Per-request flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE: Final = 1 << 0
REPLY_ERROR_BIT: Final = 1 << 15


class ReplyType(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = REPLY_ERROR_BIT | 1
    ERROR_OFFSET = REPLY_ERROR_BIT | 2


# Error values on the wire. They equal the Linux errno values of the same name.
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

ERROR_NAMES: Final[dict[int, str]] = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# --- meta contexts -----------------------------------------------------------------

BASE_ALLOCATION: Final = "base:allocation"
DIRTY_BITMAP_PREFIX: Final = "qemu:dirty-bitmap:"

# base:allocation extent flags
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
# qemu:dirty-bitmap:* extent flags
STATE_DIRTY: Final = 1 << 0

# --- sizes -------------------------------------------------------------------------

#: The largest payload a client may send or request when the server states no
#: maximum block size; also QEMU's own limit (NBD_MAX_BUFFER_SIZE).
DEFAULT_MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: Largest length of a request without payload (u32 length field). It is a
#: multiple of every legal minimum block size (powers of two up to 64 KiB).
MAX_REQUEST_LENGTH: Final = (1 << 32) - (1 << 20)

# --- structs -----------------------------------------------------------------------

U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
U64: Final = struct.Struct(">Q")
#: magic, option, length
OPTION_HEADER: Final = struct.Struct(">QII")
#: magic, option, reply type, length
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
#: NBD_INFO_EXPORT: size, transmission flags
INFO_EXPORT: Final = struct.Struct(">QH")
#: NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum
INFO_BLOCK_SIZE: Final = struct.Struct(">III")
#: magic, command flags, type, cookie, offset, length
REQUEST: Final = struct.Struct(">IHHQQI")
#: magic, error, cookie
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
#: magic, flags, type, cookie, length
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")
#: OFFSET_HOLE payload: offset, hole size
OFFSET_HOLE: Final = struct.Struct(">QI")
#: ERROR payload head: error, message length
ERROR_HEAD: Final = struct.Struct(">IH")
#: one BLOCK_STATUS descriptor: length, flags
BLOCK_DESCRIPTOR: Final = struct.Struct(">II")
