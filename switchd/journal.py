"""The usage journal: each usage report and each batch is appended to a file in SPOOL_DIR first.

One file per switchd process, `journal-<pid>-<token>.jsonl`, held with an exclusive flock for
the process's life, one JSON object a line:

    {"t":"h","v":1,"replaces":null}                      first line: the file it supersedes, if any
    {"t":"r","n":7,"a":acct,"s":sess,"m":model,"u":usage} one usage report, before its frame is forwarded
    {"t":"b","id":..,"a":..,"s":..,"p":..,"m":..,"u":..,"r":[7,8]}  a batch (and the reports it
                                                          covers), before RECORD_USAGE is sent
    {"t":"k","id":..}                                     switchdb acknowledged that batch (or refused it for good)

A plain write reaches the kernel's page cache, so a record survives the process's death (SIGKILL,
OOM), not a power loss; JOURNAL_FSYNC=batch also fsyncs each batch record (a session's last 5
reports or 2 s), so a power loss costs at most the reports since each session's last batch. After a
death, the next process on the same SPOOL_DIR finds the file unlocked, resends every batch without
an ack under its original id (switchdb counts a batch id once), turns the reports in no batch into
new batches, and deletes the file once all of them are acknowledged. A process that dies mid-write
leaves a torn last line, which is ignored; any other unreadable line keeps the file aside (`.bad`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs

from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("off", "batch")
COMPACT_BYTES = 4 * 1024 * 1024  # past this, the journal is rewritten with only what is still owed
_DIR_LOCK = ".journal.lock"


@attrs.frozen
class Batch:
    batch_id: str
    account_id: str
    session_id: str
    provider: str
    model: str
    usage_json: str


@attrs.frozen
class Report:
    account_id: str
    session_id: str
    model: str
    usage_json: str


@attrs.define
class JournalState:
    """What a journal still owes switchdb: reports in no batch yet, and batches not acknowledged."""

    replaces: str | None = None
    pending: dict[int, Report] = attrs.Factory(dict)
    unacked: dict[str, Batch] = attrs.Factory(dict)
    last_seq: int = -1

    def report(self, seq: int, report: Report) -> None:
        if seq <= self.last_seq:
            raise ValueError(f"report {seq} after report {self.last_seq}")
        self.last_seq = seq
        self.pending[seq] = report

    def batch(self, batch: Batch, seqs: tuple[int, ...]) -> None:
        # Seqs not pending are tolerated: a report whose own write failed is still in the batch.
        for seq in seqs:
            self.pending.pop(seq, None)
        self.unacked.setdefault(batch.batch_id, batch)

    def ack(self, batch_id: str) -> None:
        self.unacked.pop(batch_id, None)

    @property
    def owes(self) -> bool:
        return bool(self.pending or self.unacked)


def _line(record: Mapping[str, object]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def header_line(replaces: str | None) -> bytes:
    return _line({"t": "h", "v": 1, "replaces": replaces})


def report_line(seq: int, report: Report) -> bytes:
    return _line({"t": "r", "n": seq, "a": report.account_id, "s": report.session_id, "m": report.model,
                  "u": report.usage_json})


def batch_line(batch: Batch, seqs: tuple[int, ...]) -> bytes:
    return _line({"t": "b", "id": batch.batch_id, "a": batch.account_id, "s": batch.session_id,
                  "p": batch.provider, "m": batch.model, "u": batch.usage_json, "r": list(seqs)})


def ack_line(batch_id: str) -> bytes:
    return _line({"t": "k", "id": batch_id})


def state_lines(state: JournalState, replaces: str | None) -> bytes:
    """A new journal holding exactly what `state` still owes (compaction)."""
    parts = [header_line(replaces)]
    parts += [report_line(seq, report) for seq, report in state.pending.items()]
    parts += [batch_line(batch, ()) for batch in state.unacked.values()]
    return b"".join(parts)


_FIELDS = {
    "h": {"t", "v", "replaces"},
    "r": {"t", "n", "a", "s", "m", "u"},
    "b": {"t", "id", "a", "s", "p", "m", "u", "r"},
    "k": {"t", "id"},
}


def _str(record: Mapping[str, object], key: str) -> str:
    value = record[key]
    if type(value) is not str:
        raise ValueError(f"{key} must be a string")
    return value


def _usage(record: Mapping[str, object]) -> str:
    text = _str(record, "u")
    try:
        UsageTotals.from_json(text)
    except SwitchError as exc:
        raise ValueError(exc.message) from None
    return text


def _apply(state: JournalState, record: object, first: bool) -> None:
    if type(record) is not dict or record.get("t") not in _FIELDS or set(record) != _FIELDS[record["t"]]:
        raise ValueError("not a journal record")
    kind = record["t"]
    if kind == "h":
        replaces = record["replaces"]
        if not first or record["v"] != 1 or not (replaces is None or type(replaces) is str):
            raise ValueError("misplaced or unknown header")
        state.replaces = replaces
    elif kind == "r":
        seq = record["n"]
        if type(seq) is not int or seq < 0:
            raise ValueError("n must be a non-negative integer")
        state.report(seq, Report(_str(record, "a"), _str(record, "s"), _str(record, "m"), _usage(record)))
    elif kind == "b":
        seqs = record["r"]
        if type(seqs) is not list or not all(type(s) is int for s in seqs):
            raise ValueError("r must be a list of integers")
        batch = Batch(_str(record, "id"), _str(record, "a"), _str(record, "s"), _str(record, "p"), _str(record, "m"),
                      _usage(record))
        state.batch(batch, tuple(seqs))
    else:
        state.ack(_str(record, "id"))


def parse_journal(data: bytes) -> tuple[JournalState, int]:
    """The state a journal's bytes describe, and how many of its bytes are whole lines.

    An incomplete last line is a write cut short by the process's death, not corruption: it is
    left out (and its report was never forwarded). Any other bad line raises ValueError naming it.
    """
    state = JournalState()
    end = data.rfind(b"\n") + 1
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            _apply(state, json.loads(raw.decode()), number == 1)
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return state, end


def new_batches(pending: Mapping[int, Report], new_id: Callable[[], str]) -> list[tuple[Batch, tuple[int, ...]]]:
    """The reports in no batch, as one new batch per account, session and model (with the reports it covers)."""
    groups: dict[tuple[str, str, str], tuple[UsageTotals, list[int]]] = {}
    for seq, report in pending.items():
        totals, seqs = groups.setdefault((report.account_id, report.session_id, report.model), (UsageTotals(), []))
        totals.merge(UsageTotals.from_json(report.usage_json))
        seqs.append(seq)
    return [
        (Batch(new_id(), account, session, "openai", model, totals.to_json()), tuple(seqs))
        for (account, session, model), (totals, seqs) in groups.items()
    ]


def check_fsync(policy: str) -> bool:
    if policy not in FSYNC_POLICIES:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key JOURNAL_FSYNC must be off or batch")
    return policy == "batch"


@contextmanager
def _dir_locked(directory: Path) -> Iterator[None]:
    """Held while a journal is created and locked, and while orphans are looked for: no process
    may take a journal in the instant between its creation and its owner's lock."""
    fd = os.open(directory / _DIR_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _try_lock(path: Path, flags: int) -> int | None:
    """An fd of `path` under this process's exclusive flock; None while a live process holds it, or once it is gone."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink == 0:  # unlinked by its owner between our listing and our lock
            raise BlockingIOError
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Journal:
    """One journal file, locked by this process. Every method is synchronous: an append is one write."""

    def __init__(self, path: Path, fd: int, state: JournalState, size: int, fsync: bool, live: bool) -> None:
        self.path = path
        self.state = state
        self.fsync = fsync
        self.live = live  # this process's own journal (compacted when big), not a dead one's being replayed
        self.compact_bytes = COMPACT_BYTES
        self._fd = fd
        self._size = size
        self._unwritten: dict[str, bytes] = {}  # batch records whose write failed, retried before sending

    @classmethod
    def create(cls, directory: Path, fsync: bool, state: JournalState | None = None,
               replaces: str | None = None) -> Journal:
        """A new journal holding `state`: written whole under a temporary name, then renamed, so a
        journal that names what it replaces is always complete."""
        state = state or JournalState()
        path = directory / f"journal-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        tmp = path.with_suffix(".tmp")
        with _dir_locked(directory):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            data = state_lines(state, replaces)
            _write_all(fd, data)
            os.fsync(fd)
            tmp.rename(path)
            if fsync:
                _fsync_dir(directory)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, fd, JournalState(replaces, dict(state.pending), dict(state.unacked), state.last_seq),
                   len(data), fsync, live=True)

    @classmethod
    def adopt(cls, path: Path, fsync: bool) -> Journal | None:
        """The journal of a process that died, locked and with any torn last line cut off; None when
        a live process holds it. Raises ValueError (the file closed) when it cannot be parsed."""
        fd = _try_lock(path, os.O_RDWR | os.O_APPEND)
        if fd is None:
            return None
        try:
            data = _read_all(fd)
            state, end = parse_journal(data)
            if end < len(data):
                os.ftruncate(fd, end)  # what we append must not be glued to the torn line
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, state, end, fsync, live=False)

    # Appends. A failed write is logged and undone (truncated), never raised into the session:
    # what is in memory is still delivered while the process lives.

    def report(self, report: Report) -> int:
        seq = self.state.last_seq + 1
        self.state.report(seq, report)
        try:
            self._append(report_line(seq, report), sync=False)
        except OSError as exc:
            log.error("usage journal %s: a usage report could not be written (%s)", self.path.name, exc)
        return seq

    def batch(self, batch: Batch, seqs: tuple[int, ...]) -> None:
        self.state.batch(batch, seqs)
        line = batch_line(batch, seqs)
        try:
            self._append(line)
        except OSError as exc:
            log.error("usage journal %s: batch %s could not be written yet (%s)", self.path.name, batch.batch_id, exc)
            self._unwritten[batch.batch_id] = line

    def written(self, batch_id: str) -> bool:
        """Whether the batch is in the journal, trying again if its write failed: a batch is sent only once it is."""
        line = self._unwritten.get(batch_id)
        if line is None:
            return True
        try:
            self._append(line)
        except OSError:
            return False
        del self._unwritten[batch_id]
        return True

    def ack(self, batch_id: str) -> None:
        self.state.ack(batch_id)
        self._unwritten.pop(batch_id, None)
        try:
            # Not fsynced even with JOURNAL_FSYNC=batch: a lost ack only resends a batch switchdb already counts once.
            self._append(ack_line(batch_id), sync=False)
        except OSError as exc:
            log.warning("usage journal %s: ack of %s not written (%s)", self.path.name, batch_id, exc)
        if self.live and self._size > self.compact_bytes:
            self.compact()

    def compact(self) -> None:
        """Start a new file holding only what is still owed, then drop this one; on failure keep this one."""
        try:
            new = Journal.create(self.path.parent, self.fsync, self.state, replaces=self.path.name)
        except OSError as exc:
            log.warning("usage journal %s not compacted (%s)", self.path.name, exc)
            return
        self.path.unlink(missing_ok=True)  # before our lock goes: nobody may adopt the old file
        os.close(self._fd)
        self.path, self._fd, self._size, self.state = new.path, new._fd, new._size, new.state
        self._unwritten.clear()  # every unacked batch is in the new file
        log.info("usage journal compacted into %s", self.path.name)

    @property
    def size(self) -> int:
        return self._size

    def close(self, delete: bool) -> None:
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)

    def _append(self, data: bytes, sync: bool = True) -> None:
        _write_all(self._fd, data, self._size)
        self._size += len(data)
        if sync and self.fsync:
            os.fsync(self._fd)


def _write_all(fd: int, data: bytes, size: int | None = None) -> None:
    """One write of a whole line; a short or failed write is cut off again so no torn line stays mid-file."""
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, "short write")
    except OSError:
        if size is not None:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        raise


def _read_all(fd: int) -> bytes:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.frozen
class Found:
    """What the journals of dead processes in a directory hold, each now locked by this process."""

    journals: list[Journal]
    bad: list[Path]


def find_orphans(directory: Path, fsync: bool, own: Path | None = None) -> Found:
    """Lock and read every journal no live process holds; unreadable ones are renamed `.bad`.

    A journal that another complete journal replaces (a compaction cut short before the old
    file went) is deleted: everything it still owed is in its successor. A journal file appears
    under its name only once its owner holds its lock (written as .tmp, then renamed), so the
    per-worker directories, whose creations this directory's lock does not cover, are safe to read.
    """
    journals: list[Journal] = []
    bad: list[Path] = []
    with _dir_locked(directory):
        for tmp in sorted(directory.glob("journal-*.tmp")):  # a compaction that died before its rename
            fd = _try_lock(tmp, os.O_RDONLY)
            if fd is not None:
                tmp.unlink(missing_ok=True)
                os.close(fd)
        # Also the per-worker directories a WORKERS>1 run left, should this run have fewer workers.
        for path in sorted([*directory.glob("journal-*.jsonl"), *directory.glob("worker-*/journal-*.jsonl")]):
            if path == own:
                continue
            try:
                journal = Journal.adopt(path, fsync)
            except ValueError as exc:
                aside = path.with_suffix(".bad")
                path.rename(aside)
                log.error("usage journal %s cannot be read (%s); kept as %s", path.name, exc, aside.name)
                bad.append(aside)
                continue
            if journal is not None:
                journals.append(journal)
        superseded = {j.state.replaces for j in journals if j.state.replaces}
        kept = []
        for journal in journals:
            if journal.path.name in superseded:
                journal.close(delete=True)
            else:
                kept.append(journal)
    return Found(kept, bad)
