"""Agent API: notifications (``POST /ntfyme/test``), sent by the notifier through ntfy."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, post

from virtbackup.contracts.subjects import NotifyCmd
from virtbackup.contracts.v1.config import NtfyToken
from virtbackup.contracts.v1.webhooks import NtfyTest, TestResult
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway


class NtfyTestBody(Body, kw_only=True):
    """``{"token": ...}``, optional: without it the configured ``ntfymeToken`` is used.
    A token with a space or a control character is a 400 naming ``token``."""

    token: NtfyToken | None = None


class NotifyController(Controller):
    @post("/ntfyme/test", status_code=200, responses=responses(400))
    async def ntfy_test(
        self, gw: Gateway, data: NtfyTestBody | None = None
    ) -> Response[dict[str, Any]]:
        """Publish a test notification to the configured ntfy server and topic: 200 with
        ``success: true`` and ntfy's status code, or (as ``/sftp/test`` answers a failed
        test) 200 with ``success: false``, ntfy's status code if it answered, and
        ``error``: what went wrong (ntfy's answer, no answer, no topic configured)."""
        token = data.token if data is not None else None
        if token and gw.secrets is not None:  # nothing goes on the bus in clear
            token = gw.secrets.seal(token)
        if gw.ntfy is not None:  # the settings just posted, not those of a moment ago
            await gw.ntfy.sync()
        result = await gw.bus.request(
            NotifyCmd.NTFY_TEST, NtfyTest(token=token), TestResult, timeout=15.0
        )
        if result.ok:
            body = {
                "success": True,
                "message": "Test notification delivered.",
                "statusCode": result.status_code,
            }
            return Response(body, status_code=200)
        body = {
            "success": False,
            "message": "Test notification not delivered.",
            "statusCode": result.status_code,
            "error": result.error,
        }
        return Response(body, status_code=200)
