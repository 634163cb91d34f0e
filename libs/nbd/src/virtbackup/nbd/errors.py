"""The exceptions of the NBD client.

Every exception derives from :class:`NbdError`. Each class says whether a retry
can help (``retryable``): a lost connection can be retried on a new connection,
a server that answered EINVAL to a request will answer it again.
"""

from __future__ import annotations

from . import protocol as p


class NbdError(Exception):
    """Base class of every NBD client error."""

    #: True when repeating the operation (possibly on a new connection) may succeed.
    retryable: bool = False


class NbdConnectionError(NbdError):
    """The connection could not be made, was lost, or was closed by the client.

    Requests in flight when the connection dies fail with this error; their
    outcome on the server is unknown (a write may or may not have landed).
    """

    retryable = True


class NbdProtocolError(NbdConnectionError):
    """The server broke the protocol; the client drops the connection."""


class NbdHandshakeError(NbdError):
    """Option negotiation failed (unknown export, refused option, TLS required...).

    ``option`` is the option code that was refused, ``reply`` the server's error
    reply type and ``message`` the text the server sent with it, if any.
    """

    def __init__(
        self, message: str, *, option: int | None = None, reply: int | None = None
    ) -> None:
        super().__init__(message)
        self.option = option
        self.reply = reply
        self.message = message


class NbdUnsupportedError(NbdError):
    """The export does not allow the operation (read-only, no trim, no such meta context...).

    Raised by the client before anything is sent.
    """


class NbdCommandError(NbdError):
    """The server answered a request with an error.

    ``errno`` is the NBD error value (equal to the Linux errno of the same name),
    ``message`` the server's human-readable text (structured replies only, else
    empty), ``error_offset`` the offset the error is about when the server gave one.
    The connection stays usable.
    """

    def __init__(
        self,
        command: p.Command,
        offset: int,
        length: int,
        errno: int,
        message: str = "",
        error_offset: int | None = None,
    ) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.errno = errno
        self.message = message
        self.error_offset = error_offset
        name = p.ERROR_NAMES.get(errno, "E?")
        text = f"NBD {command.name} offset={offset} length={length} failed: {name} ({errno})"
        if error_offset is not None:
            text += f" at offset {error_offset}"
        if message:
            text += f": {message}"
        super().__init__(text)

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """EIO, ENOMEM and ESHUTDOWN may be transient; other errors are the request's fault."""
        return self.errno in (p.EIO, p.ENOMEM, p.ESHUTDOWN)
