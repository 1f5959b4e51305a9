"""Usage on its way to switchdb: a session's ledger, the switch-wide outbox, and the journal behind both.

A session meters each provider report into its ledger, which appends it to this process's
journal (switchd.journal) before the frame that carries it is forwarded, and lowers the local
balance; its batcher task turns the running totals into a batch every 5 reports or 2 s, fixes
the batch in the journal, sends it and records switchdb's acknowledgement there, retrying while
switchdb is away or fails. What a session still holds when it ends goes to the outbox, whose
workers keep retrying. What is unacknowledged when the process stops or dies stays in its
journal; the next start on the same SPOOL_DIR delivers it, exactly once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from common.dbclient import DbClient
from common.errors import ErrorCode, SwitchError
from common.pricing import batch_cost, charge, log_fallbacks
from common.replies import Pricing, Recorded, Validated
from common.usage import UsageTotals
from common.wire import MessageType
from switchd.journal import Batch, Journal, Report, check_fsync, find_orphans, new_batches
from switchd.metering import meter
from switchd.metrics import Metrics
from switchd.upstream import backoff

log = logging.getLogger(__name__)

_FALLBACKS_LOGGED: set[str] = set()  # unknown models priced by the fallback: each logged once a process

BATCH_REPORTS = 5
FLUSH_INTERVAL_S = 2.0
# Leases (switchdb.leases): a session asks for enough for LEASE_RESPONSES of the largest report it
# has seen, and no less than the floor of its unit (about a long spoken answer: 4,000 tokens, or
# 10 US cents in nano-USD), so a busy session renews every few responses rather than every one,
# while a small balance still spreads over several sessions. It renews when less than half is
# left, after every recorded batch (so switchdb stops counting what it has recorded twice), and
# every RENEW_S while idle (switchdb voids a lease after 30 s).
LEASE_RESPONSES = 4
LEASE_FLOOR = {"tokens": 4_000, "usd": 100_000_000}
RENEW_S = 10.0
LEASE_WAIT_S = 5.0  # how long a session whose lease is spent waits for a renewal before it is cut
# switchdb voids a lease LEASE_S (30 s) after it last set it, stored to the second. A session that
# has had no renewal answered for LEASE_VALID_S, counted from when it asked the last answered one,
# spends no more of it (what is left: a renewal under way may take the timeout, 5 s, to fail).
LEASE_VALID_S = 20.0
OUTBOX_WORKERS = 8
# Replies that say the batch itself can never be recorded: kept aside as rejected. Anything else
# (INTERNAL_DB_UNAVAILABLE, INTERNAL_ERROR, a storage error, a code this build does not know) is retried.
PERMANENT = frozenset({
    ErrorCode.INTERNAL_BAD_USAGE, ErrorCode.INTERNAL_MALFORMED_MESSAGE, ErrorCode.INTERNAL_UNKNOWN_TYPE,
    ErrorCode.EXTERNAL_BAD_PARAMS, ErrorCode.EXTERNAL_NOT_FOUND,
})

__all__ = ["Batch", "Ledger", "Outbox", "open_lease", "record", "renew_lease", "run_batcher"]


class Ledger:
    """One session's unflushed usage and its local view of the account's balance.

    The balance is in the account's unit: tokens, or nano-USD for an account with `pricing`, which
    pays each report's cost at the price book's rates times its markup, exactly as switchdb
    charges it. So the mid-session cut-off works the same in both."""

    def __init__(
        self, account_id: str, session_id: str, model: str, credits: int, journal: Journal | None = None,
        pricing: Pricing | None = None, lease_key: str = "", metrics: Metrics | None = None,
    ) -> None:
        self.account_id = account_id
        self.session_id = session_id
        self.model = model
        self.credits = credits
        self.journal = journal  # None only in unit tests of the arithmetic
        self.pricing = pricing
        self.transcription_model = ""  # what the session's input transcription is billed as
        self.totals = UsageTotals()
        self.pending = 0  # what the reports in `totals` take off the balance
        self.inflight: Batch | None = None  # taken, sent, not yet acknowledged
        self.wake = trio.Event()  # set on the first pending report and when a batch is full
        self._seqs: list[int] = []  # the journal's numbers of the reports in `totals`
        # With a lease (`lease_key`), `credits` is what is left of it; without, a local copy of the balance.
        self.lease_key = lease_key
        self.metrics = metrics
        self.spent = 0  # everything this session has taken off the balance
        self.recorded = 0  # the part of `spent` switchdb has acknowledged
        self.inflight_spend = 0  # what the batch in flight takes
        self.largest = 0  # the largest single report's spend
        self.renew = trio.Event()  # set when the lease should be renewed now
        self.renewed = trio.Event()  # set (and replaced) when a renewal is answered
        self.lease_until: float | None = None  # trio time the lease may be void from; set by run_leases

    @property
    def unit(self) -> str:
        return "tokens" if self.pricing is None else "usd"

    def lease_size(self) -> int:
        """What to hold beyond what is spent and not yet recorded."""
        return max(LEASE_FLOOR[self.unit], LEASE_RESPONSES * self.largest)

    def holding(self) -> int:
        """What the session holds of its lease now: spent and not recorded, plus what it may still spend.

        A renewal asks switchdb to keep at least that. Should its answer be lost (switchdb slow
        past the timeout, or away), the session goes on spending what it holds, and the lease
        switchdb set meanwhile still covers all of it: a lost answer never lets switchdb give to
        another session what this one goes on spending."""
        return self.spent - self.recorded + max(self.credits, 0)

    def leased(self, granted: int, recorded_before: int, asked_at: float | None = None) -> None:
        """A renewal's answer: `granted` covers all spending since `recorded_before` was recorded.

        `asked_at` (trio time the request was sent): the lease is good until LEASE_VALID_S later."""
        self.credits = granted - (self.spent - recorded_before)
        if asked_at is not None:
            self.lease_until = asked_at + LEASE_VALID_S
        self.answered()

    def answered(self) -> None:
        self.renewed.set()
        self.renewed = trio.Event()

    def lapse_if_due(self) -> None:
        """Once the lease may be void (no renewal answered for LEASE_VALID_S), spend no more of it."""
        if self.lease_until is not None and trio.current_time() >= self.lease_until:
            self.credits = min(self.credits, 0)

    async def refill(self) -> bool:
        """Whether the session may go on once its credits are spent: with a lease, after one more renewal."""
        if self.credits > 0:
            return True
        if not self.lease_key:
            return False
        with trio.move_on_after(LEASE_WAIT_S):
            self.renew.set()
            await self.renewed.wait()
        return self.credits > 0

    def add(self, event: Mapping[str, object]) -> int:
        """Meter a usage event into the totals and journal it; returns the tokens it deducts.

        Call it before forwarding the event's frame: once this returns, the report survives the
        process's death. An event without usage writes nothing.
        """
        report = UsageTotals()
        tokens = meter(event, report)
        if not report.reports:
            return 0
        report.transcription_model = self.transcription_model
        spend = tokens if self.pricing is None else self._charge(report)
        self.totals.merge(report)
        if self.journal is not None:
            self._seqs.append(
                self.journal.report(Report(self.account_id, self.session_id, self.model, report.to_json()))
            )
        self.added(spend)
        return tokens

    def _charge(self, report: UsageTotals) -> int:
        assert self.pricing is not None
        try:
            priced = batch_cost(report, self.pricing.book, self.model)
        except SwitchError as exc:  # counts no price applies to: switchdb refuses the batch too
            log.warning("usage report not priced: %s", exc.message)
            return 0
        log_fallbacks(priced, _FALLBACKS_LOGGED)
        charged = charge(priced.nano_usd, self.pricing.markup)
        if self.metrics is not None:
            self.metrics.cost_nano_usd += priced.nano_usd
            self.metrics.charged_nano_usd += charged
        return charged

    def added(self, spend: int) -> None:
        """Account for a report just added to `totals`: `spend` in the account's unit."""
        self.credits -= spend
        self.pending += spend
        self.spent += spend
        self.largest = max(self.largest, spend)
        if self.lease_key and self.credits * 2 < self.lease_size():
            self.renew.set()
        if self.totals.reports == 1 or self.totals.reports >= BATCH_REPORTS:
            self.wake.set()

    def take_batch(self) -> Batch | None:
        """The totals as a new batch, fixed in the journal (id included) before anyone sends it."""
        if not self.totals.reports:
            return None
        batch = Batch(
            uuid.uuid4().hex, self.account_id, self.session_id, "openai", self.model, self.totals.to_json()
        )
        if self.journal is not None:
            self.journal.batch(batch, tuple(self._seqs))
        self._seqs = []
        self.totals = UsageTotals()
        self.inflight_spend, self.pending = self.pending, 0
        self.wake = trio.Event()
        return batch

    def acknowledged(self, credits: int) -> None:
        # switchdb's balance already includes the batch; reports added since are still ours to subtract.
        self.recorded += self.inflight_spend
        self.inflight_spend = 0
        if not self.lease_key:
            self.credits = credits - self.pending
            return
        # Never more than the account holds (an adjustment may have lowered it); the lease is
        # renewed so switchdb stops counting the batch in it as well as in the balance.
        self.credits = min(self.credits, credits - self.pending)
        self.renew.set()


