"""Logging: level, the one account whose debug lines always show, JSON lines."""
from __future__ import annotations

import json
import logging

import pytest

from common.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_account_shows_that_accounts_debug_lines_only(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "acct_watched", "text")
    log = logging.getLogger("test")
    log.debug("hidden line", extra={"account": "acct_other"})
    log.debug("shown line", extra={"account": "acct_watched"})
    log.info("info line")
    err = capsys.readouterr().err
    assert "shown line" in err and "info line" in err and "hidden line" not in err


def test_json_format_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG", None, "json")
    logging.getLogger("test").warning("hello %s", "there", extra={"account": "a1", "session": "s1"})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "hello there" and line["level"] == "WARNING"
    assert (line["account"], line["session"]) == ("a1", "s1")
