"""switchd.tls.TlsStream against Python's own TLS server side, over a real socket pair."""
from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme

from switchd.tls import TlsStream


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost",))).configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def pair(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost"
) -> AsyncIterator[tuple[TlsStream, TlsStream]]:
    a, b = trio.socket.socketpair()
    left = TlsStream(trio.SocketStream(a), client, server_hostname=hostname)
    right = TlsStream(trio.SocketStream(b), server, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.do_handshake)
        await left.do_handshake()
    try:
        yield left, right
    finally:
        await left.aclose()
        await right.aclose()


async def receive_exactly(stream: TlsStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await stream.receive_some()
        assert data, "the stream ended early"
        got += data
    return bytes(got)


async def test_bytes_cross_both_ways_whole_and_in_order_past_the_socket_buffer(tls_ca: trustme.CA) -> None:
    # Much more than a socket buffer holds: writes the kernel takes only in part wait for the rest.
    blob = os.urandom(4 * 1024 * 1024)
    async with pair(server_context(tls_ca), client_context(tls_ca)) as (left, right):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(left.send_all, blob)
                assert await receive_exactly(right, len(blob)) == blob
            async with trio.open_nursery() as nursery:
                for i in range(100):  # many small records, as a relay writes them
                    nursery.start_soon(right.send_all, b"%03d" % i)
                    await trio.testing.wait_all_tasks_blocked()
                got = await receive_exactly(left, 300)
            assert got == b"".join(b"%03d" % i for i in range(100))


async def test_writes_from_two_tasks_never_interleave_records(tls_ca: trustme.CA) -> None:
    chunks = [bytes([i]) * 300_000 for i in range(2)]
    async with pair(server_context(tls_ca), client_context(tls_ca)) as (left, right):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for chunk in chunks:
                    nursery.start_soon(left.send_all, chunk)
                got = await receive_exactly(right, sum(map(len, chunks)))
    # Each write is whole; which comes first is the scheduler's choice.
    assert got in (chunks[0] + chunks[1], chunks[1] + chunks[0])


@pytest.mark.parametrize("notify", [True, False])
async def test_the_end_of_the_stream_reads_as_empty_with_or_without_close_notify(
    tls_ca: trustme.CA, notify: bool
) -> None:
    async with pair(server_context(tls_ca), client_context(tls_ca)) as (left, right):
        await right.send_all(b"last words")
        if notify:
            await right.aclose()
        else:
            await right.transport.aclose()  # cut: no close_notify
        with trio.fail_after(10):
            assert await receive_exactly(left, 10) == b"last words"
            assert await left.receive_some() == b""


async def handshake_error(server: ssl.SSLContext, client: ssl.SSLContext) -> trio.BrokenResourceError:
    """What the client's handshake raises (the server's own failure to agree is not the question)."""
    a, b = trio.socket.socketpair()
    left = TlsStream(trio.SocketStream(a), client, server_hostname="localhost")
    right = TlsStream(trio.SocketStream(b), server, server_side=True)

    async def serve() -> None:
        try:
            await right.do_handshake()
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as failed:
                await left.do_handshake()
            await left.aclose()
    await right.aclose()
    return failed.value


async def test_an_untrusted_certificate_is_a_broken_stream_naming_the_verification(tls_ca: trustme.CA) -> None:
    failed = await handshake_error(server_context(trustme.CA()), client_context(tls_ca))
    assert isinstance(failed.__cause__, ssl.SSLCertVerificationError)
    assert failed.__cause__.verify_message == "unable to get local issuer certificate"


async def test_a_wrong_hostname_is_refused(tls_ca: trustme.CA) -> None:
    failed = await handshake_error(server_context(tls_ca, "example.org"), client_context(tls_ca))
    assert isinstance(failed.__cause__, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in failed.__cause__.verify_message


async def test_a_peer_that_hangs_up_during_the_handshake_is_a_broken_stream(tls_ca: trustme.CA) -> None:
    a, b = trio.socket.socketpair()
    b.close()
    client = TlsStream(trio.SocketStream(a), client_context(tls_ca), server_hostname="localhost")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await client.do_handshake()
    await client.aclose()


async def test_a_closed_stream_refuses_use(tls_ca: trustme.CA) -> None:
    async with pair(server_context(tls_ca), client_context(tls_ca)) as (left, _):
        await left.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await left.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await left.receive_some()
        await left.aclose()  # twice is fine
