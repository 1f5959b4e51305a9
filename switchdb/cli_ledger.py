"""The ledger's admin commands (`switchdb price ...`, `account list|set|suspend|resume`,
`credits adjust|history`, the statement of `usage`), registered by `switchdb.cli.build_parser`.

Amounts are typed as decimal text and read by common/limits.py (nano-USD, milli-USD per 1M
tokens, ten-thousandths for a markup): a negative, NaN, over-precise or too large amount is one
clear error line and exit status 1, and changes nothing.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

from common.errors import ErrorCode, SwitchError
from common.limits import check_amount, parse_markup, parse_minute_price, parse_token_price, parse_usd
from common.pricing import PRICE_TYPES
from switchdb import accounts, ledger, prices
from switchdb.db import Connection, transaction

Command = Callable[..., argparse.ArgumentParser]


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    """A command's result: JSON with --json, else the text (every CLI command prints through this)."""
    print(json.dumps(data, ensure_ascii=False) if args.json else text, flush=True)


def account_id(conn: Connection, id_or_email: str) -> str:
    """`--account` takes an id or an email everywhere."""
    return accounts.find_account(conn, id_or_email).id


def tokens_amount(text: str, *, signed: bool = False) -> int:
    """A token count typed by the operator, within the balance limit."""
    body = text[1:] if signed and text[:1] in "+-" else text
    if not body.isascii() or not body.isdigit() or len(body) > 40:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"tokens must be a whole number, got {text!r:.60}")
    return check_amount("balance_tokens", int(text), signed=signed)


def amount_of(args: argparse.Namespace, *, signed: bool = False) -> tuple[str, int]:
    """(unit, amount) from exactly one of --tokens and --usd."""
    if (args.tokens is None) == (args.usd is None):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "give exactly one of --tokens and --usd")
    if args.usd is not None:
        return ledger.USD, parse_usd(args.usd, name="--usd", signed=signed)
    return ledger.TOKENS, tokens_amount(args.tokens, signed=signed)


# --- prices -----------------------------------------------------------------------------------


def _price_text(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<30}" + "".join(f"{name:>16}" for name in PRICE_TYPES) + "  as of"
    lines = [head]
    for row in rows:
        mark = " (fallback)" if row["fallback"] else ""
        mark = " (transcription fallback)" if row["transcription_fallback"] else mark
        lines.append(
            f"{row['model']:<30}" + "".join(f"{row[name] or '-':>16}" for name in PRICE_TYPES)
            + f"  {row['as_of']}{mark}"
        )
    return "\n".join(lines) + "\n(USD per 1M tokens; per_minute in USD per minute)"


def cmd_price_list(args: argparse.Namespace, conn: Connection) -> None:
    book = prices.load_book(conn)
    rows = prices.price_rows(book)
    emit(
        args,
        {"prices": rows, "fallback": book.fallback, "transcription_fallback": book.transcription_fallback,
         "unit": "USD per 1M tokens; per_minute: USD per minute"},
        _price_text(rows),
    )


def cmd_price_set(args: argparse.Namespace, conn: Connection) -> None:
    rates: dict[str, int] = {}
    for name in PRICE_TYPES:
        text = getattr(args, name)
        if text is not None:
            flag = "--" + name.replace("_", "-")
            parse = parse_minute_price if name == "per_minute" else parse_token_price
            rates[name] = parse(text, name=flag)
    if not rates:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "give at least one price (--text-in, --audio-out, ...)")
    if args.as_of is not None:
        try:
            date.fromisoformat(args.as_of)
        except ValueError:
            raise SwitchError(
                ErrorCode.EXTERNAL_BAD_PARAMS, f"--as-of must be a date (YYYY-MM-DD), got {args.as_of!r:.40}"
            ) from None
    with transaction(conn):
        book = prices.set_price(conn, args.model, rates, args.source, args.as_of)
    row = next(r for r in prices.price_rows(book) if r["model"] == args.model)
    emit(args, row, _price_text([row]))


