"""Upstream policy: which closes are retried, how long to wait between tries. Pure."""
from __future__ import annotations

import random
from enum import Enum


class CloseAction(Enum):
    END = "end"  # the provider ended the session normally (the client asked with session.close)
    RETRY = "retry"  # a drop, an outage or the provider's session cap: reconnect and restore
    FATAL = "fatal"  # a configuration fault: retrying would only repeat it


MAX_TRIES = 5
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 8.0
# A connection that stayed up this long counts as healthy: the next drop starts a fresh round of tries.
HEALTHY_AFTER_S = 10.0


def close_action(code: int | None) -> CloseAction:
    if code == 1000:
        return CloseAction.END
    # 3000 bad provider key; 4000-4999 bad model, beta shape and other request faults.
    if code is not None and (3000 <= code < 5000):
        return CloseAction.FATAL
    return CloseAction.RETRY  # 1001 (incl. session_expired), 1006, 1011, 1012-1014, no close frame


def backoff(attempt: int, rng: random.Random = random._inst) -> float:
    """Full-jitter exponential backoff before retry `attempt` (1-based)."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
