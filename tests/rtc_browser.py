"""A WebRTC browser for the tests, in its own process (aiortc runs on asyncio, the tests on Trio).

`python -m tests.rtc_browser URL KEY [SESSION_JSON]` does what the official browser sample
does: a microphone track (silence), the `oai-events` data channel, the offer POSTed to URL
with `Authorization: Bearer KEY` (raw `application/sdp`, or multipart with SESSION_JSON), the
answer applied. JSON lines on stdout: `{"op": "answered", "status", "location"}` or
`{"op": "refused", "status", "body"}`, `{"op": "open"}`, `{"op": "event", "event"}` for each
data-channel message, `{"op": "closed"}` when the call ends. On stdin: `{"op": "send", "event"}`
and `{"op": "close"}` (hang up as a browser does: close the peer connection).
"""
from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any
from urllib.parse import urlsplit

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack


def emit(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def post(url: str, key: str, content_type: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = (f"POST {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: {content_type}\r\nAccept: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head_bytes, _, payload = response.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, payload


async def main(url: str, key: str, session: str | None) -> None:
    pc = RTCPeerConnection()
    closed = asyncio.Event()

    def ended() -> None:
        if not closed.is_set():
            closed.set()
            emit(op="closed")

    pc.addTrack(AudioStreamTrack())
    channel = pc.createDataChannel("oai-events")
    channel.on("open", lambda: emit(op="open"))
    channel.on("message", lambda text: emit(op="event", event=json.loads(text)))
    channel.on("close", ended)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            ended()

    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate here
    offer = pc.localDescription.sdp.encode()
    if session is None:
        status, headers, body = await post(url, key, "application/sdp", offer)
    else:
        boundary = uuid.uuid4().hex
        body_parts = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n"
                      f"Content-Type: application/sdp\r\n\r\n").encode() + offer + (
                      f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"session\"\r\n"
                      f"Content-Type: application/json\r\n\r\n{session}\r\n--{boundary}--\r\n").encode()
        status, headers, body = await post(url, key, f"multipart/form-data; boundary={boundary}", body_parts)
    if status != 201:
        emit(op="refused", status=status, body=body.decode(errors="replace"))
        await pc.close()
        return
    emit(op="answered", status=status, location=headers.get("location"))
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "send":
                channel.send(json.dumps(command["event"]))
            elif command["op"] == "close":
                await pc.close()
                ended()
                return

    task = loop.create_task(commands())
    await closed.wait()
    task.cancel()
    await pc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
