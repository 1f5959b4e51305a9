"""`python -m perf.load`: a load generator for any Realtime Switch deployment (or any Realtime endpoint).

Opens N WebSocket sessions and drives them with one of four patterns:

- realtime: each session sends `--rate` `input_audio_buffer.append` frames per second holding
  `--frame-ms` of 24 kHz PCM16 (50/s of 20 ms ≈ 1.3 KB frames is a live microphone); sessions
  are phase-spread over one frame interval, as unsynchronised clients are;
- closed:   one frame in flight per session: send, wait for its echo, repeat (round trip time);
- flood:    up to `--window` frames in flight per session, as fast as the path allows (frames/s);
- connect:  `--count` sequential connects per session slot, timing upgrade → first server event.

Every frame carries `event_id` "lg<seq>_<send ns>"; any received frame whose event_id has that
form is an echo and yields a round trip (switchd-sim --echo, perf.upstream). Against an upstream
that does not echo (the real provider) latency and loss are simply not reported.

Only frames sent after `--warmup` count toward latency. In the realtime pattern a frame's
latency runs from when it was scheduled, not when it left, so a generator that falls behind
(its send lag is reported too) cannot hide the delay (no coordinated omission). `--watch NAME=PID` samples those
processes' CPU (utime+stime from /proc) over the measured window, as does the generator itself,
so an operator can tell whether the relay, the peer or the generator was the bottleneck.
Output: a table, or with `--json` one JSON object on stdout.

This is the operator's tool (any URL, ws:// or wss://, any upstream). The relay benchmark
drives switchd with perf.engine instead: one lean epoll process playing both the clients and
the provider, so that on a small machine the load costs far less CPU than switchd does.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from trio_websocket import (ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection,
                            connect_websocket_url)

from perf.cpu import CpuWindow
from perf.report import summarize, table

BYTES_PER_MS = 48  # PCM16 mono at 24 kHz
FRAME = '{"type":"input_audio_buffer.append","event_id":"lg%d_%d","audio":"%s"}'
MARK = '"event_id":"lg'
MAX_MESSAGE = 32 * 1024 * 1024
CONNECT_TIMEOUT_S = 15.0
PATTERNS = ("realtime", "closed", "flood", "connect")


@dataclass
class Config:
    url: str
    key: str | None = None
    session_prefix: str = "perf"
    sessions: int = 1
    duration: float = 10.0
    warmup: float = 1.0
    rate: float = 50.0
    frame_ms: int = 20
    frame_bytes: int | None = None
    pattern: str = "realtime"
    window: int = 64
    count: int = 100
    connect_concurrency: int = 32
    drain: float = 5.0
    headers: list[str] = field(default_factory=list)
    subprotocol: str | None = None
    watch: dict[str, int] = field(default_factory=dict)
    samples: bool = False


@dataclass
class Stats:
    connected: int = 0
    connect_failed: int = 0
    connect_ns: list[int] = field(default_factory=list)
    first_event_ns: list[int] = field(default_factory=list)
    sent: int = 0
    echoes: int = 0
    other: int = 0
    sent_window: int = 0
    received_window: int = 0
    echoes_window: int = 0
    latency_ns: list[int] = field(default_factory=list)
    lag_ns: list[int] = field(default_factory=list)
    lost: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[str] = field(default_factory=Counter)


@dataclass
class Clock:
    """The shared schedule, fixed once every session has tried to connect."""
    start: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0
    go: trio.Event = field(default_factory=trio.Event)


def session_url(cfg: Config, slot: str) -> str:
    if cfg.key is None:
        return cfg.url
    parts = urlsplit(cfg.url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("rs_key", "rs_sessid")]
    query += [("rs_key", cfg.key), ("rs_sessid", f"{cfg.session_prefix}-{slot}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def audio_payload(cfg: Config) -> str:
    if cfg.frame_bytes is not None:
        overhead = len(FRAME % (0, time.perf_counter_ns(), ""))
        b64_len = max(4, (cfg.frame_bytes - overhead) // 4 * 4)
        raw = b64_len // 4 * 3
    else:
        raw = cfg.frame_ms * BYTES_PER_MS
    return base64.b64encode(random.Random(5).randbytes(raw)).decode()


def echo_of(frame: str | bytes) -> tuple[int, int] | None:
    """(seq, send ns) when the frame echoes one of ours."""
    if type(frame) is not str:
        return None
    at = frame.find(MARK, 0, 200)
    if at < 0:
        return None
    at += len(MARK)
    end = frame.find('"', at)
    seq, _, sent = frame[at:end].partition("_")
    try:
        return int(seq), int(sent)
    except ValueError:
        return None


def _headers(cfg: Config) -> list[tuple[bytes, bytes]]:
    out = []
    for h in cfg.headers:
        name, _, value = h.partition(":")
        out.append((name.strip().encode(), value.strip().encode()))
    return out


async def _connect(nursery: trio.Nursery, cfg: Config, slot: str, stats: Stats) -> WebSocketConnection | None:
    t0 = time.perf_counter_ns()
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            ws = await connect_websocket_url(
                nursery, session_url(cfg, slot), extra_headers=_headers(cfg), max_message_size=MAX_MESSAGE,
                subprotocols=[cfg.subprotocol] if cfg.subprotocol else None)
    except ConnectionRejected as exc:
        stats.errors[f"rejected {exc.status_code}"] += 1
    except (HandshakeError, OSError, trio.TooSlowError) as exc:
        stats.errors[f"connect {type(exc).__name__}"] += 1
    else:
        stats.connect_ns.append(time.perf_counter_ns() - t0)
        stats.connected += 1
        return ws
    stats.connect_failed += 1
    return None


class _Session:
    """One session's counters while it runs (echo bookkeeping for the drain and loss)."""

    def __init__(self) -> None:
        self.sent = 0
        self.echoed = 0
        self.done_sending = False
        self.drained = trio.Event()
        self.credit: trio.Semaphore | None = None