async def record(db: DbClient, batch: Batch, journal: Journal | None = None) -> int:
    """RECORD_USAGE until acknowledged (idempotent by batch id); returns the account's new balance.

    Sent only once the batch is in the journal. Raises SwitchError only when switchdb refuses
    the batch itself for good (PERMANENT); every other failure is retried with backoff.
    """
    attempt = 0
    while True:
        if journal is None or journal.written(batch.batch_id):
            try:
                fields = await db.request(
                    MessageType.RECORD_USAGE, batch.batch_id, batch.account_id, batch.session_id,
                    batch.provider, batch.model, batch.usage_json,
                )
                return Recorded.decode(fields).balance
            except SwitchError as exc:
                if exc.code in PERMANENT:
                    raise
                reason = str(exc.code)
        else:
            reason = "not journaled yet"
        attempt += 1
        log.warning("usage batch %s not recorded (%s), retry %d", batch.batch_id, reason, attempt)
        await trio.sleep(backoff(min(attempt, 4)))


async def run_batcher(ledger: Ledger, db: DbClient) -> None:
    """A session task: flush every BATCH_REPORTS reports, and FLUSH_INTERVAL_S after the first pending
    one; and with a lease, keep it renewed."""
    async with trio.open_nursery() as nursery:
        if ledger.lease_key:
            nursery.start_soon(run_leases, ledger, db)
        await _flush(ledger, db)  # returns only by raising


