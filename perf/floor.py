"""The relays switchd is measured beside: two bare TCP proxies, and the usual Python WebSocket relay.

The default is a bare Trio TCP proxy (no WebSocket parsing, no metering, nothing but bytes in
and out): the least any Trio relay costs on a machine (one wake-up, one read and one write per
message and direction). `--threads` is a blocking TCP proxy with a thread per direction and no
event loop at all: its round trip is what the kernel's and the machine's wake-ups alone add to
any user-space relay. Both pass TLS through untouched: on a `wss://` provider the client's TLS
runs end to end through them.

`--websockets URL` is what the usual Python gateway is built on: asyncio and the `websockets`
package, clients in plain ws://, each session its own connection to URL (`wss://` verified
against `--ca`), every message read whole on one side and sent on the other, nothing else. The
bar switchd must beat on the TLS path. The relay benchmark measures switchd side by side with
all three, in the same place.

    python -m perf.floor --target-port N [--threads]   # prints `floor listening ws://127.0.0.1:PORT`
    python -m perf.floor --websockets wss://127.0.0.1:N/v1/realtime?model=m [--ca ca.pem]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
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


# The provider takes events up to 16 MiB; the relay must not be the one refusing them.
WEBSOCKETS_MAX_MESSAGE = 16 * 1024 * 1024


async def _websockets_main(target: str, context: ssl.SSLContext | None) -> None:
    # Imported here: only this relay needs the package (perf's extras), the TCP proxies do not.
    from websockets.asyncio.client import connect
    from websockets.asyncio.connection import Connection
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def relay(client: ServerConnection) -> None:
        try:
            upstream = await connect(target, ssl=context, compression=None, max_size=WEBSOCKETS_MAX_MESSAGE)
        except (OSError, ConnectionClosed, ssl.SSLError):
            await client.close(1011, "upstream unreachable")
            return

        async def pipe(src: Connection, dst: Connection) -> None:
            try:
                async for message in src:
                    await dst.send(message)
            except ConnectionClosed:
                pass

        async with upstream:
            tasks = [asyncio.create_task(pipe(client, upstream)), asyncio.create_task(pipe(upstream, client))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # either side gone: it is over
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async with serve(relay, "127.0.0.1", 0, compression=None, max_size=WEBSOCKETS_MAX_MESSAGE) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        sys.stdout.write(f"floor listening ws://127.0.0.1:{port}\n")
        sys.stdout.flush()
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--target-port", type=int, help="a bare TCP proxy to this loopback port")
    kind.add_argument("--websockets", metavar="URL", help="an asyncio + websockets relay to this ws:// or wss:// URL")
    parser.add_argument("--threads", action="store_true", help="a blocking TCP proxy, a thread per direction")
    parser.add_argument("--ca", metavar="PEM", help="--websockets: trust this CA for wss:// (default: the system's)")
    args = parser.parse_args(argv)
    try:
        if args.websockets:
            context = ssl.create_default_context(cafile=args.ca) if args.websockets.startswith("wss:") else None
            asyncio.run(_websockets_main(args.websockets, context))
        elif args.threads:
            _serve_threads(args.target_port)
        else:
            trio.run(_main, args.target_port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
