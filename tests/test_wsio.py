"""WebSocket connections over real loopback sockets, plain and TLS (certificates made by trustme)."""
from __future__ import annotations

import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from switchd.tls import TlsStream
from switchd.websocket import Message
from switchd.ws_codec import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_response,
    check_upgrade_request,
    encode_frame,
    parse_head,
)
from switchd.wsio import Closed, ConnectError, WsConnection, client_ssl_context, connect, read_head
from tests.test_websocket import read_frames

MAX = 16 << 20
Handler = Callable[[WsConnection], Awaitable[None]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    return context


@asynccontextmanager
async def ws_server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """A WebSocket server on a fresh loopback port, running `handler` per connection; yields its URL."""

    async def serve_one(stream: trio.abc.Stream) -> None:
        try:
            head, rest = await read_head(stream, bytearray())
            _, key = check_upgrade_request(head)
            await stream.send_all(accept_response(key, None))
            await handler(WsConnection(stream, bytes(rest), server=True, max_message=MAX))
        except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError, Closed):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
            await trio.open_tcp_listeners(0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        if tls is not None:
            listeners = [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]
        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        yield f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/v1/realtime"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def ws_pair(tls: bool, ca: trustme.CA, tmp_path: Path) -> AsyncIterator[tuple[WsConnection, WsConnection]]:
    """(client, server): connected through connect(), over TCP or TLS."""
    send, receive = trio.open_memory_channel[WsConnection](1)
    release = trio.Event()

    async def hold(conn: WsConnection) -> None:
        await send.send(conn)
        await release.wait()

    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with ws_server(hold, server_context(ca) if tls else None) as url:
        client = await connect(url, [], max_message=MAX, connect_timeout=5,
                               ssl_context=client_ssl_context(str(ca_file)) if tls else None)
        server = await receive.receive()
        try:
            yield client, server
        finally:
            release.set()
            await trio.aclose_forcefully(client.stream)


def payloads(messages: list[Message]) -> list[bytes]:
    return [m.payload for m in messages]


@pytest.fixture(params=["plain", "tls"])
def tls(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "tls")


async def test_messages_both_ways_and_the_close_handshake(tls: bool, ca: trustme.CA, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with ws_pair(tls, ca, tmp_path) as (client, server):
            await client.send_text('{"type":"hello"}')
            [got] = await server.receive()
            assert got.payload == b'{"type":"hello"}' and got.text and got.masked
            # A client's frame, forwarded as it stands, is a valid frame from us as a client.
            await client.send(got.frame)
            assert payloads(await server.receive()) == [b'{"type":"hello"}']
            big = bytes(range(256)) * 4096  # 1 MiB, many reads and TLS records
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send, encode_frame(OP_TEXT, big, mask=False))
                [got] = await client.receive()
            assert got.payload == big and not got.masked
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.aclose, 4000, "bye")
                with pytest.raises(Closed) as exc:
                    await server.receive()
            assert (exc.value.code, exc.value.reason) == (4000, "bye")
            assert client.closed is not None and client.closed.code == 4000
            with pytest.raises(Closed):
                await server.send_text("too late")


async def test_frames_arrive_whole_and_in_order_under_a_small_send_buffer(
    tls: bool, ca: trustme.CA, tmp_path: Path
) -> None:
    async with ws_pair(tls, ca, tmp_path) as (client, server):
        _socket_of(client).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        senders, count = 4, 60

        async def sender(n: int) -> None:
            for i in range(count):
                text = f"{n}:{i}:" + "x" * (37 * i * (n + 1) % 20_000)
                if i % 3:
                    await client.send_text(text)
                else:  # several frames in one write
                    await client.send(encode_frame(OP_TEXT, text.encode(), mask=True) * 2)

        got: list[bytes] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for n in range(senders):
                    nursery.start_soon(sender, n)
                while len(got) < senders * count * 4 // 3:
                    got += payloads(await server.receive())
        for n in range(senders):
            mine = [p.split(b":") for p in got if p.startswith(f"{n}:".encode())]
            seqs = [int(p[1]) for p in mine]
            assert seqs == sorted(seqs) and set(seqs) == set(range(count))
            assert all(p[2] == b"x" * (37 * int(p[1]) * (n + 1) % 20_000) for p in mine)


