"""Google Drive driver specifics, against the in-memory stand-in for Google.

No real Google service is reachable here: ``FakeGoogleDrive`` follows the documented
Drive v3 and OAuth token requests, with switches for 401, 429, 500 and duplicate names.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest

from virtbackup.contracts.v1.config import GdriveSettings
from virtbackup.storage import (
    InvalidKeyError,
    InvalidParamsError,
    NotFoundError,
    PermanentError,
    RetryPolicy,
    TransientError,
    open_driver,
    retry,
    test_connection,
)
from virtbackup.storage.gdrive import GdriveDriver, quote
from virtbackup.storage.google_auth import (
    GoogleApi,
    GoogleTokens,
    TokenSource,
    format_expires_at,
    parse_expires_at,
    parse_retry_after,
)
from virtbackup.testing.gdrive import FOLDER_MIME, FakeGoogleDrive, google_driver

MIB = 1024 * 1024


def drive(google: FakeGoogleDrive, **kwargs: object) -> GdriveDriver:
    """A GdriveDriver on the stand-in, with its own root folder."""
    kwargs.setdefault("tokens", google.issue_tokens())
    kwargs.setdefault("root_path", f"/g-{secrets.token_hex(4)}")
    kwargs.setdefault("api", google.api())
    return GdriveDriver(**kwargs)  # type: ignore[arg-type]


def media_requests(google: FakeGoogleDrive) -> list[str]:
    return [
        r.headers.get("Range", "")
        for r in google.requests
        if r.method == "GET" and r.query.get("alt") == "media"
    ]


# -- layout ----------------------------------------------------------------------------


async def test_keys_map_onto_folders_under_root_path_virtbackup(google: FakeGoogleDrive) -> None:
    async with google_driver(google, root_path="/Backups/Team") as driver:
        assert await test_connection(driver) == (
            "Google Drive connection successful (read/write OK)."
        )
        await driver.put("chunks/ab/ab12", b"chunk")
        await driver.put("repository.json", b"{}")
    folder = google.folder_id("Backups/Team/VirtBackup/chunks/ab")
    assert folder is not None
    [chunk] = google.children(folder)
    assert (chunk.name, chunk.data, chunk.folder) == ("ab12", b"chunk", False)
    root = google.folder_id("Backups/Team/VirtBackup")
    assert root is not None
    assert sorted(f.name for f in google.children(root)) == ["chunks", "repository.json"]


async def test_root_path_slash_is_my_drive(google: FakeGoogleDrive) -> None:
    async with google_driver(google, root_path="/") as driver:
        await driver.put("k", b"v")
    assert [f.name for f in google.children("root")] == ["VirtBackup"]


async def test_names_with_quotes_and_backslashes_are_escaped(google: FakeGoogleDrive) -> None:
    assert quote("it's a\\b") == "'it\\'s a\\\\b'"
    async with drive(google) as driver:
        await driver.put("it's/o'k", b"1")
        await driver.put("it's/and and 'x'", b"2")
        assert await driver.get("it's/o'k") == b"1"
        assert sorted([k async for k in driver.list("it's/")]) == ["it's/and and 'x'", "it's/o'k"]


async def test_folders_are_created_once_and_cached(google: FakeGoogleDrive) -> None:
    async with drive(google) as driver:
        await asyncio.gather(*(driver.put(f"a/b/{i}", b"x") for i in range(20)))
        creates = [r for r in google.requests if r.method == "POST" and r.path == "/drive/v3/files"]
        assert len(creates) == 4  # root folder, VirtBackup, a, b
        before = len(google.requests)
        await driver.put("a/b/again", b"y")
        # Cached folders: one upload, one listing of the name; nothing else.
        assert len(google.requests) - before == 2


async def test_reads_do_not_create_folders(google: FakeGoogleDrive) -> None:
    async with drive(google, root_path="/nothing/here") as driver:
        with pytest.raises(NotFoundError):
            await driver.get("a/b")
        assert [k async for k in driver.list()] == []
        await driver.delete("a/b")
    assert google.children("root") == []


async def test_uploads_multipart_small_resumable_large(google: FakeGoogleDrive) -> None:
    async with drive(google, chunk_size=256 * 1024, multipart_limit=MIB) as driver:
        small, large = secrets.token_bytes(MIB), secrets.token_bytes(MIB + 300_000)
        await driver.put("small", small)
        await driver.put("large", large)
        assert await driver.get("small") == small
        assert await driver.get("large") == large
    uploads = [r for r in google.requests if r.path == "/upload/drive/v3/files"]
    kinds = [(r.method, r.query.get("uploadType")) for r in uploads]
    assert kinds[0] == ("POST", "multipart")
    assert kinds[1] == ("POST", "resumable")
    chunks = [r for r in uploads if r.method == "PUT"]
    assert len(chunks) == 6  # 1 MiB + 300000 bytes in 256 KiB chunks
    assert chunks[0].headers["Content-Range"] == f"bytes 0-{256 * 1024 - 1}/{len(large)}"
    assert all("Authorization" not in r.headers for r in chunks)


async def test_range_reads_send_a_range_header(google: FakeGoogleDrive) -> None:
    data = secrets.token_bytes(5000)
    async with drive(google) as driver:
        await driver.put("r", data)
        assert await driver.get_range("r", 100, 50) == data[100:150]
        assert await driver.get_range("r", 4990, 100) == data[4990:]
        assert await driver.get_range("r", 5000, 10) == b""  # past the end: no request
    assert media_requests(google) == ["bytes=100-149", "bytes=4990-4999"]


async def test_list_pages_through_many_files(google: FakeGoogleDrive) -> None:
    google.max_page_size = 3
    async with drive(google) as driver:
        keys = [f"l/{i:02d}" for i in range(11)]
        await asyncio.gather(*(driver.put(k, b"x") for k in keys))
        assert [k async for k in driver.list("l/")] == keys
    assert any("pageToken" in r.query for r in google.requests)


async def test_unsupported_queries_are_rejected_by_the_stand_in(google: FakeGoogleDrive) -> None:
    tokens = google.issue_tokens()
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{google.api().api_base}/files",
            params={"q": "fullText contains 'x'"},
            headers={"Authorization": f"Bearer {tokens.access_token}"},
        )
    assert response.status_code == 400


# -- duplicate names ----------------------------------------------------------------------


async def test_put_removes_older_files_of_the_same_name(google: FakeGoogleDrive) -> None:
    async with drive(google, root_path="/dups") as driver:
        await driver.put("d/k", b"first")
        folder = google.folder_id("dups/VirtBackup/d")
        assert folder is not None
        # Another client's files of the same name, as Drive allows.
        google.add_file(folder, "k", b"stray one")
        google.add_file(folder, "k", b"newest stray")
        assert await driver.get("d/k") == b"newest stray"  # readers take the newest
        assert await driver.stat("d/k") == len(b"newest stray")
        assert [k async for k in driver.list("d/")] == ["d/k"]  # listed once
        await driver.put("d/k", b"final")
        assert [f.data for f in google.children(folder)] == [b"final"]
        assert await driver.get("d/k") == b"final"
        google.add_file(folder, "k", b"again")
        await driver.delete("d/k")  # every file of the name goes
        assert google.children(folder) == []


async def test_concurrent_upload_race_converges_on_the_newest(google: FakeGoogleDrive) -> None:
    google.race_uploads = True  # each upload lands just after a concurrent one
    async with drive(google, root_path="/race") as driver:
        await driver.put("k", b"mine")
        assert await driver.get("k") == b"mine"
        root = google.folder_id("race/VirtBackup")
        assert root is not None
        assert [f.data for f in google.children(root)] == [b"mine"]


async def test_concurrent_folder_creation_uses_the_oldest(google: FakeGoogleDrive) -> None:
    google.race_folders = True  # every folder creation races with another client's
    async with drive(google, root_path="/fold") as driver:
        await driver.put("x/y", b"data")
        google.race_folders = False
        # One folder of each name is left, and it holds the data.
        names = [f.name for f in google.children("root")]
        assert names == ["fold"]
        vb = google.folder_id("fold/VirtBackup/x")
        assert vb is not None
        assert [f.data for f in google.children(vb)] == [b"data"]
    async with drive(google, root_path="/fold") as other:  # a fresh client agrees
        assert await other.get("x/y") == b"data"


async def test_twin_folders_resolve_to_the_oldest_for_readers(google: FakeGoogleDrive) -> None:
    async with drive(google, root_path="/twins") as driver:
        await driver.put("a/k", b"real")
        vb = google.folder_id("twins/VirtBackup")
        assert vb is not None
        twin = google.add_file(vb, "a", folder=True)  # newer twin, with other content
        google.add_file(twin, "k", b"twin")
        google.add_file(twin, "only-in-twin", b"t")
    async with drive(google, root_path="/twins") as fresh:
        assert await fresh.get("a/k") == b"real"
        assert [k async for k in fresh.list()] == ["a/k"]


async def test_a_vanished_folder_is_transient_then_recreated(google: FakeGoogleDrive) -> None:
    async with drive(google, root_path="/gone") as driver:
        await driver.put("a/k", b"1")
        folder = google.folder_id("gone/VirtBackup/a")
        assert folder is not None
        google.files.pop(folder)  # deleted behind the driver's back (cached id is stale)
        with pytest.raises(TransientError, match="disappeared"):
            await driver.put("a/k2", b"2")
        await driver.put("a/k2", b"2")
        assert await driver.get("a/k2") == b"2"


# -- tokens -------------------------------------------------------------------------------


async def test_expired_token_is_refreshed_and_the_request_repeated(
    google: FakeGoogleDrive,
) -> None:
    refreshed: list[GoogleTokens] = []
    tokens = google.issue_tokens()
    async with drive(google, tokens=tokens, on_refresh=refreshed.append) as driver:
        await driver.put("k", b"v")
        google.expire_access_tokens()  # Google says 401 although expires_at is in the future
        assert await driver.get("k") == b"v"
        assert google.refreshes == 1
        assert len(refreshed) == 1
        new = refreshed[0]
        assert new.access_token != tokens.access_token
        assert new.refresh_token == tokens.refresh_token
        assert new.expires_at is not None
        assert new.expires_at > datetime.now(UTC) + timedelta(minutes=50)
        assert driver.tokens == new
        statuses = [r.path for r in google.requests if r.path == "/token"]
        assert statuses == ["/token"]


async def test_concurrent_401s_refresh_once(google: FakeGoogleDrive) -> None:
    calls: list[GoogleTokens] = []

    async def on_refresh(tokens: GoogleTokens) -> None:  # async callbacks are awaited
        await asyncio.sleep(0)
        calls.append(tokens)

    async with drive(google, on_refresh=on_refresh) as driver:
        await asyncio.gather(*(driver.put(f"k{i}", b"v") for i in range(4)))
        google.expire_access_tokens()
        assert await asyncio.gather(*(driver.get(f"k{i}") for i in range(4))) == [b"v"] * 4
    assert google.refreshes == 1
    assert len(calls) == 1


async def test_token_about_to_expire_is_refreshed_before_the_request(
    google: FakeGoogleDrive,
) -> None:
    stale = google.issue_tokens(expires_in=30)  # within the 60 s skew
    async with drive(google, tokens=stale) as driver:
        await driver.put("k", b"v")
    assert google.refreshes == 1
    used = {r.headers.get("Authorization") for r in google.requests if r.path != "/token"}
    assert f"Bearer {stale.access_token}" not in used


async def test_only_a_refresh_token_is_enough(google: FakeGoogleDrive) -> None:
    issued = google.issue_tokens()
    async with drive(google, tokens=GoogleTokens(refresh_token=issued.refresh_token)) as driver:
        await driver.put("k", b"v")
    assert google.refreshes == 1


async def test_invalid_refresh_token_is_permanent_and_quick(google: FakeGoogleDrive) -> None:
    refreshed: list[GoogleTokens] = []
    async with drive(google, on_refresh=refreshed.append) as driver:
        await driver.put("k", b"v")
        google.expire_access_tokens()
        google.revoke_refresh_tokens()
        started = time.monotonic()
        with pytest.raises(PermanentError, match="invalid_grant") as info:
            await retry(lambda: driver.get("k"), RetryPolicy(attempts=5, initial_delay=1))
        assert "sign in with Google again" in str(info.value)
        assert time.monotonic() - started < 2  # not retried
        with pytest.raises(PermanentError, match="invalid_grant"):  # remembered: no new request
            await driver.put("k2", b"v")
    assert [r.path for r in google.requests].count("/token") == 1
    assert refreshed == []


async def test_wrong_client_is_permanent(google: FakeGoogleDrive) -> None:
    async with drive(google, api=google.api(client_secret="wrong")) as driver:
        google.expire_access_tokens()
        with pytest.raises(PermanentError, match="invalid_client"):
            await driver.put("k", b"v")


async def test_no_client_id_is_permanent_when_a_refresh_is_needed(
    google: FakeGoogleDrive,
) -> None:
    async with drive(google, api=google.api(client_id="")) as driver:
        await driver.put("k", b"v")  # the access token is still good
        google.expire_access_tokens()
        with pytest.raises(PermanentError, match="VIRTBACKUP_GOOGLE_CLIENT_ID"):
            await driver.get("k")


async def test_expired_access_token_without_refresh_token(google: FakeGoogleDrive) -> None:
    issued = google.issue_tokens()
    tokens = GoogleTokens(access_token=issued.access_token)
    async with drive(google, tokens=tokens) as driver:
        await driver.put("k", b"v")
        google.expire_access_tokens()
        with pytest.raises(PermanentError, match="no refresh token"):
            await driver.get("k")


async def test_token_endpoint_outage_is_transient(google: FakeGoogleDrive) -> None:
    async with drive(google) as driver:
        google.expire_access_tokens()
        google.fail_next(503, match="/token", retry_after=1)
        with pytest.raises(TransientError, match="token refresh") as info:
            await driver.put("k", b"v")
        assert info.value.retry_after == 1
        await driver.put("k", b"v")


# -- throttling and server errors ---------------------------------------------------------


async def test_429_with_retry_after_is_transient_then_retry_succeeds(
    google: FakeGoogleDrive,
) -> None:
    async with drive(google) as driver:
        await driver.put("k", b"v")
        google.fail_next(429, match="alt=media", retry_after=1)
        with pytest.raises(TransientError) as info:
            await driver.get("k")
        assert info.value.retry_after == 1.0
        google.fail_next(429, match="alt=media", retry_after=1)
        waits: list[float] = []
        started = time.monotonic()
        data = await retry(
            lambda: driver.get("k"),
            RetryPolicy(attempts=3, initial_delay=0.01),
            on_retry=lambda attempt, exc, delay: waits.append(delay),
        )
        assert data == b"v"
        assert waits == [1.0]  # the server's Retry-After, not the 10 ms backoff
        assert time.monotonic() - started >= 1.0


async def test_500_and_rate_limit_403_are_transient(google: FakeGoogleDrive) -> None:
    async with drive(google) as driver:
        await driver.put("k", b"v")
        google.fail_next(500, match="POST /upload")
        with pytest.raises(TransientError, match="HTTP 500"):
            await driver.put("k", b"w")
        google.fail_next(403, match="GET /drive/v3/files", reason="userRateLimitExceeded")
        with pytest.raises(TransientError, match="HTTP 403"):
            await driver.stat("k")
        google.fail_next(403, match="POST /upload", reason="storageQuotaExceeded")
        with pytest.raises(PermanentError, match="full"):
            await driver.put("k", b"w")
        google.fail_next(403, match="POST /upload", reason="insufficientPermissions")
        with pytest.raises(PermanentError, match="denied"):
            await driver.put("k", b"w")
        google.fail_next(500, count=2, match="/upload")
        await retry(lambda: driver.put("k", b"w"), RetryPolicy(attempts=3, initial_delay=0.01))
        assert await driver.get("k") == b"w"


async def test_failed_resumable_chunk_leaves_no_file(google: FakeGoogleDrive) -> None:
    async with drive(google, multipart_limit=0, chunk_size=256 * 1024) as driver:
        data = secrets.token_bytes(MIB)
        google.fail_next(503, match="upload_id=")
        with pytest.raises(TransientError):
            await driver.put("big", data)
        assert not await driver.exists("big")
        await driver.put("big", data)
        assert await driver.get("big") == data


async def test_unreachable_is_transient() -> None:
    google = FakeGoogleDrive()  # never started: nothing listens on its URLs
    google.port = 9  # discard: refused on loopback
    driver = drive(google, tokens=GoogleTokens(access_token="x"))
    async with driver:
        with pytest.raises(TransientError, match="unreachable"):
            await driver.get("k")


async def test_closed_driver_refuses(google: FakeGoogleDrive) -> None:
    driver = drive(google)
    await driver.close()
    await driver.close()
    with pytest.raises(PermanentError, match="closed"):
        await driver.put("k", b"v")


# -- the factory, the tokens holder and expiresAt -------------------------------------------


async def test_factory_takes_settings_and_calls_on_refresh(google: FakeGoogleDrive) -> None:
    issued = google.issue_tokens()
    settings = GdriveSettings(
        refresh_token=issued.refresh_token, access_token="stale", expires_at=0
    )
    stored: list[GdriveSettings] = []
    driver = open_driver(
        "gdrive",
        {"rootPath": "/f"},
        tokens=settings,
        on_refresh=lambda tokens: stored.append(tokens.apply_to(settings)),
        google_api=google.api(),
    )
    async with driver:
        await driver.put("k", b"v")
    assert len(stored) == 1
    assert stored[0].refresh_token == issued.refresh_token
    assert stored[0].access_token not in ("", "stale")
    assert isinstance(stored[0].expires_at, str)
    assert stored[0].expires_at.endswith("Z")


def test_google_api_from_env() -> None:
    api = GoogleApi.from_env(
        {"VIRTBACKUP_GOOGLE_CLIENT_ID": "id", "VIRTBACKUP_GOOGLE_CLIENT_SECRET": "secret"}
    )
    assert api.client_id == "id"
    assert api.client_secret == "secret"
    assert api.api_base == "https://www.googleapis.com/drive/v3"
    assert api.upload_base == "https://www.googleapis.com/upload/drive/v3"
    assert api.token_url == "https://oauth2.googleapis.com/token"
    assert "secret" not in repr(api)
    with pytest.raises(InvalidParamsError, match="api_base"):
        GoogleApi(api_base="ftp://x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1775707200, datetime(2026, 4, 9, 4, 0, tzinfo=UTC)),
        (1775707200000, datetime(2026, 4, 9, 4, 0, tzinfo=UTC)),
        (1775707200.5, datetime(2026, 4, 9, 4, 0, 0, 500000, tzinfo=UTC)),
        ("1775707200", datetime(2026, 4, 9, 4, 0, tzinfo=UTC)),
        ("1775707200000", datetime(2026, 4, 9, 4, 0, tzinfo=UTC)),
        ("2026-02-06T12:00:00Z", datetime(2026, 2, 6, 12, 0, tzinfo=UTC)),
        ("2026-02-06T13:00:00+01:00", datetime(2026, 2, 6, 12, 0, tzinfo=UTC)),
        ("2026-02-06T12:00:00.250Z", datetime(2026, 2, 6, 12, 0, 0, 250000, tzinfo=UTC)),
        ("2026-02-06T12:00:00", datetime(2026, 2, 6, 12, 0, tzinfo=UTC)),  # naive: UTC
        (None, None),
        ("", None),
        ("  ", None),
    ],
)
def test_parse_expires_at(value: object, expected: datetime | None) -> None:
    parsed = parse_expires_at(value)
    assert parsed == expected
    if parsed is not None:
        assert parsed.tzinfo is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tomorrow", "neither a Unix timestamp"),
        ("2026-13-01T00:00:00Z", "ISO-8601"),
        (True, "boolean"),
        (-5, "not a valid Unix timestamp"),
        (float("nan"), "not a valid Unix timestamp"),
        (10**20, "out of range"),
        (int("9" * 400), "400-digit number"),
        ("9" * 400, "too long"),
        ([1], "number or a string"),
    ],
)
def test_parse_expires_at_rejects_clearly(value: object, message: str) -> None:
    with pytest.raises(InvalidParamsError, match=message) as info:
        parse_expires_at(value)
    assert isinstance(info.value, ValueError)
    assert "expiresAt" in str(info.value)


def test_tokens_holder() -> None:
    wire = {
        "accessToken": "ya29.a",
        "refreshToken": "1//r",
        "scope": "https://www.googleapis.com/auth/drive.file",
        "accountEmail": "user@example.com",
        "expiresAt": 1775707200000,
    }
    tokens = GoogleTokens.from_wire(wire)
    assert tokens.expires_at == datetime(2026, 4, 9, 4, 0, tzinfo=UTC)
    assert "ya29" not in repr(tokens)
    assert "1//r" not in repr(tokens)
    assert tokens.expired(now=datetime(2026, 4, 9, 3, 59, 30, tzinfo=UTC))  # within skew
    assert not tokens.expired(now=datetime(2026, 4, 9, 3, 58, tzinfo=UTC))
    assert GoogleTokens(access_token="a").expired() is False  # unknown expiry: try it
    assert GoogleTokens(refresh_token="r").expired() is True
    settings = tokens.apply_to(GdriveSettings(root_path="/x"))
    assert settings.expires_at == "2026-04-09T04:00:00Z"
    assert settings.root_path == "/x"
    assert msgspec.to_builtins(settings)["accountEmail"] == "user@example.com"
    assert GoogleTokens.from_settings(settings) == tokens
    assert format_expires_at(None) is None
    with pytest.raises(InvalidParamsError, match="refreshToken is required"):
        GoogleTokens.from_wire({**wire, "refreshToken": ""})
    with pytest.raises(InvalidParamsError, match="expiresAt"):
        GoogleTokens.from_wire({**wire, "expiresAt": "soon"})
    with pytest.raises(ValueError, match="aware"):
        GoogleTokens(access_token="a", expires_at=datetime(2026, 1, 1))


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("999999") == 3600.0


async def test_token_source_keeps_refresh_token_unless_rotated(google: FakeGoogleDrive) -> None:
    issued = google.issue_tokens()
    async with httpx.AsyncClient() as http:
        source = TokenSource(
            GoogleTokens(refresh_token=issued.refresh_token, scope="s"), api=google.api(), http=http
        )
        token = await source.access_token()
        assert token.startswith("ya29.")
        assert source.tokens.refresh_token == issued.refresh_token
        assert await source.access_token() == token  # fresh: no second refresh
    assert google.refreshes == 1


async def test_folder_mime_is_drives(google: FakeGoogleDrive) -> None:
    async with drive(google, root_path="/m") as driver:
        await driver.put("a/b", b"x")
    folder = google.folder_id("m")
    assert folder is not None
    assert {f.mime_type for f in google.children(folder)} == {FOLDER_MIME}


@pytest.mark.parametrize("field", ["accountEmail", "scope", "refreshToken"])
def test_tokens_with_control_characters_are_refused(field: str) -> None:
    wire = {"refreshToken": "1//r", field: "a\x00b"}
    with pytest.raises(InvalidParamsError, match=f"{field} must not contain control"):
        GoogleTokens.from_wire(wire)


async def test_an_empty_folder_is_removed_on_request_and_only_then(
    google: FakeGoogleDrive,
) -> None:
    """Drive keeps folders as objects: deleting a folder's last file leaves the folder;
    ``remove_empty_folder`` removes it when it is empty, never a parent or a folder that
    holds something, and a later put makes it again."""
    async with drive(google) as driver:
        root = "/".join(driver.root)
        await driver.put("vms/a/t1/backup.json", b"1")
        await driver.put("vms/a/t2/backup.json", b"2")
        await driver.delete("vms/a/t1/backup.json")
        assert google.folder_id(f"{root}/vms/a/t1") is not None  # left by the delete
        assert await driver.remove_empty_folder("vms/a/t1/") is True
        assert google.folder_id(f"{root}/vms/a/t1") is None
        assert google.folder_id(f"{root}/vms/a") is not None  # its parent stays
        assert await driver.remove_empty_folder("vms/a/") is False  # holds t2
        assert await driver.remove_empty_folder("vms/a/t1/") is True  # gone already
        assert await driver.remove_empty_folder("vms/none/") is True
        with pytest.raises(InvalidKeyError):
            await driver.remove_empty_folder("vms/a/t2")
        await driver.put("vms/a/t1/backup.json", b"again")  # the cached id was dropped
        assert await driver.get("vms/a/t1/backup.json") == b"again"
        assert [k async for k in driver.list("vms/")] == [
            "vms/a/t1/backup.json",
            "vms/a/t2/backup.json",
        ]
