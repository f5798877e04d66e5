"""How the CLI's processes log: the human text format, or one JSON object per line.

`--log-format json` is for log pipelines: each record becomes
`{"time": ..., "level": ..., "logger": ..., "message": ..., <key>: <value>, ...}` where the
key=value fields of our lifecycle lines (`applied model=demo version=3 pull_s=0.41`) are parsed
out, numbers as numbers; a field never overwrites the five fixed keys.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "configure_logging"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_FIELD = re.compile(r"(?:^|\s)([A-Za-z_][\w.]*)=(\S+)")
_FIXED = frozenset({"time", "level", "logger", "message", "exception"})


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the message's key=value fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in _FIELD.findall(message):
            if key not in _FIXED:
                out.setdefault(key, _value(value))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger of a CLI process: `level` and `log_format` are already validated."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.set_name("weightstream")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "weightstream"]:
        root.removeHandler(old)  # main() called again in one process (tests): one handler
    root.addHandler(handler)
    root.setLevel(level)
