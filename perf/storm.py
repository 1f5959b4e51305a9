"""`python -m perf.storm`: a connect storm — new WebSocket sessions asked for at a fixed rate, every answer counted.

Why: a full switch must turn new sessions away (503 EXTERNAL_OVER_CAPACITY), quickly and cheaply,
while the sessions it holds go on unharmed. A storm of upgrades is what a full switch meets
when many clients reconnect at once (a provider outage, a deploy). This tool is one plain
`select.epoll` loop over non-blocking sockets with pre-built requests, so on a small machine
the storm costs far less CPU than the switch spends answering it.

Attempt k starts at start + k / rate (open loop: a slow answer never delays the next attempt).
Each attempt: TCP connect, one upgrade request with its own rs_sessid (`<prefix>-<k>`), read
the answer's status line and body, then close with an RST (SO_LINGER 0) so neither side keeps a
TIME_WAIT socket and a long storm cannot run out of ports. A 101 (a session accepted) is
counted and closed the same way. Outcomes are counted by status and body, e.g.
`503 EXTERNAL_OVER_CAPACITY`, `101`, `error ECONNREFUSED`, `timeout`. Answer time runs from
the attempt's connect() to its complete answer; how late each connect() started against its
schedule is reported apart (start lag). Times (time.monotonic(), one clock for every process on
the machine) of the first and last attempt, the last answer and each 101 let a caller line the
storm up with its own timeline. CPU of the storm and of `--watch NAME=PID` processes is
sampled over the storm.

`--control-stdin` (for benchmarks): wait for a line on stdin before the first attempt, stop
at the next line or at end of input (or after `--duration`, whichever comes first). ws:// only.
Output: a table, or one JSON object with `--json`.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from perf.cpu import CpuWindow
from perf.report import summarize, table

now_ns = time.perf_counter_ns
MAX_ANSWER = 64 * 1024  # an answer head + body larger than this is not a switch's rejection
START_DELAY_NS = 5_000_000
MAX_ACCEPTED_TIMES = 10_000
# RST on close: no TIME_WAIT on either side, so thousands of short connections reuse ports freely.
LINGER_RST = struct.pack("ii", 1, 0)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT


@dataclass
class Config:
    url: str
    key: str | None = None
    session_prefix: str = "storm"
    rate: float = 100.0
    duration: float = 10.0
    timeout: float = 5.0
    max_inflight: int = 2000
    control_stdin: bool = False
    watch: dict[str, int] = field(default_factory=dict)


@dataclass
class Stats:
    attempts: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    answer_ns: dict[str, list[int]] = field(default_factory=dict)  # by outcome
    lag_ns: list[int] = field(default_factory=list)
    max_inflight_seen: int = 0
    accepted_at: list[float] = field(default_factory=list)  # time.monotonic() of each 101's answer
    last_start: float | None = None
    last_answer: float | None = None


class Attempt:
    __slots__ = ("buf", "deadline", "fd", "sock", "started", "state")

    def __init__(self, sock: socket.socket, started: int, deadline: int) -> None:
        self.sock, self.fd, self.started, self.deadline = sock, sock.fileno(), started, deadline
        self.state = "connecting"
        self.buf = b""


def outcome_of(data: bytes) -> str | None:
    """`<status> <body>` once the answer is complete, `101` for an upgrade; None while incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end].decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    status = parts[1] if len(parts) > 1 else "?"
    if status == "101":
        return "101"
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    body = data[end + 4 :]
    if len(body) < length:
        return None
    text = body[:length].decode("utf-8", "replace").strip()
    return f"{status} {text}" if text else status


