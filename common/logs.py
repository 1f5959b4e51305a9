"""Logging set-up shared by the daemons: level, one always-debug account, text or JSON lines.

Records may carry `extra={"account": account_id}`; LOG_ACCOUNT shows that account's debug
lines whatever the level. Callers never pass keys, audio or transcripts to a logger.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """C0/C1 control characters (ESC, BEL, CR, LF, ...) as \\xNN: a line of the log stays one line
    and cannot drive the terminal that shows it."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


class _LevelOrAccount(logging.Filter):
    def __init__(self, level: int, account: str | None) -> None:
        super().__init__()
        self.level = level
        self.account = account

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        return self.account is not None and getattr(record, "account", None) == self.account


class TextFormatter(logging.Formatter):
    """The message escaped (whatever a client put in it); a traceback below it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("account", "session", "code"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(level: str = "INFO", account: str | None = None, fmt: str = "text") -> None:
    threshold = logging.getLevelName(level.upper())
    if not isinstance(threshold, int):
        threshold = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_LevelOrAccount(threshold, account))
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The handler's filter decides; the root passes debug through only when an account needs it.
    root.setLevel(logging.DEBUG if account else threshold)