def _socket_of(conn: WsConnection) -> trio.SocketStream:
    stream = conn.stream
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else \
        stream.transport if isinstance(stream, TlsStream) else stream
    assert isinstance(raw, trio.SocketStream)
    return raw


async def test_a_write_cancelled_midway_ends_the_connection_never_corrupts_it(
    tls: bool, ca: trustme.CA, tmp_path: Path
) -> None:
    async with ws_pair(tls, ca, tmp_path) as (client, server):
        await client.send_text("before")
        big = b"y" * (8 << 20)  # far more than the socket buffers hold: the write blocks part-way
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def write() -> None:
                    with scope:
                        await client.send(encode_frame(OP_TEXT, big, mask=True))

                nursery.start_soon(write)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            assert client.closed is not None and client.closed.code == 1006
            with pytest.raises(Closed):
                await client.send_text("after")  # nothing may follow part of a frame
            # The peer gets what came before, then the end: never a frame made of two.
            got: list[bytes] = []
            with pytest.raises(Closed) as exc:
                while True:
                    got += payloads(await server.receive())
            assert got == [b"before"] and exc.value.code == 1006


async def test_a_write_cancelled_before_it_starts_sends_nothing(tls: bool, ca: trustme.CA, tmp_path: Path) -> None:
    async with ws_pair(tls, ca, tmp_path) as (client, server):
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.send_text("never")
        with trio.fail_after(10):
            await client.send_text("next")
            assert payloads(await server.receive()) == [b"next"]
        assert client.closed is None


async def test_pings_are_answered_and_fragments_arrive_whole(tls: bool, ca: trustme.CA, tmp_path: Path) -> None:
    async with ws_pair(tls, ca, tmp_path) as (client, server):
        with trio.fail_after(10):
            await client.send(
                encode_frame(OP_PING, b"hb", mask=True)
                + encode_frame(OP_TEXT, b'{"type":', mask=True, fin=False)
                + encode_frame(OP_PING, b"mid", mask=True)
                + encode_frame(OP_CONT, b'"x"}', mask=True)
            )
            [got] = await server.receive()
            assert got.payload == b'{"type":"x"}' and got.masked  # masked again, for the next hop
            # The client's transport sees the pongs, in order, before the server's next message.
            await server.send_text("done")
            raw = b""
            while raw.count(b"done") == 0:
                raw += await client.stream.receive_some(1 << 16)
            assert read_frames(raw, False) == [(OP_PONG, b"hb"), (OP_PONG, b"mid"), (OP_TEXT, b"done")]


async def test_a_protocol_violation_closes_with_1002_and_the_peer_is_told(
    tls: bool, ca: trustme.CA, tmp_path: Path
) -> None:
    async with ws_pair(tls, ca, tmp_path) as (client, server):
        with trio.fail_after(10):
            await client.stream.send_all(encode_frame(OP_TEXT, b"unmasked", mask=False))
            with pytest.raises(Closed) as exc:
                await server.receive()
            assert exc.value.code == 1002
            with pytest.raises(Closed) as exc:
                await client.receive()
            assert exc.value.code == 1002  # the server's close said why


async def test_invalid_close_codes_are_answered_with_1002_not_echoed() -> None:
    left, right = trio.testing.memory_stream_pair()
    server = WsConnection(left, b"", server=True, max_message=MAX)
    await right.send_all(encode_frame(OP_CLOSE, b"\x03\xe7", mask=True))  # 999
    with trio.fail_after(5), pytest.raises(Closed) as exc:
        await server.receive()
    assert exc.value.code == 1002
    reply = await right.receive_some()
    assert reply[0] == 0x80 | OP_CLOSE and reply[2:4] == b"\x03\xea"


