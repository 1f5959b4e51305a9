"""The pump: what it forwards of a connection's bytes, and how it hands a connection back.

`forward_plain` is checked over real socket pairs against the codec's own parser (hypothesis:
any mix of frames, any split into reads): the destination gets exactly the plain frames before
the first one that is not plain, and nothing is lost or doubled; the frames it forwards for the
reader to read later (transcript deltas) are kept in order, never more than MAX_OBSERVED. Then
the pump's thread itself, against Trio tasks: handing back, part-written frames, writers that must
not interleave, a gone destination, cancellation, gathering when busy.
"""
from __future__ import annotations

import select
import socket
import threading

import outcome
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from switchd.metrics import Metrics
from switchd.pump import MAX_OBSERVED, Lane, Pump
from switchd.ws import WsConnection
from switchd.ws_codec import OP_BINARY, OP_CONT, OP_PING, OP_TEXT, encode_frame, parse_header

MAX = 1 << 20
LIMIT = 3000
PREFIX = b'{"type":"response.output_audio.delta"'
OBSERVE = (b'{"type":"response.output_audio_transcript.delta"', b'{"type":"response.output_text.delta"')


def conn(sock: socket.socket, *, server: bool) -> WsConnection:
    return WsConnection(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), b"", server=server, max_message=MAX)


def is_plain(frame: bytes, *, server: bool, prefix: bytes) -> bool:
    header = parse_header(frame, 0, expect_masked=server, max_length=MAX)
    assert header is not None
    return (header.fin and header.opcode == OP_TEXT and header.length < 65536 and header.length <= LIMIT
            and frame[header.size :].startswith(prefix))


def carried(frames: list[bytes], *, server: bool, prefix: bytes, observe: tuple[bytes, ...]) -> tuple[int, list[bytes]]:
    """The reference: how many frames lead that the pump may carry, and the payloads it keeps of them."""
    kept: list[bytes] = []
    for i, frame in enumerate(frames):
        if is_plain(frame, server=server, prefix=prefix):
            continue
        payload = frame[parse_header(frame, 0, expect_masked=server, max_length=MAX).size :]
        if observe and len(kept) < MAX_OBSERVED and is_plain(frame, server=server, prefix=b"") \
                and payload.startswith(observe):
            kept.append(payload)
            continue
        return i, kept
    return len(frames), kept


def drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        out += data


payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda tail: PREFIX + tail, st.binary(max_size=300)),
    st.builds(lambda head, tail: head + tail, st.sampled_from(OBSERVE), st.binary(max_size=300)),
    st.sampled_from([b"x" * 125, b"x" * 126, PREFIX + b"y" * 4000, OBSERVE[0] + b"t" * 4000, b"z" * 70_000]),
)
frame_specs = st.tuples(st.sampled_from([OP_TEXT] * 6 + [OP_BINARY, OP_PING, OP_CONT]), payloads, st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(frame_specs, max_size=24), st.lists(st.integers(1, 5000), max_size=20), st.booleans())
def test_forwards_exactly_the_plain_frames_before_the_first_that_is_not(
    specs: list[tuple[int, bytes, bool]], cuts: list[int], server: bool
) -> None:
    frames = [encode_frame(op, p[:125] if op == OP_PING else p, mask=server, fin=fin or op == OP_PING)
              for op, p, fin in specs]
    # As switchd's lanes: any client text frame; the provider's audio, and its transcripts kept for the reader.
    prefix, observe = (b"", ()) if server else (PREFIX, OBSERVE)
    trio.run(_check_forwarding, frames, cuts, server, prefix, observe)


