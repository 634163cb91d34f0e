"""Another user's ``qemu:///session`` libvirtd, reached over SSH as that user.

A session daemon runs as its user, keeps its socket and state under that user's
directories and starts QEMU as that user: nothing of it needs root. libvirt's own
client finds the socket at ``$XDG_RUNTIME_DIR/libvirt/libvirt-sock`` (or
``~/.cache/libvirt/libvirt-sock`` without a runtime directory) and starts the daemon
(``libvirtd --timeout=120``) when nobody listens there; :func:`ensure_session_daemon`
does the same over an SSH login, with a bounded wait, so that the socket can be
forwarded (:func:`virtbackup.virt.connection.forward_libvirt_socket`).

Pull-mode backup exports of a session daemon listen on TCP with TLS: QEMU reads the
certificates from libvirt's ``backup_tls_x509_cert_dir``, which a session daemon reads
from the user's own ``qemu.conf`` (``$XDG_CONFIG_HOME/libvirt/qemu.conf``) at start, and
whose default (``/etc/pki/qemu``) the user cannot write. When the user's ``qemu.conf``
names no such folder, :func:`ensure_session_daemon` adds
``backup_tls_x509_cert_dir = "<config>/libvirt/pki/virtbackup"`` (a 0700 folder of the
user's) and, if the daemon already ran, restarts it so that it reads the setting (its
running VMs keep running: libvirtd reconnects to their QEMU processes). The
certificates are written there later, as for a system host
(:func:`virtbackup.virt.nbd_tls.install_server_credentials`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Final

from virtbackup.virt.errors import Unreachable
from virtbackup.virt.host import Host

__all__ = [
    "SESSION_DAEMON_TIMEOUT",
    "SessionDaemon",
    "ensure_session_argv",
    "ensure_session_daemon",
    "parse_session_daemon",
]

#: Seconds an idle session daemon started here waits for a client before it exits
#: (libvirt's own autostart uses the same); one with running VMs never exits.
SESSION_DAEMON_TIMEOUT: Final = 120

#: Runs as the session user. Prints ``key=value`` lines: socket, home, conf, tls, scratch,
#: started, restarted. Exits 3 with a reason on stderr when the daemon does not come up
#: within $1 tenths of a second.
_ENSURE: Final = r"""
set -u
limit=$1
idle=$2
umask 077
[ -n "${HOME:-}" ] && [ "${HOME#/}" != "$HOME" ] || { echo "no home directory" >&2; exit 2; }
if [ -n "${XDG_RUNTIME_DIR:-}" ] && [ -d "$XDG_RUNTIME_DIR" ]; then
  run="$XDG_RUNTIME_DIR/libvirt"
else
  run="$HOME/.cache/libvirt"
fi
config="${XDG_CONFIG_HOME:-$HOME/.config}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
sock="$run/libvirt-sock"
pidf="$run/libvirtd.pid"
conf="$config/libvirt/qemu.conf"
mkdir -p "$config/libvirt" "$cache/virtbackup/scratch" || exit 2
chmod 0700 "$cache/virtbackup" "$cache/virtbackup/scratch" || exit 2
tls=$(sed -n 's/^[[:space:]]*backup_tls_x509_cert_dir[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' \
      "$conf" 2>/dev/null | tail -n 1)
changed=0
if [ -z "$tls" ]; then
  tls="$config/libvirt/pki/virtbackup"
  printf '\n# added by VirtBackup: its backup exports use TLS with client certificates\n%s\n' \
    "backup_tls_x509_cert_dir = \"$tls\"" >> "$conf" || exit 2
  changed=1
fi
mkdir -p "$tls" && chmod 0700 "$tls" || exit 2
running() {
  test -S "$sock" && test -s "$pidf" && kill -0 "$(cat "$pidf" 2>/dev/null)" 2>/dev/null
}
started=0
restarted=0
if [ "$changed" = 1 ] && running; then
  # Wait for the old daemon's process to be gone, not only its socket: a new daemon
  # started while the old one still holds the pid file's lock exits at once.
  old=$(cat "$pidf")
  kill "$old"
  i=0
  while kill -0 "$old" 2>/dev/null && [ "$i" -lt "$limit" ]; do sleep 0.1; i=$((i + 1)); done
  restarted=1
