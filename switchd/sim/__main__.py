"""`switchd-sim --host 127.0.0.1 --port N [--fast] [--echo] [--max-session-seconds S]`.

Prints one ready line, `switchd-sim listening ws://HOST:PORT`, once it accepts connections;
SIGTERM or SIGINT stops it. Logging follows LOG_LEVEL / LOG_ACCOUNT / LOG_FORMAT.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from common.logs import setup_logging
from switchd.sim.server import SimOptions, serve

logger = logging.getLogger("switchd.sim")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="switchd-sim", description="OpenAI Realtime (GA) API simulator")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 (default) picks a free one")
    parser.add_argument("--fast", action="store_true", help="send responses as fast as possible, not in real time")
    parser.add_argument("--echo", action="store_true", help="send every client frame back verbatim, nothing else")
    parser.add_argument("--max-session-seconds", type=_positive, default=3600.0,
                        help="close sessions with session_expired/1001 after this long (default 3600)")
    return parser.parse_args(argv)


async def _run(host: str, port: int, options: SimOptions) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve, host, port, options=options))
            url_host = f"[{host}]" if ":" in host else host
            sys.stdout.write(f"switchd-sim listening ws://{url_host}:{bound}\n")
            sys.stdout.flush()
            async for signum in signals:
                logger.info("%s received, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_ACCOUNT") or None,
                  os.environ.get("LOG_FORMAT", "text"))
    options = SimOptions(fast=args.fast, echo=args.echo, max_session_seconds=args.max_session_seconds)
    trio.run(_run, args.host, args.port, options)


if __name__ == "__main__":
    main()
