"""A bare Trio TCP proxy: no WebSocket parsing, no metering, nothing but bytes in and out.

It is the least any Trio relay costs on a machine (one wake-up, one read and one write per
message and direction), so the relay benchmark measures switchd side by side with it: what
switchd adds over this floor is what its own work costs.

    python -m perf.floor --target-port N   # prints `floor listening ws://127.0.0.1:PORT`
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    rfd, wfd = src.socket.fileno(), dst.socket.fileno()
    while True:
        await trio.lowlevel.wait_readable(rfd)
        data = os.read(rfd, 65536)
        if not data:
            return
        while data:
            try:
                data = data[os.write(wfd, data):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(wfd)


async def _connection(client: trio.SocketStream, target_port: int) -> None:
    try:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
    except OSError:
        await client.aclose()
        return
    async with client, upstream, trio.open_nursery() as nursery:
        async def both(a: trio.SocketStream, b: trio.SocketStream) -> None:
            try:
                await _pump(a, b)
            except OSError:
                pass
            nursery.cancel_scope.cancel()  # either side gone: the connection is over

        nursery.start_soon(both, client, upstream)
        nursery.start_soon(both, upstream, client)


async def _main(target_port: int) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    sys.stdout.write(f"floor listening ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}\n")
    sys.stdout.flush()
    await trio.serve_listeners(lambda s: _connection(s, target_port), listeners)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-port", type=int, required=True, help="the loopback port to relay to")
    args = parser.parse_args(argv)
    try:
        trio.run(_main, args.target_port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