async def test_a_lost_connection_is_1006(tls: bool, ca: trustme.CA, tmp_path: Path) -> None:
    async with ws_pair(tls, ca, tmp_path) as (client, server):
        await trio.aclose_forcefully(client.stream)
        with trio.fail_after(5), pytest.raises(Closed) as exc:
            await server.receive()
        assert exc.value.code == 1006
        with pytest.raises(Closed):
            await server.send_text("gone")


async def test_one_read_returns_all_its_messages_in_order() -> None:
    left, right = trio.testing.memory_stream_pair()
    # Bytes that came with the upgrade response are the first frames.
    first = encode_frame(OP_TEXT, b"early", mask=False)
    client = WsConnection(left, first, server=False, max_message=MAX)
    assert payloads(await client.receive()) == [b"early"]
    await right.send_all(b"".join(encode_frame(OP_TEXT, b"%d" % i, mask=False) for i in range(50)))
    with trio.fail_after(5):
        assert payloads(await client.receive()) == [b"%d" % i for i in range(50)]
    t0 = client.last_data_at
    await right.send_all(encode_frame(OP_PING, b"", mask=False))
    await right.send_all(encode_frame(OP_TEXT, b"later", mask=False))
    with trio.fail_after(5):
        assert payloads(await client.receive()) == [b"later"]
    assert client.last_data_at >= t0


async def test_a_flooding_peer_does_not_hold_up_another_connection(capsys: pytest.CaptureFixture[str]) -> None:
    async def echo(conn: WsConnection) -> None:
        while True:
            for message in await conn.receive():
                await conn.send(encode_frame(OP_TEXT, message.payload, mask=False))

    n = 20_000
    flood = encode_frame(OP_TEXT, b"a", mask=True, fin=False)
    flood += encode_frame(OP_CONT, b"", mask=True, fin=False) * n + encode_frame(OP_CONT, b"z", mask=True)
    trips: list[float] = []
    async with ws_server(echo) as url:
        flooder = await connect(url, [], max_message=MAX, connect_timeout=5)
        other = await connect(url, [], max_message=MAX, connect_timeout=5)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def flooding() -> None:
                    for _ in range(5):
                        await flooder.send(flood)
                    got: list[bytes] = []
                    while len(got) < 5:
                        got += payloads(await flooder.receive())
                    assert got == [b"az"] * 5

                nursery.start_soon(flooding)
                for i in range(100):
                    start = time.perf_counter()
                    await other.send_text(f"ping {i}")
                    assert payloads(await other.receive()) == [f"ping {i}".encode()]
                    trips.append(time.perf_counter() - start)
        await flooder.aclose()
        await other.aclose()
    trips.sort()
    with capsys.disabled():
        print(f"\nround trips beside a flood of 5 x {n} empty continuations: median {trips[50] * 1e3:.2f} ms, "
              f"max {trips[-1] * 1e3:.2f} ms")


async def test_an_untrusted_certificate_is_a_connect_error_naming_the_cause(ca: trustme.CA, tmp_path: Path) -> None:
    async def idle(conn: WsConnection) -> None:
        await conn.receive()

    with trio.fail_after(10):
        async with ws_server(idle, server_context(ca)) as url:
            with pytest.raises(ConnectError, match="certificate verify failed: unable to get local issuer") as exc:
                await connect(url, [], max_message=MAX, connect_timeout=5)  # the system store only
            assert exc.value.permanent  # trying again cannot help
        self_signed = trustme.CA()  # a CA certificate serving as its own server certificate
        (tmp_path / "cert.pem").write_bytes(self_signed.cert_pem.bytes())
        (tmp_path / "key.pem").write_bytes(self_signed.private_key_pem.bytes())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        async with ws_server(idle, context) as url:
            with pytest.raises(ConnectError, match="certificate verify failed: self-signed certificate"):
                await connect(url, [], max_message=MAX, connect_timeout=5)


