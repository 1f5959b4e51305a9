"""`switchd`: run the switch daemon with settings from the environment."""
from __future__ import annotations

import os
import sys
from functools import partial

import trio

from common.config import load_settings
from common.errors import SwitchError
from common.logs import setup_logging
from switchd.server import serve
from switchd.workers import WORKER_ENV, supervise


async def _main() -> None:
    settings = load_settings("switchd")
    setup_logging(settings.log_level, settings.log_account, settings.log_format)
    if settings.workers > 1:
        if not await supervise(settings):
            sys.exit(1)
        return
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve, settings, reuse_port=WORKER_ENV in os.environ))
        # The one line tests and launchers wait for.
        sys.stdout.write(
            f"switchd listening {bound.scheme}://{settings.host}:{bound.port}"
            f" metrics http://{settings.metrics_host}:{bound.metrics_port}\n"
        )
        sys.stdout.flush()


def _alone(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (a nursery wraps what a start raised)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main() -> None:
    try:
        trio.run(_main)
    except BaseException as exc:
        error = _alone(exc)
        if isinstance(error, SwitchError):  # a configuration error found at start: the message, no traceback
            sys.stderr.write(f"switchd: {error.message}\n")
            sys.exit(2)
        if isinstance(error, KeyboardInterrupt):
            sys.exit(0)
        raise


if __name__ == "__main__":
    main()
