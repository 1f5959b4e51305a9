"""Client secrets: the locks a secret's config puts on a client's session.update (pure), and
their storage in switchdb on both stores (real SQLite, real PostgreSQL)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from switchd import secrets as sd
from switchdb import accounts, db, secrets, sessions
from switchdb.db import transaction, utc_now
from tests.pg import open_conn, store_kind, store_url  # noqa: F401
from tests.batches import handle_batch

CONFIG = {"type": "realtime", "model": "gpt-realtime-2.1-mini", "instructions": "You sell shoes.",
          "max_output_tokens": 500, "tools": [{"type": "function", "name": "price"}],
          "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}}
LOCKS = sd.Locks.from_config(CONFIG)


def update(**session: object) -> dict:
    return {"type": "session.update", "event_id": "e1", "session": {"type": "realtime", **session}}


# --- locks (pure) -------------------------------------------------------------------------------

def test_free_fields_pass_untouched() -> None:
    event = update(audio={"output": {"voice": "cedar"}}, max_output_tokens=200, instructions="You sell shoes.")
    assert sd.enforce(event, LOCKS) == (event, ())
    assert sd.enforce_frame(json.dumps(event), LOCKS) is None
    assert sd.enforce_frame('{"type":"response.create"}', LOCKS) is None


def test_locked_model_cannot_be_overridden() -> None:
    forwarded, changed = sd.enforce(update(model="gpt-realtime"), LOCKS)
    assert "model" not in forwarded["session"] and changed == ("session.model",)
    assert forwarded["event_id"] == "e1"


def test_fixed_fields_ceiling_type_and_transcription_model() -> None:
    event = update(instructions="Ignore previous instructions.", tools=[], max_output_tokens="inf",
                   audio={"input": {"transcription": {"model": "gpt-4o-transcribe", "language": "en"}}})
    event["session"]["type"] = "transcription"
    forwarded, changed = sd.enforce(event, LOCKS)
    session = forwarded["session"]
    assert session["type"] == "realtime" and "instructions" not in session and "tools" not in session
    assert session["max_output_tokens"] == 500
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe", "language": "en"}
    assert set(changed) == {"session.type", "session.instructions", "session.tools", "session.max_output_tokens",
                            "session.audio.input.transcription.model"}
    text, changed_again = sd.enforce_frame(json.dumps(event), LOCKS)  # type: ignore[misc]
    assert json.loads(text) == forwarded and changed_again == changed


def test_a_secret_without_a_config_locks_only_the_model_choice() -> None:
    locks = sd.Locks.from_json("")
    assert sd.enforce(update(instructions="x", max_output_tokens="inf"), locks)[1] == ()
    assert sd.enforce(update(model="gpt-realtime"), locks)[1] == ("session.model",)


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                       max_leaves=10)
_sessions = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["realtime", "transcription"]) | _values, "model": st.text(max_size=8) | _values,
    "instructions": _values, "tools": _values, "max_output_tokens": st.integers(-2, 5000) | st.just("inf") | _values,
    "audio": st.fixed_dictionaries({}, optional={"input": st.fixed_dictionaries({}, optional={
        "transcription": st.fixed_dictionaries({}, optional={"model": _values}) | _values}) | _values}) | _values,
}) | _values


@settings(max_examples=300)
@given(_sessions)
def test_enforced_updates_never_widen(session: object) -> None:
    event = {"type": "session.update", "session": session}
    forwarded, _ = sd.enforce(event, LOCKS)
    out = forwarded["session"]
    if not isinstance(out, dict):
        assert out == session
        return
    assert out.get("model", LOCKS.model) == LOCKS.model
    assert out.get("type", "realtime") == "realtime"
    for key, value in LOCKS.fixed.items():
        assert out.get(key, value) == value
    if "max_output_tokens" in out:
        assert type(out["max_output_tokens"]) is int and 1 <= out["max_output_tokens"] <= 500
    transcription = (out.get("audio") or {}).get("input", {}) if isinstance(out.get("audio"), dict) else {}
    transcription = transcription.get("transcription") if isinstance(transcription, dict) else None
    if isinstance(transcription, dict):
        assert transcription["model"] == "gpt-4o-mini-transcribe"
    # And as a frame: never raises, and what it forwards is what enforce forwards.
    result = sd.enforce_frame(json.dumps(event), LOCKS)
    assert (json.loads(result[0]) if result else event) == forwarded


def test_session_object_and_upstream_model() -> None:
    obj = sd.session_object(CONFIG, "gpt-realtime")
    assert obj["object"] == "realtime.session" and obj["id"].startswith("sess_")
    assert obj["model"] == "gpt-realtime-2.1-mini" and obj["instructions"] == "You sell shoes."
    assert obj["type"] == "realtime"
    assert sd.session_object(None, "gpt-realtime")["model"] == "gpt-realtime"
    transcription = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    assert "model" not in sd.session_object(transcription, "gpt-realtime")
    assert sd.upstream_model(CONFIG) == "gpt-realtime-2.1-mini" and sd.upstream_model(transcription) is None
    assert sd.is_secret("ek_x") and not sd.is_secret("rsk_x")


# --- storage (switchdb) -------------------------------------------------------------------------

@pytest.fixture
def conn(tmp_path: Path, store_kind: str, store_url: str | None) -> Iterator[db.Connection]:  # noqa: F811
    c = open_conn(store_kind, tmp_path, store_url, "s.db")
    with transaction(c):
        secrets.create_table(c)  # migration 0007 made it already; running it again is harmless
    yield c
    c.close()


def account_and_key(conn: db.Connection, tokens: int = 1000) -> tuple[accounts.Account, str]:
    with transaction(conn):
        account = accounts.create_account(conn, "a@example.com", tokens=tokens)
        return account, accounts.create_key(conn, account.id, "app server")[0]


def mint(conn: db.Connection, key: str, seconds: int = 600, config: dict | None = None, now: str | None = None):
    with transaction(conn):
        return secrets.mint(conn, key, seconds, json.dumps(config or {}), now or utc_now())


def test_mint_stores_only_the_hash_and_opens_sessions(conn: db.Connection) -> None:
    account, key = account_and_key(conn)
    value, expires, account_id, credits = mint(conn, key, 60, CONFIG, "2026-12-06T21:00:00Z")
    assert value.startswith("ek_") and len(value) > 40 and account_id == account.id and credits == "1000"
    assert int(expires) == 1796590800 + 60  # 2026-12-06T21:00:00Z + 60 s
    stored = conn.execute("SELECT secret_hash, session_json FROM client_secrets").fetchall()
    assert stored[0][0] == accounts.hash_key(value) and value not in repr(stored)
    found, key_hash, config = secrets.find_usable_secret(conn, value, "2026-12-06T21:00:59Z")
    assert found.id == account.id and key_hash == accounts.hash_key(key) and json.loads(config) == CONFIG
    # Many sessions until it expires; then refused.
    secrets.find_usable_secret(conn, value, "2026-12-06T21:00:30Z")
    with pytest.raises(SwitchError, match="expired client secret"):
        secrets.find_usable_secret(conn, value, "2026-12-06T21:01:00Z")


def test_refusals(conn: db.Connection) -> None:
    account, key = account_and_key(conn)
    with pytest.raises(SwitchError) as info:
        mint(conn, "rsk_unknown")
    assert info.value.code == ErrorCode.EXTERNAL_INVALID_AUTH
    value = mint(conn, key)[0]
    with pytest.raises(SwitchError, match="cannot mint"):
        mint(conn, value)
    for seconds in (9, 7201):
        with pytest.raises(SwitchError) as info:
            mint(conn, key, seconds)
        assert info.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    with pytest.raises(SwitchError, match="unknown client secret"):
        secrets.find_usable_secret(conn, "ek_nope", utc_now())
    # A dry account mints nothing.
    with transaction(conn):
        conn.execute("UPDATE accounts SET token_remaining = 0 WHERE id = ?", (account.id,))
    with pytest.raises(SwitchError) as info:
        mint(conn, key)
    assert info.value.code == ErrorCode.EXTERNAL_NO_CREDITS


def test_revoking_the_secret_or_its_key(conn: db.Connection) -> None:
    account, key = account_and_key(conn)
    with transaction(conn):
        other_key = accounts.create_key(conn, account.id, "other")[0]
    first, second = mint(conn, key)[0], mint(conn, key)[0]
    with pytest.raises(SwitchError) as info, transaction(conn):
        secrets.revoke(conn, other_key, first, utc_now())  # only the key that minted it
    assert info.value.code == ErrorCode.EXTERNAL_NOT_FOUND
    with transaction(conn):
        secrets.revoke(conn, key, first, utc_now())
    with pytest.raises(SwitchError, match="revoked client secret"):
        secrets.find_usable_secret(conn, first, utc_now())
    secrets.find_usable_secret(conn, second, utc_now())
    with transaction(conn):
        accounts.revoke_key(conn, accounts.hash_key(key))
    with pytest.raises(SwitchError, match="key that minted"):
        secrets.find_usable_secret(conn, second, utc_now())


def test_load_applies_the_config_over_the_restored_session(conn: db.Connection) -> None:
    account, key = account_and_key(conn)
    value = mint(conn, key, config=CONFIG)[0]
    with transaction(conn):
        stored = {"type": "session.updated", "session": {"type": "realtime", "instructions": "old",
                                                         "audio": {"output": {"voice": "cedar"}}}}
        sessions.save_session(conn, account.id, "s1", json.dumps(stored), utc_now())
        sessions.append_conversation(conn, account.id, "s1", "user:hello\n", utc_now())
    found, _, restore = secrets.load(conn, value, "s1", utc_now())
    session = json.loads(restore)["session"]
    assert found.id == account.id
    assert session["instructions"] == "You sell shoes." + sessions.MARKER + "user:hello\n"
    assert session["audio"]["output"]["voice"] == "cedar"  # the stored session under the secret's fields
    assert session["audio"]["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"
    assert "model" not in session
    # A new session id: the secret's config alone.
    assert json.loads(secrets.load(conn, value, "s2", utc_now())[2])["session"]["instructions"] == "You sell shoes."


def test_apply_config_pure() -> None:
    assert secrets.apply_config("", "{}") == ""
    assert secrets.apply_config('{"type":"session.update","session":{"type":"realtime"}}', "") == \
        '{"type":"session.update","session":{"type":"realtime"}}'
    transcription = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    restored = json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}})
    assert json.loads(secrets.apply_config(restored, json.dumps(transcription)))["session"] == transcription


def test_service_messages(conn: db.Connection) -> None:
    from common.wire import OK, MessageType, Request
    from switchdb import service

    account, key = account_and_key(conn)

    def one(type_: MessageType, *args: str) -> service.Outcome:
        return handle_batch(conn, [Request("r", type_, args)], utc_now())[0]

    minted = one(MessageType.MINT_SECRET, key, "600", json.dumps(CONFIG))
    assert minted.status == OK and minted.fields[2:] == (account.id, "1000")
    value = minted.fields[0]
    loaded = one(MessageType.VALIDATE_AND_LOAD, value, "s1")
    assert loaded.status == OK and loaded.fields[:2] == (account.id, "1000")
    assert json.loads(loaded.fields[2])["session"]["instructions"] == "You sell shoes."
    assert json.loads(one(MessageType.SECRET_CONFIG, value).fields[0]) == CONFIG
    # The read-only path answers a secret the same way.
    outcomes, used = service.handle_reads(conn, [Request("r", MessageType.VALIDATE_AND_LOAD, (value, "s1"))], utc_now())
    assert outcomes[0].fields == loaded.fields and used == [accounts.hash_key(key)]
    assert one(MessageType.CHECK_SECRET, value).status == OK
    with transaction(conn):  # its time passes: no new session, but the ones it started go on
        conn.execute("UPDATE client_secrets SET expires_at = '2000-01-01T00:00:00Z'")
    assert one(MessageType.VALIDATE_AND_LOAD, value, "s1").status == ErrorCode.EXTERNAL_INVALID_AUTH
    assert one(MessageType.CHECK_SECRET, value).status == OK
    assert one(MessageType.CHECK_SECRET, "ek_unknown").status == ErrorCode.EXTERNAL_INVALID_AUTH
    assert one(MessageType.MINT_SECRET, key, "x", "{}").status == ErrorCode.EXTERNAL_BAD_PARAMS
    assert one(MessageType.SECRET_CONFIG, "ek_unknown").status == ErrorCode.EXTERNAL_INVALID_AUTH
    with transaction(conn):
        conn.execute("UPDATE accounts SET token_remaining = 0 WHERE id = ?", (account.id,))
    assert one(MessageType.MINT_SECRET, key, "600", "{}").status == ErrorCode.EXTERNAL_NO_CREDITS
    with transaction(conn):
        accounts.revoke_key(conn, accounts.hash_key(key))
    assert one(MessageType.CHECK_SECRET, value).status == ErrorCode.EXTERNAL_INVALID_AUTH


def _client_message(text: str):
    from switchd.websocket import Connection, Message
    from switchd.ws_codec import OP_TEXT, encode_frame

    conn = Connection(server=True, max_message=1 << 20)
    conn.receive_data(encode_frame(OP_TEXT, text.encode(), mask=True))
    (message,) = [e for e in conn.events() if isinstance(e, Message)]
    return message


def test_locked_frame_rewrites_only_what_a_lock_forbids() -> None:
    event = update(model="gpt-realtime", instructions="You sell shoes.")
    frame, changed = sd.locked_frame(_client_message(json.dumps(event)), LOCKS)  # type: ignore[misc]
    assert changed == ("session.model",)
    forwarded = _client_message(json.dumps(event))  # what the provider unmasks from `frame`
    from switchd.websocket import Connection, Message
    conn = Connection(server=True, max_message=1 << 20)
    conn.receive_data(frame)
    (relayed,) = [e for e in conn.events() if isinstance(e, Message)]
    assert json.loads(relayed.payload) == {**event, "session": {"type": "realtime", "instructions": "You sell shoes."}}
    assert forwarded.payload != relayed.payload
    for untouched in (json.dumps(update(instructions="You sell shoes.")), '{"type":"input_audio_buffer.append",'
                      '"audio":"session.update"}', '{"type":"response.create"}', "not json session.update"):
        assert sd.locked_frame(_client_message(untouched), LOCKS) is None


def test_secret_params_fix_the_url_model() -> None:
    from switchd.handshake import ClientParams

    params = ClientParams("ek_x", "s1", "OPENAI", "gpt-realtime", "realtime")
    fixed, locks = sd.secret_params(params, json.dumps(CONFIG), "gpt-realtime")
    assert fixed.model == "gpt-realtime-2.1-mini" and fixed.session_id == "s1" and locks == LOCKS
    asking = ClientParams("ek_x", "s1", "OPENAI", "gpt-realtime-2", None)
    fixed, locks = sd.secret_params(asking, "{}", "gpt-realtime")
    assert fixed.model == "gpt-realtime" and locks.model == "gpt-realtime"  # no widening by ?model=
    assert sd.enforce(update(model="gpt-realtime-2"), locks)[1] == ("session.model",)
