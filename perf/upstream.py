"""`python -m perf.upstream`: a load upstream with the realtime traffic shape, echoing for latency.

A benchmark peer standing in for the provider. Every client `input_audio_buffer.append` comes
back as a `response.output_audio.delta` carrying the same audio and the client's `event_id`
(so the load generator can time the round trip), on switchd's real audio fast path. On top of
that it sends what a speaking provider sends: a transcript delta every few frames and, every
few seconds of audio, a ~1 KB `response.done` with usage (which switchd meters and batches to
switchdb), `rate_limits.updated` and the next `response.created`. With the client at 50
appends/s this is 50 audio deltas/s per session plus transcripts and a response.done every
`--response-every` / 50 seconds. Any other client frame is echoed verbatim.

Prints `perf-upstream listening ws://HOST:PORT` when ready; SIGTERM stops it.
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from perf.events import (RATE_LIMITS, audio_delta_head, response_created, response_done, response_id, session_created,
                         transcript_delta)

APPEND_PREFIX = '{"type":"input_audio_buffer.append","event_id":"'
MAX_MESSAGE = 16 * 1024 * 1024


async def _session(ws: WebSocketConnection, n: int, transcript_every: int, response_every: int) -> None:
    send = ws.send_message
    await send(session_created(n))
    responses = 0
    resp = response_id(n, responses)
    await send(response_created(resp, responses))
    head = audio_delta_head(resp)
    appends = 0
    while True:
        frame = await ws.get_message()
        if type(frame) is str and frame.startswith(APPEND_PREFIX):
            # The load generator's own layout: event_id, then audio. Cheap slicing keeps this
            # peer's CPU (it shares the machine with switchd) low.
            end = frame.find('"', len(APPEND_PREFIX))
            event_id = frame[len(APPEND_PREFIX):end]
            audio_at = frame.find('"audio":"', end) + len('"audio":"')
            audio = frame[audio_at:frame.find('"', audio_at)]
            await send(head % (event_id, audio))
            appends += 1
            if appends % transcript_every == 0:
                await send(transcript_delta(resp, appends))
            if appends % response_every == 0:
                await send(response_done(resp, responses))
                await send(RATE_LIMITS)
                responses += 1
                resp = response_id(n, responses)
                head = audio_delta_head(resp)
                await send(response_created(resp, responses))
        else:
            await send(frame)


async def _handle(request: WebSocketRequest, counter: list[int], transcript_every: int, response_every: int) -> None:
    try:
        ws = await request.accept(subprotocol="realtime" if "realtime" in request.proposed_subprotocols else None)
        counter[0] += 1
        await _session(ws, counter[0], transcript_every, response_every)
    except ConnectionClosed:
        pass


async def _main(args: argparse.Namespace) -> None:
    counter = [0]
    handler = partial(_handle, counter=counter, transcript_every=args.transcript_every,
                      response_every=args.response_every)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_websocket, handler, args.host, args.port, None,
                                                 max_message_size=MAX_MESSAGE))
            sys.stdout.write(f"perf-upstream listening ws://{args.host}:{server.port}\n")
            sys.stdout.flush()
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--transcript-every", type=int, default=10, help="a transcript delta every N appends")
    parser.add_argument("--response-every", type=int, default=150,
                        help="response.done + rate_limits.updated + response.created every N appends (150 = 3 s)")
    trio.run(_main, parser.parse_args(argv))


if __name__ == "__main__":
    main()
