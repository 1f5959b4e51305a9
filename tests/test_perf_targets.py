"""The target summary's judgements (pure: no benchmark runs here)."""
from __future__ import annotations

from typing import Any

from perf import targets


def _relay(added_p999: float, baseline_ok: bool) -> dict[str, Any]:
    point = {"sessions": targets.TARGET_SESSIONS, "added_ms": {"p99.9": added_p999}, "baseline_ok": baseline_ok}
    return {"realtime": [point]}


def _status(name_starts: str, results: dict[str, Any]) -> str:
    return next(row["status"] for row in targets.evaluate(results) if row["target"].startswith(name_starts))


def test_a_tail_compared_with_a_saturated_baseline_is_not_measured() -> None:
    assert _status("p99.9 added", {"relay": _relay(-9.7, baseline_ok=False)}) == targets.NOT_MEASURED
    assert _status("p99.9 added", {"relay": _relay(3.0, baseline_ok=True)}) == targets.MET
    assert _status("p99.9 added", {"relay": _relay(25.0, baseline_ok=True)}) == targets.NOT_MET


def _workers(ratio: float, per_worker: list[int], lost: int = 0) -> dict[str, Any]:
    return {"workers": {"workers": 2, "sessions": sum(per_worker), "sessions_per_process": 150,
                        "sessions_per_worker": per_worker, "lost": lost, "connect_failed": 0,
                        "ratio_us_per_message": ratio, "us_per_relayed_message": 30.0 * ratio,
                        "one_process_us_per_relayed_message": 30.0}}


def test_workers_scale_only_when_every_worker_served_and_nothing_was_lost() -> None:
    assert _status("worker processes", {"relay": _workers(0.9, [150, 150])}) == targets.MET
    assert _status("worker processes", {"relay": _workers(1.4, [150, 150])}) == targets.NOT_MET
    assert _status("worker processes", {"relay": _workers(0.9, [300, 0])}) == targets.NOT_MET
    assert _status("worker processes", {"relay": _workers(0.9, [150, 150], lost=3)}) == targets.NOT_MET