async def test_a_certificate_for_another_name_is_a_connect_error(ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def idle(conn: WsConnection) -> None:
        await conn.receive()

    with trio.fail_after(10):
        async with ws_server(idle, server_context(ca, "provider.example")) as url:
            with pytest.raises(ConnectError, match="certificate verify failed: IP address mismatch"):
                await connect(url, [], max_message=MAX, connect_timeout=5, ssl_context=client_ssl_context(str(ca_file)))


@pytest.mark.parametrize(("status", "permanent"), [("403 Forbidden", True), ("429 Too Many Requests", False),
                                                   ("503 Service Unavailable", False)])
async def test_refusals_are_connect_errors(status: str, permanent: bool) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        await read_head(stream, bytearray())
        await stream.send_all(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, refuse, 0)
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(ConnectError, match=f"upgrade refused with {status}") as exc:
                await connect(f"ws://127.0.0.1:{port}/", [], max_message=MAX, connect_timeout=5)
            assert exc.value.permanent == permanent  # a wrong key stays wrong; a busy provider may not be
            nursery.cancel_scope.cancel()
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        with pytest.raises(ConnectError, match="connect with 127.0.0.1") as exc:
            await connect(f"ws://127.0.0.1:{port}/", [], max_message=MAX, connect_timeout=5)
        assert not exc.value.permanent  # the provider may be back in a moment
        with pytest.raises(ConnectError, match="not a WebSocket URL"):
            await connect(f"http://127.0.0.1:{port}/", [], max_message=MAX, connect_timeout=5)


async def test_a_silent_server_is_a_timeout_not_a_hang() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(5), pytest.raises(ConnectError, match="timed out after 0.2 s") as exc:
            await connect(f"wss://127.0.0.1:{port}/", [], max_message=MAX, connect_timeout=0.2)
        assert not exc.value.permanent
        nursery.cancel_scope.cancel()


async def test_read_head_returns_what_came_after_it() -> None:
    left, right = trio.testing.memory_stream_pair()
    await right.send_all(b"GET / HTTP/1.1\r\nHost: x\r")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.send_all, b"\n\r\n\x81\x00")
        head, rest = await read_head(left, bytearray())
    assert head == parse_head(b"GET / HTTP/1.1\r\nHost: x") and rest == b"\x81\x00"


async def test_a_write_past_its_deadline_leaves_the_connection_lost_not_corrupt(
    ca: trustme.CA, tmp_path: Path
) -> None:
    async with ws_pair(False, ca, tmp_path) as (client, server):
        with trio.fail_after(10):
            with trio.move_on_after(0.2) as scope:
                await client.send(encode_frame(OP_TEXT, b"z" * (8 << 20), mask=True))  # nobody reads it
            assert scope.cancelled_caught
            assert client.closed is not None and client.closed.code == 1006
            with pytest.raises(Closed):
                await client.send_text("nothing may follow half a frame")
            # The peer sees the frame cut short: a lost connection, never a frame made of two.
            got: list[bytes] = []
            with pytest.raises(Closed) as exc:
                while True:
                    got += payloads(await server.receive())
            assert got == [] and exc.value.code == 1006


async def test_messages_survive_a_receive_cancelled_while_it_answers_a_ping() -> None:
    left, right = trio.testing.memory_stream_pair()
    arrived = encode_frame(OP_TEXT, b"kept", mask=True) + encode_frame(OP_PING, b"p", mask=True)
    server = WsConnection(left, arrived, server=True, max_message=MAX)
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.receive()  # parsed, then cancelled on its way to write the pong
    with trio.fail_after(5):
        assert payloads(await server.receive()) == [b"kept"]
    assert server.closed is None
