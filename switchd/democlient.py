"""A minimal client for trying the switch: speak one synthetic turn, show the events that come back.

    python -m switchd.democlient 'ws://127.0.0.1:3000/v1/realtime?rs_key=...&rs_sessid=demo'
"""
from __future__ import annotations

import base64
import json
import math
import struct
import sys

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

RATE = 24_000


def pcm(ms: int, amplitude: int) -> str:
    samples = RATE * ms // 1000
    data = struct.pack(f"<{samples}h", *(int(amplitude * math.sin(i / 10)) for i in range(samples)))
    return base64.b64encode(data).decode()


async def talk(url: str) -> None:
    async with open_websocket_url(url) as ws:
        for _ in range(25):  # 0.5 s of tone, then 1 s of silence: the server VAD ends the turn
            await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": pcm(20, 8000)}))
        for _ in range(50):
            await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": pcm(20, 0)}))
        with trio.move_on_after(30):
            while True:
                event = json.loads(await ws.get_message())
                detail = ""
                if event["type"] == "response.done":
                    detail = f"  usage={json.dumps(event['response'].get('usage'))}"
                elif event["type"].endswith("transcript.delta") or event["type"].endswith("transcription.delta"):
                    detail = f"  {event.get('delta')!r}"
                elif event["type"] == "error":
                    detail = f"  {event['error']}"
                sys.stdout.write(f"{event['type']}{detail}\n")
                if event["type"] == "response.done":
                    break


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        trio.run(talk, sys.argv[1])
    except ConnectionClosed as exc:
        sys.exit(f"closed: {exc.reason}")


if __name__ == "__main__":
    main()
