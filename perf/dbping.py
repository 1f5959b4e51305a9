"""`python -m perf.dbping`: PING round trips to switchdb, one every `--every` ms, from a lean process.

Blocking pyzmq, no event loop: the probe's own scheduling must add as little as possible to what
it measures (a Trio probe's timed sleep alone costs it about 0.1 ms of CPU and wakes it up to a
millisecond late). PING is answered by switchdb's reader on the spot, never queued behind the
database, so its round trip is how long switchdb's event loop took to get to it. Prints one
JSON line: the round trips in ms, in order, and how many PINGs got no answer within
`--timeout` ms.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import zmq

_PING = b"PING"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m perf.dbping", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--every", type=float, default=1.0, help="ms between PINGs")
    p.add_argument("--duration", type=float, default=5.0, help="seconds")
    p.add_argument("--timeout", type=float, default=1000.0, help="ms to wait for an answer")
    a = p.parse_args(argv)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.endpoint)
    rtts: list[float] = []
    unanswered = 0
    clock = time.perf_counter
    end = clock() + a.duration
    n = 0
    while (t0 := clock()) < end:
        request_id = b"%d" % n
        n += 1
        sock.send_multipart([request_id, _PING])
        # A late answer to an earlier PING is read and dropped: only this one's id counts.
        while sock.poll(a.timeout):
            if sock.recv_multipart()[0] == request_id:
                rtts.append((clock() - t0) * 1000)
                break
        else:
            unanswered += 1
        time.sleep(max(0.0, a.every / 1000 - (clock() - t0)))
    sys.stdout.write(json.dumps({"every_ms": a.every, "rtt_ms": rtts, "unanswered": unanswered}) + "\n")
    sock.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