async def _check_forwarding(frames: list[bytes], cuts: list[int], server: bool, prefix: bytes,
                            observe: tuple[bytes, ...]) -> None:
    feed, src_sock = socket.socketpair()
    dest_sock, out = socket.socketpair()
    out.setblocking(False)
    pump = Pump(Metrics())
    src, dest = conn(src_sock, server=server), conn(dest_sock, server=not server)
    lane = Lane(pump, dest, LIMIT, prefix, inbound=True, observe=observe)
    stream = b"".join(frames)
    first_not_plain, observed = carried(frames, server=server, prefix=prefix, observe=observe)
    pos, back, counted = 0, False, 0
    feed.setblocking(False)  # a big stream must not block on a full socket with nobody reading it
    sizes = iter(cuts)
    while pos < len(stream) and not back:
        try:
            pos += feed.send(stream[pos : pos + next(sizes, len(stream))])
        except BlockingIOError:
            pass  # full: the reads below make room
        while not back and select.select([src_sock], [], [], 0)[0]:  # one read a step, as per wake
            back, n, _ = src.forward_plain(lane, 1.0)
            counted += n
    forwarded = drain(out)
    kept = src._data[src._pos :]
    src_sock.setblocking(False)
    unread = drain(src_sock)
    # Nothing lost or doubled: forwarded + kept in the buffer + still in the socket + not yet fed.
    assert forwarded + kept + unread + stream[pos:] == stream
    assert forwarded == b"".join(frames[:counted])
    assert counted <= first_not_plain
    # What it kept for the reader: the transcripts among what it forwarded, in order, no more.
    assert src.observed == observed[: len(src.observed)]
    assert len(src.observed) == sum(1 for f in frames[:counted] if not is_plain(f, server=server, prefix=prefix))
    if pos == len(stream):  # all of it was read: every plain frame went, the first other one stopped it
        assert counted == first_not_plain
        assert back == (first_not_plain < len(frames))
        assert src.observed == observed
    if counted:
        assert src.last_data_at == 1.0
    pump._epoll.close()
    for s in (feed, out):
        s.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=MAX_OBSERVED, max_size=3 * MAX_OBSERVED),
       st.lists(st.integers(1, 3000), max_size=10))
def test_keeps_at_most_max_observed_then_hands_the_next_back(kinds: list[bool], cuts: list[int]) -> None:
    """A long run of audio and transcript deltas (as a speaking provider sends): the cap holds."""
    frames = [encode_frame(OP_TEXT, (OBSERVE[0] if transcript else PREFIX) + b',"n":%d}' % i, mask=False)
              for i, transcript in enumerate(kinds)]
    trio.run(_check_forwarding, frames, cuts, False, PREFIX, OBSERVE)


def payload_size(frame: bytes) -> int:
    header = parse_header(frame, 0, expect_masked=True, max_length=MAX)
    assert header is not None
    return header.length


def frames_of(n: int, size: int) -> list[bytes]:
    return [encode_frame(OP_TEXT, (b"%06d" % i) + b"a" * size, mask=True) for i in range(n)]


async def relay(src: WsConnection, dest: WsConnection, got: list[int], seen: trio.Event | None = None) -> None:
    """What a session's reader does with the frames the pump hands back: send them on itself."""
    while True:
        opcode, frame, _ = await src.receive()
        got.append(opcode)
        await dest.send_raw(frame)
        if seen is not None:
            seen.set()


async def read_all(out: socket.socket, n: int) -> bytes:
    out.setblocking(False)
    received = b""
    while len(received) < n:
        await trio.lowlevel.wait_readable(out)
        received += drain(out)
    return received


async def test_reader_gets_the_first_frame_that_is_not_plain_and_order_holds() -> None:
    """Plain frames via the pump, a binary one via the reader, then plain via the pump again."""
    feed, src_sock = socket.socketpair()
    dest_sock, out = socket.socketpair()
    metrics = Metrics()
    pump = Pump(metrics)
    src, dest = conn(src_sock, server=True), conn(dest_sock, server=False)
    src.lane = Lane(pump, dest, LIMIT, b"", inbound=True)
    before, after = frames_of(50, 100), frames_of(50, 200)
    odd = encode_frame(OP_BINARY, b"\x00\x01", mask=True)
    got: list[int] = []
    seen = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            nursery.start_soon(relay, src, dest, got, seen)
            feed.sendall(b"".join(before) + odd)
            await seen.wait()
            feed.sendall(b"".join(after))
            received = await read_all(out, len(b"".join(before + [odd] + after)))
            nursery.cancel_scope.cancel()
    assert received == b"".join(before + [odd] + after)
    assert got == [OP_BINARY]  # the reader saw only the frame that was not plain
    # The pump's thread counts what it carried; the reader's frame is the session's to count.
    assert metrics.pump_frames_in == 100 and metrics.pump_bytes_in == sum(payload_size(f) for f in before + after)
    assert "client_to_upstream\"} 100" in metrics.render()
    assert not pump._parked  # the cancelled reader left the pump's epoll


class OwedWatch(WsConnection):
    """A destination that says when a reader came back to finish a frame the pump part-wrote."""

    owed_flush: trio.Event

    async def send_raw(self, frame: bytes) -> None:
        if not frame:
            self.owed_flush.set()
        await super().send_raw(frame)


