"""deploy/backup.py: a consistent, checked copy of the SQLite store, encrypted like the original."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlcipher3

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DB_PATH", "DB_URL", "DB_ENCRYPTION_KEY"}}
    return {**env, **values}


def _cli(env: dict[str, str], *argv: str) -> dict[str, object]:
    done = subprocess.run([str(BIN / "switchdb"), "--json", *argv], env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _backup(env: dict[str, str], dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "backup.py"), str(dest), *extra],
                          env=env, capture_output=True, text=True, timeout=60)


def _emails(path: Path, key: str | None) -> list[str]:
    conn = sqlcipher3.connect(str(path))
    try:
        if key:
            conn.execute("PRAGMA key = '" + key + "'")
        return [row[0] for row in conn.execute("SELECT email FROM accounts ORDER BY email")]
    finally:
        conn.close()


def test_backup_of_an_encrypted_store_is_encrypted_with_the_same_key(tmp_path: Path) -> None:
    env = _env(DB_PATH=str(tmp_path / "switch.db"), DB_ENCRYPTION_KEY="k3y 'quoted'")
    _cli(env, "account", "create", "--email", "ana@example.com")
    done = _backup(env, tmp_path / "backups")
    assert done.returncode == 0, done.stderr
    copy = Path(done.stdout.split("backup: ", 1)[1].strip())
    assert copy.parent == tmp_path / "backups" and copy.stat().st_mode & 0o077 == 0
    assert _emails(copy, "k3y ''quoted''") == ["ana@example.com"]
    try:
        _emails(copy, None)
    except sqlcipher3.DatabaseError:
        pass
    else:
        raise AssertionError("the copy must not be readable without the key")
    assert not list((tmp_path / "backups").glob("*.partial")) and not list((tmp_path / "backups").glob("*-wal"))


def test_backup_with_a_wrong_key_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    env = _env(DB_PATH=str(tmp_path / "switch.db"), DB_ENCRYPTION_KEY="right")
    _cli(env, "migrate")
    done = _backup({**env, "DB_ENCRYPTION_KEY": "wrong"}, tmp_path / "backups")
    assert done.returncode != 0 and "DB_ENCRYPTION_KEY" in done.stderr
    assert not list((tmp_path / "backups").glob("*"))


def test_backup_keeps_only_the_newest_copies(tmp_path: Path) -> None:
    env = _env(DB_PATH=str(tmp_path / "switch.db"))
    _cli(env, "account", "create", "--email", "bo@example.com")
    dest = tmp_path / "backups"
    dest.mkdir()
    for day in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        (dest / f"switch-{day}.db").write_bytes(b"old")
    done = _backup(env, dest, "--keep", "2")
    assert done.returncode == 0, done.stderr
    kept = sorted(p.name for p in dest.iterdir())
    assert len(kept) == 2 and kept[0] == "switch-20260103T000000Z.db"
    assert _emails(dest / kept[1], None) == ["bo@example.com"]


def test_backup_refuses_the_postgresql_store(tmp_path: Path) -> None:
    done = _backup(_env(DB_URL="postgresql://switch@db.example/switch"), tmp_path / "backups")
    assert done.returncode != 0 and "pg_dump" in done.stderr
