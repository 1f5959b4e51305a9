"""What every benchmark shares: percentiles, tables, and the JSON envelope with the machine it ran on.

A number without its machine, versions and commit cannot be compared with a later one, so
every result file carries them.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("trio", "trio-websocket", "wsproto", "pyzmq", "orjson", "sqlcipher3-binary", "attrs")
ENVELOPE_FIELDS = ("benchmark", "mode", "machine", "python", "libraries", "git", "started_at", "duration_s", "notes",
                   "results")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100); NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def summarize(values: Iterable[float], qs: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    data = sorted(values)
    out: dict[str, float] = {"n": len(data)}
    for q in qs:
        out[f"p{q:g}"] = percentile(data, q)
    out["max"] = data[-1] if data else float("nan")
    out["mean"] = sum(data) / len(data) if data else float("nan")
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def libraries() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_info() -> dict[str, Any]:
    """Read-only: the commit and whether the tree had local changes (the numbers then belong to those)."""
    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def envelope(name: str, mode: str, started: float, results: dict[str, Any], notes: Sequence[str]) -> dict[str, Any]:
    return {
        "benchmark": name,
        "mode": mode,
        "machine": machine(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "libraries": libraries(),
        "git": git_info(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 2),
        "notes": list(notes),
        "results": results,
    }


def write_json(directory: Path, name: str, data: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    # NaN is not JSON; null says "not measured" to any reader.
    path.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)

    def render(row: Sequence[str]) -> str:
        # First column left-aligned (names), numbers right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [f"\n{title}", render(list(headers)), line, *(render(r) for r in cells)]
    return "\n".join(out)


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
