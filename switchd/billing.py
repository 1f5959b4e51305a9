"""Usage on its way to switchdb: a session's ledger, the switch-wide outbox, and the spool.

A session adds each provider report to its ledger's running totals and lowers its local
balance; its batcher task turns the totals into a batch every 5 reports or 2 s and waits for
switchdb's acknowledgement, retrying while switchdb is away. What a session still holds when
it ends goes to the outbox, whose workers keep retrying; what the outbox still holds when the
daemon's shutdown grace runs out is written to the spool and sent first at the next start.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from common.dbclient import DbClient
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import MessageType
from switchd.upstream import backoff

log = logging.getLogger(__name__)

BATCH_REPORTS = 5
FLUSH_INTERVAL_S = 2.0
OUTBOX_WORKERS = 8


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    account_id: str
    session_id: str
    provider: str
    model: str
    usage_json: str


class Ledger:
    """One session's unflushed usage and its local view of the account's balance."""

    def __init__(self, account_id: str, session_id: str, model: str, credits: int) -> None:
        self.account_id = account_id
        self.session_id = session_id
        self.model = model
        self.credits = credits
        self.totals = UsageTotals()
        self.inflight: Batch | None = None  # taken, sent, not yet acknowledged
        self.wake = trio.Event()  # set on the first pending report and when a batch is full

    def added(self, tokens: int) -> None:
        """Account for a report just added to `totals`."""
        self.credits -= tokens
        if self.totals.reports == 1 or self.totals.reports >= BATCH_REPORTS:
            self.wake.set()

    def take_batch(self) -> Batch | None:
        if not self.totals.reports:
            return None
        batch = Batch(
            uuid.uuid4().hex, self.account_id, self.session_id, "openai", self.model, self.totals.to_json()
        )
        self.totals = UsageTotals()
        self.wake = trio.Event()
        return batch

    def acknowledged(self, credits: int) -> None:
        # switchdb's balance already includes the batch; reports added since are still ours to subtract.
        self.credits = credits - self.totals.tokens


async def record(db: DbClient, batch: Batch) -> int:
    """RECORD_USAGE until acknowledged (idempotent by batch id); returns the account's new balance."""
    attempt = 0
    while True:
        try:
            fields = await db.request(
                MessageType.RECORD_USAGE, batch.batch_id, batch.account_id, batch.session_id,
                batch.provider, batch.model, batch.usage_json,
            )
            return int(fields[0])
        except SwitchError as exc:
            if exc.code != ErrorCode.INTERNAL_DB_UNAVAILABLE:
                raise
        attempt += 1
        log.warning("switchdb unavailable, usage batch %s retry %d", batch.batch_id, attempt)
        await trio.sleep(backoff(min(attempt, 4)))


async def run_batcher(ledger: Ledger, db: DbClient) -> None:
    """A session task: flush every BATCH_REPORTS reports, and FLUSH_INTERVAL_S after the first pending one."""
    while True:
        await ledger.wake.wait()
        with trio.move_on_after(FLUSH_INTERVAL_S):
            while ledger.totals.reports < BATCH_REPORTS:
                ledger.wake = trio.Event()
                await ledger.wake.wait()
        ledger.inflight = ledger.take_batch()
        if ledger.inflight is None:
            continue
        credits = await record(db, ledger.inflight)
        ledger.inflight = None
        ledger.acknowledged(credits)
        if ledger.credits <= 0:
            raise SwitchError(ErrorCode.EXTERNAL_NO_CREDITS, "the account has no credits left")


def spool_lines(batches: list[Batch]) -> str:
    return "".join(json.dumps(asdict(b), separators=(",", ":")) + "\n" for b in batches)


def parse_spool(text: str) -> list[Batch]:
    """Read a spool file; raises ValueError naming the line when any line is not a batch."""
    batches = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or set(data) != set(Batch.__dataclass_fields__):
                raise ValueError("not a batch")
            if not all(isinstance(v, str) for v in data.values()):
                raise ValueError("fields must be strings")
            UsageTotals.from_json(data["usage_json"])
        except (ValueError, SwitchError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
        batches.append(Batch(**data))
    return batches


class Outbox:
    """Batches that outlived their session, delivered by the daemon until acknowledged."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.unacked: dict[str, Batch] = {}
        self._send, self._receive = trio.open_memory_channel[Batch](math.inf)
        self._changed = trio.Event()
        self._replayed: list[Path] = []  # spool files read at start, removed once their batches are safe

    def submit(self, batch: Batch) -> None:
        self.unacked[batch.batch_id] = batch
        self._send.send_nowait(batch)

    def load_spool(self) -> int:
        """Queue every spooled batch; a file that cannot be parsed is renamed aside and reported."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
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
                self.submit(batch)
            self._replayed.append(path)
            count += len(batches)
        if count:
            log.info("replaying %d spooled usage batches", count)
        return count

    async def run(self, db: DbClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(OUTBOX_WORKERS):
                nursery.start_soon(self._deliver, db, self._receive.clone())
            task_status.started()

    async def _deliver(self, db: DbClient, receive: trio.MemoryReceiveChannel[Batch]) -> None:
        async for batch in receive:
            try:
                await record(db, batch)
            except SwitchError as exc:
                # switchdb refused the batch itself (not an outage): keep it aside for the operator.
                log.error("switchdb refused usage batch %s (%s); spooled as rejected", batch.batch_id, exc.code)
                self._write(batch_list=[batch], prefix="rejected")
            del self.unacked[batch.batch_id]
            self._changed.set()
            self._changed = trio.Event()
            if not self.unacked:
                self._forget_replayed()

    async def drained(self) -> None:
        while self.unacked:
            await self._changed.wait()

    def spill(self) -> Path | None:
        """Write every unacknowledged batch to a new spool file (at shutdown)."""
        path = self._write(list(self.unacked.values()), prefix="usage") if self.unacked else None
        if path is not None:
            log.warning("spooled %d undelivered usage batches to %s", len(self.unacked), path)
        self._forget_replayed()
        return path

    def _write(self, batch_list: list[Batch], prefix: str) -> Path:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(spool_lines(batch_list))
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
        return path

    def _forget_replayed(self) -> None:
        for path in self._replayed:
            path.unlink(missing_ok=True)
        self._replayed.clear()
