"""The exception hierarchy of ``virtbackup.virt`` and the translation from libvirt's errors.

Every public coroutine of this package raises only :class:`VirtError` subclasses (and
``ValueError`` for arguments that can never be valid). The inventory service maps them
to replies: :class:`NotFound` and :class:`Conflict` are permanent for the request that
caused them, :class:`Unreachable` and :class:`VirtTimeout` may succeed on a retry after a
reconnect.
"""

from __future__ import annotations

from typing import Any

import libvirt


class VirtError(Exception):
    """A libvirt operation failed.

    ``code`` and ``domain`` are libvirt's ``VIR_ERR_*`` and ``VIR_FROM_*`` numbers when the
    error came from libvirt (``None`` otherwise); ``libvirt_message`` is libvirt's own text,
    e.g. ``"Requested operation is not valid: domain is already running"``.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        domain: int | None = None,
        libvirt_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.domain = domain
        self.libvirt_message = libvirt_message


class NotFound(VirtError):
    """The domain (or checkpoint, snapshot, backup job) does not exist."""


class Conflict(VirtError):
    """The object's current state forbids the operation (libvirt's reason is in the message).

    Examples: starting a running domain, destroying a stopped one, beginning a backup on a
    domain that is not running or already has a job, defining a name that exists, any
    call that timed out waiting for the domain's job lock (another job holds it).
    """


class CheckpointInconsistent(Conflict):
    """libvirt refused a checkpoint because a disk's bitmap is missing or broken.

    The caller must fall back to a full backup (and delete the checkpoint's metadata).
    """


class Unreachable(VirtError):
    """The hypervisor cannot be reached: connection refused, lost, auth failed, keepalive."""

    retryable = True


class VirtTimeout(VirtError):
    """A call did not finish within its bound.

    The libvirt call may still be running in its worker thread; the connection's keepalive
    ends it if the peer is gone.
    """

    retryable = True


class CommandFailed(VirtError):
    """A helper command on the hypervisor host (``qemu-img``, ``find``, ``rm``) failed."""


_UNREACHABLE_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)
_UNREACHABLE_SOURCES = frozenset(
    {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_SSH, libvirt.VIR_FROM_LIBSSH, libvirt.VIR_FROM_REMOTE}
)
_NOT_FOUND_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
        libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
        libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
    }
)
_CONFLICT_CODES = frozenset({libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_DOM_EXIST})


def translate(exc: Any, *, opening: bool = False) -> VirtError:
    """Map a ``libvirt.libvirtError`` to the matching :class:`VirtError` subclass.

    ``opening`` says the error came from opening a connection: then every error means
    the hypervisor is unreachable.
    """
    code: int | None = exc.get_error_code()
    source: int | None = exc.get_error_domain()
    text = str(exc.get_error_message() or exc)
    kwargs: dict[str, Any] = {"code": code, "domain": source, "libvirt_message": text}
    if opening or code in _UNREACHABLE_CODES or source in _UNREACHABLE_SOURCES:
        return Unreachable(text, **kwargs)
    if code in _NOT_FOUND_CODES:
        return NotFound(text, **kwargs)
    if code == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT:
        return CheckpointInconsistent(text, **kwargs)
    if (
        code in _CONFLICT_CODES
        or (code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in text)
        or (code == libvirt.VIR_ERR_OPERATION_TIMEOUT and "state change lock" in text)
    ):
        return Conflict(text, **kwargs)
    return VirtError(text, **kwargs)
