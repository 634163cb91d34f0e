"""Structured logging: one JSON object a line on stderr, with the current trace id."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from opentelemetry import trace

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
        handler.formatter.converter = __import__("time").gmtime  # type: ignore[union-attr]
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    adopt_library_loggers()
    for noisy in ("nats", "faststream", "uvicorn.access", "asyncssh"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


#: Libraries that give their loggers a console handler of their own (and stop them
#: propagating): FastStream's ``faststream`` (app and broker messages, a colourised
#: plain-text line on stderr) and ``faststream.access.*`` (per-message lines on stdout).
OWN_HANDLER_LOGGERS = ("faststream",)


def adopt_library_loggers() -> None:
    """Make the loggers of ``OWN_HANDLER_LOGGERS`` (and those below them) write through
    the root logger's handler, so a service's log is one format (JSON lines) throughout:
    their own console handlers are removed and they propagate again. Loggers such a
    library creates later are covered by passing it a logger (``broker.make_broker``)."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if not any(name == top or name.startswith(top + ".") for top in OWN_HANDLER_LOGGERS):
            continue
        for own in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
            logger.removeHandler(own)
        logger.propagate = True
