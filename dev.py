#!/usr/bin/env python3
"""VirtBackup's two commands, for a fresh machine with only python3.

    python3 dev.py up     # install what is needed, then run NATS and every service
    python3 dev.py test   # install what is needed, then lint, type-check and run every test
    python3 dev.py bench  # install what is needed, then the benchmark against virtnbdbackup
                          # (options: --reps 1 --steps full,incremental --warm ...; bench/README.md)
    python3 dev.py fleet  # 1,000 simulated servers x 10 VMs: refresh, memory, listings, history,
                          # the nightly run of every VM (simulated transfer; --no-run: without)
                          # (bench/fleet.py; options: --servers 1000 --vms 10 --jobs 10000 ...)
    python3 dev.py load   # 100 SSE + 100 WebSocket clients while jobs run, /health p50/p99
                          # (bench/load.py; options: --sse 100 --ws 100 --seconds 60 ...)

Both install what they need: as root, the Debian packages (libvirt, QEMU, OpenSSH, ...);
then uv (from PyPI, into .tools/ if it is not on PATH) and every Python package into
.venv from the lock file. Standard library only: this file runs before anything is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TOOLS = ROOT / ".tools"

#: Debian packages: libvirt and QEMU for the inventory and the data path, the headers to
#: build libvirt-python, NBD tools, OpenSSH for remote hosts and SFTP, the peer tool, and
#: UEFI firmware and the TPM emulator for UEFI VMs with an emulated TPM.
DEBIAN_PACKAGES = [
    "libvirt-daemon-system",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    "libnbd-bin",
    "dnsmasq-base",
    "libvirt-dev",
    "pkg-config",
    "gcc",
    "openssh-server",
    "openssh-client",
    "ovmf",
    "swtpm",
    "swtpm-tools",
    # The web console's browser tests: headless Chromium driven by Playwright (never its download).
    "chromium",
    "chromium-driver",
]


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(cmd: list[str], **kwargs: object) -> None:
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def missing_debian_packages() -> list[str]:
    if not shutil.which("dpkg-query"):
        return []
    missing = []
    for package in DEBIAN_PACKAGES:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_debian_packages() -> None:
    missing = missing_debian_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        say(f"not root: cannot install Debian packages {' '.join(missing)}; install them first")
        if "libvirt-dev" in missing or "pkg-config" in missing:
            sys.exit("libvirt-python needs libvirt-dev and pkg-config to build")
        return
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def uv_binary() -> str:
    found = shutil.which("uv")
    if found:
        return found
    tool_uv = TOOLS / "bin" / "uv"
    if not tool_uv.exists():
        say("installing uv into .tools/")
        run([sys.executable, "-m", "venv", str(TOOLS)])
        run([str(TOOLS / "bin" / "pip"), "install", "-q", "uv"])
    return str(tool_uv)


def ensure_python_env() -> None:
    """Install the locked packages, with their bytecode compiled, and compile the
    project's own sources too. Where ``PYTHONDONTWRITEBYTECODE`` is set (this machine's
    sessions set it) nothing else ever writes a ``.pyc``, so every service process the
    tests and ``up`` start compiled its imports from source again: about a second of CPU
    per process on the 2-core machine, dozens of processes per test module."""
    say("installing Python packages into .venv (uv sync --locked --compile-bytecode)")
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_PROJECT_ENVIRONMENT=str(VENV))
    run(
        [
            uv_binary(), "sync", "--locked", "--all-packages", "--compile-bytecode",
            "--python", sys.executable,
        ],
        cwd=ROOT,
        env=env,
    )  # fmt: skip
    run(
        [bin_("python"), "-m", "compileall", "-q", "-j", "0", "libs", "services", "bench",
         "tests", "conftest.py"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


HELM_LINT_ENV = TOOLS / "helm-sdkpy"


def python_312() -> str | None:
    """A Python 3.12 or newer that runs (pyenv's shims may name one that is not active)."""
    found = [shutil.which(f"python3.{minor}") for minor in (13, 12)]
    found += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.1[2-9]*/bin/python3"))
    for candidate in found:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def ensure_helm_lint() -> None:
    """Helm's engine for tests/test_deploy_validate.py (tools/helm_lint.py): helm-sdkpy,
    pinned, in a Python 3.12 environment of its own (it needs 3.12; no registry we reach
    ships a helm binary). Best effort: without it those tests are skipped, saying why."""
    marker = HELM_LINT_ENV / ".installed-0.1.32"
    if marker.exists():
        return
    say("installing helm-sdkpy 0.1.32 (Helm's engine) into .tools/helm-sdkpy")
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    python = HELM_LINT_ENV / "bin" / "python"
    base = python_312()
    if base is None:
        say("no Python 3.12 or newer here: the chart's lint tests will be skipped")
        return
    try:
        run([uv_binary(), "venv", "-q", "--python", base, str(HELM_LINT_ENV)], env=env)
        packages = ["helm-sdkpy==0.1.32", "PyYAML>=6"]
        run([uv_binary(), "pip", "install", "-q", "--python", str(python), *packages], env=env)
    except (subprocess.CalledProcessError, OSError) as exc:
        say(f"helm-sdkpy not installed ({exc}): the chart's lint tests will be skipped")
        return
    marker.touch()


def ensure_libvirtd() -> None:
    """Start virtlogd and libvirtd when root and they are not running (no systemd here)."""
    if os.geteuid() != 0 or not shutil.which("libvirtd"):
        return
    kvm = Path("/dev/kvm")
    if kvm.exists():
        # What Debian's udev rule does: without it libvirt re-probes QEMU on every lookup.
        subprocess.run(["chgrp", "kvm", str(kvm)], check=False)
        kvm.chmod(0o660)
    for daemon in ("virtlogd", "libvirtd"):
        # root's own: another user's session libvirtd (a test's second host) is not it
        if subprocess.run(["pgrep", "-u", "0", "-x", daemon], capture_output=True).returncode != 0:
            say(f"starting {daemon}")
            run([daemon, "-d"])
    sock = Path("/var/run/libvirt/libvirt-sock")
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def bin_(name: str) -> str:
    return str(VENV / "bin" / name)


def cmd_up(args: list[str]) -> int:
    ensure_debian_packages()
    ensure_python_env()
    ensure_libvirtd()
    env = dict(os.environ)
    env.setdefault("VIRTBACKUP_DATA_DIR", str(ROOT / ".data"))
    return subprocess.call([bin_("virtbackup"), "up", *args], cwd=ROOT, env=env)


def cmd_test(args: list[str]) -> int:
    ensure_debian_packages()
    ensure_python_env()
    ensure_helm_lint()
    steps = [
        ("ruff check", [bin_("ruff"), "check", "."]),
        ("ruff format --check", [bin_("ruff"), "format", "--check", "."]),
        ("mypy --strict", [bin_("mypy")]),
        ("lint-imports (the import contract in pyproject.toml)", [bin_("lint-imports")]),
    ]
    for title, cmd in steps:
        say(title)
        if subprocess.call(cmd, cwd=ROOT) != 0:
            say(f"{title} failed")
            return 1
    say("pytest")
    code = subprocess.call([bin_("pytest"), *(args or whole_suite_args())], cwd=ROOT)
    if code == 5:
        say("pytest collected no tests")
        return 1
    return code


def whole_suite_args() -> list[str]:
    """The whole suite in ``VIRTBACKUP_TEST_WORKERS`` pytest-xdist workers (default 2, one
    per core here; 0 or 1: one process): a unit per test module, heaviest first, modules
    sharing machine state in one unit (the root ``conftest.py`` says which and why)."""
    workers = int(os.environ.get("VIRTBACKUP_TEST_WORKERS", "2"))
    if workers <= 1:
        return []
    return ["-n", str(workers), "--dist", "loadfile", "--no-loadscope-reorder"]


def cmd_bench(args: list[str]) -> int:
    ensure_debian_packages()
    ensure_python_env()
    ensure_libvirtd()
    return subprocess.call([bin_("python"), "bench/run.py", *args], cwd=ROOT)


def cmd_script(script: str, args: list[str]) -> int:
    """Run one of the bench/ scripts that start a system of their own (never ``virtbackup
    up``): the fleet simulation or the load benchmark."""
    ensure_debian_packages()
    ensure_python_env()
    ensure_libvirtd()
    return subprocess.call([bin_("python"), script, *args], cwd=ROOT)


SCRIPTS = {"fleet": "bench/fleet.py", "load": "bench/load.py"}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in {"up", "test", "install", "bench", *SCRIPTS}:
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "install":
        ensure_debian_packages()
        ensure_python_env()
        ensure_helm_lint()
        return 0
    if command == "bench":
        return cmd_bench(rest)
    if command in SCRIPTS:
        return cmd_script(SCRIPTS[command], rest)
    return cmd_up(rest) if command == "up" else cmd_test(rest)


if __name__ == "__main__":
    sys.exit(main())