async def _flush(ledger: Ledger, db: DbClient) -> None:
    while True:
        await ledger.wake.wait()
        with trio.move_on_after(FLUSH_INTERVAL_S):
            while ledger.totals.reports < BATCH_REPORTS:
                ledger.wake = trio.Event()
                await ledger.wake.wait()
        ledger.inflight = ledger.take_batch()
        if ledger.inflight is None:
            continue
        credits = await record(db, ledger.inflight, ledger.journal)
        if ledger.journal is not None:
            ledger.journal.ack(ledger.inflight.batch_id)
        ledger.inflight = None
        # Credits at or below zero now cut the session at its next report, once that report's frame
        # is forwarded: cut here, the reports the session was forwarding would be billed unseen.
        ledger.acknowledged(credits)


def new_lease_key() -> str:
    return uuid.uuid4().hex


async def request_lease(db: DbClient, account_id: str, lease_key: str, held: int, wanted: int) -> int:
    """LEASE: set the session's lease to at most `wanted`, at least `held` (spent, not yet recorded);
    returns what switchdb granted."""
    fields = await db.request(MessageType.LEASE, account_id, lease_key, str(max(0, held)), str(max(0, held, wanted)))
    try:
        return int(fields[0])
    except (IndexError, ValueError):
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "a LEASE reply without an amount") from None