fi
if ! running; then
  daemon=$(command -v libvirtd || echo /usr/sbin/libvirtd)
  [ -x "$daemon" ] || { echo "libvirtd is not installed" >&2; exit 2; }
  log="$cache/virtbackup/libvirtd-start.log"
  launch() {
    (cd / && "$daemon" --timeout="$idle" --daemon) </dev/null >"$log" 2>&1
  }
  rm -f "$sock"
  launch
  started=1
  i=0
  while ! running; do
    i=$((i + 1))
    if [ "$i" -gt "$limit" ]; then
      why=$(tail -c 400 "$log" 2>/dev/null)
      echo "the session libvirtd did not create $sock in time: $why" >&2
      exit 3
    fi
    # A daemon that exited (another one's lock not yet released, a transient failure) is
    # started again, once a second, within the same limit.
    if [ $((i % 10)) = 0 ] && ! pgrep -u "$(id -u)" -x libvirtd >/dev/null 2>&1; then
      launch
    fi
    sleep 0.1
  done
fi
printf 'socket=%s\nhome=%s\nconf=%s\ntls=%s\nscratch=%s\nstarted=%s\nrestarted=%s\n' \
  "$sock" "$HOME" "$conf" "$tls" "$cache/virtbackup/scratch" "$started" "$restarted"
"""


@dataclass(frozen=True, slots=True)
class SessionDaemon:
    """Where a user's session daemon is, as that user's shell sees it (absolute paths).

    ``socket``: libvirtd's socket to forward; ``home``: the user's home; ``qemu_conf``:
    the user's qemu.conf; ``tls_dir``: the backup TLS folder it names (0700, the user's);
    ``scratch_dir``: a 0700 folder of the user's for backup scratch files and state
    copies; ``started``: this call started the daemon (its socket may need a moment to
    accept); ``restarted``: it ran without the TLS setting and was restarted."""

    socket: str
    home: str
    qemu_conf: str
    tls_dir: str
    scratch_dir: str
    started: bool
    restarted: bool


def ensure_session_argv(timeout: float) -> list[str]:
    """The command that :func:`ensure_session_daemon` runs as the session user (for a
    caller that runs it some other way, e.g. ``runuser``), waiting ``timeout`` seconds at
    most; its output is read with :func:`parse_session_daemon`."""
    tenths = max(1, int(timeout * 10))
    return ["sh", "-c", _ENSURE, "ensure-session", str(tenths), str(SESSION_DAEMON_TIMEOUT)]


def parse_session_daemon(output: str) -> SessionDaemon:
    """The :class:`SessionDaemon` the command of :func:`ensure_session_argv` printed.
    Raises :class:`Unreachable` when the output does not say it (absolute paths)."""
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    try:
        daemon = SessionDaemon(
            socket=values["socket"],
            home=values["home"],
            qemu_conf=values["conf"],
            tls_dir=values["tls"],
            scratch_dir=values["scratch"],
            started=values["started"] == "1",
            restarted=values["restarted"] == "1",
        )
    except KeyError as exc:
        raise Unreachable(
            f"the session libvirtd's places were not reported ({exc}): {shlex.quote(output)}"
        ) from None
    for path in (daemon.socket, daemon.home, daemon.qemu_conf, daemon.tls_dir, daemon.scratch_dir):
        if not path.startswith("/"):
            raise Unreachable(f"the session libvirtd's places are not absolute paths: {path!r}")
    return daemon


async def ensure_session_daemon(host: Host, *, timeout: float = 20.0) -> SessionDaemon:
    """Make sure the session daemon of the user ``host`` runs commands as is up (starting
    it, as libvirt's client would, when it is not) with a backup TLS folder in its
    ``qemu.conf`` (see the module docstring), and say where it is.

    Waits at most ``timeout`` seconds for the daemon. Raises :class:`Unreachable` with the
    reason when the host cannot run the commands, has no ``libvirtd``, or the daemon does
    not come up in time; :class:`~virtbackup.virt.errors.VirtTimeout` when the host does
    not answer."""
    result = await host.run(ensure_session_argv(timeout), timeout=timeout + 15)
    if result.returncode != 0:
        raise Unreachable(
            f"the session libvirtd cannot be started: {result.stderr.strip() or result.stdout}"
            f" (exit {result.returncode})"
        )
    return parse_session_daemon(result.stdout)
