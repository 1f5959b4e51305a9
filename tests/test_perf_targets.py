"""The target summary's judgements (pure: no benchmark runs here)."""
from __future__ import annotations

from typing import Any

from perf import targets


def _path(added_p999: float, baseline_ok: bool) -> dict[str, Any]:
    point = {"sessions": targets.TARGET_SESSIONS, "added_ms": {"p99.9": added_p999}, "baseline_ok": baseline_ok}
    return {"realtime": [point]}


def _relay(tls: dict[str, Any], plain: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"relay": {"tls": tls, "plain": plain}}


def _row(name_starts: str, results: dict[str, Any]) -> dict[str, Any]:
    return next(row for row in targets.evaluate(results) if row["target"].startswith(name_starts))


def _status(name_starts: str, results: dict[str, Any]) -> str:
    return str(_row(name_starts, results)["status"])


def test_a_tail_compared_with_a_saturated_baseline_is_not_measured() -> None:
    assert _status("p99.9 added", _relay(_path(-9.7, baseline_ok=False))) == targets.NOT_MEASURED
    assert _status("p99.9 added", _relay(_path(3.0, baseline_ok=True))) == targets.MET
    assert _status("p99.9 added", _relay(_path(25.0, baseline_ok=True))) == targets.NOT_MET


def test_relay_targets_are_judged_on_the_tls_path_with_the_plain_one_beside() -> None:
    row = _row("p99.9 added", _relay(_path(25.0, baseline_ok=True), _path(3.0, baseline_ok=True)))
    assert row["status"] == targets.NOT_MET  # the TLS path's figure decides, however good the plain one
    assert row["measured"] == "TLS: 25.00 ms at 150 sessions | plain ws://: 3.00 ms at 150 sessions"
    assert _row("p99.9 added", _relay(_path(3.0, baseline_ok=True)))["measured"].endswith("plain ws://: not run")


def _workers(ratio: float, per_worker: list[int], lost: int = 0) -> dict[str, Any]:
    return {"workers": {"workers": 2, "sessions": sum(per_worker), "sessions_per_process": 150,
                        "sessions_per_worker": per_worker, "lost": lost, "connect_failed": 0,
                        "ratio_us_per_message": ratio, "us_per_relayed_message": 30.0 * ratio,
                        "one_process_us_per_relayed_message": 30.0}}


def test_workers_scale_only_when_every_worker_served_and_nothing_was_lost() -> None:
    assert _status("worker processes", _relay(_workers(0.9, [150, 150]))) == targets.MET
    assert _status("worker processes", _relay(_workers(1.4, [150, 150]))) == targets.NOT_MET
    assert _status("worker processes", _relay(_workers(0.9, [300, 0]))) == targets.NOT_MET
    assert _status("worker processes", _relay(_workers(0.9, [150, 150], lost=3))) == targets.NOT_MET


def _closed(switchd_added_us: float, relay_added_us: float) -> dict[str, Any]:
    over = switchd_added_us / relay_added_us if relay_added_us else None
    return {"closed_loop": {"added_median_rtt_us": switchd_added_us, "added_over_websockets_relay": over,
                            "p50_ms": {"direct": 0.1, "through": 0.1 + switchd_added_us / 1000},
                            "websockets_relay": {"added_p50_us": relay_added_us}}}


def test_round_trip_must_beat_the_websockets_relay_measured_in_the_same_run() -> None:
    assert _status("added median RTT", _relay(_closed(150, 300))) == targets.MET
    assert _status("added median RTT", _relay(_closed(300, 300))) == targets.NOT_MET
    # A relay that measured as adding nothing sets no bar.
    assert _status("added median RTT", _relay(_closed(150, 0))) == targets.NOT_MEASURED