async def test_part_written_frame_is_finished_before_anything_else() -> None:
    """A destination that will not take it all: the rest is owed, and goes out before any other frame."""
    feed, src_sock = socket.socketpair()
    dest_sock, out = socket.socketpair()
    dest_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pump = Pump(Metrics())
    src = conn(src_sock, server=True)
    dest = OwedWatch(trio.SocketStream(trio.socket.from_stdlib_socket(dest_sock)), b"", server=False, max_message=MAX)
    dest.owed_flush = trio.Event()
    src.lane = Lane(pump, dest, 60_000, b"", inbound=True)
    frames = frames_of(40, 50_000)
    wire = b"".join(frames)
    ping = encode_frame(OP_PING, b"between", mask=False)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            nursery.start_soon(trio.SocketStream(trio.socket.from_stdlib_socket(feed)).send_all, wire)
            nursery.start_soon(relay, src, dest, [])
            # Nobody reads `out` yet: the pump's write stops part-way, it hands the reader back,
            # and the reader waits to write the rest under the connection's lock.
            await dest.owed_flush.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert dest._lock.locked() and dest._owed
            nursery.start_soon(dest.send_raw, ping)  # another writer must wait for the rest
            received = await read_all(out, len(wire) + len(ping))
            nursery.cancel_scope.cancel()
    # Every frame whole and in order, with the ping between two of them, never inside one.
    at = received.find(ping)
    assert at > 0 and received[:at] + received[at + len(ping) :] == wire
    assert at % len(frames[0]) == 0


def whole_frames(data: bytes, *, masked: bool) -> list[bytes]:
    """Split a byte stream into frames with the codec's parser; every byte must belong to one."""
    frames, pos = [], 0
    while pos < len(data):
        header = parse_header(data, pos, expect_masked=masked, max_length=MAX)
        assert header is not None and pos + header.size + header.length <= len(data), "a frame was cut"
        frames.append(data[pos : pos + header.size + header.length])
        pos += header.size + header.length
    return frames


class OwnedLock:
    """The pump's lock, knowing which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()


class CheckedWrites(WsConnection):
    """A connection whose every write from Trio must be made holding the pump's lock."""

    pump_lock: OwnedLock

    def _write(self, data: bytes) -> int:
        assert self.pump_lock.owner == threading.get_ident(), "a write without the pump's lock"
        return super()._write(data)


async def test_the_pump_thread_and_trio_writers_never_interleave_bytes() -> None:
    """The pump forwards a client's frames to a destination that Trio tasks write to as well (error
    events, pongs), through a small send buffer so writes stop part-way on both sides: every Trio
    write holds the pump's lock, and every frame arrives whole, each writer's frames in order."""
    feed, src_sock = socket.socketpair()
    dest_sock, out = socket.socketpair()
    dest_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    pump = Pump(Metrics())
    pump.lock = OwnedLock()  # type: ignore[assignment]
    src = conn(src_sock, server=True)
    dest = CheckedWrites(trio.SocketStream(trio.socket.from_stdlib_socket(dest_sock)), b"", server=True,
                         max_message=MAX)
    dest.pump_lock = pump.lock
    src.lane = Lane(pump, dest, LIMIT, b"", inbound=True)
    dest.lane = Lane(pump, None, LIMIT, b"", inbound=False)  # as a session's client: the pump may write to it
    pumped = [encode_frame(OP_TEXT, b"p%05d" % i + b"a" * 2500, mask=True) for i in range(400)]
    written = [encode_frame(OP_TEXT, b"t%05d" % i + b"b" * 1800, mask=True) for i in range(400)]

    async def write_all() -> None:
        for frame in written:
            await dest.send_raw(frame)

    total = len(b"".join(pumped + written))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            nursery.start_soon(relay, src, dest, [])
            nursery.start_soon(trio.SocketStream(trio.socket.from_stdlib_socket(feed)).send_all, b"".join(pumped))
            nursery.start_soon(write_all)
            received = await read_all(out, total)
            nursery.cancel_scope.cancel()
    frames = whole_frames(received, masked=True)
    assert [f for f in frames if f in set(pumped)] == pumped
    assert [f for f in frames if f in set(written)] == written
    assert len(frames) == len(pumped) + len(written)


