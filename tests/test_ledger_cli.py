"""The ledger's admin commands through the real entry point, `.venv/bin/switchdb`, on both stores:
prices, money accounts, statements, the account lifecycle, and every amount's limits.
"""
from __future__ import annotations

from pathlib import Path

from common.usage import UsageTotals
from common.wire import MessageType, Request
from switchdb.db import utc_now
from tests.pg import store_kind, store_url  # noqa: F401
from tests.test_switchdb_cli import connect, fails, ok_json, run, store  # noqa: F401
from tests.batches import handle_batch

Store = tuple[str, "str | None"]


def _record(tmp_path: Path, st: Store, batch_id: str, account_id: str, totals: UsageTotals,
            model: str = "gpt-realtime") -> None:
    conn = connect(tmp_path, st)
    try:
        (outcome,) = handle_batch(conn, [Request("r", MessageType.RECORD_USAGE, (
            batch_id, account_id, "s-" + batch_id[:2], "openai", model, totals.to_json()))], utc_now())
        assert outcome.status == "OK", outcome
    finally:
        conn.close()


def test_price_list_set_and_fallback(tmp_path: Path, store: Store) -> None:
    listed = ok_json(tmp_path, "price", "list")
    rows = {row["model"]: row for row in listed["prices"]}
    assert rows["gpt-realtime"]["audio_out"] == "64" and rows["gpt-realtime"]["cached_text_in"] == "0.4"
    assert rows["gpt-realtime"]["as_of"] and rows["gpt-realtime"]["source"].startswith("https://")
    assert listed["fallback"] == "gpt-realtime" and rows["gpt-realtime"]["fallback"] is True
    assert rows["whisper-1"]["per_minute"] == "0.006" and rows["whisper-1"]["text_in"] is None

    got = ok_json(tmp_path, "price", "set", "--model", "gpt-realtime", "--text-in", "4.5", "--audio-out", "70.125")
    assert (got["text_in"], got["audio_out"], got["text_out"]) == ("4.5", "70.125", "16")
    assert got["source"] == "set by the operator"
    new = ok_json(tmp_path, "price", "set", "--model", "my-model", "--text-in", "1", "--per-minute", "0.01",
                  "--source", "contract 7", "--as-of", "2026-01-02")
    assert (new["text_in"], new["per_minute"], new["audio_in"], new["as_of"]) == ("1", "0.01", None, "2026-01-02")
    assert {r["model"] for r in ok_json(tmp_path, "price", "list")["prices"]} >= {"my-model", "gpt-realtime"}
    text = run(tmp_path, "price", "list").stdout
    assert "my-model" in text and "70.125" in text

    assert ok_json(tmp_path, "price", "fallback", "--model", "gpt-realtime-mini")["fallback"] == "gpt-realtime-mini"
    fails(tmp_path, "price", "fallback", "--model", "my-model", names="my-model has no")  # lacks rates
    fails(tmp_path, "price", "fallback", "--model", "nothing-like-it", names="not in the price book")
    assert ok_json(tmp_path, "price", "list")["fallback"] == "gpt-realtime-mini"


def test_bad_prices_are_clear_errors_and_change_nothing(tmp_path: Path, store: Store) -> None:
    before = ok_json(tmp_path, "price", "list")
    for flag, value, says in [
        ("--text-in", "-1", "must not be negative"),
        ("--text-in", "NaN", "decimal number"),
        ("--audio-out", "inf", "decimal number"),
        ("--text-out", "1.0001", "at most 3"),
        ("--cached-text-in", "1e3", "decimal number"),
        ("--text-in", "1000.001", "beyond its maximum"),
        ("--per-minute", "0.0000000001", "at most 9"),
    ]:
        fails(tmp_path, "price", "set", "--model", "gpt-realtime", flag, value, names=says)
    fails(tmp_path, "price", "set", "--model", "gpt-realtime", names="at least one price")
    fails(tmp_path, "price", "set", "--model", " spaced", "--text-in", "1", names="model name")
    fails(tmp_path, "price", "set", "--model", "m", "--text-in", "1", "--as-of", "2026-02-30", names="date")
    assert ok_json(tmp_path, "price", "list") == before