class Storm:
    def __init__(self, cfg: Config) -> None:
        parts = urlsplit(cfg.url)
        if parts.scheme != "ws" or parts.hostname is None:
            raise ValueError("the storm speaks ws:// only")
        self.cfg = cfg
        self.target = (parts.hostname, parts.port or 80)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("rs_key", "rs_sessid")]
        if cfg.key is not None:
            query.append(("rs_key", cfg.key))
        # Everything but the session id is fixed: one bytes template, formatted per attempt.
        base = f"{parts.path or '/'}?{urlencode(query)}" + ("&" if query else "")
        self.template = (f"GET {base}rs_sessid={cfg.session_prefix}-%d HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c3Rvcm1zdG9ybXN0b3JtIQ==\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.ep = select.epoll()
        self.inflight: dict[int, Attempt] = {}
        self.order: deque[Attempt] = deque()  # by start, so by deadline: timeouts are found at the left
        self.stats = Stats()
        self.cpu = CpuWindow({**cfg.watch, "storm": os.getpid()})

    def _finish(self, a: Attempt, outcome: str) -> None:
        if a.state == "done":
            return
        a.state = "done"
        self.stats.outcomes[outcome] += 1
        if not outcome.startswith(("error", "timeout")):
            self.stats.answer_ns.setdefault(outcome, []).append(now_ns() - a.started)
            self.stats.last_answer = time.monotonic()
            if outcome == "101" and len(self.stats.accepted_at) < MAX_ACCEPTED_TIMES:
                self.stats.accepted_at.append(self.stats.last_answer)
        del self.inflight[a.fd]
        self.ep.unregister(a.fd)
        try:
            a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        except OSError:
            pass
        a.sock.close()

    def _start(self, k: int, due: int, now: int) -> None:
        self.stats.attempts += 1
        self.stats.lag_ns.append(now - due)
        self.stats.last_start = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = Attempt(sock, now, now + int(self.cfg.timeout * 1e9))
        a.buf = self.template % k  # the request, until it is sent
        self.inflight[a.fd] = a
        self.order.append(a)
        self.ep.register(a.fd, _OUT)
        err = sock.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS):
            self._finish(a, f"error {errno.errorcode.get(err, err)}")
        self.stats.max_inflight_seen = max(self.stats.max_inflight_seen, len(self.inflight))

    def _on_event(self, a: Attempt, ev: int) -> None:
        if a.state == "connecting":
            err = a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._finish(a, f"error {errno.errorcode.get(err, err)}")
                return
            try:
                sent = a.sock.send(a.buf)
            except OSError as exc:
                self._finish(a, f"error {errno.errorcode.get(exc.errno or 0, exc.errno)}")
                return
            if sent != len(a.buf):  # a few hundred bytes on a fresh connection: never partial in practice
                self._finish(a, "error partial request write")
                return
            a.state, a.buf = "reading", b""
            self.ep.modify(a.fd, _IN)
            return
        try:
            chunk = a.sock.recv(MAX_ANSWER)
        except OSError as exc:
            self._finish(a, f"error {errno.errorcode.get(exc.errno or 0, exc.errno)} before an answer")
            return
        a.buf += chunk
        outcome = outcome_of(a.buf)
        if outcome is not None:
            self._finish(a, outcome)
        elif not chunk:
            self._finish(a, "error closed before an answer")
        elif len(a.buf) > MAX_ANSWER:
            self._finish(a, "error answer too large")

    def run(self) -> dict[str, Any]:
        cfg, stats = self.cfg, self.stats
        started_wall = time.time()
        if cfg.control_stdin:
            if not sys.stdin.buffer.readline():  # end of input before "go": nothing to do
                return self.summary(0.0, None, None, started_wall)
            self.ep.register(0, _IN)  # the next line, or end of input, stops the storm
        interval = 1e9 / cfg.rate
        start = now_ns() + START_DELAY_NS
        stop_at = start + int(cfg.duration * 1e9)
        mono_start = time.monotonic() + START_DELAY_NS / 1e9
        stopping, k = False, 0
        self.cpu.start()
        while True:
            now = now_ns()
            due = start + int(k * interval)
            while not stopping and due <= now and due < stop_at:
                if len(self.inflight) >= cfg.max_inflight:
                    stats.attempts += 1
                    stats.outcomes["skipped: in-flight cap"] += 1
                else:
                    self._start(k, due, now)
                k += 1
                now = now_ns()
                due = start + int(k * interval)
            if due >= stop_at:
                stopping = True
            while self.order and (self.order[0].state == "done" or self.order[0].deadline <= now):
                a = self.order.popleft()
                if a.state != "done":
                    self._finish(a, "timeout")
            if stopping and not self.inflight:
                break
            wake = self.order[0].deadline if self.order else now + 1_000_000_000
            if not stopping:
                wake = min(wake, due)
            # epoll rounds its timeout up to whole ms: an attempt starts at most ~1 ms late (reported as lag).
            for fd, ev in self.ep.poll(max(0.0, (wake - now_ns()) / 1e9)):
                if fd == 0:
                    stopping = True
                    self.ep.unregister(0)
                    continue
                a = self.inflight.get(fd)
                if a is not None:
                    self._on_event(a, ev)
        span = (now_ns() - start) / 1e9
        cpu = self.cpu.stop()
        return self.summary(span, mono_start, time.monotonic(), started_wall, cpu)

    def summary(self, span: float, mono_start: float | None, mono_stop: float | None, started_wall: float,
                cpu: dict[str, Any] | None = None) -> dict[str, Any]:
        stats = self.stats
        answered = sum(len(v) for v in stats.answer_ns.values())
        return {
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "key"},
            "attempts": stats.attempts,
            "answered": answered,
            "outcomes": dict(stats.outcomes),
            "accepted": stats.outcomes.get("101", 0),
            "rate_achieved": stats.attempts / span if span > 0 else None,
            "span_s": span,
            # CLOCK_MONOTONIC is one clock for every process on the machine: a caller can line the
            # storm up with its own timeline.
            "monotonic_start": mono_start,
            "monotonic_last_start": stats.last_start,
            "monotonic_last_answer": stats.last_answer,
            "monotonic_stop": mono_stop,
            "accepted_monotonic": stats.accepted_at,
            "answer_ms": _ms([n for v in stats.answer_ns.values() for n in v]),
            "answer_ms_by_outcome": {k: _ms(v) for k, v in sorted(stats.answer_ns.items())},
            "start_lag_ms": _ms(stats.lag_ns),
            "max_inflight_seen": stats.max_inflight_seen,
            "cpu": cpu or {},
            "elapsed_s": time.time() - started_wall,
        }