async def test_a_reader_cancelled_after_the_pump_handed_it_back_is_not_woken_again() -> None:
    """The pump's thread handed the reader back, then it was cancelled before Trio rescheduled it:
    the cancellation wins, and the hand-back is dropped (rescheduling it would crash the run)."""
    feed, src_sock = socket.socketpair()
    pump = Pump(Metrics())
    src = conn(src_sock, server=True)
    lane = Lane(pump, None, LIMIT, b"", inbound=True)
    cancelled = False

    async def park(task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
        nonlocal cancelled
        task_status.started(trio.lowlevel.current_task())
        try:
            await pump.carry(src, lane)
        except trio.Cancelled:
            cancelled = True
            raise

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            task = await nursery.start(park)
            await trio.testing.wait_all_tasks_blocked()
            with pump.lock:  # what the pump's thread does when it hands back, without the poke
                pump._hand_back(src.fd, task, outcome.Value(None))
            assert not pump._parked and task in pump._handed
            nursery.cancel_scope.cancel()
    assert cancelled and not pump._handed and not pump._parked
    pump._epoll.close()
    feed.close()


async def test_gone_destination_leaves_the_frames_to_the_reader() -> None:
    feed, src_sock = socket.socketpair()
    dest_sock, out = socket.socketpair()
    pump = Pump(Metrics())
    src, dest = conn(src_sock, server=True), conn(dest_sock, server=False)
    lane = Lane(pump, dest, LIMIT, b"", inbound=True)
    out.close()  # the peer is gone: the write fails (EPIPE)
    frames = frames_of(3, 10)
    feed.sendall(b"".join(frames))
    assert src.forward_plain(lane, 0.0) == (True, 0, 0)
    for f in frames:  # all still there, for the session to buffer while it reconnects
        opcode, frame, _ = await src.receive()
        assert frame == f
    # From the provider: a transcript the write did not take is not kept either; the reader reads it.
    up_feed, up_sock = socket.socketpair()
    up = conn(up_sock, server=False)
    transcript = encode_frame(OP_TEXT, OBSERVE[0] + b',"delta":"hi"}', mask=False)
    up_feed.sendall(transcript)
    assert up.forward_plain(Lane(pump, dest, LIMIT, PREFIX, inbound=False, observe=OBSERVE), 0.0) == (True, 0, 0)
    assert up.observed == [] and (await up.receive())[1] == transcript
    lane.dest = None
    feed.close()
    assert src.forward_plain(lane, 0.0) == (True, 0, 0)
    pump._epoll.close()


async def test_busy_pump_gathers_for_one_coalesce_and_a_lone_frame_never_waits() -> None:
    """The thread's gathering sleep is held by the test: what went out before it was let go did not wait."""
    token = trio.lowlevel.current_trio_token()
    gathering, let_go = trio.Event(), threading.Event()
    sleeps: list[float] = []

    def hold(seconds: float) -> None:  # the pump's thread, gathering
        sleeps.append(seconds)
        trio.from_thread.run_sync(gathering.set, trio_token=token)
        let_go.wait()

    metrics = Metrics()
    pump = Pump(metrics, coalesce=0.001, sleep=hold)
    feeds, outs, srcs = [], [], []
    for _ in range(3):
        feed, src_sock = socket.socketpair()
        dest_sock, out = socket.socketpair()
        src, dest = conn(src_sock, server=True), conn(dest_sock, server=False)
        src.lane = Lane(pump, dest, LIMIT, b"", inbound=True)
        feeds.append(feed), outs.append(out), srcs.append((src, dest))
    one, two, three = frames_of(3, 10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            for src, dest in srcs:
                nursery.start_soon(relay, src, dest, [])
            await trio.testing.wait_all_tasks_blocked()
            assert len(pump._parked) == 3  # each reader parked on its first receive
            feeds[0].sendall(one)  # a lone frame goes at once
            assert await read_all(outs[0], len(one)) == one
            assert metrics.relay_wakes == 1 and not sleeps
            with pump.lock:  # three ready in one wake: busy (the thread serves them once we let go)
                for feed in feeds:
                    feed.sendall(two)
            await gathering.wait()
            assert [await read_all(out, len(two)) for out in outs] == [two] * 3
            assert sleeps == [0.001] and metrics.relay_wakes == 2
            feeds[0].sendall(three)  # gathered until the coalesce is over
            assert drain(outs[0]) == b""
            let_go.set()
            assert await read_all(outs[0], len(three)) == three
            assert metrics.relay_wakes == 3
            feeds[0].sendall(one)  # that wake found one ready: no longer busy, so no wait
            assert await read_all(outs[0], len(one)) == one
            assert metrics.relay_wakes == 4 and sleeps == [0.001]
            nursery.cancel_scope.cancel()
    assert metrics.pump_frames_in == 6