def cmd_price_fallback(args: argparse.Namespace, conn: Connection) -> None:
    with transaction(conn):
        book = prices.set_fallback(conn, args.model, args.transcription)
    data = {"fallback": book.fallback, "transcription_fallback": book.transcription_fallback}
    emit(args, data, f"fallback {book.fallback}; transcription fallback {book.transcription_fallback}")


# --- accounts ---------------------------------------------------------------------------------


def _list_text(rows: list[accounts.Account]) -> str:
    return "\n".join(
        f"{a.id}  {a.email}  {a.plan_name}  {a.status}  {ledger.format_amount(a.unit, a.credits)} {a.unit}"
        for a in rows
    ) or "no accounts"


def cmd_account_list(args: argparse.Namespace, conn: Connection) -> None:
    from common.emails import email_key

    where, params = [], []
    if args.status:
        where.append("status = ?")
        params.append(args.status)
    if args.email:
        where.append("instr(email_key, ?) > 0" if not _pg(conn) else "strpos(email_key, ?) > 0")
        params.append(email_key(args.email))
    sql = f"SELECT {accounts._ACCOUNT_COLUMNS} FROM accounts"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = [accounts.Account(*row) for row in conn.execute(sql + " ORDER BY created_at, id", params)]
    emit(args, {"accounts": [a.as_json() for a in rows]}, _list_text(rows))


def _pg(conn: Connection) -> bool:
    from switchdb.db import is_postgres

    return is_postgres(conn)


def _show(args: argparse.Namespace, account: accounts.Account) -> None:
    from switchdb.cli import _account_text

    emit(args, account.as_json(), _account_text(account))


def cmd_account_set(args: argparse.Namespace, conn: Connection) -> None:
    if args.plan is None and args.email is None and args.markup is None:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "give --plan, --email or --markup")
    with transaction(conn):
        found = account_id(conn, args.account)
        if args.plan is not None:
            ledger.set_plan(conn, found, args.plan, sorted(accounts.PLAN_ALLOWANCES))
        if args.email is not None:
            ledger.set_email(conn, found, args.email)
        if args.markup is not None:
            markup = parse_markup(args.markup, name="--markup")
            conn.execute("UPDATE accounts SET markup = ? WHERE id = ?", (markup, found))
    _show(args, accounts.require_account(conn, found))


def cmd_account_suspend(args: argparse.Namespace, conn: Connection) -> None:
    with transaction(conn):
        found = account_id(conn, args.account)
        ledger.set_status(conn, found, ledger.SUSPENDED)
    _show(args, accounts.require_account(conn, found))


def cmd_account_resume(args: argparse.Namespace, conn: Connection) -> None:
    with transaction(conn):
        found = account_id(conn, args.account)
        ledger.set_status(conn, found, ledger.ACTIVE)
    _show(args, accounts.require_account(conn, found))


# --- credits ----------------------------------------------------------------------------------


def cmd_credits_topup(args: argparse.Namespace, conn: Connection) -> None:
    unit, amount = amount_of(args)
    with transaction(conn):
        account = accounts.top_up(conn, account_id(conn, args.account), amount, unit)
    _show(args, account)


def cmd_credits_adjust(args: argparse.Namespace, conn: Connection) -> None:
    unit, amount = amount_of(args, signed=True)
    with transaction(conn):
        found = account_id(conn, args.account)
        ledger.adjust(conn, found, unit, amount, args.reason, args.allow_negative)
    _show(args, accounts.require_account(conn, found))


def cmd_credits_history(args: argparse.Namespace, conn: Connection) -> None:
    data = ledger.history(conn, account_id(conn, args.account))
    unit = data["unit"]
    lines = [f"{e['time']}  {e['kind']:<8}{ledger.format_amount(unit, e['amount']):>22}  {e['reason']}"
             for e in data["entries"]]
    lines += [f"{u['day']}  usage   {ledger.format_amount(unit, u['amount']):>22}  {u['batches']} batches"
              for u in data["usage"]]
    lines.append(f"balance {ledger.format_amount(unit, data['balance'])} {unit}")
    emit(args, data, "\n".join(lines))


# --- statements -------------------------------------------------------------------------------


