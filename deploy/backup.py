"""Back up switchdb's SQLite store while switchdb runs: a consistent copy, encrypted like the original.

    /opt/realtime-switch/.venv/bin/python deploy/backup.py DEST_DIR [--keep N]

Reads DB_PATH and DB_ENCRYPTION_KEY from the environment (the units' EnvironmentFile). Uses
SQLite's online backup API, which copies a consistent snapshot page by page while the daemon
keeps writing (WAL mode). With DB_ENCRYPTION_KEY the copy is a SQLCipher file with the same key:
the plain `sqlite3` shell cannot read either, and a backup is worth nothing without the key, so
keep the key somewhere other than next to the backups. The copy is checked (`PRAGMA quick_check`)
before it is given its final name. For the PostgreSQL store (DB_URL) use pg_dump instead
(deploy/README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import sqlcipher3

PREFIX = "switch-"
SUFFIX = ".db"


def _open(path: Path, key: str | None) -> sqlcipher3.Connection:
    conn = sqlcipher3.connect(str(path))
    if key:
        conn.execute("PRAGMA key = '" + key.replace("'", "''") + "'")
    return conn


def backup(db_path: Path, key: str | None, dest_dir: Path, keep: int) -> Path:
    """Write a checked copy of the store into dest_dir; then keep only the `keep` newest copies."""
    if not db_path.is_file():
        raise SystemExit(f"backup: DB_PATH {db_path} is not a file")
    dest_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    final = dest_dir / f"{PREFIX}{stamp}{SUFFIX}"
    partial = final.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    source = _open(db_path, key)
    try:
        try:
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher3.DatabaseError as exc:
            raise SystemExit(f"backup: cannot read {db_path} (wrong or missing DB_ENCRYPTION_KEY?): {exc}") from None
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the copy holds what the store holds
        os.close(fd)
        target = _open(partial, key)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
            check = target.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            target.close()
    finally:
        source.close()
    if check != "ok":
        raise SystemExit(f"backup: the copy {partial} failed its check: {check}")
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    partial.rename(final)
    dir_fd = os.open(dest_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    for old in sorted(dest_dir.glob(f"{PREFIX}*{SUFFIX}"))[:-keep]:
        old.unlink()
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backup.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("dest_dir", type=Path, help="where the copies go")
    parser.add_argument("--keep", type=int, default=14, help="how many copies to keep (default 14)")
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error("--keep must be at least 1")
    if os.environ.get("DB_URL"):
        raise SystemExit("backup: DB_URL is set: back up PostgreSQL with pg_dump (deploy/README.md)")
    db_path = os.environ.get("DB_PATH")
    if not db_path:
        raise SystemExit("backup: missing required config key DB_PATH")
    final = backup(Path(db_path), os.environ.get("DB_ENCRYPTION_KEY") or None, args.dest_dir, args.keep)
    print(f"backup: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