async def _read(ws: WebSocketConnection, s: _Session, cfg: Config, clock: Clock, stats: Stats, warm: int) -> None:
    while True:
        try:
            frame = await ws.get_message()
        except ConnectionClosed as exc:
            if exc.reason is not None and not s.drained.is_set():
                stats.close_codes[str(exc.reason.code)] += 1
            return
        now_ns = time.perf_counter_ns()
        now = trio.current_time()
        if clock.window_start <= now <= clock.window_end:
            stats.received_window += 1
        echo = echo_of(frame)
        if echo is None:
            stats.other += 1
            continue
        seq, sent_ns = echo
        stats.echoes += 1
        s.echoed += 1
        if seq >= warm:
            stats.latency_ns.append(now_ns - sent_ns)
            stats.echoes_window += 1
        if s.credit is not None:
            s.credit.release()
        if s.done_sending and s.echoed >= s.sent:
            s.drained.set()


async def _send(ws: WebSocketConnection, s: _Session, stats: Stats, seq: int, payload: str, in_window: bool,
                stamp_ns: int | None = None) -> None:
    await ws.send_message(FRAME % (seq, time.perf_counter_ns() if stamp_ns is None else stamp_ns, payload))
    s.sent += 1
    stats.sent += 1
    if in_window:
        stats.sent_window += 1


async def _finish(ws: WebSocketConnection, s: _Session, cfg: Config, stats: Stats, echoing: bool) -> None:
    s.done_sending = True
    if s.echoed >= s.sent:
        s.drained.set()
    with trio.move_on_after(cfg.drain if echoing else 0.2):
        await s.drained.wait()
    stats.lost += max(0, s.sent - s.echoed)
    s.drained.set()  # the close that follows is ours, not a server's close code
    with trio.move_on_after(2):
        await ws.aclose()


async def _session(index: int, cfg: Config, clock: Clock, stats: Stats, limiter: trio.CapacityLimiter,
                   attempted: list[int], all_attempted: trio.Event, payload: str) -> None:
    interval = 1 / cfg.rate
    async with trio.open_nursery() as nursery:
        async with limiter:
            ws = await _connect(nursery, cfg, str(index), stats)
        attempted[0] += 1
        if attempted[0] >= cfg.sessions:
            all_attempted.set()
        if ws is None:
            return
        await clock.go.wait()
        s = _Session()
        try:
            if cfg.pattern == "realtime":
                total, warm = int((cfg.warmup + cfg.duration) * cfg.rate), int(cfg.warmup * cfg.rate)
                nursery.start_soon(_read, ws, s, cfg, clock, stats, warm)
                start = clock.start + (index % cfg.sessions) / cfg.sessions * interval
                # Trio's clock is perf_counter plus an offset; stamping each frame with its *scheduled*
                # time makes a frame that left late (generator starved, or held back by TCP
                # backpressure from a slow relay) count its wait: no coordinated omission.
                offset = trio.current_time() - time.perf_counter()
                for seq in range(total):
                    at = start + seq * interval
                    await trio.sleep_until(at)
                    stats.lag_ns.append(int((trio.current_time() - at) * 1e9))
                    await _send(ws, s, stats, seq, payload, seq >= warm, int((at - offset) * 1e9))
            elif cfg.pattern == "flood":
                s.credit = trio.Semaphore(cfg.window)
                nursery.start_soon(_read, ws, s, cfg, clock, stats, 0)
                seq = 0
                while trio.current_time() < clock.window_end:
                    await s.credit.acquire()
                    await _send(ws, s, stats, seq, payload, trio.current_time() >= clock.window_start)
                    seq += 1
            else:  # closed
                await _closed_loop(ws, s, cfg, clock, stats, payload)
            await _finish(ws, s, cfg, stats, echoing=stats.echoes > 0)
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else "none"
            stats.close_codes[str(code)] += 1
            stats.errors["closed while sending"] += 1
            stats.lost += max(0, s.sent - s.echoed)
        nursery.cancel_scope.cancel()


