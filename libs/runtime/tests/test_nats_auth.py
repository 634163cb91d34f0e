"""NATS users: generated once and kept private; deployed configurations match the table."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from virtbackup.contracts.subjects import SERVICES
from virtbackup.runtime.nats_auth import (
    ADMIN,
    USERS,
    NatsAuth,
    deploy_authorization,
    password_variable,
    permissions,
)
from virtbackup.runtime.nats_server import NatsServer, nats_server_binary

ROOT = Path(__file__).resolve().parents[3]


def test_passwords_are_generated_once_and_readable_by_the_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "nats-users.json"
    auth = NatsAuth.load_or_create(path)
    assert set(auth.passwords) == set(USERS)
    assert len(set(auth.passwords.values())) == len(USERS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert NatsAuth.load_or_create(path) == auth
    assert json.loads(path.read_text()) == dict(auth.passwords)
    assert auth.credentials("gateway").env()["VIRTBACKUP_NATS_USER"] == "gateway"
    assert auth.passwords["gateway"] not in repr(auth.credentials("gateway"))


def test_the_server_configuration_is_private(nats_server: NatsServer) -> None:
    assert nats_server.config_path is not None
    assert stat.S_IMODE(nats_server.config_path.stat().st_mode) == 0o600


def test_every_service_has_its_own_inbox_and_no_wildcard_over_the_bus() -> None:
    for service in SERVICES:
        perms = permissions(service)
        assert f"_INBOX.{service}.>" in perms.subscribe
        assert not any(s in {">", "$JS.API.>", "$KV.>", "_INBOX.>"} for s in perms.publish)
        assert not any(s in {">", "_INBOX.>", "$KV.>"} for s in perms.subscribe)
    assert "$KV.VB_CONFIG.>" not in permissions("inventory").publish
    assert "$JS.API.STREAM.PURGE.VB_WORK" in permissions("job-orchestrator").publish


def test_the_deployed_nats_configurations_are_the_generated_one(tmp_path: Path) -> None:
    generated = deploy_authorization()
    for path in ("deploy/k8s/nats/auth.conf", "helm/virtbackup/files/nats-auth.conf"):
        assert (ROOT / path).read_text() == generated, f"{path}: run `virtbackup nats-auth`"
    # nats-server accepts it, with the passwords from its environment.
    conf = tmp_path / "nats.conf"
    (tmp_path / "auth.conf").write_text(generated)
    conf.write_text("port: 4222\ninclude ./auth.conf\n")
    env = {password_variable(user): f"pw-{user}" for user in USERS}
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(conf), "-t"], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert password_variable(ADMIN) == "VIRTBACKUP_NATS_PASSWORD_ADMIN"
