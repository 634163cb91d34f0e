"""A real HTTP receiver on loopback for webhook and ntfy tests (HTTP/1.1, asyncio).

Every request is recorded (method, path, headers, body). What it answers is set per
path with :meth:`Receiver.script`: a list of actions taken in turn for the requests to
that path (the last one repeats): ``200``/``500``... (answer with that status),
``"hang"`` (read the request, never answer), ``"close"`` (close the connection without
answering). ntfy's servers cannot be reached from the test machines; this receiver also
stands in for ntfy's publish API: it answers a publish (``POST /`` with a JSON body, or
``POST /<topic>``) like ntfy, with the message as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

Action = int | str


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``async with Receiver() as rx``: listening on ``rx.url`` until the block ends."""

    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[Action]] = field(default_factory=dict)
    port: int = 0
    _server: asyncio.Server | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str, *actions: Action) -> None:
        """Answer the requests to ``path`` with ``actions`` in turn (the last repeats)."""
        self.scripts[path] = list(actions)

    def to(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, count: int, timeout: float) -> list[Received]:
        """Until ``count`` requests to ``path`` have arrived; ``TimeoutError`` if not."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.to(path)) >= count)
        return self.to(path)

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = raw.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(method, path, headers, body, time.monotonic())
                async with self._arrived:
                    self.requests.append(received)
                    self._arrived.notify_all()
                script = self.scripts.get(path, [200])
                index = min(len(self.to(path)) - 1, len(script) - 1)
                action = script[index]
                if action == "hang":
                    await asyncio.sleep(3600)
                    return
                if action == "close":
                    return
                assert isinstance(action, int)
                answer = self._answer(received)
                writer.write(
                    f"HTTP/1.1 {action} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    def _answer(received: Received) -> bytes:
        """ntfy's answer to a publish (harmless for a webhook receiver)."""
        try:
            sent = received.json() if received.body.startswith(b"{") else {}
        except ValueError:
            sent = {}
        topic = sent.get("topic") if isinstance(sent, dict) else None
        return json.dumps(
            {
                "id": f"m{len(received.body)}",
                "time": int(time.time()),
                "event": "message",
                "topic": topic or received.path.strip("/"),
                "message": sent.get("message", "") if isinstance(sent, dict) else "",
            }
        ).encode()
