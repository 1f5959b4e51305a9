"""DB_URL in the settings and the logs: DB_PATH not required with it, its password never shown."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_settings
from common.errors import SwitchError
from switchdb import pg
from switchdb.db import store_name

URL = "postgresql://ledger:pa55word@db.internal:5433/switch?sslmode=require&password=also-secret"


@pytest.mark.parametrize("role", ["switchdb", "cli"])
def test_db_url_makes_db_path_optional(role: str, tmp_path: Path) -> None:
    env = {"ZMQ_SOCKET_PATH": "ipc:///x"}
    with pytest.raises(SwitchError, match="DB_PATH"):
        load_settings(role, env, tmp_path / ".env")  # type: ignore[arg-type]
    settings = load_settings(role, {**env, "DB_URL": URL}, tmp_path / ".env")  # type: ignore[arg-type]
    assert settings.db_url == URL and settings.db_path == ""
    assert "pa55word" not in repr(settings) and "also-secret" not in repr(settings)


def test_the_url_is_shown_without_secrets() -> None:
    shown = pg.redact_url(URL)
    assert shown == "postgresql://ledger:***@db.internal:5433/switch"
    assert pg.redact_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert pg.redact_url("postgresql:///d?host=/tmp/sock") == "postgresql:///d"
    assert store_name(load_settings("cli", {"DB_URL": URL}, Path("/nonexistent/.env"))) == shown


def test_only_postgresql_urls_are_taken() -> None:
    assert pg.is_postgres_url("postgresql://h/d") and pg.is_postgres_url("postgres://h/d")
    assert not pg.is_postgres_url("sqlite:///x.db") and not pg.is_postgres_url("") and not pg.is_postgres_url(None)


def test_sql_is_translated_once_and_exactly() -> None:
    assert pg.translate("SELECT a FROM t WHERE b = ? AND c LIKE '5%' AND d = ?") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE '5%%' AND d = %s")
    assert pg.translate("BEGIN IMMEDIATE") == "BEGIN"
