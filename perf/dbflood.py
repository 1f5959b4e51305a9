"""`python -m perf.dbflood`: RECORD_USAGE as fast as switchdb acknowledges, from C DEALER sockets.

Plain blocking pyzmq with a poller, not Trio: the flood must cost as little client CPU as
possible so that switchdb, not the client, is what saturates. Each socket keeps `--inflight`
requests outstanding (a new one for every reply). Prints `dbflood flooding` when the first
requests are out, then one JSON line with the counts once `--duration` is over and the
outstanding replies are in (bounded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence

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
    more = zmq.SNDMORE

    def send(s: zmq.Socket) -> None:
        # Frame by frame: pyzmq's send_multipart costs several times more per message.
        *head, last = request_frames(prefix, next(counter), account, usage_frame)
        put = s.send
        for frame in head:
            put(frame, more)
        put(last)

    def recv_status(s: zmq.Socket) -> bytes:
        """One reply's status frame (the rest is read and dropped); raises zmq.Again when none is waiting."""
        first = s.recv(zmq.NOBLOCK, copy=False)
        frame = first
        status = b"?"
        index = 0
        while frame.more:
            frame = s.recv(zmq.NOBLOCK, copy=False)
            index += 1
            if index == 1:
                status = frame.bytes
        return status

    poller = zmq.Poller()
    outstanding = {s: 0 for s in socks}
    for s in socks:
        poller.register(s, zmq.POLLIN)
        for _ in range(a.inflight):
            send(s)
            outstanding[s] += 1
    sys.stdout.write("dbflood flooding\n")
    sys.stdout.flush()
    statuses: Counter[bytes] = Counter()
    start = time.perf_counter()
    deadline = start + a.duration
    acked_in_window = 0
    cpu0 = time.process_time()
    while True:
        now = time.perf_counter()
        sending = now < deadline
        if not sending and (not any(outstanding.values()) or now > deadline + DRAIN_S):
            break
        for s, _ in poller.poll(100):
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
                for _ in range(got):
                    send(s)
                outstanding[s] += got
    result = {
        "clients": a.clients, "inflight_per_client": a.inflight, "duration_s": a.duration,
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