async def _closed_loop(ws: WebSocketConnection, s: _Session, cfg: Config, clock: Clock, stats: Stats,
                       payload: str) -> None:
    seq = 0
    while trio.current_time() < clock.window_end and seq < cfg.count:
        in_window = trio.current_time() >= clock.window_start
        await _send(ws, s, stats, seq, payload, in_window)
        with trio.move_on_after(cfg.drain):
            while True:
                frame = await ws.get_message()
                now_ns = time.perf_counter_ns()
                echo = echo_of(frame)
                if echo is not None and echo[0] == seq:
                    s.echoed += 1
                    stats.echoes += 1
                    if in_window:
                        stats.latency_ns.append(now_ns - echo[1])
                        stats.echoes_window += 1
                        stats.received_window += 1
                    break
                stats.other += 1
        seq += 1


async def _connects(cfg: Config, stats: Stats) -> None:
    """Sequential connects: upgrade (and, through switchd, VALIDATE_AND_LOAD) → first server event."""
    for i in range(cfg.count):
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter_ns()
            ws = await _connect(nursery, cfg, f"c{i}-{os.getpid()}", stats)
            if ws is not None:
                try:
                    with trio.fail_after(CONNECT_TIMEOUT_S):
                        await ws.get_message()
                    stats.first_event_ns.append(time.perf_counter_ns() - t0)
                except (ConnectionClosed, trio.TooSlowError) as exc:
                    stats.errors[f"first event {type(exc).__name__}"] += 1
                with trio.move_on_after(2):
                    await ws.aclose()
            nursery.cancel_scope.cancel()


async def _sample_cpu(cfg: Config, clock: Clock, out: dict[str, Any]) -> None:
    window = CpuWindow({**cfg.watch, "load generator": os.getpid()})
    await trio.sleep_until(clock.window_start)
    window.start()
    await trio.sleep_until(clock.window_end)
    out.update(window.stop())


async def run(cfg: Config) -> dict[str, Any]:
    if cfg.pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}")
    stats, clock, cpu = Stats(), Clock(), {}
    started = time.time()
    budget = CONNECT_TIMEOUT_S * (1 + cfg.sessions / max(1, cfg.connect_concurrency)) + cfg.warmup + cfg.duration \
        + cfg.drain + 30
    if cfg.pattern == "connect":
        budget += cfg.count * CONNECT_TIMEOUT_S
    with trio.fail_after(budget):  # every run is bounded, whatever the endpoint does
        if cfg.pattern == "connect":
            await _connects(cfg, stats)
        else:
            payload = audio_payload(cfg)
            limiter = trio.CapacityLimiter(cfg.connect_concurrency)
            attempted, all_attempted = [0], trio.Event()
            async with trio.open_nursery() as nursery:
                for i in range(cfg.sessions):
                    nursery.start_soon(_session, i, cfg, clock, stats, limiter, attempted, all_attempted, payload)
                await all_attempted.wait()
                clock.start = trio.current_time() + 0.1
                clock.window_start = clock.start + cfg.warmup
                clock.window_end = clock.window_start + cfg.duration
                clock.go.set()
                if stats.connected:
                    nursery.start_soon(_sample_cpu, cfg, clock, cpu)
    return summary(cfg, stats, cpu, time.time() - started)


def _ms(values: Sequence[int]) -> dict[str, float]:
    return {k: (v / 1e6 if k != "n" else v) for k, v in summarize(values).items()}


