"""Settings: read once from the environment (a `.env` file first, the real environment wins)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import attrs

from common.errors import ErrorCode, SwitchError

DEFAULT_UPSTREAM_URL = "wss://api.openai.com/v1/realtime?model=gpt-realtime"
DEFAULT_GEMINI_URL = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"

Role = Literal["switchd", "switchdb", "cli"]


@attrs.frozen
class Settings:
    zmq_socket_path: str = ""
    zmq_timeout_ms: int = 5000
    db_path: str = ""
    db_url: str | None = None  # postgresql://…: the PostgreSQL store instead of SQLite at DB_PATH
    db_encryption_key: str | None = None
    openai_api_key: str | None = None
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_ca_file: str | None = None  # a CA bundle trusted for wss:// besides the system's
    tls_cert_file: str | None = None  # with tls_key_file: switchd serves wss:// itself
    tls_key_file: str | None = None
    gemini_api_key: str | None = None
    gemini_url: str = DEFAULT_GEMINI_URL
    host: str = "127.0.0.1"
    port: int = 3000
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    max_payload_length: int = 2 * 1024 * 1024
    idle_timeout: float = 120.0
    max_sessions: int = 0  # 0: no limit
    shutdown_grace: float = 10.0
    workers: int = 1  # switchd processes sharing PORT (SO_REUSEPORT)
    spool_dir: str = "var/spool"
    journal_fsync: str = "off"  # off, or batch: fsync the journal once per usage batch written
    log_level: str = "INFO"
    log_account: str | None = None
    log_format: str = "text"

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug logs; secrets must not.
        secret = {"db_encryption_key", "openai_api_key", "gemini_api_key", "db_url"}
        shown = ", ".join(
            f"{f.name}={'***' if f.name in secret and getattr(self, f.name) else repr(getattr(self, f.name))}"
            for f in attrs.fields(Settings)
        )
        return f"Settings({shown})"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional `export` and quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def upstream_is_local(url: str) -> bool:
    """An upstream on loopback is a simulator or test upstream: no provider key needed."""
    parts = urlsplit(url)
    return parts.scheme in ("ws", "wss") and (parts.hostname or "") in {"127.0.0.1", "localhost", "::1"}


_INT_KEYS = {"ZMQ_TIMEOUT_MS", "PORT", "METRICS_PORT", "MAX_PAYLOAD_LENGTH", "MAX_SESSIONS", "WORKERS"}
_FLOAT_KEYS = {"IDLE_TIMEOUT", "SHUTDOWN_GRACE"}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "switchd": ("ZMQ_SOCKET_PATH",),
    "switchdb": ("ZMQ_SOCKET_PATH", "DB_PATH"),
    "cli": ("DB_PATH",),
}


def load_settings(
    role: Role, environ: Mapping[str, str] | None = None, env_file: Path = Path(".env")
) -> Settings:
    """Build the settings for one daemon; a missing required key raises naming the key."""
    env = {**read_env_file(env_file), **(os.environ if environ is None else environ)}
    env = {k: v for k, v in env.items() if v != ""}
    for key in _REQUIRED[role]:
        if key == "DB_PATH" and "DB_URL" in env:
            continue  # the PostgreSQL store: no file
        if key not in env:
            raise SwitchError(ErrorCode.INTERNAL_ENV_KEY_NOT_FOUND, f"missing required config key {key}")
    if role == "switchd" and "OPENAI_API_KEY" not in env and not upstream_is_local(
        env.get("UPSTREAM_URL", DEFAULT_UPSTREAM_URL)
    ):
        raise SwitchError(
            ErrorCode.INTERNAL_ENV_KEY_NOT_FOUND,
            "missing required config key OPENAI_API_KEY (required unless UPSTREAM_URL is a local ws:// simulator)",
        )
    kwargs: dict[str, object] = {}
    for name in attrs.fields_dict(Settings):
        key = name.upper()
        if key not in env:
            continue
        value = env[key]
        try:
            if key in _INT_KEYS:
                kwargs[name] = int(value)
            elif key in _FLOAT_KEYS:
                kwargs[name] = float(value)
            else:
                kwargs[name] = value
        except ValueError:
            raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"config key {key} must be a number") from None
    settings = Settings(**kwargs)  # type: ignore[arg-type]
    if settings.workers < 1:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key WORKERS must be at least 1")
    if settings.log_format not in ("text", "json"):
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key LOG_FORMAT must be text or json")
    for key, port in (("PORT", settings.port), ("METRICS_PORT", settings.metrics_port)):
        if not 0 <= port <= 65535:  # the kernel would take it modulo 65536 and bind another port
            raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"config key {key} must be 0 to 65535, not {port}")
    if role == "switchd":
        _check_upstream_url(settings.upstream_url)
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config keys TLS_CERT_FILE and TLS_KEY_FILE go together")
    return settings


def _check_upstream_url(url: str) -> None:
    """A provider URL that could never be dialled is a start-up error, not a 1011 per session."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key UPSTREAM_URL must be a ws:// or wss:// URL")
    if not parts.hostname:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key UPSTREAM_URL has no host")
    try:
        port = parts.port  # raises for a port that is not a number or past 65535
    except ValueError:
        port = 0
    if port == 0:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key UPSTREAM_URL has a bad port (1 to 65535)")
