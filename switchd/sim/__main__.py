"""`switchd-sim --host 127.0.0.1 --port N [--fast] [--echo] [--max-session-seconds S] [--tls-cert PEM --tls-key PEM]`.

Prints one ready line, `switchd-sim listening ws://HOST:PORT` (`wss://` with a certificate),
once it accepts connections; SIGTERM or SIGINT stops it. Logging follows LOG_LEVEL /
LOG_ACCOUNT / LOG_FORMAT.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from functools import partial

import trio

from common.logs import setup_logging
from switchd.sim.server import SimOptions, serve, tls_context

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
    parser.add_argument("--tls-cert", metavar="PEM", help="serve wss:// with this certificate chain (leaf first)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


async def _run(host: str, port: int, options: SimOptions, context: ssl.SSLContext | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve, host, port, options=options, ssl_context=context))
            url_host = f"[{host}]" if ":" in host else host
            scheme = "ws" if context is None else "wss"
            sys.stdout.write(f"switchd-sim listening {scheme}://{url_host}:{bound}\n")
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
    context = None
    if args.tls_cert is not None:
        try:
            context = tls_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            sys.exit(f"switchd-sim: cannot use --tls-cert/--tls-key: {exc}")
    trio.run(_run, args.host, args.port, options, context)


if __name__ == "__main__":
    main()