def test_usd_accounts_topups_and_limits(tmp_path: Path, store: Store) -> None:
    usd = ok_json(tmp_path, "account", "create", "--email", "Buyer@Example.com", "--usd", "25", "--markup", "1.3")
    assert (usd["unit"], usd["balance_usd"], usd["markup"], usd["credits"]) == ("usd", "25", "1.3", 25 * 10**9)
    tok = ok_json(tmp_path, "account", "create", "--email", "tokens@example.com")
    assert tok["unit"] == "tokens" and "balance_usd" not in tok and tok["credits"] == 1000
    # --account takes an email (any case) everywhere.
    up = ok_json(tmp_path, "credits", "topup", "--account", "buyer@EXAMPLE.com", "--usd", "10.000000001")
    assert up["balance_usd"] == "35.000000001"
    assert ok_json(tmp_path, "account", "show", usd["id"])["balance_usd"] == "35.000000001"
    assert ok_json(tmp_path, "credits", "topup", "--account", "tokens@example.com", "--tokens", "5")["credits"] == 1005
    assert ok_json(tmp_path, "key", "create", "--account", "BUYER@example.com", "--label", "l")["account_id"] == usd["id"]
    assert len(ok_json(tmp_path, "key", "list", "--account", "buyer@example.com")["keys"]) == 1

    fails(tmp_path, "credits", "topup", "--account", usd["id"], "--tokens", "5", names="counts usd")
    fails(tmp_path, "credits", "topup", "--account", tok["id"], "--usd", "5", names="counts tokens")
    fails(tmp_path, "credits", "topup", "--account", tok["id"], names="exactly one of")
    fails(tmp_path, "credits", "topup", "--account", "nobody@example.com", "--tokens", "5", names="no account")
    fails(tmp_path, "credits", "topup", "--account", usd["id"], "--usd", "-5", names="must not be negative")
    fails(tmp_path, "credits", "topup", "--account", usd["id"], "--usd", "0.0000000001", names="at most 9")
    fails(tmp_path, "credits", "topup", "--account", usd["id"], "--usd", "1000000000", names="above its maximum")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--tokens", "9223372036854775807",
          names="balance_tokens 9223372036854775807 is above its maximum 1000000000000000")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--tokens", str(2**63), names="above its maximum")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--usd", "1000000000.01", names="beyond its maximum")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--usd", "5", "--markup", "0", names="markup")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--usd", "5", "--markup", "10.5", names="markup")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--usd", "5", "--tokens", "3", names="--usd")
    fails(tmp_path, "account", "create", "--email", "BUYER@example.COM", "--usd", "5", names="already exists")
    fails(tmp_path, "account", "create", "--email", "not-an-email", names="not an email address")
    # One top-up may not carry a balance past its maximum.
    big = ok_json(tmp_path, "account", "create", "--email", "big@example.com", "--tokens", str(10**15))
    fails(tmp_path, "credits", "topup", "--account", big["id"], "--tokens", "1", names="above its maximum")
    assert ok_json(tmp_path, "account", "show", big["id"])["credits"] == 10**15


