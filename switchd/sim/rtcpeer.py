"""The simulator's WebRTC side, in a process of its own: aiortc runs on asyncio, the simulator on Trio.

`python -m switchd.sim.rtcpeer` speaks JSON lines. On stdin: `{"op": "offer", "call", "sdp"}`,
`{"op": "send", "call", "text"}`, `{"op": "hangup", "call"}`. On stdout: `{"op": "answer", "call",
"sdp"}` or `{"op": "error", "call", "message"}`, then `{"op": "open", "call"}` once the browser's
`oai-events` channel is open, `{"op": "message", "call", "text"}` for each of its messages and
`{"op": "closed", "call"}` once when the call ends (hangup, or the browser gone). The answer
sends silence on its audio track, as a provider that is not speaking does; stdin's end closes all.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

log = logging.getLogger("switchd.sim.rtcpeer")
MAX_LINE = 16 * 1024 * 1024
DRAIN_S = 2.0


def _emit(**message: Any) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _drain(pc: RTCPeerConnection, channel: RTCDataChannel) -> None:
    """Let what was sent before a hangup reach the browser, as the provider's last events do: the
    close (an SCTP abort) would otherwise overtake data still queued or unacknowledged. aiortc has
    no event for "all acknowledged", so its queues are looked at, for DRAIN_S at most."""
    sctp: Any = pc.sctp
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_S
    while loop.time() < deadline:
        if not (channel.bufferedAmount or getattr(sctp, "_outbound_queue", None) or getattr(sctp, "_sent_queue", None)):
            return
        await asyncio.sleep(0.01)


class Peers:
    def __init__(self) -> None:
        self.calls: dict[str, RTCPeerConnection] = {}
        self.channels: dict[str, RTCDataChannel] = {}
        self.closed: set[str] = set()

    def _ended(self, call: str) -> None:
        if call not in self.closed:
            self.closed.add(call)
            _emit(op="closed", call=call)

    async def offer(self, call: str, sdp: str) -> None:
        pc = RTCPeerConnection()
        self.calls[call] = pc

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                pc.addTrack(AudioStreamTrack())

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != "oai-events":
                return
            self.channels[call] = channel
            channel.on("message", lambda text: _emit(op="message", call=call, text=text)
                       if isinstance(text, str) else None)
            channel.on("close", lambda: self._ended(call))
            _emit(op="open", call=call)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._ended(call)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # a malformed or unusable offer: the call is refused, the peer goes on
            del self.calls[call]
            await pc.close()
            _emit(op="error", call=call, message=str(exc) or type(exc).__name__)
            return
        _emit(op="answer", call=call, sdp=pc.localDescription.sdp)

    def send(self, call: str, text: str) -> None:
        channel = self.channels.get(call)
        if channel is not None and channel.readyState == "open":
            channel.send(text)

    async def hangup(self, call: str) -> None:
        pc = self.calls.pop(call, None)
        channel = self.channels.pop(call, None)
        if pc is not None and channel is not None:
            await _drain(pc, channel)
        if pc is not None:
            await pc.close()
        self._ended(call)

    async def close_all(self) -> None:
        for call in list(self.calls):
            await self.hangup(call)


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    peers = Peers()
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        try:
            message = json.loads(line)
            op, call = message["op"], message["call"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed command")
            continue
        if op == "offer":
            task = loop.create_task(peers.offer(call, message["sdp"]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif op == "send":
            peers.send(call, message["text"])
        elif op == "hangup":
            await peers.hangup(call)
    await peers.close_all()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main())
