"""Bare TCP proxies: no WebSocket parsing, no metering, nothing but bytes in and out.

The default is a Trio proxy: the least any Trio relay costs on a machine (one wake-up, one read
and one write per message and direction). `--threads` is a blocking proxy with a thread per
direction and no event loop at all: its round trip is what the kernel's and the machine's
wake-ups alone add to any user-space relay. The relay benchmark measures switchd side by side
with both, in the same place.

    python -m perf.floor --target-port N [--threads]   # prints `floor listening ws://127.0.0.1:PORT`
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
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


def _blocking_pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):  # either side gone: the connection is over
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _serve_threads(target_port: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    sys.stdout.write(f"floor listening ws://127.0.0.1:{listener.getsockname()[1]}\n")
    sys.stdout.flush()
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port))
        except OSError:
            client.close()
            continue
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_blocking_pump, args=(a, b), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-port", type=int, required=True, help="the loopback port to relay to")
    parser.add_argument("--threads", action="store_true", help="a blocking proxy, a thread per direction")
    args = parser.parse_args(argv)
    try:
        if args.threads:
            _serve_threads(args.target_port)
        else:
            trio.run(_main, args.target_port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
