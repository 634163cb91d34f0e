"""Opening the repository of a configured destination."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from virtbackup.contracts.v1.config import AgentConfig, Destination
from virtbackup.repository.repository import Repository
from virtbackup.storage.factory import open_destination
from virtbackup.storage.google_auth import GoogleApi, GoogleTokens, OnRefresh


async def open_repository(
    destination: Destination,
    cfg: AgentConfig | None = None,
    *,
    create: bool = True,
    locked: bool = False,
    on_refresh: OnRefresh | None = None,
    google: Mapping[str, str] | None = None,
) -> Repository:
    """The repository at ``destination``, created on first use when ``create`` (encrypted
    when the destination has an ``encryption`` passphrase).

    ``locked`` opens an encrypted repository without its key, for listing restore points.
    ``cfg`` supplies what is configured outside the destination: the Google tokens and
    ``dummyDriverTmpWrites``. The caller closes it: ``await repo.close()`` (or
    ``async with``).

    ``google`` (a Google Drive destination whose credentials are in the vault:
    ``clientId``, ``clientSecret``, ``refreshToken``) replaces the account's tokens and
    the OAuth client of the environment; its access tokens live only in this
    repository's driver (``on_refresh`` is not called: nothing is stored).
    """
    if google:
        api = dataclasses.replace(
            GoogleApi.from_env(),
            client_id=google.get("clientId", ""),
            client_secret=google.get("clientSecret", ""),
        )
        driver = open_destination(
            destination,
            tokens=GoogleTokens(refresh_token=google.get("refreshToken", "")),
            google_api=api,
        )
    else:
        driver = open_destination(
            destination,
            tmp_writes=cfg.dummy_driver_tmp_writes if cfg else False,
            tokens=cfg.backup.gdrive if cfg and destination.driver_id == "gdrive" else None,
            on_refresh=on_refresh,
        )
    enc = destination.encryption
    passphrase = enc.passphrase if enc else None
    try:
        if create:
            cipher = enc.cipher if enc else "aes-256-gcm"
            return await Repository.open_or_create(driver, passphrase, cipher)
        return await Repository.open(driver, passphrase, locked=locked)
    except BaseException:
        await driver.close()
        raise