def _ms(values: Sequence[int]) -> dict[str, float]:
    return {k: (v / 1e6 if k != "n" else v) for k, v in summarize(values).items()}


def render(result: dict[str, Any]) -> str:
    rows: list[list[Any]] = [["attempts", result["attempts"]], ["rate achieved /s", result["rate_achieved"]],
                             ["answered", result["answered"]]]
    rows += [[f"outcome: {k}", v] for k, v in sorted(result["outcomes"].items())]
    for name in ("answer_ms", "start_lag_ms"):
        s = result[name]
        if s["n"]:
            rows += [[f"{name} {q}", s[q]] for q in ("p50", "p99", "p99.9", "max")]
    for name, usage in result["cpu"].items():
        if usage and name != "machine":
            rows.append([f"cpu % of one core: {name}", usage["pct_of_one_core"]])
    return table(f"perf.storm: {result['config']['rate']:g} connects/s", ["measure", "value"], rows, digits=3)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="python -m perf.storm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--url", required=True, help="ws://host:port/v1/realtime (rs_key/rs_sessid added per attempt)")
    p.add_argument("--key", help="Realtime Switch key; each attempt gets rs_sessid=<prefix>-<k>")
    p.add_argument("--session-prefix", default=f"storm{os.getpid()}")
    p.add_argument("--rate", type=float, default=100.0, help="connect attempts per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of attempts")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds an attempt may wait for its answer")
    p.add_argument("--max-inflight", type=int, default=2000,
                   help="attempts open at once; past it an attempt is skipped and counted (file descriptors)")
    p.add_argument("--control-stdin", action="store_true",
                   help="start at the first line on stdin, stop at the next line or end of input")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="sample this process's CPU over the storm (same host)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    for n, v in (("--rate", a.rate), ("--duration", a.duration), ("--timeout", a.timeout),
                 ("--max-inflight", a.max_inflight)):
        if v <= 0:
            p.error(f"{n} must be positive")
    watch = {}
    for w in a.watch:
        name, _, pid = w.rpartition("=")
        if not name or not pid.isdigit():
            p.error("--watch takes NAME=PID")
        watch[name] = int(pid)
    cfg = Config(url=a.url, key=a.key, session_prefix=a.session_prefix, rate=a.rate, duration=a.duration,
                 timeout=a.timeout, max_inflight=a.max_inflight, control_stdin=a.control_stdin, watch=watch)
    return cfg, a.json


def main(argv: Sequence[str] | None = None) -> None:
    cfg, as_json = parse_args(argv)
    result = Storm(cfg).run()
    sys.stdout.write((json.dumps(result) if as_json else render(result)) + "\n")


if __name__ == "__main__":
    main()
