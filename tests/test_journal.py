"""The usage journal's format, replay and file handling (switchd.journal), and the ledger/outbox on top of it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from switchd.billing import Ledger, Outbox, record
from switchd.journal import (
    Batch, Journal, JournalState, Report, ack_line, batch_line, check_fsync, find_orphans, header_line,
    new_batches, parse_journal, report_line,
)

ACCOUNTS = ("acc1", "acc2")
SESSIONS = ("s1", "s2", 'odd "sess" ü')


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("journal-*"))


def usage(tokens: int) -> str:
    return UsageTotals(input_tokens=tokens, reports=1).to_json()


def tokens_of(usage_json: str) -> int:
    return UsageTotals.from_json(usage_json).tokens


# A journal's life as operations: a report for (account, session), a batch of one session's
# pending reports, an ack of one earlier batch. `play` writes it and keeps a model of what is owed.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("report"), st.sampled_from(ACCOUNTS), st.sampled_from(SESSIONS), st.integers(0, 10**6)),
        st.tuples(st.just("batch"), st.sampled_from(ACCOUNTS), st.sampled_from(SESSIONS), st.just(0)),
        st.tuples(st.just("ack"), st.just(""), st.just(""), st.integers(0, 50)),
    ),
    max_size=60,
)


def play(ops: list[tuple[str, str, str, int]]) -> tuple[bytes, dict[int, Report], dict[str, Batch], int, int]:
    """(journal bytes, model pending, model unacked, tokens reported, tokens acked)."""
    lines = [header_line(None)]
    pending: dict[int, Report] = {}
    unacked: dict[str, Batch] = {}
    batches: list[Batch] = []
    seq = reported = acked = 0
    for kind, account, session, n in ops:
        if kind == "report":
            report = Report(account, session, "m", usage(n))
            lines.append(report_line(seq, report))
            pending[seq] = report
            seq += 1
            reported += n
        elif kind == "batch":
            seqs = tuple(s for s, r in pending.items() if (r.account_id, r.session_id) == (account, session))
            if not seqs:
                continue
            total = sum(tokens_of(pending.pop(s).usage_json) for s in seqs)
            batch = Batch(f"b{len(batches)}", account, session, "openai", "m", usage(total))
            lines.append(batch_line(batch, seqs))
            unacked[batch.batch_id] = batch
            batches.append(batch)
        elif batches:
            batch = batches[n % len(batches)]
            lines.append(ack_line(batch.batch_id))
            if unacked.pop(batch.batch_id, None) is not None:
                acked += tokens_of(batch.usage_json)
    return b"".join(lines), pending, unacked, reported, acked


@given(operations)
def test_parse_recovers_what_is_owed(ops: list) -> None:
    data, pending, unacked, _, _ = play(ops)
    state, end = parse_journal(data)
    assert end == len(data)
    assert state.pending == pending and state.unacked == unacked


@given(operations)
def test_replay_bills_every_report_exactly_once(ops: list) -> None:
    data, _, _, reported, acked = play(ops)
    state, _ = parse_journal(data)
    ids = iter(range(10**6))
    fresh = new_batches(state.pending, lambda: f"new{next(ids)}")
    resent = sum(tokens_of(b.usage_json) for b in state.unacked.values())
    new = sum(tokens_of(b.usage_json) for b, _ in fresh)
    assert acked + resent + new == reported
    assert len({b.batch_id for b, _ in fresh} | set(state.unacked)) == len(fresh) + len(state.unacked)
    covered = sorted(s for _, seqs in fresh for s in seqs)
    assert covered == sorted(state.pending)  # each pending report in exactly one new batch
    for batch, seqs in fresh:  # never two sessions (or accounts) in one batch
        assert {(state.pending[s].account_id, state.pending[s].session_id) for s in seqs} == {
            (batch.account_id, batch.session_id)}


@given(operations, st.data())
def test_a_torn_last_line_is_not_corruption(ops: list, data: st.DataObject) -> None:
    """A process killed mid-write leaves any prefix of its journal: never an error, and what is
    read is exactly the whole lines before the cut."""
    text, *_ = play(ops)
    cut = data.draw(st.integers(0, len(text)))
    state, end = parse_journal(text[:cut])
    assert end <= cut and (end == 0 or text[end - 1 : end] == b"\n")
    assert state == parse_journal(text[:end])[0]


@given(operations, st.data(), st.sampled_from([b"garbage", b"{}", b'{"t":"r"}', b"\xff\xfe", b"[1,2]",
                                               b'{"t":"k","id":5}', b'{"t":"h","v":1,"replaces":null}']))
def test_a_bad_line_before_the_last_is_refused(ops: list, data: st.DataObject, bad: bytes) -> None:
    text, *_ = play(ops)
    lines = text.splitlines(keepends=True)
    at = data.draw(st.integers(1, len(lines)))
    corrupt = b"".join(lines[:at]) + bad + b"\n" + b"".join(lines[at:])
    with pytest.raises(ValueError, match="line"):
        parse_journal(corrupt)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_value_error(data: bytes) -> None:
    try:
        state, end = parse_journal(data)
    except ValueError:
        return
    assert end <= len(data)


@given(st.lists(st.text(max_size=20), max_size=8))
def test_arbitrary_text_lines_only_raise_value_error(lines: list[str]) -> None:
    try:
        parse_journal("".join(line.replace("\n", "") + "\n" for line in lines).encode())
    except ValueError:
        pass


def test_reports_must_come_in_order() -> None:
    r = Report("a", "s", "m", usage(1))
    with pytest.raises(ValueError, match="line 3"):
        parse_journal(header_line(None) + report_line(5, r) + report_line(5, r))


def test_bad_usage_in_a_record_is_refused() -> None:
    line = json.dumps({"t": "r", "n": 0, "a": "a", "s": "s", "m": "m", "u": '{"input_tokens":-1}'}).encode()
    with pytest.raises(ValueError, match="line 1"):
        parse_journal(line + b"\n")


def test_fsync_policy_is_checked() -> None:
    assert check_fsync("off") is False and check_fsync("batch") is True
    with pytest.raises(SwitchError) as exc:
        check_fsync("always")
    assert exc.value.code == ErrorCode.INTERNAL_BAD_CONFIG and "JOURNAL_FSYNC" in exc.value.message
    with pytest.raises(SwitchError):
        Outbox(Path("/nonexistent"), "sometimes")


def write_journal(directory: Path) -> tuple[Journal, Batch]:
    """A journal owing: one unacked batch (5 tokens), two pending reports of s2 (7 tokens); one batch acked."""
    j = Journal.create(directory, fsync=False)
    done = Batch("done", "a", "s1", "openai", "m", usage(100))
    j.batch(done, (j.report(Report("a", "s1", "m", usage(100))),))
    j.ack("done")
    owed = Batch("owed", "a", "s1", "openai", "m", usage(5))
    j.batch(owed, (j.report(Report("a", "s1", "m", usage(5))),))
    j.report(Report("a", "s2", "m", usage(3)))
    j.report(Report("a", "s2", "m", usage(4)))
    return j, owed


def test_a_live_journal_is_not_adopted_a_dead_one_is(tmp_path: Path) -> None:
    j, owed = write_journal(tmp_path)
    assert find_orphans(tmp_path, False).journals == []  # its lock is held (as by a live process)
    j.close(delete=False)
    found = find_orphans(tmp_path, False)
    assert len(found.journals) == 1
    state = found.journals[0].state
    assert state.unacked == {"owed": owed}
    assert sorted(tokens_of(r.usage_json) for r in state.pending.values()) == [3, 4]
    found.journals[0].close(delete=False)


def test_a_torn_tail_is_cut_before_appending(tmp_path: Path) -> None:
    j, _ = write_journal(tmp_path)
    path = j.path
    j.close(delete=False)
    with open(path, "ab") as f:
        f.write(b'{"t":"r","n":99,"a":"a","s')  # died mid-write
    (adopted,) = find_orphans(tmp_path, False).journals
    adopted.ack("owed")
    adopted.close(delete=False)
    state, end = parse_journal(path.read_bytes())
    assert end == path.stat().st_size and state.unacked == {} and len(state.pending) == 2


def test_an_unreadable_journal_is_kept_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j, _ = write_journal(tmp_path)
    path = j.path
    j.close(delete=False)
    data = path.read_bytes()
    path.write_bytes(data[:40] + b"\x00garbage\n" + data[40:])
    found = find_orphans(tmp_path, False)
    assert found.journals == [] and found.bad == [path.with_suffix(".bad")]
    assert path.with_suffix(".bad").read_bytes().startswith(data[:40])  # kept byte for byte
    assert not path.exists()
    assert "cannot be read" in caplog.text


def test_compaction_keeps_only_what_is_owed(tmp_path: Path) -> None:
    j = Journal.create(tmp_path, fsync=False)
    j.compact_bytes = 2000
    first = j.path
    for i in range(40):
        seq = j.report(Report("a", "s", "m", usage(i)))
        batch = Batch(f"b{i}", "a", "s", "openai", "m", usage(i))
        j.batch(batch, (seq,))
        if i % 10:
            j.ack(batch.batch_id)
    j.report(Report("a", "s", "m", usage(1000)))
    assert j.path != first and not first.exists()
    assert names(tmp_path) == [j.path.name]
    state, _ = parse_journal(j.path.read_bytes())
    assert set(state.unacked) == {f"b{i}" for i in range(40) if i % 10 == 0}
    assert [tokens_of(r.usage_json) for r in state.pending.values()] == [1000]
    assert j.path.stat().st_size < 2000
    j.close(delete=False)


def test_a_compaction_cut_short_is_resolved(tmp_path: Path) -> None:
    old, owed = write_journal(tmp_path)
    # Died after the new file was complete but before the old one was removed.
    new = Journal.create(tmp_path, False, old.state, replaces=old.path.name)
    (tmp_path / "journal-1-dead.tmp").write_bytes(b"partial")  # died before a rename
    old.close(delete=False)
    new.close(delete=False)
    found = find_orphans(tmp_path, False)
    assert [j.path for j in found.journals] == [new.path]
    assert not old.path.exists() and not (tmp_path / "journal-1-dead.tmp").exists()
    assert found.journals[0].state.unacked == {"owed": owed}
    found.journals[0].close(delete=False)


class FakeDb:
    """switchdb's replies, scripted: a list of error codes to answer before accepting."""

    def __init__(self, errors: list[ErrorCode]) -> None:
        self.errors = errors
        self.sent: list[str] = []

    async def request(self, type: object, *args: str) -> tuple[str, ...]:
        self.sent.append(args[0])
        if self.errors:
            raise SwitchError(self.errors.pop(0))
        return ("42",)


