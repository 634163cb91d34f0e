"""Commands on the hypervisor host: locally, or over an asyncssh connection.

libvirt does not expose everything a backup needs (``qemu-img info`` of an image in use,
listing and removing scratch files), so a few helpers run commands on the host that runs
libvirtd. :class:`LocalHost` runs them as subprocesses of this process; :class:`SshHost`
runs them through an existing asyncssh connection. Both take an argv list and quote it
themselves; nothing is passed through a local shell.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncssh

from virtbackup.virt.errors import CommandFailed, Unreachable, VirtTimeout


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The outcome of one command: exit status and decoded (UTF-8, replaced) output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        """Return self, or raise :class:`CommandFailed` when the exit status is not 0."""
        if self.returncode != 0:
            raise CommandFailed(
                f"{shlex.join(self.argv)} exited with {self.returncode}: {self.stderr.strip()}"
            )
        return self


class Host(Protocol):
    """Where libvirtd runs; runs a command there and returns its result (never raises on
    a non-zero exit, raises :class:`VirtTimeout` past ``timeout`` and
    :class:`Unreachable` when the host cannot be reached). ``input`` is written to the
    command's standard input (else it reads nothing): the way to hand a command a secret
    without putting it in an argument list that every local user can see."""

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, input: str | None = None
    ) -> CommandResult: ...


class LocalHost:
    """This machine: commands run as subprocesses of the current process."""

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, input: str | None = None
    ) -> CommandResult:
        args = tuple(argv)
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            data = input.encode() if input is not None else None
            out, err = await asyncio.wait_for(proc.communicate(data), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise VirtTimeout(f"{shlex.join(args)} did not finish in {timeout} s") from None
        return CommandResult(
            args,
            proc.returncode if proc.returncode is not None else -1,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )


class SshHost:
    """A remote hypervisor reached through an open asyncssh client connection.

    The connection is borrowed: closing it is the owner's business.
    """

    def __init__(self, connection: asyncssh.SSHClientConnection) -> None:
        self.connection = connection

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, input: str | None = None
    ) -> CommandResult:
        args = tuple(argv)
        try:
            result = await self.connection.run(
                shlex.join(args), check=False, timeout=timeout, input=input
            )
        except asyncssh.TimeoutError:
            raise VirtTimeout(f"{shlex.join(args)} did not finish in {timeout} s") from None
        except (OSError, asyncssh.Error) as exc:
            raise Unreachable(f"ssh command failed: {exc}") from exc
        return CommandResult(
            args,
            result.exit_status if result.exit_status is not None else -1,
            _text(result.stdout),
            _text(result.stderr),
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


async def list_files(host: Host, directory: str, pattern: str) -> list[str]:
    """Regular files directly in ``directory`` whose name matches the glob ``pattern``.

    Returns absolute paths, sorted; an absent directory yields an empty list.
    """
    result = await host.run(
        ["find", directory, "-maxdepth", "1", "-type", "f", "-name", pattern, "-print0"]
    )
    if result.returncode != 0:
        probe = await host.run(["test", "-d", directory])
        if probe.returncode != 0:
            return []
        result.check()
    return sorted(p for p in result.stdout.split("\0") if p)


async def remove_files(host: Host, paths: Sequence[str]) -> None:
    """Remove files; absent files are not an error (idempotent)."""
    if paths:
        (await host.run(["rm", "-f", "--", *paths])).check()


async def path_exists(host: Host, path: str) -> bool:
    """Whether ``path`` exists on the host."""
    return (await host.run(["test", "-e", path])).returncode == 0