def test_cpu_per_message_is_judged_only_at_the_target_load() -> None:
    def point(n: int, us: float) -> dict[str, Any]:
        return {"sessions": n, "switchd_us_per_relayed_message": us, "switchd_cpu_pct_of_core": 50.0}
    assert _status("switchd CPU per relayed", _relay({"realtime": [point(50, 10.0), point(150, 24.0)]})) == targets.MET
    assert _status("switchd CPU per relayed", _relay({"realtime": [point(150, 26.0)]})) == targets.NOT_MET
    assert _status("switchd CPU per relayed", _relay({"realtime": [point(50, 10.0)]})) == targets.NOT_MEASURED


def test_memory_is_reported_not_judged() -> None:
    memory = {"memory": {"sessions": 10, "idle_bytes_per_session": 40960.0,
                         "partial_frame_bytes_per_session": 4_300_000.0}}
    row = _row("switchd memory per idle session", _relay(memory))
    assert row["status"] == targets.REPORTED and row["measured"].startswith("TLS: 40.0 KiB per session")
    assert _status("switchd memory per idle session", _relay({"memory": None})) == targets.NOT_MEASURED


def test_cpu_per_message_on_a_saturated_machine_is_not_a_pass() -> None:
    point = {"sessions": 150, "switchd_us_per_relayed_message": 10.0, "switchd_cpu_pct_of_core": 30.0,
             "baseline_ok": False, "holds": False}
    row = _row("switchd CPU per relayed", _relay({"realtime": [point]}))
    assert row["status"] == targets.NOT_MEASURED and "saturated" in row["measured"]
    row = _row("switchd CPU per relayed", _relay({"realtime": [{**point, "baseline_ok": True}]}))
    assert row["status"] == targets.MET and "missed its latency limits" in row["measured"]


def test_cpu_per_message_above_the_goal_is_a_miss_even_on_a_saturated_machine() -> None:
    # Saturation only lowers the cost per message (more messages per wake-up): above the goal even so, it missed.
    point = {"sessions": 150, "switchd_us_per_relayed_message": 62.0, "switchd_cpu_pct_of_core": 100.0,
             "baseline_ok": False, "holds": False}
    floor = {"sessions": 150, **{name: {"us_per_relayed_message": us, "system_us_per_relayed_message": 11.0}
                                 for name, us in (("floor", 48.0), ("threads", 30.0), ("websockets", 60.0))}}
    row = _row("switchd CPU per relayed", _relay({"realtime": [point], "floor": floor}))
    assert row["status"] == targets.NOT_MET
    assert "bare Trio TCP proxy 48.00 (11.00 sys), blocking threads TCP proxy 30.00" in row["measured"]


def _capacity(sessions: int, fails_at: int | None, limited_by_baseline: bool = False) -> dict[str, Any]:
    return {"sessions": sessions, "bounded_above_by": fails_at, "limited_by_baseline": limited_by_baseline}


def test_a_saturated_tail_is_a_miss_once_switchd_failed_below_the_target_with_a_sound_baseline() -> None:
    failed_below = {**_path(80.0, baseline_ok=False), "capacity": _capacity(43, 46)}
    row = _row("p99.9 added", _relay(failed_below))
    assert row["status"] == targets.NOT_MET and "missed the limits at 46 sessions" in row["measured"]
    # A failure that was itself the baseline's says nothing either.
    unsure = {**_path(80.0, baseline_ok=False), "capacity": _capacity(43, 46, limited_by_baseline=True)}
    assert _status("p99.9 added", _relay(unsure)) == targets.NOT_MEASURED


def test_capacity_shows_the_bare_trio_proxy_in_its_place() -> None:
    path = {"capacity": _capacity(43, 46), "floor": {"floor_capacity": _capacity(131, 137)}}
    row = _row("realtime sessions per switchd process", _relay(path))
    assert row["status"] == targets.NOT_MET
    assert row["measured"].startswith("TLS: 43 (fails at 46); a bare Trio TCP proxy in its place: 131 (fails at 137)")
    assert _row("realtime sessions per", _relay({"capacity": _capacity(160, None)}))["status"] == targets.MET