async def test_transient_replies_are_retried_and_only_a_bad_batch_is_refused(autojump_clock: trio.abc.Clock) -> None:
    batch = Batch("b", "a", "s", "openai", "m", usage(1))
    db = FakeDb([ErrorCode.INTERNAL_ERROR, ErrorCode.INTERNAL_DB_UNAVAILABLE, ErrorCode.INTERNAL_DB_ENCRYPTION])
    assert await record(db, batch) == 42  # type: ignore[arg-type]
    assert db.sent == ["b"] * 4
    with pytest.raises(SwitchError):
        await record(FakeDb([ErrorCode.INTERNAL_BAD_USAGE]), batch)  # type: ignore[arg-type]


async def test_ledger_journals_each_report_before_returning(tmp_path: Path) -> None:
    j = Journal.create(tmp_path, fsync=True)
    ledger = Ledger("a", "s", "m", 1000, journal=j)
    event = {"type": "response.done", "response": {"usage": {"input_tokens": 30, "output_tokens": 12}}}
    assert ledger.add(event) == 42 and ledger.credits == 958
    assert ledger.add({"type": "response.done", "response": {}}) == 0  # no usage: nothing written
    state, _ = parse_journal(j.path.read_bytes())
    assert [tokens_of(r.usage_json) for r in state.pending.values()] == [42]
    batch = ledger.take_batch()
    assert batch is not None
    state, _ = parse_journal(j.path.read_bytes())
    assert state.pending == {} and state.unacked == {batch.batch_id: batch}  # its id fixed before it is sent
    j.close(delete=False)


