"""Logging setup: one line per record, as text (key=value) or JSON.

Structured fields travel in `extra={"fields": {...}}` so both formats carry them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_RESERVED = "fields"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}"]
        parts.append(f"msg={_quote(record.getMessage())}")
        fields: dict[str, Any] = getattr(record, _RESERVED, {})
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        out.update(getattr(record, _RESERVED, {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _quote(value: object) -> str:
    text = "" if value is None else str(value)
    # Job-controlled text (ids) must not be able to fake a second log line or field.
    if text and all(c.isalnum() or c in "-_./:" for c in text):
        return text
    return json.dumps(text)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`logger.info("msg", extra=fields(job_id=...))`."""
    return {_RESERVED: values}