def _day(text: str, *, end: bool) -> str:
    """A date (YYYY-MM-DD, UTC) or an ISO 8601 time as the stored timestamp text; `until`'s date is inclusive."""
    from switchdb.db import format_time

    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day) + (timedelta(days=1) if end else timedelta())
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise SwitchError(
            ErrorCode.EXTERNAL_BAD_PARAMS, f"not a date (YYYY-MM-DD) or ISO 8601 time: {text!r:.40}"
        ) from None
    return format_time(moment)


def cmd_usage(args: argparse.Namespace, conn: Connection) -> None:
    since = _day(args.since, end=False) if args.since else None
    until = _day(args.until, end=True) if args.until else None
    if since and until and since >= until:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "--since must be before --until")
    data = ledger.statement(conn, account_id(conn, args.account), since, until, args.by)
    if args.csv:
        if args.json:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "give --csv or --json, not both")
        print(ledger.statement_csv(data), flush=True)
        return
    breakdown = "\n".join(f"  {name:<14}{count}" for name, count in data["breakdown"].items())
    text = (
        f"account        {data['account_id']}\nbatches        {data['batches']}\n"
        f"input tokens   {data['input_tokens']}\noutput tokens  {data['output_tokens']}\n"
        f"total tokens   {data['total_tokens']} (includes transcription)\nbreakdown\n{breakdown}\n"
        f"cost           ${data['cost_usd']} at list prices\ncharged        ${data['charged_usd']}"
        f" at the account's price (markup {data['markup']})"
    )
    for group in data.get("groups", []):
        text += f"\n{data['by']} {group[data['by']]}: {group['total_tokens']} tokens, cost ${group['cost_usd']}," \
                f" charged ${group['charged_usd']}"
    emit(args, data, text)


# --- parsing ----------------------------------------------------------------------------------


def register(
    commands: Any, account: Any, credits: Any, command: Callable[..., argparse.ArgumentParser]
) -> None:
    """Add the ledger's subcommands to the parser's groups (`command(group, name, run, help)`)."""
    price = commands.add_parser("price", help="the price book").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    command(price, "list", cmd_price_list, "list the price book")
    sub = command(price, "set", cmd_price_set, "set a model's prices (USD per 1M tokens; per minute in USD)")
    sub.add_argument("--model", required=True)
    for name in PRICE_TYPES:
        sub.add_argument("--" + name.replace("_", "-"), dest=name, metavar="USD")
    sub.add_argument("--source", help="where the prices come from (default: set by the operator)")
    sub.add_argument("--as-of", help="the date they were read (default: today)")
    sub = command(price, "fallback", cmd_price_fallback, "price unknown models as this one")
    sub.add_argument("--model", required=True)
    sub.add_argument("--transcription", action="store_true", help="the fallback for transcription models")

    sub = command(account, "list", cmd_account_list, "list accounts")
    sub.add_argument("--status", choices=ledger.STATUSES)
    sub.add_argument("--email", help="part of the email (any case)")
    sub = command(account, "set", cmd_account_set, "change an account's plan name, email or markup")
    sub.add_argument("account", metavar="ID_OR_EMAIL")
    sub.add_argument("--plan", choices=sorted(accounts.PLAN_ALLOWANCES))
    sub.add_argument("--email")
    sub.add_argument("--markup", help="price multiplier over list prices, e.g. 1.3")
    sub = command(account, "suspend", cmd_account_suspend, "refuse the account's keys until resumed")
    sub.add_argument("account", metavar="ID_OR_EMAIL")
    sub = command(account, "resume", cmd_account_resume, "make a suspended account active again")
    sub.add_argument("account", metavar="ID_OR_EMAIL")

    sub = command(credits, "adjust", cmd_credits_adjust, "correct or refund a balance (±), with a reason")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
    sub.add_argument("--tokens", metavar="±N")
    sub.add_argument("--usd", metavar="±USD")
    sub.add_argument("--reason", required=True)
    sub.add_argument("--allow-negative", action="store_true", help="allow the balance to go below zero")
    sub = command(credits, "history", cmd_credits_history, "every credit movement; the balance is their sum")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