async def test_outbox_replays_a_dead_journal_and_deletes_it_once_acknowledged(tmp_path: Path) -> None:
    dead, owed = write_journal(tmp_path)
    dead.close(delete=False)
    outbox = Outbox(tmp_path)
    assert outbox.load_spool() == 2  # the unacked batch again, the two pending reports as one new batch
    assert "owed" in outbox.unacked
    (fresh,) = [b for b in outbox.unacked.values() if b.batch_id != "owed"]
    assert (fresh.session_id, tokens_of(fresh.usage_json)) == ("s2", 7)
    state, _ = parse_journal(dead.path.read_bytes())
    assert fresh.batch_id in state.unacked  # journaled in the dead file before being sent
    db = FakeDb([])
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run, db)
        with trio.fail_after(5):
            await outbox.drained()
        nursery.cancel_scope.cancel()
    assert sorted(db.sent) == sorted(["owed", fresh.batch_id])
    assert not dead.path.exists()
    assert outbox.close() == 0
    assert names(tmp_path) == []  # a clean stop leaves no journal behind


async def test_outbox_close_leaves_unacknowledged_batches_for_the_next_start(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.load_spool()
    assert outbox.journal is not None
    ledger = Ledger("a", "s", "m", 100, journal=outbox.journal)
    ledger.add({"type": "response.done", "response": {"usage": {"input_tokens": 9}}})
    batch = ledger.take_batch()
    assert batch is not None
    outbox.submit(batch)
    assert outbox.close() == 1
    nxt = Outbox(tmp_path)
    assert nxt.load_spool() == 1 and list(nxt.unacked) == [batch.batch_id]
    nxt.close()


def test_old_spool_files_are_journaled(tmp_path: Path) -> None:
    from switchd.billing import spool_lines

    (tmp_path / "usage-1-x.jsonl").write_text(spool_lines([Batch("old", "a", "s", "openai", "m", usage(3))]))
    outbox = Outbox(tmp_path)
    assert outbox.load_spool() == 1 and list(outbox.unacked) == ["old"]
    assert not (tmp_path / "usage-1-x.jsonl").exists()
    assert outbox.journal is not None
    assert "old" in parse_journal(outbox.journal.path.read_bytes())[0].unacked
    outbox.close()


def test_state_round_trips_through_compaction_lines() -> None:
    state = JournalState()
    state.report(3, Report("a", "s", "m", usage(2)))
    state.batch(Batch("x", "a", "s", "openai", "m", usage(1)), ())
    from switchd.journal import state_lines

    parsed, _ = parse_journal(state_lines(state, "journal-1-a.jsonl"))
    assert (parsed.pending, parsed.unacked, parsed.replaces) == (state.pending, state.unacked, "journal-1-a.jsonl")
    assert os.sep not in (parsed.replaces or "")


def test_journals_left_in_worker_directories_are_found(tmp_path: Path) -> None:
    (tmp_path / "worker-1").mkdir()
    j, owed = write_journal(tmp_path / "worker-1")
    j.close(delete=False)
    (found,) = find_orphans(tmp_path, False).journals  # a run with fewer workers still delivers it
    assert found.state.unacked == {"owed": owed}
    found.close(delete=False)


async def test_a_batch_is_never_sent_before_it_is_journaled(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    j = Journal.create(tmp_path, fsync=False)
    ledger = Ledger("a", "s", "m", 100, journal=j)
    ledger.add({"type": "response.done", "response": {"usage": {"input_tokens": 9}}})
    writable, j._fd = j._fd, os.open(j.path, os.O_RDONLY)  # the disk refuses writes for a while
    batch = ledger.take_batch()
    assert batch is not None
    db = FakeDb([])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, db, batch, j)
        await trio.sleep(30)  # virtual time (autojump clock): the retries run meanwhile
        assert db.sent == []  # not in the journal yet: not sent
        os.close(j._fd)
        j._fd = writable  # the disk has room again
    assert db.sent == [batch.batch_id]
    assert batch.batch_id in parse_journal(j.path.read_bytes())[0].unacked
    j.close(delete=False)