async def open_lease(db: DbClient, account: Validated) -> tuple[Validated, str]:
    """The first lease of a session about to open: (the account with the lease as its balance, the
    lease's key). Raises EXTERNAL_NO_CREDITS when none can be had, for a 402 at the handshake."""
    key = new_lease_key()
    unit = "tokens" if account.pricing is None else "usd"
    granted = await request_lease(db, account.account_id, key, 0, LEASE_FLOOR[unit])
    if granted <= 0:
        raise SwitchError(
            ErrorCode.EXTERNAL_NO_CREDITS,
            "no credits left: the balance is spent, or held by the account's open sessions",
        )
    return attrs.evolve(account, balance=granted), key


async def renew_lease(ledger: Ledger, db: DbClient) -> None:
    """One renewal: keep at least what the session holds (`Ledger.holding`), ask for LEASE_RESPONSES
    more. Unanswered, the session goes on with what it holds, cut only once that is spent, or
    once the lease may have lapsed (LEASE_VALID_S since the last answered renewal was asked)."""
    recorded = ledger.recorded
    held = ledger.spent - recorded
    asked_at = trio.current_time()
    try:
        granted = await request_lease(
            db, ledger.account_id, ledger.lease_key, ledger.holding(), held + ledger.lease_size()
        )
    except SwitchError as exc:
        log.warning("lease not renewed (%s)", exc.code)
        ledger.lapse_if_due()
        ledger.answered()
        return
    ledger.leased(granted, recorded, asked_at)


async def run_leases(ledger: Ledger, db: DbClient) -> None:
    """A session task: renew its lease when asked (low, or a batch recorded) and every RENEW_S;
    at the end, leave in it only what is spent and not recorded yet (the outbox records that)."""
    if ledger.lease_until is None:  # the first lease was granted at the handshake, just before
        ledger.lease_until = trio.current_time() + LEASE_VALID_S
    try:
        while True:
            left = ledger.lease_until - trio.current_time()
            with trio.move_on_after(min(RENEW_S, left) if left > 0 else RENEW_S):  # woken at the lapse once
                await ledger.renew.wait()
            ledger.renew = trio.Event()
            ledger.lapse_if_due()
            await renew_lease(ledger, db)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(LEASE_WAIT_S):
            try:
                held = ledger.spent - ledger.recorded
                await request_lease(db, ledger.account_id, ledger.lease_key, held, held)
            except SwitchError as exc:  # it expires by itself
                log.info("lease not released (%s)", exc.code)


def spool_lines(batches: list[Batch]) -> str:
    """Batches as JSON lines: the rejected-*.jsonl files, and the spool files of earlier versions."""
    return "".join(json.dumps(attrs.asdict(b), separators=(",", ":")) + "\n" for b in batches)