def summary(cfg: Config, stats: Stats, cpu: dict[str, Any], elapsed: float) -> dict[str, Any]:
    echoing = stats.echoes > 0
    window = cfg.duration if cfg.pattern != "connect" else None
    out: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("key", "samples")},
        "sessions_connected": stats.connected,
        "connect_failed": stats.connect_failed,
        "connect_ms": _ms(stats.connect_ns),
        "sent": stats.sent,
        "echoes_received": stats.echoes,
        "other_received": stats.other,
        "echoing_upstream": echoing,
        "lost": stats.lost if echoing else None,
        "window_s": window,
        "sent_in_window": stats.sent_window,
        "received_in_window": stats.received_window,
        "echoes_per_s": stats.echoes_window / window if window else None,
        "latency_ms": _ms(stats.latency_ns) if echoing else None,
        "send_lag_ms": _ms(stats.lag_ns) if stats.lag_ns else None,
        "errors": dict(stats.errors),
        "close_codes": dict(stats.close_codes),
        "cpu": cpu,
        "elapsed_s": elapsed,
    }
    if cfg.pattern == "connect":
        out["first_event_ms"] = _ms(stats.first_event_ns)
    if cfg.samples:
        out["latency_us_samples"] = [n // 1000 for n in stats.latency_ns]
        out["first_event_us_samples"] = [n // 1000 for n in stats.first_event_ns]
    return out


def render(result: dict[str, Any]) -> str:
    rows: list[list[Any]] = [
        ["sessions connected", result["sessions_connected"]], ["connect failed", result["connect_failed"]],
        ["frames sent", result["sent"]], ["echoes received", result["echoes_received"]],
        ["other frames received", result["other_received"]], ["lost", result["lost"]],
        ["echoes/s (window)", result["echoes_per_s"]],
    ]
    for name in ("latency_ms", "first_event_ms", "connect_ms", "send_lag_ms"):
        summary_ = result.get(name)
        if summary_ and summary_["n"]:
            rows += [[f"{name} {q}", summary_[q]] for q in ("p50", "p99", "p99.9", "max")]
    for name, usage in result["cpu"].items():
        if usage and name != "machine":
            rows.append([f"cpu % of one core: {name}", usage["pct_of_one_core"]])
    if result["cpu"].get("machine"):
        rows.append(["machine busy cores (all processes)", result["cpu"]["machine"]["busy_cores"]])
        rows.append(["  of which not watched", result["cpu"]["machine"]["others_cores"]])
    rows += [["errors", json.dumps(result["errors"]) or "{}"], ["close codes", json.dumps(result["close_codes"])]]
    return table(f"perf.load: {result['config']['pattern']} x {result['config']['sessions']} session(s)",
                 ["measure", "value"], rows, digits=3)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="python -m perf.load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--url", required=True, help="ws(s)://host:port/v1/realtime (rs_key/rs_sessid added per session "
                                                "when --key is given)")
    p.add_argument("--key", help="Realtime Switch key; each session gets rs_sessid=<prefix>-<n>")
    p.add_argument("--session-prefix", default=f"perf{os.getpid()}")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds, after the warmup")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--rate", type=float, default=50.0, help="appends per second per session (realtime)")
    p.add_argument("--frame-ms", type=int, default=20, help="audio per append (24 kHz PCM16)")
    p.add_argument("--frame-bytes", type=int, help="size each frame to about this many bytes instead of --frame-ms")
    p.add_argument("--pattern", choices=PATTERNS, default="realtime")
    p.add_argument("--window", type=int, default=64, help="frames in flight per session (flood)")
    p.add_argument("--count", type=int, default=100, help="connects (connect) or frame cap (closed)")
    p.add_argument("--connect-concurrency", type=int, default=32)
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for outstanding echoes")
    p.add_argument("--header", action="append", default=[], help="extra handshake header 'Name: value'")
    p.add_argument("--subprotocol", help="WebSocket subprotocol to offer (e.g. realtime)")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="sample this process's CPU over the measured window (same host)")
    p.add_argument("--samples", action="store_true", help="include raw latency samples (µs) in the JSON")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    for n, v in (("--sessions", a.sessions), ("--rate", a.rate), ("--count", a.count), ("--window", a.window)):
        if v <= 0:
            p.error(f"{n} must be positive")
    watch = {}
    for w in a.watch:
        name, _, pid = w.rpartition("=")
        if not name or not pid.isdigit():
            p.error("--watch takes NAME=PID")
        watch[name] = int(pid)
    cfg = Config(url=a.url, key=a.key, session_prefix=a.session_prefix, sessions=a.sessions, duration=a.duration,
                 warmup=a.warmup, rate=a.rate, frame_ms=a.frame_ms, frame_bytes=a.frame_bytes, pattern=a.pattern,
                 window=a.window, count=a.count, connect_concurrency=a.connect_concurrency, drain=a.drain,
                 headers=a.header, subprotocol=a.subprotocol, watch=watch, samples=a.samples)
    return cfg, a.json


def main(argv: Sequence[str] | None = None) -> None:
    cfg, as_json = parse_args(argv)
    result = trio.run(run, cfg)
    sys.stdout.write((json.dumps(result) if as_json else render(result)) + "\n")


if __name__ == "__main__":
    main()
