"""`python -m perf.engine`: a lean load engine playing both ends of the relay in one epoll loop.

Why: perf.load and perf.upstream (trio-websocket) each cost as much CPU per message as switchd,
so on a small machine they, not switchd, set the capacity figure. This engine keeps the data
path in one plain `select.epoll` loop over non-blocking sockets with os.read/os.write, and
pre-built frames (perf.wire): per message it patches a few digits and makes one write.

It runs, in one process:
- N WebSocket clients, connecting to switchd (`--url ... --key ...`, each with its own
  rs_sessid) or, with `--direct`, straight to the peer below (the baseline: same clients, same
  peer, no switchd);
- the peer standing in for the provider, on a listening socket: its own (port 0) or one
  inherited from the caller (`--peer-fd`), so a long-lived switchd can keep one UPSTREAM_URL
  across many engine runs. `--peer-only` runs just the peer, as a process of its own, until
  SIGTERM (it prints `perf.engine peer listening ws://HOST:PORT`); clients run with `--no-peer`
  then, pointed at switchd or straight at that peer with `--url`. Split like that, a direct round
  trip wakes two processes as a real client and provider would, where one engine playing both
  ends never sleeps between them. It answers each `input_audio_buffer.append` with a
  `response.output_audio.delta` of about the same size carrying the append's event_id, sends a
  transcript delta every `--transcript-every` appends and, every `--response-every` appends, a
  `response.done` with usage + `rate_limits.updated` + `response.created` (switchd's metering
  path runs as in production), each session at its own phase of those periods.

Patterns: realtime (`--rate` appends/s per client, phases spread evenly over one interval;
latency from each frame's *scheduled* send time to its echo, so a late send counts: no
coordinated omission), closed (one frame in flight per client; latency from the actual send)
and flood (`--window` in flight; frames/s). After the last send the engine waits up to `--drain`
seconds for echoes; lost = sent − echoed. CPU of the engine and of `--watch NAME=PID`
processes (user and system apart) and the machine's busy cores are sampled over the measured
window. Output: a table, or one JSON object with `--json`.

TLS, as in production where the provider is `wss://`: `--peer-cert/--peer-key` make the peer
serve TLS; clients speak TLS to a `wss://` URL (and, with `--direct`, to a TLS peer), trusting
`--ca`. TLS runs over memory BIOs in the same loop (ssl.SSLObject, as trio.SSLStream does).
"""
from __future__ import annotations

import argparse
import base64
import errno
import gc
import json
import os
import select
import socket
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from perf import events
from perf.cpu import CpuWindow
from perf.report import summarize, table
from perf.wire import (APPEND_PREFIX, ID_LEN, MARK, ZERO_KEY, AppendTemplate, DeltaTemplate, audio_b64, client_frame,
                       close_frame, server_frame)
from switchd.ws_codec import (MAX_HEAD, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, check_upgrade_request,
                              check_upgrade_response, parse_close, parse_head, unmask, upgrade_request, accept_response)

PATTERNS = ("realtime", "closed", "flood")
READ_BYTES = 16 * 1024  # several frames per read when busy; level-triggered epoll reports the rest
CONNECT_TIMEOUT_S = 15.0
PEER_WAIT_S = 10.0  # for switchd to open every session's upstream before the clock starts
CLOSE_WAIT_S = 5.0
START_DELAY_NS = 50_000_000
# Timer wakeups at most this often: a wakeup costs about what a message does, and at high N
# socket events wake the loop anyway. Lateness is measured (send lag) and counts in the latency.
MIN_TIMER_GAP_NS = 200_000
# Events served per poll: small batches let the ticker send due frames between them, so one
# burst (after a stall, say) does not hold back every send behind hundreds of reads.
MAX_EVENTS = 64
MAX_ITERATIONS = 50_000_000  # far above any run's wakeups; the loops are bounded by time first
MARK_LEN = len(MARK)
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
now_ns = time.perf_counter_ns


@dataclass
class Config:
    url: str | None = None  # switchd's ws://host:port/path; None with direct
    direct: bool = False
    key: str | None = None
    session_prefix: str = "eng"
    sessions: int = 1
    pattern: str = "realtime"
    rate: float = 50.0
    frame_ms: int = 20
    frame_bytes: int | None = None
    window: int = 64
    duration: float = 6.0
    warmup: float = 1.0
    drain: float = 3.0
    connect_concurrency: int = 32
    transcript_every: int = 10
    response_every: int = 150
    peer_fd: int | None = None
    no_peer: bool = False  # the peer is another process (`--peer-only`): serve none, wait for none
    watch: dict[str, int] = field(default_factory=dict)
    samples: bool = False
    peer_cert: str | None = None  # the peer serves TLS with this chain (PEM, leaf first)...
    peer_key: str | None = None  # ...and this key
    ca: str | None = None  # clients trust this CA (PEM) for wss://