def test_statement_by_type_group_and_format(tmp_path: Path, store: Store) -> None:
    account = ok_json(tmp_path, "account", "create", "--email", "s@example.com", "--usd", "1", "--markup", "1.5")
    aid = account["id"]
    text_only = UsageTotals(input_tokens=1000, input_text=1000, reports=1)  # $0.004 at list price
    audio_out = UsageTotals(output_tokens=100, output_audio=100, reports=1)  # $0.0064
    _record(tmp_path, store, "b1", aid, text_only)
    _record(tmp_path, store, "b2", aid, audio_out, model="gpt-realtime-2025-08-28")  # a dated snapshot
    ok_json(tmp_path, "price", "set", "--model", "gpt-realtime", "--text-in", "8")
    _record(tmp_path, store, "b3", aid, text_only)  # $0.008 now; b1 keeps its $0.004

    total = ok_json(tmp_path, "usage", "--account", "S@example.com")
    assert (total["input_tokens"], total["output_tokens"], total["total_tokens"], total["batches"]) == (2000, 100, 2100, 3)
    assert total["breakdown"]["output_audio"] == 100 and total["breakdown"]["input_text"] == 2000
    assert (total["cost_usd"], total["charged_usd"]) == ("0.0184", "0.0276")
    assert ok_json(tmp_path, "account", "show", aid)["balance_usd"] == "0.9724"

    by_model = ok_json(tmp_path, "usage", "--account", aid, "--by", "model")
    assert [(g["model"], g["cost_usd"]) for g in by_model["groups"]] == [
        ("gpt-realtime", "0.012"), ("gpt-realtime-2025-08-28", "0.0064")]
    by_day = ok_json(tmp_path, "usage", "--account", aid, "--by", "day")
    assert len(by_day["groups"]) == 1 and by_day["groups"][0]["charged_usd"] == "0.0276"
    by_session = ok_json(tmp_path, "usage", "--account", aid, "--by", "session")
    assert {g["session"] for g in by_session["groups"]} == {"s-b1", "s-b2", "s-b3"}

    today = utc_now()[:10]
    assert ok_json(tmp_path, "usage", "--account", aid, "--since", today, "--until", today)["batches"] == 3
    assert ok_json(tmp_path, "usage", "--account", aid, "--until", "2000-01-01")["cost_usd"] == "0"
    assert ok_json(tmp_path, "usage", "--account", aid, "--since", "2999-01-01")["batches"] == 0

    csv = run(tmp_path, "usage", "--account", aid, "--by", "model", "--csv")
    assert csv.returncode == 0, csv.stderr
    lines = csv.stdout.strip().split("\n")
    assert lines[0].startswith("model,batches,input_tokens") and lines[0].endswith("cost_usd,charged_usd")
    assert lines[-1].startswith("total,3,2000,100,2100,") and lines[-1].endswith(",0.0184,0.0276")
    assert len(lines) == 4

    fails(tmp_path, "usage", "--account", aid, "--since", "2026-13-01", names="not a date")
    fails(tmp_path, "usage", "--account", aid, "--until", "yesterday", names="not a date")
    fails(tmp_path, "usage", "--account", aid, "--since", "2026-02-02", "--until", "2026-02-01", names="before")
    fails(tmp_path, "usage", "--account", "acct_nobody", names="no account")
    fails(tmp_path, "usage", "--account", aid, "--by", "week", status=2, names="invalid choice")


def test_account_lifecycle(tmp_path: Path, store: Store) -> None:
    a = ok_json(tmp_path, "account", "create", "--email", "one@example.com")
    b = ok_json(tmp_path, "account", "create", "--email", "two@example.org", "--usd", "3")
    assert {x["id"] for x in ok_json(tmp_path, "account", "list")["accounts"]} == {a["id"], b["id"]}
    assert [x["id"] for x in ok_json(tmp_path, "account", "list", "--email", "EXAMPLE.ORG")["accounts"]] == [b["id"]]

    suspended = ok_json(tmp_path, "account", "suspend", "one@example.com")
    assert suspended["status"] == "suspended"
    assert [x["id"] for x in ok_json(tmp_path, "account", "list", "--status", "suspended")["accounts"]] == [a["id"]]
    assert ok_json(tmp_path, "account", "resume", a["id"])["status"] == "active"
    assert ok_json(tmp_path, "account", "list", "--status", "suspended")["accounts"] == []

    changed = ok_json(tmp_path, "account", "set", a["id"], "--plan", "Pro", "--email", "Uno@Example.com")
    assert (changed["plan_name"], changed["email"], changed["credits"]) == ("Pro", "Uno@Example.com", 1000)
    assert ok_json(tmp_path, "account", "show", "uno@example.com")["id"] == a["id"]
    fails(tmp_path, "account", "set", a["id"], "--email", "TWO@example.org", names="already exists")
    fails(tmp_path, "account", "set", a["id"], "--email", "bad", names="not an email address")
    fails(tmp_path, "account", "set", a["id"], names="give --plan")
    fails(tmp_path, "account", "suspend", "acct_nobody", names="no account")
    fails(tmp_path, "account", "list", "--status", "gone", status=2, names="invalid choice")


