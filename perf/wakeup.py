"""`python -m perf.wakeup`: what one cross-process wake-up costs a round trip on this machine.

Two processes bounce a 1 KB message over loopback TCP with blocking calls (no event loop, no
parsing): each round trip is two wake-ups of a sleeping process plus four small syscalls. A
relay between a client process and a provider process adds two such wake-ups to their closed
loop (client → relay → peer → relay → client against client → peer → client), so this round
trip is what those wake-ups cost at that moment (it swings with the VM's neighbours: the relay
benchmark runs it in every round). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Sequence

MESSAGE = b"x" * 1024


def _echo(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)


def round_trips(rounds: int) -> list[float]:
    """`rounds` round trips (µs) to a forked echo process, sorted."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        child = os.fork()
        if child == 0:
            try:
                _echo(listener.getsockname()[1])
            finally:
                os._exit(0)
        conn, _ = listener.accept()
    samples = []
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            conn.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                got += len(conn.recv(65536))
            samples.append((time.perf_counter_ns() - t0) / 1000)
    os.waitpid(child, 0)
    return sorted(samples)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m perf.wakeup", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5000)
    a = p.parse_args(argv)
    samples = round_trips(a.rounds)
    n = len(samples)
    print(json.dumps({"rounds": n, "rtt_us": {"p50": samples[n // 2], "p99": samples[min(n - 1, n * 99 // 100)]}}))


if __name__ == "__main__":
    main()
