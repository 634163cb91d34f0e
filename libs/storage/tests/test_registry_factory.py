"""The registry (``GET /drivers``) and the factory agree with the contracts' schemas."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from virtbackup.contracts.v1.config import DRIVER_PARAMS, SECRET_KEYS, Destination, GdriveSettings
from virtbackup.contracts.v1.drivers import DriverInfo
from virtbackup.storage import (
    Driver,
    InvalidParamsError,
    available_drivers,
    driver_info,
    open_destination,
    open_driver,
)
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.storage.gdrive import GdriveDriver
from virtbackup.storage.google_auth import GoogleTokens
from virtbackup.storage.s3 import S3Driver
from virtbackup.storage.sftp import SftpDriver

MINIMAL = {
    "filesystem": {"path": "/srv/backups"},
    "sftp": {"host": "h", "username": "u", "password": "p", "hostKey": "SHA256:" + "A" * 43},
    "s3": {"endpoint": "h:9000", "bucket": "bucket"},
    "gdrive": {},
    "dummy": {},
}
TOKENS = GoogleTokens(refresh_token="1//refresh")


def test_every_implemented_driver_is_listed() -> None:
    assert [d.id for d in available_drivers()] == ["filesystem", "sftp", "s3", "gdrive", "dummy"]
    assert driver_info("ftp") is None
    gdrive = driver_info("gdrive")
    assert gdrive is not None
    assert gdrive.label == "Google Drive"
    assert gdrive.capabilities.supports_range_read is True
    assert gdrive.capabilities.supports_batch_delete is False


@pytest.mark.parametrize("info", available_drivers(), ids=lambda d: d.id)
def test_params_match_the_schema(info: DriverInfo) -> None:
    fields = msgspec.inspect.type_info(DRIVER_PARAMS[info.id])
    assert isinstance(fields, msgspec.inspect.StructType)
    params = {p.name: p for p in info.capabilities.params}
    assert list(params) == [f.encode_name for f in fields.fields]
    for field in fields.fields:
        param = params[field.encode_name]
        assert param.required == field.required
        assert param.secret == (field.encode_name in SECRET_KEYS)
        if not field.required:
            assert param.default == field.default
    assert info.capabilities.max_concurrent_writes >= 1


def test_wire_format_is_camel_case() -> None:
    encoded = msgspec.json.decode(msgspec.json.encode(available_drivers()))
    sftp = next(d for d in encoded if d["id"] == "sftp")
    assert sftp["usesPath"] is True
    assert sftp["capabilities"]["supportsRangeRead"] is True
    names = {p["name"]: p for p in sftp["capabilities"]["params"]}
    assert names["privateKey"]["secret"] is True
    assert names["basePath"]["default"] == "/"
    assert names["port"] == {
        "name": "port",
        "type": "integer",
        "required": False,
        "secret": False,
        "default": 22,
        "description": "SSH port",
    }


@pytest.mark.parametrize("driver_id", list(MINIMAL))
async def test_every_listed_driver_opens_with_minimal_params(driver_id: str) -> None:
    driver = open_driver(driver_id, MINIMAL[driver_id], tokens=TOKENS)
    try:
        assert isinstance(driver, Driver)
        assert driver.driver_id == driver_id
        assert driver_info(driver_id) is not None
    finally:
        await driver.close()


async def test_roots_are_the_virtbackup_folder_of_the_base() -> None:
    fs = open_driver("filesystem", {"path": "/srv/backups"})
    sftp = open_driver("sftp", {**MINIMAL["sftp"], "basePath": "/Backup/"})
    s3 = open_driver("s3", {**MINIMAL["s3"], "prefix": "/team/a/"})
    s3_bare = open_driver("s3", MINIMAL["s3"])
    gdrive = open_driver("gdrive", {"rootPath": "/Backups/Team/"}, tokens=TOKENS)
    gdrive_bare = open_driver("gdrive", {}, tokens=GdriveSettings(refresh_token="r"))
    try:
        assert isinstance(fs, FilesystemDriver)
        assert fs.root == Path("/srv/backups/VirtBackup")
        assert isinstance(sftp, SftpDriver)
        assert sftp.root == "/Backup/VirtBackup"
        assert isinstance(s3, S3Driver)
        assert s3.root == "team/a/VirtBackup/"
        assert isinstance(s3_bare, S3Driver)
        assert s3_bare.root == "VirtBackup/"
        assert isinstance(gdrive, GdriveDriver)
        assert gdrive.root == ("Backups", "Team", "VirtBackup")
        assert isinstance(gdrive_bare, GdriveDriver)
        assert gdrive_bare.root == ("VirtBackup",)
    finally:
        for driver in (fs, sftp, s3, s3_bare, gdrive, gdrive_bare):
            await driver.close()


@pytest.mark.parametrize(
    ("driver_id", "params", "message"),
    [
        ("gdrive", {}, r"no Google account is connected"),
        ("gdrive", {"rootPath": 1}, "rootPath"),
        ("gdrive", {"rootPath": "/a/../b"}, "rootPath"),
        ("gdrive", {"root_path": "/"}, "root_path"),
        ("ftp", {}, "unknown or unavailable driver 'ftp'"),
        ("filesystem", {}, "missing required field `path`"),
        ("filesystem", {"path": ""}, "path"),
        ("filesystem", {"path": "/x", "extra": 1}, "unknown field `extra`"),
        ("sftp", {"host": "h", "username": "u", "password": "p", "port": "22"}, "port"),
        ("sftp", {"host": "h", "username": "u", "password": "p", "port": 70000}, "port"),
        ("sftp", {"host": "h", "username": "u"}, "password or a privateKey"),
        ("sftp", {"host": "h", "username": "u", "password": "p"}, "host key of h:22 is not pinned"),
        ("sftp", {"host": "h", "username": "u", "base_path": "/x", "password": "p"}, "base_path"),
        ("s3", {"endpoint": "h:9000"}, "bucket"),
        ("s3", {"endpoint": "h:9000", "bucket": "b"}, "bucket"),
        ("s3", {"endpoint": "h:9000", "bucket": "bucket", "secure": "yes"}, "secure"),
        ("dummy", {"anything": 1}, "unknown field"),
    ],
)
def test_bad_params_are_rejected_with_the_field_named(
    driver_id: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidParamsError, match=message.replace("(", r"\(")) as info:
        open_driver(driver_id, params)
    assert isinstance(info.value, ValueError)


async def test_open_destination(tmp_path: Path) -> None:
    destination = msgspec.convert(
        {"id": "dest_fs_1", "driverId": "filesystem", "params": {"path": str(tmp_path)}},
        type=Destination,
    )
    async with open_destination(destination) as driver:
        await driver.put("k", b"v")
    assert (tmp_path / "VirtBackup" / "k").read_bytes() == b"v"
