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
            f"switchd listening ws://{settings.host}:{bound.port} metrics http://{settings.host}:{bound.metrics_port}\n"
        )
        sys.stdout.flush()


def main() -> None:
    try:
        trio.run(_main)
    except SwitchError as exc:
        sys.stderr.write(f"switchd: {exc.message}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
