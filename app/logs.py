"""Log output: readable lines for a laptop, one JSON object per line for production.

Structured fields travel as `extra=` on the record; the JSON formatter emits them,
the text formatter keeps them out of the way.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# Access tokens and tickets (JWTs), refresh tokens and API keys never reach a log line,
# whichever code path or library put them in the message.
_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|srt_[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
    r"|sk-[A-Za-z0-9_-]{20,}"
)


def redact(text: str) -> str:
    return _SECRETS.sub("[redacted]", text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would repeat ours, with the query string (tickets) in it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(_dropped_on_purpose)


def _dropped_on_purpose(record: logging.LogRecord) -> bool:
    """An SSE response that drops a client too slow to read ends without its final
    chunk, which is how it makes uvicorn close the connection; uvicorn logs that as an
    error. The response logs the drop itself, once, as what it is."""
    return record.getMessage() != "ASGI callable returned without completing response."