def parse_spool(text: str) -> list[Batch]:
    """Read a spool file; raises ValueError naming the line when any line is not a batch."""
    batches = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or set(data) != set(attrs.fields_dict(Batch)):
                raise ValueError("not a batch")
            if not all(isinstance(v, str) for v in data.values()):
                raise ValueError("fields must be strings")
            UsageTotals.from_json(data["usage_json"])
        except (ValueError, SwitchError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
        batches.append(Batch(**data))
    return batches


def _new_id() -> str:
    return uuid.uuid4().hex


class Outbox:
    """This process's journal, and the batches delivered by the daemon until acknowledged: those
    that outlived their session, and those journaled by processes that died."""

    def __init__(self, spool_dir: Path, fsync: str = "off") -> None:
        self.spool_dir = spool_dir
        self.fsync = check_fsync(fsync)
        self.journal: Journal | None = None  # opened by load_spool
        self.unacked: dict[str, Batch] = {}
        self._journal_of: dict[str, Journal | None] = {}
        self._adopted: list[Journal] = []  # journals of dead processes, deleted once they owe nothing
        self._send, self._receive = trio.open_memory_channel[Batch](math.inf)
        self._changed = trio.Event()

    def submit(self, batch: Batch, journal: Journal | None = None) -> None:
        """Deliver a batch already in `journal` (this process's by default)."""
        if batch.batch_id in self.unacked:  # an old spool file replayed twice: one delivery is enough
            return
        self.unacked[batch.batch_id] = batch
        self._journal_of[batch.batch_id] = journal or self.journal
        self._send.send_nowait(batch)

    def load_spool(self) -> int:
        """Open this process's journal and queue everything dead processes left in SPOOL_DIR.

        The journals of dead processes: unacknowledged batches again with their own ids, reports
        in no batch as new batches (journaled before they are sent). Spool files of earlier
        versions are journaled and deleted. An unreadable file is renamed `.bad` and reported.
        """
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self.journal = Journal.create(self.spool_dir, self.fsync)
        except OSError as exc:
            raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"cannot write a journal in SPOOL_DIR ({exc})") from None
        count = 0
        for journal in find_orphans(self.spool_dir, self.fsync, own=self.journal.path).journals:
            for batch, seqs in new_batches(journal.state.pending, _new_id):
                journal.batch(batch, seqs)
            if not journal.state.unacked:
                journal.close(delete=True)
                continue
            self._adopted.append(journal)
            for batch in list(journal.state.unacked.values()):
                self.submit(batch, journal)
                count += 1
        count += self._import_spool_files()
        if count:
            log.info("replaying %d journaled usage batches", count)
        return count

    def _import_spool_files(self) -> int:
        assert self.journal is not None
        count = 0
        for path in sorted(self.spool_dir.glob("usage-*.jsonl")):
            try:
                batches = parse_spool(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                aside = path.with_suffix(".bad")
                path.rename(aside)
                log.error("spool file %s cannot be read (%s); kept as %s", path.name, exc, aside.name)
                continue
            for batch in batches:
                if batch.batch_id in self.unacked:  # already journaled by a start that died before the unlink
                    continue
                self.journal.batch(batch, ())  # same ids: journaled twice if we die before the unlink, counted once
                self.submit(batch)
            path.unlink()
            count += len(batches)
        return count

    async def run(self, db: DbClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(OUTBOX_WORKERS):
                nursery.start_soon(self._deliver, db, self._receive.clone())
            task_status.started()

    async def _deliver(self, db: DbClient, receive: trio.MemoryReceiveChannel[Batch]) -> None:
        async for batch in receive:
            journal = self._journal_of[batch.batch_id]
            done = True
            try:
                await record(db, batch, journal)
            except SwitchError as exc:
                # switchdb refused the batch itself (not an outage): keep it aside for the operator.
                log.error("switchdb refused usage batch %s (%s); kept as rejected", batch.batch_id, exc.code)
                done = self._write_rejected(batch)
            if journal is not None and done:
                journal.ack(batch.batch_id)
                if not journal.live and not journal.state.owes:
                    self._adopted.remove(journal)
                    journal.close(delete=True)
            del self.unacked[batch.batch_id], self._journal_of[batch.batch_id]
            self._changed.set()
            self._changed = trio.Event()

    async def drained(self) -> None:
        while self.unacked:
            await self._changed.wait()

    def close(self) -> int:
        """At shutdown: what is unacknowledged stays journaled for the next start; returns how many batches."""
        left = 0
        for journal in (self.journal, *self._adopted):
            if journal is not None:
                left += len(journal.state.unacked) + len(new_batches(journal.state.pending, _new_id))
                journal.close(delete=not journal.state.owes)
        if left:
            log.warning("%d usage batches left in the journal for the next start", left)
        self.journal = None
        self._adopted.clear()
        return left

    def _write_rejected(self, batch: Batch) -> bool:
        path = self.spool_dir / f"rejected-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(spool_lines([batch]))
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(path)
        except OSError as exc:
            log.error("rejected usage batch %s stays in the journal (%s)", batch.batch_id, exc)
            return False
        return True
