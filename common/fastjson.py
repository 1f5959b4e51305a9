"""json.loads without its Python wrapper: json's C scanner run straight on the text.

Same value and same refusals as json.loads: anything the scanner does not take whole (leading
or trailing whitespace, invalid JSON) goes to json.loads itself. Used where every microsecond of
a parse counts: switchd's metering path and switchdb's usage batches.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# scan_once is set on each decoder instance by json's C module, so typeshed does not declare it.
_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads(text: str) -> Any:
    """json.loads(text): the same value, and ValueError or RecursionError for the same inputs."""
    try:
        value, end = _scan_once(text, 0)
        if end == len(text):
            return value
    except (StopIteration, ValueError, RecursionError):
        pass
    return json.loads(text)
