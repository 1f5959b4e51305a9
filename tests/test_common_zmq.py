"""The Trio–ZeroMQ adapter against a real ROUTER: the pitfalls that stall naive adapters."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from common.dbclient import open_db_client
from common.errors import ErrorCode, SwitchError
from common.wire import OK, MessageType, decode_request, encode_reply
from common.zmq_trio import ZmqSocket

_n = itertools.count()


def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/z{next(_n)}.sock"


async def echo_router(ep: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, silent: bool = False) -> None:
    """A ROUTER that answers every request with its own args (or never, when silent)."""
    raw = zmq.Context.instance().socket(zmq.ROUTER)
    raw.bind(ep)
    sock = ZmqSocket(raw)
    try:
        task_status.started()
        while True:
            identity, *frames = await sock.recv()
            if silent:
                continue
            req = decode_request(frames)
            await sock.send([identity, *encode_reply(req.request_id, OK, *req.args)])
    finally:
        sock.close()


async def test_queued_messages_are_all_received(tmp_path: Path) -> None:
    # Messages already queued before the reader parks must not wait for an edge that never comes.
    ep = endpoint(tmp_path)
    ctx = zmq.Context.instance()
    pull = ZmqSocket(ctx.socket(zmq.PULL))
    pull.sock.bind(ep)
    push = ctx.socket(zmq.PUSH)
    push.connect(ep)
    for i in range(500):
        push.send_multipart([str(i).encode()])
    with trio.fail_after(10):
        got = [int((await pull.recv())[0]) for _ in range(500)]
    assert got == list(range(500))
    push.close(linger=0)
    pull.close()


async def test_second_reader_is_refused(tmp_path: Path) -> None:
    raw = zmq.Context.instance().socket(zmq.PULL)
    raw.bind(endpoint(tmp_path))
    sock = ZmqSocket(raw)
    with pytest.raises(ExceptionGroup) as exc:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sock.recv)
            nursery.start_soon(sock.recv)
    assert exc.value.subgroup(trio.BusyResourceError) is not None
    sock.close()


async def test_many_concurrent_requests_do_not_stall(tmp_path: Path) -> None:
    ep = endpoint(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(echo_router, ep)
        async with open_db_client(ep, 5000) as db:
            results: list[tuple[str, ...]] = []

            async def worker(w: int) -> None:
                for i in range(250):
                    results.append(await db.request(MessageType.GET_CREDITS, f"{w}:{i}|\n\x00é"))

            with trio.fail_after(60):
                async with trio.open_nursery() as workers:
                    for w in range(32):
                        workers.start_soon(worker, w)
        nursery.cancel_scope.cancel()
    assert len(results) == 32 * 250
    assert all(r[0].endswith("|\n\x00é") for r in results)


async def test_request_times_out_with_db_unavailable(tmp_path: Path) -> None:
    ep = endpoint(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: echo_router(ep, task_status=task_status, silent=True))
        async with open_db_client(ep, 50) as db:
            with pytest.raises(SwitchError) as exc:
                await db.request(MessageType.PING)
            assert exc.value.code == ErrorCode.INTERNAL_DB_UNAVAILABLE
        nursery.cancel_scope.cancel()


async def test_fire_and_forget_sends_arrive_in_order(tmp_path: Path) -> None:
    ep = endpoint(tmp_path)
    raw = zmq.Context.instance().socket(zmq.ROUTER)
    raw.bind(ep)
    router = ZmqSocket(raw)
    async with open_db_client(ep, 5000) as db:
        for i in range(2000):
            await db.send(MessageType.APPEND_CONVERSATION, "acct", "s", str(i))
        with trio.fail_after(10):
            got = [decode_request((await router.recv())[1:]).args[2] for _ in range(2000)]
    assert got == [str(i) for i in range(2000)]
    router.close()


async def test_a_sessions_sends_wait_for_its_replica_rather_than_spill_to_another(tmp_path: Path) -> None:
    # With several replicas a socket queues nothing for a replica not yet connected; a send that
    # went to another replica meanwhile would be stored before the ones queued behind it.
    home_ep, other_ep = endpoint(tmp_path), endpoint(tmp_path)  # ("acct", "s") hashes to the first
    other = ZmqSocket(zmq.Context.instance().socket(zmq.ROUTER))
    other.sock.bind(other_ep)
    home = ZmqSocket(zmq.Context.instance().socket(zmq.ROUTER))
    async with open_db_client(f"{home_ep},{other_ep}", 5000) as db, trio.open_nursery() as nursery:

        async def append_all() -> None:
            for i in range(100):
                await db.send(MessageType.APPEND_CONVERSATION, "acct", "s", str(i))

        await db.send(MessageType.APPEND_CONVERSATION, "acct", "t", "")  # ("acct", "t") goes to the other
        with trio.fail_after(10):
            await other.recv()  # connected to the other replica, not yet to the first
        nursery.start_soon(append_all)
        await trio.testing.wait_all_tasks_blocked()  # the first send waits for its replica
        home.sock.bind(home_ep)
        with trio.fail_after(10):
            got = [decode_request((await home.recv())[1:]).args[2] for _ in range(100)]
    assert got == [str(i) for i in range(100)]
    assert other.recv_nowait() is None
    home.close()
    other.close()


async def test_bursts_drain_and_answer_everything(tmp_path: Path) -> None:
    # The server-side pattern: drain all that is waiting, answer it in one burst, park; no
    # message may be left waiting for an edge that already went (also across multipart frames).
    ep = endpoint(tmp_path)
    raw = zmq.Context.instance().socket(zmq.ROUTER)
    raw.bind(ep)
    router = ZmqSocket(raw)
    assert router.recv_nowait() is None

    async def serve() -> None:
        while True:
            burst = []
            while (message := router.recv_nowait()) is not None:
                identity, *frames = message
                req = decode_request(frames)
                burst.append([identity, *encode_reply(req.request_id, OK, *req.args)])
            assert router.send_many_nowait(burst) == []
            await router.wait_readable()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with open_db_client(ep, 5000) as db:

            async def ask(i: int) -> None:
                assert await db.request(MessageType.GET_CREDITS, f"{i}\x00é" * (i % 5)) == (f"{i}\x00é" * (i % 5),)

            with trio.fail_after(30):
                async with trio.open_nursery() as askers:
                    for i in range(1000):
                        askers.start_soon(ask, i)
        nursery.cancel_scope.cancel()
    router.close()


async def test_send_many_keeps_order_and_returns_what_the_hwm_refused(tmp_path: Path) -> None:
    ep = endpoint(tmp_path)
    ctx = zmq.Context.instance()
    push_raw = ctx.socket(zmq.PUSH)
    push_raw.setsockopt(zmq.SNDHWM, 5)
    push_raw.setsockopt(zmq.LINGER, 0)
    push_raw.bind(ep)
    push = ZmqSocket(push_raw)
    # No peer yet: a PUSH queues nothing and refuses at once, so everything comes back, in order.
    messages = [[b"m", str(i).encode()] for i in range(20)]
    assert push.send_many_nowait(messages) == messages
    pull_raw = ctx.socket(zmq.PULL)
    pull_raw.connect(ep)
    pull = ZmqSocket(pull_raw)
    with trio.fail_after(10):
        for frames in messages:
            await push.send(frames)
        got = [await pull.recv() for _ in messages]
    assert got == messages
    push.close()
    pull.close()


async def test_wait_readable_yields_when_input_is_already_waiting(tmp_path: Path) -> None:
    # Under a steady stream a message is nearly always waiting again by the time the reader has
    # drained the last one: if waiting on it returned without a checkpoint, the reader would hold
    # the event loop (switchdb's handler, its replies) for as long as the stream lasted.
    ep = endpoint(tmp_path)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.ROUTER)
    raw.bind(ep)
    router = ZmqSocket(raw)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(ep)
    try:
        assert router.recv_nowait() is None
        dealer.send_multipart([b"1", b"PING"])
        assert raw.poll(5000) == zmq.POLLIN  # waiting now, before the reader looks again
        with trio.testing.assert_checkpoints():
            await router.wait_readable()
        assert router.recv_nowait() is not None
    finally:
        dealer.close(linger=0)
        router.close()