def test_credit_adjustments_and_history(tmp_path: Path, store: Store) -> None:
    tok = ok_json(tmp_path, "account", "create", "--email", "t@example.com", "--tokens", "100")
    usd = ok_json(tmp_path, "account", "create", "--email", "u@example.com", "--usd", "2")
    assert ok_json(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "+50",
                   "--reason", "refund for outage")["credits"] == 150
    assert ok_json(tmp_path, "credits", "adjust", "--account", "u@example.com", "--usd", "-0.5",
                   "--reason", "correction")["balance_usd"] == "1.5"
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "-151", "--reason", "x",
          names="--allow-negative")
    assert ok_json(tmp_path, "account", "show", tok["id"])["credits"] == 150  # nothing changed
    assert ok_json(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "-151", "--reason", "x",
                   "--allow-negative")["credits"] == -1
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "5", names="--reason", status=2)
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "5", "--reason", " ", names="reason")
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "0", "--reason", "r", names="zero")
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", "1.5", "--reason", "r",
          names="whole number")
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--usd", "1", "--reason", "r", names="counts tokens")
    fails(tmp_path, "credits", "adjust", "--account", tok["id"], "--tokens", str(-(10**15) - 1), "--reason", "r",
          names="below its minimum")

    _record(tmp_path, store, "b1", usd["id"], UsageTotals(output_tokens=1000, output_audio=1000, reports=1))
    _record(tmp_path, store, "b2", tok["id"], UsageTotals(input_tokens=9, input_text=9, reports=1))
    for account, unit in ((usd, "usd"), (tok, "tokens")):
        history = ok_json(tmp_path, "credits", "history", "--account", account["id"])
        shown = ok_json(tmp_path, "account", "show", account["id"])
        assert history["unit"] == unit
        assert history["balance"] == history["sum"] == shown["credits"]
        total = sum(e["amount"] for e in history["entries"]) + sum(u["amount"] for u in history["usage"])
        assert total == shown["credits"]
    usd_history = ok_json(tmp_path, "credits", "history", "--account", usd["id"])
    assert [(e["kind"], e["amount_usd"], e["reason"]) for e in usd_history["entries"]] == [
        ("create", "2", "account created"), ("adjust", "-0.5", "correction")]
    assert usd_history["usage"][0]["amount_usd"] == "-0.064" and usd_history["balance_usd"] == "1.436"
    assert "refund for outage" in run(tmp_path, "credits", "history", "--account", tok["id"]).stdout


def test_key_revoke_takes_the_leaked_plaintext(tmp_path: Path, store: Store) -> None:
    account = ok_json(tmp_path, "account", "create", "--email", "k@example.com")
    key = ok_json(tmp_path, "key", "create", "--account", "k@example.com", "--label", "leaked")
    revoked = ok_json(tmp_path, "key", "revoke", key["key"])
    assert revoked["key_hash"] == key["key_hash"] and revoked["revoked_at"]
    proc = fails(tmp_path, "key", "revoke", "rsk_" + "x" * 43, names="no key")
    assert "rsk_" + "x" * 43 not in proc  # a plaintext is never echoed
    assert account["id"]
