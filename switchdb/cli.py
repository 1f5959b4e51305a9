"""`switchdb`: the daemon (`serve`, the default) and the admin commands, which work on the store
directly (the SQLite file at DB_PATH, or PostgreSQL at DB_URL).

Errors are one line on stderr (`switchdb: ...`), exit status 1 (2 for bad arguments); with
`--json` stdout holds exactly one JSON object, or nothing when the command failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from common.config import Settings, load_settings, read_env_file
from common.errors import ErrorCode, SwitchError
from common.logs import setup_logging
from switchdb import accounts, ledger, cli_ledger, cli_secrets, prices, sessions, usage
from switchdb.db import (
    Connection,
    applied_migrations,
    format_time,
    is_database_error,
    migrate,
    open_database,
    open_store,
    store_name,
    transaction,
    utc_now,
)

DEMO_EMAIL = "demo@realtime-switch.local"
DEMO_PLAN = "Pro"
DEMO_SESSION_ID = "demo"
DEMO_SESSION_UPDATE = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "instructions": "You are the Realtime Switch demo assistant. Answer briefly and in a friendly tone.",
        "audio": {"output": {"voice": "alloy"}},
    },
}
DEFAULT_PING_TIMEOUT_MS = 5000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the problem, not the whole usage text.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _positive_text(text: str) -> str:
    """A positive whole number, kept as text: its maximum is checked where it is used."""
    _positive(text)
    return text


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _future_time(text: str) -> str:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # a time without a zone is taken as UTC
    if moment <= datetime.now(UTC):
        raise argparse.ArgumentTypeError(f"{text} is in the past")
    return format_time(moment)


# --- output -----------------------------------------------------------------------------------


def _account_text(a: accounts.Account) -> str:
    if a.unit == ledger.USD:
        usd = ledger.format_usd
        balance = (
            f"balance   ${usd(a.credits)} (plan ${usd(a.token_remaining)}, top-up ${usd(a.topup_remaining)}),"
            f" markup {ledger.format_markup(a.markup)}\n"
        )
    else:
        balance = f"credits   {a.credits} (plan tokens {a.token_remaining}, top-up {a.topup_remaining})\n"
    return (
        f"account   {a.id}\nemail     {a.email}\nplan      {a.plan_name}\n{balance}"
        f"status    {a.status}\ncreated   {a.created_at}"
    )


def _key_text(k: accounts.ApiKey) -> str:
    state = "revoked " + k.revoked_at if k.revoked_at else ("expires " + k.expires_at if k.expires_at else "no expiry")
    return f"{k.key_indicator}  {k.key_hash}  {k.label!r}  {state}  last used {k.last_used_at or 'never'}"


# --- commands on the database file ------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, conn: Connection, applied_now: list[str]) -> None:
    names = applied_migrations(conn)
    cli_ledger.emit(
        args,
        {"migrations": names, "applied_now": applied_now},
        f"schema up to date: {len(names)} migrations ({len(applied_now)} applied now), latest {names[-1]}",
    )


def cmd_account_create(args: argparse.Namespace, conn: Connection) -> None:
    usd = None if args.usd is None else cli_ledger.parse_usd(args.usd, name="--usd")
    markup = ledger.DEFAULT_MARKUP if args.markup is None else cli_ledger.parse_markup(args.markup, name="--markup")
    with transaction(conn):
        account = accounts.create_account(conn, args.email, args.plan, args.tokens, args.topup, usd=usd, markup=markup)
    cli_ledger.emit(args, account.as_json(), _account_text(account))


def cmd_account_show(args: argparse.Namespace, conn: Connection) -> None:
    account = accounts.find_account(conn, args.account)
    cli_ledger.emit(args, account.as_json(), _account_text(account))


def cmd_key_create(args: argparse.Namespace, conn: Connection) -> None:
    with transaction(conn):
        account_id = cli_ledger.account_id(conn, args.account)
        plaintext, key = accounts.create_key(conn, account_id, args.label, args.expires_at)
    data = {
        "key": plaintext,
        "key_hash": key.key_hash,
        "key_indicator": key.key_indicator,
        "account_id": key.account_id,
        "label": key.label,
        "expires_at": key.expires_at,
    }
    text = (
        f"key        {plaintext}\n(shown once: only its hash is stored)\n"
        f"key_hash   {key.key_hash}\nindicator  {key.key_indicator}\naccount    {key.account_id}\n"
        f"label      {key.label}\nexpires    {key.expires_at or 'never'}"
    )
    cli_ledger.emit(args, data, text)


def cmd_key_list(args: argparse.Namespace, conn: Connection) -> None:
    keys = accounts.list_keys(conn, cli_ledger.account_id(conn, args.account))
    cli_ledger.emit(args, {"keys": [k.as_json() for k in keys]}, "\n".join(map(_key_text, keys)) or "no keys")


def cmd_key_revoke(args: argparse.Namespace, conn: Connection) -> None:
    with transaction(conn):
        key = accounts.revoke_key(conn, args.key)
    cli_ledger.emit(args, key.as_json(), f"revoked {key.key_indicator} ({key.key_hash}) at {key.revoked_at}")


def _demo_key(conn: Connection, account_id: str, key_file: Path) -> str:
    """The key in `key_file` while it still works for the demo account, else a new one written there."""
    try:
        kept = key_file.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        kept = ""
    if kept:
        key = accounts.get_key(conn, accounts.hash_key(kept))
        if key is not None and key.account_id == account_id and key.usable(utc_now()):
            return kept
    plaintext, _ = accounts.create_key(conn, account_id, "demo")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)  # the file may have existed with a wider mode
        out.write(plaintext + "\n")
    return plaintext


def cmd_seed(args: argparse.Namespace, conn: Connection, settings: Settings) -> None:
    key_file = Path(args.key_file or (settings.db_path or "var/switchdb") + ".demo-key")
    with transaction(conn):
        try:
            account = accounts.find_account(conn, DEMO_EMAIL)
            created = False
        except SwitchError:
            account = accounts.create_account(conn, DEMO_EMAIL, DEMO_PLAN)
            created = True
        sessions.put_session_update(conn, account.id, DEMO_SESSION_ID, DEMO_SESSION_UPDATE, utc_now())
        key = _demo_key(conn, account.id, key_file)
    data = {"account_id": account.id, "key": key, "session_id": DEMO_SESSION_ID, "created": created}
    text = (
        f"demo account  {account.id} ({DEMO_EMAIL}, {account.plan_name}, {account.credits} credits)"
        f"{' created' if created else ''}\ndemo key      {key} (kept in {key_file})\nsession id    {DEMO_SESSION_ID}"
    )
    cli_ledger.emit(args, data, text)


# Every table a deployment holds, in an order that satisfies the foreign keys. Summary claims
# and call owners are not copied: they only matter while a summary or a call runs.
COPIED_TABLES: dict[str, str] = {
    "accounts": "id, email, plan_name, token_remaining, topup_remaining, status, created_at, updated_at, unit, markup,"
    " email_key",
    "api_keys": "key_hash, account_id, key_indicator, label, created_at, expires_at, last_used_at, revoked_at",
    "sessions": "account_id, session_id, type, data, created_at",
    "usage_metrics": "id, " + usage._COLUMNS,
    "client_secrets": "secret_hash, account_id, key_hash, session_json, created_at, expires_at, revoked_at",
    "credit_entries": "id, account_id, kind, amount, reason, created_at",
}
# The price book and its fallback models, as the operator left them: the target's migration seeded
# the shipped book, which these rows replace. (Leases are not copied: they void themselves in 30 s.)
REPLACED_TABLES: dict[str, str] = {
    "prices": f"{prices._COLUMNS}, updated_at",
    "ledger_settings": "name, value",
}


def copy_store(source: Connection, target: Connection) -> dict[str, int]:
    """Every row of the SQLite store `source` into the empty PostgreSQL store `target`, in one transaction.

    Raises EXTERNAL_CONFLICT (and writes nothing) when the target already holds accounts.
    """
    copied: dict[str, int] = {}
    with transaction(target):
        # No replica may create an account between the check and the copy.
        target.execute("LOCK TABLE accounts IN EXCLUSIVE MODE")
        held = target.execute("SELECT count(*) FROM accounts").fetchone()[0]
        if held:
            raise SwitchError(
                ErrorCode.EXTERNAL_CONFLICT,
                f"the DB_URL database already holds {held} accounts; copy only into an empty store",
            )
        for table in REPLACED_TABLES:
            target.execute(f"DELETE FROM {table}")
        for table, columns in {**COPIED_TABLES, **REPLACED_TABLES}.items():
            count = 0
            with target.raw.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in source.execute(f"SELECT {columns} FROM {table} ORDER BY rowid"):
                    copy.write_row(row)
                    count += 1
            copied[table] = count
        prices.bump_version(target)  # a replica already serving the target reads the copied book
        # New usage rows continue after the copied ids.
        target.execute(
            "SELECT setval(pg_get_serial_sequence('usage_metrics', 'id'), coalesce(max(id), 0) + 1, false)"
            " FROM usage_metrics"
        )
        target.execute(
            "SELECT setval(pg_get_serial_sequence('credit_entries', 'id'), coalesce(max(id), 0) + 1, false)"
            " FROM credit_entries"
        )
    return copied


def cmd_copy(args: argparse.Namespace, settings: Settings) -> None:
    if not settings.db_path or not settings.db_url:
        raise SwitchError(
            ErrorCode.INTERNAL_ENV_KEY_NOT_FOUND,
            "copy needs DB_PATH (the SQLite store) and DB_URL (the PostgreSQL one)",
        )
    if not Path(settings.db_path).is_file():
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no SQLite store at DB_PATH {settings.db_path}")
    source = open_database(settings.db_path, settings.db_encryption_key)
    try:
        migrate(source)
        target = open_store(settings)
        try:
            migrate(target)
            copied = copy_store(source, target)
        finally:
            target.close()
    finally:
        source.close()
    where = store_name(settings)
    cli_ledger.emit(
        args,
        {"copied": copied, "source": settings.db_path, "target": where},
        f"copied {settings.db_path} to {where}: "
        + ", ".join(f"{count} {table}" for table, count in copied.items()),
    )


# --- commands on the daemon ---------------------------------------------------------------------


def cmd_serve(settings: Settings) -> None:
    import trio

    from switchdb.server import serve

    setup_logging(settings.log_level, settings.log_account, settings.log_format)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(serve, settings)
            print(f"switchdb listening {endpoint}", flush=True)

    trio.run(run)


def cmd_ping(args: argparse.Namespace) -> None:
    import trio

    from common.dbclient import open_db_client
    from common.wire import MessageType

    env = {**read_env_file(Path(".env")), **os.environ}
    endpoint = env.get("ZMQ_SOCKET_PATH", "")
    if not endpoint:
        raise SwitchError(ErrorCode.INTERNAL_ENV_KEY_NOT_FOUND, "missing required config key ZMQ_SOCKET_PATH")
    timeout_ms = args.timeout_ms
    if timeout_ms is None:
        try:
            timeout_ms = int(env.get("ZMQ_TIMEOUT_MS") or DEFAULT_PING_TIMEOUT_MS)
        except ValueError:
            raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key ZMQ_TIMEOUT_MS must be a number") from None

    async def ping() -> float | None:
        async with open_db_client(endpoint, timeout_ms) as client:
            started = time.perf_counter()
            try:
                await client.request(MessageType.PING)
            except SwitchError:
                return None
            return time.perf_counter() - started

    seconds = trio.run(ping)
    if seconds is None:
        raise SwitchError(
            ErrorCode.INTERNAL_DB_UNAVAILABLE, f"switchdb at {endpoint} did not answer within {timeout_ms} ms"
        )
    latency_ms = round(seconds * 1000, 3)
    cli_ledger.emit(
        args,
        {"ok": True, "endpoint": endpoint, "latency_ms": latency_ms},
        f"switchdb at {endpoint} answered in {latency_ms} ms",
    )


# --- parsing --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    shared = _Parser(add_help=False)
    # SUPPRESS, so that `switchdb --json CMD` is not undone by the subcommand's own default.
    shared.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")

    parser = _Parser(prog="switchdb", description="Realtime Switch database daemon and admin CLI.")
    parser.add_argument("--json", action="store_true", default=False, help="print one JSON object")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction, name: str, run: Callable[..., None], help: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[shared], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    command(commands, "serve", cmd_serve, "run the daemon (the default)")
    command(commands, "migrate", cmd_migrate, "create or upgrade the schema")

    account = commands.add_parser("account", help="accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    sub = command(account, "create", cmd_account_create, "create an account")
    sub.add_argument("--email", required=True)
    sub.add_argument("--plan", choices=sorted(accounts.PLAN_ALLOWANCES), default="Free")
    sub.add_argument("--tokens", type=_count, help="plan tokens (default: the plan's allowance)")
    sub.add_argument("--topup", type=_count, default=0, help="top-up tokens")
    sub.add_argument("--usd", metavar="USD", help="a USD account with this balance (instead of tokens)")
    sub.add_argument("--markup", help="the account's price over list prices, e.g. 1.3 (default 1)")
    sub = command(account, "show", cmd_account_show, "show an account")
    sub.add_argument("account", metavar="ID_OR_EMAIL")

    key = commands.add_parser("key", help="API keys").add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = command(key, "create", cmd_key_create, "create a key (the plaintext is shown once)")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
    sub.add_argument("--label", required=True)
    sub.add_argument("--expires-at", type=_future_time, metavar="ISO8601")
    sub = command(key, "list", cmd_key_list, "list an account's keys")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
    sub = command(key, "revoke", cmd_key_revoke, "revoke a key")
    sub.add_argument("key", metavar="KEY_HASH_INDICATOR_OR_KEY")

    credits = commands.add_parser("credits", help="credits").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    sub = command(credits, "topup", cli_ledger.cmd_credits_topup, "add top-up tokens (or USD to a USD account)")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
    sub.add_argument("--tokens", type=_positive_text)
    sub.add_argument("--usd", metavar="USD")
    cli_ledger.register(commands, account, credits, command)
    cli_secrets.register(commands, command)

    sub = command(commands, "usage", cli_ledger.cmd_usage, "usage statement: tokens by type, cost and charge")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
    sub.add_argument("--since", metavar="DATE", help="from this day (YYYY-MM-DD, UTC) or ISO 8601 time")
    sub.add_argument("--until", metavar="DATE", help="to this day, inclusive (or before this ISO 8601 time)")
    sub.add_argument("--by", choices=sorted(ledger.GROUPS), help="one line per day, model or session")
    sub.add_argument("--csv", action="store_true", help="CSV rows, a total row last")
    sub = command(commands, "ping", cmd_ping, "exit 0 when the daemon answers")
    sub.add_argument("--timeout-ms", type=_positive, help="default ZMQ_TIMEOUT_MS or 5000")
    sub = command(commands, "seed", cmd_seed, "create the demo account, key and session")
    sub.add_argument("--key-file", help="where the demo key is kept (default DB_PATH.demo-key)")
    command(commands, "copy", cmd_copy, "copy the SQLite store (DB_PATH) into an empty PostgreSQL one (DB_URL)")
    return parser


def _operator_error(exc: BaseException) -> str | None:
    """The one line to show for an error an operator can fix; None for a bug (keep the traceback)."""
    if isinstance(exc, SwitchError):
        return exc.message
    if is_database_error(exc):
        return "database error: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, OSError):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):  # the daemon's errors come out of a nursery
        for inner in exc.exceptions:
            if found := _operator_error(inner):
                return found
    return None


def run(args: argparse.Namespace) -> None:
    command: Callable[..., None] = getattr(args, "run", cmd_serve)
    if command is cmd_ping:
        return cmd_ping(args)
    if command is cmd_serve:
        return cmd_serve(load_settings("switchdb"))
    settings = load_settings("cli")
    setup_logging("WARNING", None, settings.log_format)
    if command is cmd_copy:
        return cmd_copy(args, settings)
    conn = open_store(settings)
    try:
        applied_now = migrate(conn)  # every command works on an up-to-date schema
        if command is cmd_migrate:
            cmd_migrate(args, conn, applied_now)
        elif command is cmd_seed:
            cmd_seed(args, conn, settings)
        else:
            command(args, conn)
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: B036 - operator errors may come wrapped in an exception group
        message = _operator_error(exc)
        if message is None:
            raise
        print(f"switchdb: {message}", file=sys.stderr)
        return 1
    return 0
