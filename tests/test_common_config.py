"""Settings: a frozen attrs value class read from the environment, secrets kept out of its repr."""
from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from common.config import Settings, load_settings
from common.errors import ErrorCode, SwitchError

SECRETS = {
    "db_encryption_key": "sqlcipher-secret",
    "openai_api_key": "sk-provider-secret",
    "gemini_api_key": "gemini-secret",
    "db_url": "postgresql://u:pw-secret@h/d",
}


def test_settings_are_a_frozen_value() -> None:
    settings = Settings(port=1234)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    assert settings == Settings(port=1234) and hash(settings) == hash(Settings(port=1234))
    assert attrs.evolve(settings, port=5).port == 5 and settings.port == 1234


def test_repr_hides_every_secret_and_shows_the_rest() -> None:
    shown = repr(Settings(**SECRETS, host="0.0.0.0"))  # type: ignore[arg-type]
    for name, secret in SECRETS.items():
        assert secret not in shown and f"{name}=***" in shown
    assert "host='0.0.0.0'" in shown and "gemini_url=" in shown
    assert "openai_api_key=None" in repr(Settings())  # unset: nothing to hide, and it says so


def test_every_field_is_read_from_its_upper_case_key(tmp_path: Path) -> None:
    env = {"ZMQ_SOCKET_PATH": "ipc:///x", "UPSTREAM_URL": "ws://127.0.0.1:9/v1/realtime"}
    for field in attrs.fields(Settings):
        if field.name.upper() not in env and field.type in ("str", "str | None"):
            env[field.name.upper()] = f"{field.name}-value"
    env.update({"LOG_FORMAT": "json", "TLS_KEY_FILE": "k.pem", "TLS_CERT_FILE": "c.pem", "JOURNAL_FSYNC": "batch",
                "PORT": "0", "WORKERS": "3", "IDLE_TIMEOUT": "2.5", "NOT_A_SETTING": "ignored"})
    settings = load_settings("switchd", env, tmp_path / ".env")
    assert settings.gemini_url == "gemini_url-value" and settings.spool_dir == "spool_dir-value"
    assert (settings.port, settings.workers, settings.idle_timeout) == (0, 3, 2.5)
    assert settings.tls_cert_file == "c.pem" and settings.log_format == "json"


def test_a_number_that_is_not_one_names_its_key(tmp_path: Path) -> None:
    env = {"ZMQ_SOCKET_PATH": "ipc:///x", "UPSTREAM_URL": "ws://127.0.0.1:9/", "MAX_SESSIONS": "many"}
    with pytest.raises(SwitchError, match="MAX_SESSIONS") as err:
        load_settings("switchd", env, tmp_path / ".env")
    assert err.value.code == ErrorCode.INTERNAL_BAD_CONFIG