@dataclass
class Stats:
    connect_failed: int = 0
    connect_ns: list[int] = field(default_factory=list)
    sent: int = 0
    echoes: int = 0
    other: int = 0
    sent_window: int = 0
    received_window: int = 0
    echoes_window: int = 0
    latency_ns: list[int] = field(default_factory=list)
    lag_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[str] = field(default_factory=Counter)
    # The peer's side, to check it saw what the clients sent.
    peer_accepted: int = 0
    peer_appends: int = 0
    peer_frames_sent: int = 0
    peer_other: int = 0


class Conn:
    """A non-blocking socket in the loop: reads when readable, writes at once, buffers only what the kernel refused."""

    __slots__ = ("closed", "eng", "fd", "handshaking", "rbuf", "reader", "sock", "tin", "tls", "tout", "wbuf")

    def __init__(self, eng: Engine, sock: socket.socket, mask: int) -> None:
        self.eng, self.sock, self.fd = eng, sock, sock.fileno()
        self.rbuf = b""
        self.wbuf = bytearray()
        self.closed = False
        self.reader: Callable[[bytes], int] = self.on_data  # swapped for the frame parser once upgraded
        self.tls: ssl.SSLObject | None = None
        self.handshaking: bytearray | None = None  # during the TLS handshake: what was written meanwhile
        eng.add(self, mask)

    # --- TLS over memory BIOs: ciphertext through the socket, plaintext to the reader -----

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """From now on the socket carries TLS: the client side when `server_hostname` is given."""
        self.tin, self.tout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.tin, self.tout, server_side=server_hostname is None,
                                    server_hostname=server_hostname)
        self.handshaking = bytearray()
        self._handshake()

    def _handshake(self) -> None:
        assert self.tls is not None and self.handshaking is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            if self.tout.pending:
                self._raw_write(self.tout.read())
            return
        except ssl.SSLError as exc:
            if self.tout.pending:  # the alert tells the other side why
                self._raw_write(self.tout.read())
            self.tls_failed(exc)
            return
        waiting, self.handshaking = self.handshaking, None
        if waiting:
            self.tls.write(waiting)
        if self.tout.pending:
            self._raw_write(self.tout.read())

    def _tls_read(self, raw: bytes) -> bytes | None:
        """The plaintext that `raw` completes (b"" for none yet); None when the TLS stream ended."""
        assert self.tls is not None
        self.tin.write(raw)
        if self.handshaking is not None:
            self._handshake()
            if self.handshaking is not None or self.closed:
                return b""
        chunks = []
        ended = False
        try:
            while chunk := self.tls.read(READ_BYTES):
                chunks.append(chunk)
            ended = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except ssl.SSLError as exc:
            self.tls_failed(exc)
            return None
        if self.tout.pending:  # e.g. TLS 1.3 session tickets, key updates
            self._raw_write(self.tout.read())
        if ended and not chunks:
            return None
        return b"".join(chunks)

    def tls_failed(self, exc: ssl.SSLError) -> None:
        self.eng.stats.errors[f"tls {exc.reason or type(exc).__name__}"] += 1
        self.close()

    def write(self, data: bytes | bytearray) -> None:
        if self.closed:
            return
        if self.tls is not None:
            if self.handshaking is not None:
                self.handshaking += data
                return
            self.tls.write(data)
            data = self.tout.read()
        self._raw_write(data)

    def _raw_write(self, data: bytes | bytearray) -> None:
        if self.closed:
            return
        if self.wbuf:  # ordered behind what the kernel refused earlier
            self.wbuf += data
            return
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.lost()
            return
        if sent < len(data):
            self.wbuf += data[sent:]  # a copy: templates change under us
            self.eng.modify(self, _IN | _OUT)

    def _flush(self) -> None:
        try:
            sent = os.write(self.fd, self.wbuf)
        except BlockingIOError:
            return
        except OSError:
            self.lost()
            return
        del self.wbuf[:sent]
        if not self.wbuf:
            self.eng.modify(self, _IN)

    def on_event(self, ev: int) -> None:
        if ev & _OUT:
            self._flush()
            if self.closed or ev == _OUT:
                return
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.lost()
            return
        if self.tls is not None:
            plain = self._tls_read(data)
            if plain is None:
                self.lost()
                return
            if not plain:
                return
            data = plain
        if self.rbuf:
            data = self.rbuf + data
        used = self.reader(data)
        self.rbuf = data[used:] if used < len(data) else b""

    def on_data(self, data: bytes) -> int:
        """Handle what arrived; return how many bytes were used (the rest waits for more)."""
        raise NotImplementedError

    def lost(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.eng.remove(self)
            self.sock.close()


class Client(Conn):
    """One WebSocket client session: upgrade, then appends out and their echoes back."""

    __slots__ = ("close_code", "deadline", "echoed", "idx", "index", "key", "sent", "sent_at", "slot", "state", "t0",
                 "tpl")

    def __init__(self, eng: Engine, index: int, slot: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.index, self.slot, self.state = index, slot, "connecting"
        self.idx = b"%06d" % index
        self.tpl = AppendTemplate(index, eng.audio)
        self.key = base64.b64encode(os.urandom(16))
        self.sent = self.echoed = 0
        self.t0 = self.sent_at = 0
        self.close_code: int | None = None
        self.t0 = now_ns()  # while connecting: when the connect began
        self.deadline = self.t0 + int(CONNECT_TIMEOUT_S * 1e9)
        err = sock.connect_ex(eng.target)
        super().__init__(eng, sock, _OUT)
        eng.handlers[self.fd] = self._on_connect  # until the TCP connect completes
        if err not in (0, errno.EINPROGRESS):
            self.fail(f"connect {errno.errorcode.get(err, err)}")

    def _on_connect(self, ev: int) -> None:
        if self.closed:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(f"connect {errno.errorcode.get(err, err)}")
            return
        self.state = "head"
        self.eng.handlers[self.fd] = self.on_event
        self.eng.modify(self, _IN)
        if self.eng.client_tls is not None:
            self.start_tls(self.eng.client_tls, self.eng.target[0])
        self.write(upgrade_request(self.eng.host_header, self.eng.resource(self.index), self.key, []))

    def on_data(self, data: bytes) -> int:
        if self.state == "head":
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self.fail("connect head too large")
                return 0
            try:
                check_upgrade_response(parse_head(data[:end]), self.key)
            except ValueError as exc:
                status = parse_head(data[:end]).start.split(" ")[1:2] if data[:end] else []
                self.fail(f"rejected {status[0]}" if status and status[0] != "101" else f"handshake {exc}")
                return len(data)
            self.state = "open"
            self.reader = self._frames
            self.eng.opened(self)
            return end + 4 + self._frames(data, end + 4)
        return self._frames(data, 0)

    def _frames(self, data: bytes, pos: int = 0) -> int:
        """Server frames (unmasked) from `pos`; returns the bytes used after `pos`."""
        eng, stats = self.eng, self.eng.stats
        start_pos, n = pos, len(data)
        now = now_ns()
        in_window = eng.window_start <= now <= eng.window_end
        while n - pos >= 2:
            b0, ln = data[pos], data[pos + 1]
            if ln & 0x80:
                self.fail("masked server frame")
                return n - start_pos
            if ln == 126:
                if n - pos < 4:
                    break
                ln, at = (data[pos + 2] << 8) | data[pos + 3], pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, at = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
            else:
                at = pos + 2
            end = at + ln
            if end > n:
                break
            pos = end
            if in_window:
                stats.received_window += 1
            op = b0 & 0x0F
            if op != OP_TEXT:
                self._control(op, data[at:end])
                continue
            i = data.find(MARK, at, at + 120)
            if i < 0 or data[i + MARK_LEN : i + MARK_LEN + 6] != self.idx:
                stats.other += 1
                continue
            i += MARK_LEN + 7
            seq = int(data[i : i + 8])
            self.echoed += 1
            stats.echoes += 1
            eng.on_echo(self, seq, now)
        return pos - start_pos

    def _control(self, op: int, payload: bytes) -> None:
        if op == OP_CLOSE:
            self.close_code = parse_close(payload)[0]
            if self.state != "closing":
                self.eng.stats.close_codes[str(self.close_code)] += 1
            self.close()
        elif op == OP_PING:
            self.write(client_frame(payload, OP_PONG))
        else:
            self.eng.stats.other += 1

    def send_append(self, seq: int) -> None:
        self.write(self.tpl.frame(seq))
        self.sent += 1

    def tls_failed(self, exc: ssl.SSLError) -> None:
        self.fail(f"tls {exc.reason or type(exc).__name__}")

    def fail(self, why: str) -> None:
        if self.state in ("connecting", "head"):
            self.eng.stats.errors[why] += 1
            self.eng.connect_failed(self)
        self.close()

    def lost(self) -> None:
        if self.state == "open":
            self.eng.stats.errors["closed by server"] += 1
        elif self.state in ("connecting", "head"):
            self.fail("connect lost")
            return
        self.close()

    def close(self) -> None:
        self.state = "closed"
        super().close()


# Weyl's sequence: session k's phase is the fractional part of k·φ⁻¹, even for any number of sessions.
_GOLDEN = (5**0.5 - 1) / 2


def extra_phase(number: int, every: int) -> int:
    """Session `number`'s shift (0 ≤ shift < every) of its transcript or response period.

    Independent calls do not finish their responses together: without a shift, sessions that
    began appending in the same 20 ms would all send their response.done in the same 20 ms,
    every period, and the relay would meter a burst of them at once.
    """
    return int(number * _GOLDEN % 1.0 * every) if every > 0 else 0


def next_due(extras: tuple[tuple[int, int], ...], n: int) -> int:
    """The first append count after `n` at which one of `extras` ((every, shift), every 0: never) is due."""
    due = [((n + shift) // every + 1) * every - shift for every, shift in extras if every > 0]
    return min(due) if due else 1 << 62


class Peer(Conn):
    """The provider's side of one session (switchd's upstream connection, or a direct client)."""

    __slots__ = ("appends", "delta", "extras", "next_extra", "number", "resp", "responses", "state")

    def __init__(self, eng: Engine, sock: socket.socket, number: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.number, self.state, self.appends, self.responses = number, "head", 0, 0
        # (every, shift) of the transcripts and of the responses: this session's phase in each period.
        self.extras = tuple((e, extra_phase(number, e)) for e in (eng.cfg.transcript_every, eng.cfg.response_every))
        # The next append count at which a transcript or response is due (checked per append, computed rarely).
        self.next_extra = next_due(self.extras, 0)
        self.resp = events.response_id(number, 0)
        self.delta = DeltaTemplate(events.audio_delta_head(self.resp), eng.audio)
        super().__init__(eng, sock, _IN)
        if eng.peer_tls is not None:
            self.start_tls(eng.peer_tls, None)

    def on_data(self, data: bytes) -> int:
        if self.state == "head":
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self.close()
                return 0
            try:
                head = parse_head(data[:end])
                _, key = check_upgrade_request(head)
            except ValueError:
                self.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.close()
                return len(data)
            sub = "realtime" if "realtime" in head.tokens(b"sec-websocket-protocol") else None
            self.write(accept_response(key, sub)
                       + server_frame(events.session_created(self.number).encode())
                       + server_frame(events.response_created(self.resp, 0).encode()))
            self.state = "open"
            self.reader = self._frames
            self.eng.peer_opened(self)
            return end + 4 + self._frames(data, end + 4)
        return self._frames(data, 0)

    def _frames(self, data: bytes, pos: int = 0) -> int:
        """Client frames (masked; ours carry the zero key) from `pos`; replies go out in one write."""
        start_pos, n = pos, len(data)
        out: list[bytes] = []
        stats = self.eng.stats
        while n - pos >= 6:
            b0, ln = data[pos], data[pos + 1]
            if not ln & 0x80:
                self.close()  # a client frame must be masked
                return n - start_pos
            ln &= 0x7F
            if ln == 126:
                if n - pos < 8:
                    break
                ln, at = (data[pos + 2] << 8) | data[pos + 3], pos + 8
            elif ln == 127:
                if n - pos < 14:
                    break
                ln, at = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 14
            else:
                at = pos + 6
            end = at + ln
            if end > n:
                break
            pos = end
            if not data.startswith(ZERO_KEY, at - 4):  # not one of ours (switchd's own session.update)
                payload, s, e = unmask(data[at:end], data[at - 4 : at]), 0, ln
            else:
                payload, s, e = data, at, end
            op = b0 & 0x0F
            if op == OP_TEXT and payload.startswith(APPEND_PREFIX, s):
                i = payload.find(MARK, s, s + 100)
                if i >= 0:
                    i += MARK_LEN
                    out.append(self.delta.frame(payload[i : i + ID_LEN]))
                    self.appends += 1
                    stats.peer_appends += 1
                    if self.appends >= self.next_extra:
                        self._extras(out)
                    continue
            if op == OP_CLOSE:
                out.append(close_frame(1000, masked=False))
                self._send(out)
                self.close()
                return n - start_pos
            if op == OP_PING:
                out.append(server_frame(payload[s:e], OP_PONG))
            stats.peer_other += 1
        if out:
            self._send(out)
        return pos - start_pos

    def _extras(self, out: list[bytes]) -> None:
        """What a speaking provider sends besides audio: transcripts, and per response its usage."""
        eng, n = self.eng, self.appends
        (t_every, t_shift), (r_every, r_shift) = self.extras
        self.next_extra = next_due(self.extras, n)
        if t_every and (n + t_shift) % t_every == 0:
            out.append(server_frame(events.transcript_delta(self.resp, n).encode()))
        if r_every and (n + r_shift) % r_every == 0:
            out.append(server_frame(events.response_done(self.resp, self.responses).encode()))
            out.append(server_frame(events.RATE_LIMITS.encode()))
            self.responses += 1
            self.resp = events.response_id(self.number, self.responses)
            self.delta = DeltaTemplate(events.audio_delta_head(self.resp), eng.audio)
            out.append(server_frame(events.response_created(self.resp, self.responses).encode()))

    def _send(self, out: list[bytes]) -> None:
        self.eng.stats.peer_frames_sent += len(out)
        self.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        if not self.closed:
            self.eng.peers.discard(self)
        super().close()


class Listener:
    """The peer's listening socket: accepts every waiting connection on each readiness."""

    def __init__(self, eng: Engine, sock: socket.socket) -> None:
        self.eng, self.sock, self.fd = eng, sock, sock.fileno()
        sock.setblocking(False)
        eng.add(self, _IN)

    def on_event(self, ev: int) -> None:
        for _ in range(256):  # bounded; level-triggered epoll reports any left
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.eng.stats.errors[f"accept {type(exc).__name__}"] += 1
                return
            self.eng.stats.peer_accepted += 1
            self.eng.peers.add(Peer(self.eng, conn, self.eng.stats.peer_accepted))


class Engine:
    def __init__(self, cfg: Config) -> None:
        if cfg.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}")
        self.cfg = cfg
        self.stats = Stats()
        self.ep = select.epoll()
        self.conns: dict[int, Any] = {}
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.peers: set[Peer] = set()
        self.audio = audio_b64(cfg.frame_ms, cfg.frame_bytes)
        self.listener: Listener | None = None
        self.peer_address: tuple[str, int] | None = None
        self.peer_tls: ssl.SSLContext | None = None
        if cfg.peer_cert is not None and not cfg.no_peer:
            self.peer_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.peer_tls.load_cert_chain(cfg.peer_cert, cfg.peer_key)
        client_tls = False
        if not cfg.no_peer:
            if cfg.peer_fd is not None:
                lsock = socket.socket(fileno=cfg.peer_fd)
            else:
                lsock = socket.create_server(("127.0.0.1", 0), backlog=4096)
            self.listener = Listener(self, lsock)
            self.peer_address = lsock.getsockname()[:2]
        if self.peer_address is not None and (cfg.direct or cfg.url is None):
            self.target: tuple[str, int] = (self.peer_address[0], self.peer_address[1])
            self.path, self.query = "/v1/realtime", [("model", "gpt-realtime")]
            client_tls = self.peer_tls is not None
        else:
            parts = urlsplit(cfg.url)
            if parts.scheme not in ("ws", "wss") or parts.hostname is None:
                raise ValueError("the engine speaks ws:// and wss:// only")
            client_tls = parts.scheme == "wss"
            self.target = (parts.hostname, parts.port or (443 if client_tls else 80))
            self.path = parts.path or "/"
            self.query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                          if k not in ("rs_key", "rs_sessid")]
        self.host_header = f"{self.target[0]}:{self.target[1]}"
        self.client_tls = ssl.create_default_context(cafile=cfg.ca) if client_tls else None
        self.clients: list[Client] = []
        self.live: list[Client] = []
        self.connecting: set[Client] = set()
        self.interval_ns = int(1e9 / cfg.rate)
        self.start = self.window_start = self.window_end = 1 << 62  # no window until the clock starts
        self.warm_seq = 0
        self.next_slot = self.total_slots = 0
        self.cpu = CpuWindow({**cfg.watch, "engine": os.getpid()})
        self.cpu_result: dict[str, Any] = {}
        self.sampling = 0  # 0 before the window, 1 inside, 2 done
        self.ticker: Callable[[int], int | None] = lambda now: None

    # --- the loop -------------------------------------------------------------------------

    def add(self, conn: Any, mask: int) -> None:
        self.conns[conn.fd] = conn
        self.handlers[conn.fd] = conn.on_event  # the loop calls it without an attribute lookup
        self.ep.register(conn.fd, mask)

    def modify(self, conn: Any, mask: int) -> None:
        self.ep.modify(conn.fd, mask)

    def remove(self, conn: Any) -> None:
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            del self.handlers[conn.fd]
            try:
                self.ep.unregister(conn.fd)
            except OSError:
                pass

    def loop(self, done: Callable[[], bool], seconds: float) -> bool:
        """Serve events and the ticker until `done()` or `seconds` pass; True when done."""
        deadline = now_ns() + int(seconds * 1e9)
        poll, handlers, epfd = self.ep.poll, self.handlers, self.ep.fileno()
        for _ in range(MAX_ITERATIONS):
            now = now_ns()
            wake = self.ticker(now)
            if done():
                return True
            if now >= deadline:
                return False
            if wake is not None:
                wake = max(wake, now + MIN_TIMER_GAP_NS)
            wait = min(deadline, wake if wake is not None else deadline) - now_ns()
            if wait <= 0:
                events_ = poll(0, MAX_EVENTS)
            elif wait > 2_000_000:
                events_ = poll((wait - 1_000_000) / 1e9, MAX_EVENTS)  # epoll's timeout is in whole ms: wake early...
            else:
                # ...then wait the rest with select's µs timeout on the epoll fd itself (no busy spin).
                ready = select.select([epfd], [], [], wait / 1e9)[0]
                events_ = poll(0, MAX_EVENTS) if ready else ()
            for fd, ev in events_:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(ev)
        return False

    # --- phases ---------------------------------------------------------------------------

    def resource(self, index: int) -> str:
        query = list(self.query)
        if self.cfg.key is not None:
            query += [("rs_key", self.cfg.key), ("rs_sessid", f"{self.cfg.session_prefix}-{index}")]
        return f"{self.path}?{urlencode(query)}" if query else self.path

    def connect_all(self) -> None:
        """Open every client, `connect_concurrency` at a time; then wait for their peers (switchd's upstreams)."""
        waiting = deque(range(self.cfg.sessions))

        def tick(now: int) -> None:
            for c in [c for c in self.connecting if now > c.deadline]:
                c.fail("connect timeout")
            while waiting and len(self.connecting) < self.cfg.connect_concurrency:
                c = Client(self, waiting.popleft(), len(self.clients))
                self.clients.append(c)
                if not c.closed:
                    self.connecting.add(c)
            return None

        self.ticker = tick
        budget = CONNECT_TIMEOUT_S * (1 + self.cfg.sessions / max(1, self.cfg.connect_concurrency))
        self.loop(lambda: not waiting and not self.connecting, budget)
        for c in list(self.connecting):
            c.fail("connect timeout")
        self.ticker = lambda now: None
        self.live = [c for c in self.clients if c.state == "open"]
        for slot, c in enumerate(self.live):
            c.slot = slot  # its phase in the realtime schedule
        if self.listener is None:
            return
        # Through switchd, a session's upstream opens after its client's 101: start when all are up.
        self.loop(lambda: len(self.peers) >= len(self.live), PEER_WAIT_S)
        if len(self.peers) < len(self.live):
            self.stats.errors["peer connections missing at start"] += len(self.live) - len(self.peers)

    def opened(self, c: Client) -> None:
        self.connecting.discard(c)
        self.stats.connect_ns.append(now_ns() - c.t0)

    def connect_failed(self, c: Client) -> None:
        self.connecting.discard(c)
        self.stats.connect_failed += 1

    def peer_opened(self, p: Peer) -> None:
        pass

    def _clock(self) -> None:
        cfg = self.cfg
        self.start = now_ns() + START_DELAY_NS
        self.window_start = self.start + int(cfg.warmup * 1e9)
        self.window_end = self.window_start + int(cfg.duration * 1e9)

    def _sample(self, now: int) -> None:
        if self.sampling == 0 and now >= self.window_start:
            self.cpu.start()
            self.sampling = 1
        elif self.sampling == 1 and now >= self.window_end:
            self.cpu_result = self.cpu.stop()
            self.sampling = 2

    def run_realtime(self) -> None:
        cfg, live, stats = self.cfg, self.live, self.stats
        m = len(live)
        per_session = int((cfg.warmup + cfg.duration) * cfg.rate)
        self.warm_seq = int(cfg.warmup * cfg.rate)
        self.total_slots = m * per_session
        self._clock()
        start, interval, warm = self.start, self.interval_ns, self.warm_seq
        lag = stats.lag_ns

        def tick(now: int) -> int | None:
            if self.sampling != 2:
                self._sample(now)
            slot, total = self.next_slot, self.total_slots
            # Slot s is client s % m's frame s // m, due at start + s·interval/m: phases spread evenly.
            while slot < total:
                due = start + slot * interval // m
                if due > now:
                    self.next_slot = slot
                    return due if self.sampling == 2 else min(due, self.window_start if self.sampling == 0
                                                               else self.window_end)
                c, seq = live[slot % m], slot // m
                if c.state == "open":
                    c.send_append(seq)
                    stats.sent += 1
                    lag.append(now - due)
                    if seq >= warm:
                        stats.sent_window += 1
                else:
                    stats.errors["not sent: session closed"] += 1
                slot += 1
                now = now_ns()
            self.next_slot = slot
            return None if self.sampling == 2 else self.window_end

        self.ticker = tick
        span = START_DELAY_NS / 1e9 + cfg.warmup + cfg.duration + 1.0
        self.loop(lambda: self.next_slot >= self.total_slots and self.sampling == 2, span + 5)
        self.ticker = lambda now: None
        self.loop(lambda: stats.echoes >= stats.sent, cfg.drain)

    def run_driven(self) -> None:
        """closed / flood: each echo sends the next frame, until the window ends."""
        cfg, stats = self.cfg, self.stats
        self._clock()
        started = [False]

        def tick(now: int) -> int | None:
            if self.sampling != 2:
                self._sample(now)
            if not started[0]:
                if now < self.start:
                    return self.start
                started[0] = True
                for c in self.live:
                    for _ in range(1 if cfg.pattern == "closed" else cfg.window):
                        self._send_next(c, now)
            return None if self.sampling == 2 else self.window_end

        self.ticker = tick
        self.loop(lambda: self.sampling == 2, START_DELAY_NS / 1e9 + cfg.warmup + cfg.duration + 5)
        self.ticker = lambda now: None
        self.loop(lambda: stats.echoes >= stats.sent, cfg.drain)

    def _send_next(self, c: Client, now: int) -> None:
        if c.state != "open" or now >= self.window_end:
            return
        c.sent_at = now
        c.send_append(c.sent)
        self.stats.sent += 1
        if now >= self.window_start:
            self.stats.sent_window += 1

    def on_echo(self, c: Client, seq: int, now: int) -> None:
        stats = self.stats
        if self.cfg.pattern == "realtime":
            if seq >= self.warm_seq:
                m = len(self.live)
                stats.latency_ns.append(now - (self.start + (seq * m + c.slot) * self.interval_ns // m))
                stats.echoes_window += 1
            return
        in_window = self.window_start <= now <= self.window_end
        if in_window:
            stats.echoes_window += 1
            if self.cfg.pattern == "closed":
                stats.latency_ns.append(now - c.sent_at)
        self._send_next(c, now_ns())

    def close_all(self) -> None:
        """Close every client (switchd then closes their upstreams); wait, bounded, for the peers to go."""
        for c in self.live:
            if c.state == "open":
                c.state = "closing"
                c.write(close_frame(1000, masked=True))
        self.loop(lambda: not self.peers and all(c.closed for c in self.clients), CLOSE_WAIT_S)
        for conn in list(self.conns.values()):
            if conn is not self.listener:
                conn.close()
        self.ep.close()

    def serve_peer(self) -> None:
        """`--peer-only`: answer whoever connects to the peer until SIGTERM ends the process."""
        assert self.peer_address is not None
        gc.disable()  # as in run(): a collection would be latency that is the peer's, not the relay's
        host, port = self.peer_address
        scheme = "ws" if self.peer_tls is None else "wss"
        sys.stdout.write(f"perf.engine peer listening {scheme}://{host}:{port}\n")
        sys.stdout.flush()
        while True:
            self.loop(lambda: False, 3600)

    def run(self) -> dict[str, Any]:
        started = time.time()
        # A cyclic-GC pass would pause the loop and show as latency that is ours, not switchd's;
        # the run is bounded and its few long-lived cycles (engine <-> connections) die with the process.
        gc.disable()
        self.connect_all()
        if self.live:
            if self.cfg.pattern == "realtime":
                self.run_realtime()
            else:
                self.run_driven()
        # Lost = sent − echoed once the drain is over (live clients only; failed connects are counted apart).
        lost = sum(max(0, c.sent - c.echoed) for c in self.live)
        self.close_all()
        return self.summary(lost, time.time() - started)

    def summary(self, lost: int, elapsed: float) -> dict[str, Any]:
        cfg, stats = self.cfg, self.stats
        window = cfg.duration
        cpu = self.cpu_result
        eng = cpu.get("engine") or {}
        messages = stats.sent_window + stats.received_window
        out: dict[str, Any] = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("key", "samples")},
            "mode": "direct" if self.target == self.peer_address else "through" if self.listener else "to --url",
            "sessions_connected": len(self.live),
            "connect_failed": stats.connect_failed,
            "connect_ms": _ms(stats.connect_ns),
            "sent": stats.sent,
            "echoes_received": stats.echoes,
            "other_received": stats.other,
            "echoing_upstream": True,
            "lost": lost,
            "window_s": window,
            "sent_in_window": stats.sent_window,
            "received_in_window": stats.received_window,
            "echoes_per_s": stats.echoes_window / window if window else None,
            "latency_ms": _ms(stats.latency_ns) if stats.latency_ns else None,
            "send_lag_ms": _ms(stats.lag_ns) if stats.lag_ns else None,
            "errors": dict(stats.errors),
            "close_codes": dict(stats.close_codes),
            "peer": {"accepted": stats.peer_accepted, "appends": stats.peer_appends,
                     "frames_sent": stats.peer_frames_sent, "other_received": stats.peer_other},
            "cpu": cpu,
            # The engine plays both ends: its CPU per message the clients sent or received in the window.
            "engine_us_per_message": (eng["cpu_s"] / messages * 1e6) if eng and messages else None,
            "engine_user_us_per_message": (eng["user_s"] / messages * 1e6) if eng and messages else None,
            "engine_system_us_per_message": (eng["system_s"] / messages * 1e6) if eng and messages else None,
            "elapsed_s": elapsed,
        }
        if cfg.samples:
            out["latency_us_samples"] = [n // 1000 for n in stats.latency_ns]
        return out


def _ms(values: Sequence[int]) -> dict[str, float]:
    return {k: (v / 1e6 if k != "n" else v) for k, v in summarize(values).items()}


def render(result: dict[str, Any]) -> str:
    rows: list[list[Any]] = [
        ["mode", result["mode"]], ["sessions connected", result["sessions_connected"]],
        ["connect failed", result["connect_failed"]], ["frames sent", result["sent"]],
        ["echoes received", result["echoes_received"]], ["other frames received", result["other_received"]],
        ["lost", result["lost"]], ["echoes/s (window)", result["echoes_per_s"]],
        ["engine µs/message (both ends)", result["engine_us_per_message"]],
        ["  user / system", f"{_f(result['engine_user_us_per_message'])} / "
                            f"{_f(result['engine_system_us_per_message'])}"],
    ]
    for name in ("latency_ms", "send_lag_ms", "connect_ms"):
        s = result.get(name)
        if s and s["n"]:
            rows += [[f"{name} {q}", s[q]] for q in ("p50", "p99", "p99.9", "max")]
    for name, usage in result["cpu"].items():
        if usage and name != "machine":
            rows.append([f"cpu % of one core: {name}", usage["pct_of_one_core"]])
    if result["cpu"].get("machine"):
        rows.append(["machine busy cores (all processes)", result["cpu"]["machine"]["busy_cores"]])
        rows.append(["machine steal (cores the hypervisor took)", result["cpu"]["machine"]["steal_cores"]])
    rows += [["peer", json.dumps(result["peer"])], ["errors", json.dumps(result["errors"])],
             ["close codes", json.dumps(result["close_codes"])]]
    cfg = result["config"]
    return table(f"perf.engine: {cfg['pattern']} x {cfg['sessions']} session(s), {result['mode']}",
                 ["measure", "value"], rows, digits=3)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool, bool]:
    """(config, --peer-only, --json)"""
    p = argparse.ArgumentParser(prog="python -m perf.engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="switchd's ws://host:port/v1/realtime (its UPSTREAM_URL must be this engine's "
                                      "peer: pass the listening socket with --peer-fd), or with --no-peer any peer")
    target.add_argument("--direct", action="store_true", help="clients connect straight to the peer (baseline)")
    target.add_argument("--peer-only", action="store_true",
                        help="run only the peer, until SIGTERM (prints `perf.engine peer listening ws://HOST:PORT`)")
    p.add_argument("--no-peer", action="store_true",
                   help="clients only: the peer is another process (--peer-only), reached through --url")
    p.add_argument("--key", help="Realtime Switch key; each session gets rs_sessid=<prefix>-<n>")
    p.add_argument("--session-prefix", default=f"eng{os.getpid()}")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--pattern", choices=PATTERNS, default="realtime")
    p.add_argument("--rate", type=float, default=50.0, help="appends per second per session (realtime)")
    p.add_argument("--frame-ms", type=int, default=20, help="audio per append (24 kHz PCM16)")
    p.add_argument("--frame-bytes", type=int, help="size each append to about this many bytes instead")
    p.add_argument("--window", type=int, default=64, help="frames in flight per session (flood)")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds, after the warmup")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--drain", type=float, default=3.0, help="seconds to wait for outstanding echoes")
    p.add_argument("--connect-concurrency", type=int, default=32)
    p.add_argument("--transcript-every", type=int, default=10,
                   help="peer: a transcript delta every N appends (0: none)")
    p.add_argument("--response-every", type=int, default=150,
                   help="peer: response.done + rate_limits.updated + response.created every N appends (0: none)")
    p.add_argument("--peer-fd", type=int, help="an inherited listening socket for the peer (default: its own, port 0)")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="sample this process's CPU over the measured window")
    p.add_argument("--samples", action="store_true", help="include raw latency samples (µs) in the JSON")
    p.add_argument("--peer-cert", metavar="PEM", help="the peer serves TLS with this certificate chain")
    p.add_argument("--peer-key", metavar="PEM", help="the private key of --peer-cert")
    p.add_argument("--ca", metavar="PEM", help="clients trust this CA for wss:// (default: the system's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    for name, v in (("--sessions", a.sessions), ("--rate", a.rate), ("--window", a.window),
                    ("--duration", a.duration), ("--connect-concurrency", a.connect_concurrency)):
        if v <= 0:
            p.error(f"{name} must be positive")
    if a.sessions > 999_999:
        p.error("--sessions must be below 1,000,000 (6-digit ids)")
    if a.no_peer and not a.url:
        p.error("--no-peer needs --url (where the clients connect)")
    if (a.peer_cert is None) != (a.peer_key is None):
        p.error("--peer-cert and --peer-key go together")
    watch = {}
    for w in a.watch:
        name, _, pid = w.rpartition("=")
        if not name or not pid.isdigit():
            p.error("--watch takes NAME=PID")
        watch[name] = int(pid)
    cfg = Config(url=a.url, direct=a.direct, key=a.key, session_prefix=a.session_prefix, sessions=a.sessions,
                 pattern=a.pattern, rate=a.rate, frame_ms=a.frame_ms, frame_bytes=a.frame_bytes, window=a.window,
                 duration=a.duration, warmup=a.warmup, drain=a.drain, connect_concurrency=a.connect_concurrency,
                 transcript_every=a.transcript_every, response_every=a.response_every, peer_fd=a.peer_fd,
                 no_peer=a.no_peer, watch=watch, samples=a.samples, peer_cert=a.peer_cert, peer_key=a.peer_key,
                 ca=a.ca)
    return cfg, a.peer_only, a.json


def main(argv: Sequence[str] | None = None) -> None:
    cfg, peer_only, as_json = parse_args(argv)
    if peer_only:
        Engine(cfg).serve_peer()
        return
    result = Engine(cfg).run()
    sys.stdout.write((json.dumps(result) if as_json else render(result)) + "\n")


if __name__ == "__main__":
    main()
