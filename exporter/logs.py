"""Logging setup: one line per record, as text (key=value) or JSON.

Structured fields travel in `extra={"fields": {...}}` so both formats carry them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

_RESERVED = "fields"


class _TextFormatter(logging.Formatter):
    # One line per classified job is on the job path: the second's timestamp is
    # formatted once, not per record.
    _stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        line = (
            f"ts={stamp[1]}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"msg={_quote(record.getMessage())}"
        )
        fields: dict[str, Any] | None = getattr(record, _RESERVED, None)
        if fields:
            line += "".join([f" {key}={_quote(value)}" for key, value in fields.items()])
        if record.exc_info:
            line += f" error={_quote(self.formatException(record.exc_info))}"
        return line


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


# What goes unquoted: letters and digits (str.isalnum: what \w matches besides "_")
# and "-_./:". Anything else is JSON-quoted.
_PLAIN = re.compile(r"[\w\-./:]+")
_plain = _PLAIN.fullmatch
# What the job line's text values (results, reasons, method names) quote to: they come
# from small sets, so each is checked once. Bounded, since ids are in there too.
_QUOTED: dict[str, str] = {}
_QUOTED_MAX = 1024


def _quote(value: object) -> str:
    if type(value) is str:
        quoted = _QUOTED.get(value)
        if quoted is None:
            if len(_QUOTED) >= _QUOTED_MAX:
                _QUOTED.clear()
            quoted = _QUOTED[value] = _quote_text(value)
        return quoted
    return _quote_text("" if value is None else str(value))


def _quote_text(text: str) -> str:
    # Job-controlled text (ids) must not be able to fake a second log line or field.
    if _plain(text):
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
    # Neither format prints where, in which thread or process a record was made; the
    # logging manual's optimizations skip gathering it (a frame walk per record).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    # hpack's debug lines print header blocks and fields as it decodes them: the
    # forwarded requests' values (tokens among them). Never at any level of ours.
    logging.getLogger("hpack").setLevel(logging.INFO)


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`logger.info("msg", extra=fields(job_id=...))`."""
    return {_RESERVED: values}
