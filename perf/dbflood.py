"""`python -m perf.dbflood`: RECORD_USAGE as fast as switchdb acknowledges, from C DEALER sockets.

Plain blocking pyzmq with a poller, not Trio: the flood must cost as little client CPU as
possible so that switchdb, not the client, is what saturates. Each socket keeps `--inflight`
requests outstanding (a new one for every reply); with `--rate`, new requests also wait for their
turn so that all clients together send about that many per second (a steady write load below
saturation). Prints `dbflood flooding` when the first requests are out, then one JSON line with
the counts once `--duration` is over and the outstanding replies are in (bounded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from types import MethodType

import zmq

from common.usage import UsageTotals
from common.wire import OK, MessageType

DRAIN_S = 10.0


_RECORD_USAGE = MessageType.RECORD_USAGE.value.encode()
_SESSIONS = [f"flood-session-{i}".encode() for i in range(97)]


def request_frames(prefix: str, n: int, account: bytes, usage: bytes) -> list[bytes]:
    """Request `n`: `encode_request(f"{prefix}{n}", RECORD_USAGE, f"{prefix}b{n}", account, session,
    "openai", "gpt-realtime", usage)` with the frames that never change encoded once."""
    number = str(n)
    return [(prefix + number).encode(), _RECORD_USAGE, f"{prefix}b{number}".encode(), account, _SESSIONS[n % 97],
            b"openai", b"gpt-realtime", usage]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m perf.dbflood", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--account", required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--inflight", type=int, default=64, help="requests outstanding per client")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=None,
                   help="requests per second, all clients together (default: as fast as acknowledged)")
    a = p.parse_args(argv)
    usage = UsageTotals(input_tokens=132, output_tokens=121, input_text=119, input_audio=13, input_cached=64,
                        output_text=30, output_audio=91, reports=1).to_json()
    ctx = zmq.Context()
    socks = []
    for _ in range(a.clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.connect(a.endpoint)
        socks.append(s)
    prefix = f"flood-{os.getpid():x}-{os.urandom(3).hex()}-"
    counter = iter(range(10**12))
    account, usage_frame = a.account.encode(), usage.encode()
    more, noblock = zmq.SNDMORE, zmq.NOBLOCK
    # pyzmq's Python-level send and recv_multipart cost several times the C calls: the flood's own
    # CPU per request must stay well below switchdb's, so it calls the Cython methods directly.
    sends = {s: MethodType(zmq.backend.Socket.send, s) for s in socks}

    def send(s: zmq.Socket) -> None:
        *head, last = request_frames(prefix, next(counter), account, usage_frame)
        put = sends[s]
        for frame in head:
            put(frame, more)
        put(last)

    def recv_status(s: zmq.Socket) -> bytes:
        """One reply's status frame (the rest is read and dropped); raises zmq.Again when none is waiting."""
        recv = s.recv
        frame = recv(noblock, copy=False)
        status = b"?"
        if frame.more:
            frame = recv(noblock, copy=False)
            status = frame.bytes
            while frame.more:
                frame = recv(noblock, copy=False)
        return status

    poller = zmq.Poller()
    outstanding = {s: 0 for s in socks}
    # Replies received whose replacement is not sent yet (only ever waiting with --rate).
    owed = {s: a.inflight if a.rate else 0 for s in socks}
    for s in socks:
        poller.register(s, zmq.POLLIN)
        for _ in range(0 if a.rate else a.inflight):
            send(s)
            outstanding[s] += 1
    sys.stdout.write("dbflood flooding\n")
    sys.stdout.flush()
    statuses: Counter[bytes] = Counter()
    start = time.perf_counter()
    deadline = start + a.duration
    acked_in_window = 0
    paced_sent = 0
    turn = 0
    cpu0 = time.process_time()
    while True:
        now = time.perf_counter()
        sending = now < deadline
        if not sending and (not any(outstanding.values()) or now > deadline + DRAIN_S):
            break
        for s, _ in poller.poll(1 if sending and a.rate and any(owed.values()) else 100):
            got = 0
            while True:
                try:
                    status = recv_status(s)
                except zmq.Again:
                    break
                statuses[status] += 1
                got += 1
            outstanding[s] -= got
            if got and time.perf_counter() < deadline:
                acked_in_window += got
                owed[s] += got
        if not sending:
            continue
        # Without --rate, every reply is replaced at once; with it, only as many as are due by now.
        budget = int(a.rate * (time.perf_counter() - start)) - paced_sent if a.rate else None
        turn = (turn + 1) % len(socks)  # who goes first, in turn: paced sends are shared out evenly
        for s in socks[turn:] + socks[:turn]:
            n = owed[s] if budget is None else max(0, min(owed[s], budget))
            for _ in range(n):
                send(s)
            owed[s] -= n
            outstanding[s] += n
            if budget is not None:
                budget -= n
                paced_sent += n
    result = {
        "clients": a.clients, "inflight_per_client": a.inflight, "duration_s": a.duration, "rate": a.rate,
        "acked_in_window": acked_in_window, "per_s": acked_in_window / a.duration,
        "ok": statuses.get(OK.encode(), 0), "statuses": {k.decode(errors="replace"): v for k, v in statuses.items()}, "unanswered": sum(outstanding.values()),
        "client_cpu_s": time.process_time() - cpu0,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    for s in socks:
        s.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
