"""The benchmark suite runs end to end in a tiny configuration and writes complete JSON.

Never a timed assertion: numbers on a shared test machine mean nothing; what is checked is
that every benchmark works against the real daemons and reports every field it promises.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf import targets
from perf.report import ENVELOPE_FIELDS
from perf.tls import make_certs

REPO = Path(__file__).resolve().parent.parent

EXPECTED: dict[str, set[str]] = {
    "metering": {"frames", "mix", "us_per_frame", "us_per_frame_by_kind", "ratios_vs_production",
                 "audio_delta_production_us", "json_over_production", "forgery", "same_work_totals"},
    "usage": {"us_per_report", "list_over_totals", "retained_bytes_per_pending_report"},
    "switchdb": {"validate_and_load_ms", "record_usage", "record_usage_per_s_max", "ping_idle_ms",
                 "ping_steady_ms", "ping_saturated_ms", "ping_unanswered", "worst_stall_ms"},
    "connect": {"first_event_p50_ms", "first_event_p99_ms", "connects_per_side", "errors"},
    "relay": {"upstreams", "headline", "tls", "plain", "plan"},
    "overload": {"max_sessions", "reference_rate", "storms", "rejection_cost", "graceful", "graceful_by_rate",
                 "criterion"},
}
REALTIME_POINT = {"sessions", "latency_ms", "added_ms", "lost", "connect_failed", "switchd_cpu_pct_of_core",
                  "switchd_us_per_relayed_message", "switchd_user_us_per_relayed_message",
                  "switchd_system_us_per_relayed_message", "engine_us_per_message", "cpu", "holds"}


RELAY_PATH = {"upstream_url", "closed_loop", "pipelined", "realtime", "capacity", "floor", "workers", "memory",
              "placement", "stage_s"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("perf-results")
    # A subprocess, as `make perf` runs it; bounded so a hang fails instead of stalling the suite.
    done = subprocess.run([sys.executable, "-m", "perf", "--smoke", "--results-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "SUMMARY: performance targets" in done.stdout
    return out


def _load(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_benchmark_writes_its_fields(results: Path, name: str) -> None:
    data = _load(results, name)
    assert set(ENVELOPE_FIELDS) <= set(data)
    assert data["benchmark"] == name and data["mode"] == "smoke"
    assert data["machine"]["cores"] and data["machine"]["cpu_model"]
    assert data["python"]["version"] and "trio" in data["libraries"]
    assert "commit" in data["git"]
    assert EXPECTED[name] <= set(data["results"]), EXPECTED[name] - set(data["results"])


def _relay_points_complete(path: dict) -> None:
    for point in path["realtime"]:
        assert REALTIME_POINT <= set(point)
        assert point["lost"]["through"] == 0 and point["lost"]["direct"] == 0
        assert point["connect_failed"]["through"] == 0
        assert point["cpu"]["through"]["switchd"]["cpu_s"] is not None
        assert point["cpu"]["through"]["engine"]["cpu_s"] is not None
        # The engine's peer saw every append the clients sent, through switchd and direct.
        assert point["peer"]["through"]["appends"] == point["peer"]["direct"]["appends"] > 0
        assert point["errors"] == {"direct": {}, "through": {}}
    closed = path["closed_loop"]
    assert closed["samples_through"] > 0 and closed["samples_direct"] > 0
    (wakeup,) = closed["wakeup"]  # what wake-ups cost, measured in each round of (a)
    assert 0 < wakeup["rtt_us"]["p50"] <= wakeup["rtt_us"]["p99"]
    assert closed["two_wakeups_us"] == wakeup["rtt_us"]["p50"]
    # Both baselines ran: the peer in a process of its own (judged), and one engine playing both ends.
    assert closed["one_process"]["direct_p50_ms"] > 0
    bare = closed["bare_proxies"]  # the same loop through each bare proxy
    assert set(bare) == {"floor", "threads"} and all(p["p50_ms"] > 0 for p in bare.values())
    # ...and through the asyncio + websockets relay, the bar on the TLS path.
    ws = closed["websockets_relay"]
    assert ws["samples"] > 0 and ws["p50_ms"] > 0 and closed["added_over_websockets_relay"] is not None


def test_relay_runs_on_a_tls_upstream_and_a_plain_one(results: Path) -> None:
    relay = _load(results, "relay")["results"]
    assert relay["upstreams"] == ["tls", "plain"] and relay["headline"] == "tls"
    tls, plain = relay["tls"], relay["plain"]
    assert RELAY_PATH <= set(tls) and RELAY_PATH <= set(plain)
    # switchd's UPSTREAM_URL on each path: the TLS one really is wss://.
    assert tls["upstream_url"].startswith("wss://127.0.0.1:") and plain["upstream_url"].startswith("ws://127.0.0.1:")
    _relay_points_complete(tls)
    _relay_points_complete(plain)
    # Smoke runs the other stages on the TLS path only.
    assert all(plain[k] is None for k in ("pipelined", "capacity", "floor", "workers", "memory"))


def test_relay_tls_path_is_complete_and_nothing_lost(results: Path) -> None:
    relay = _load(results, "relay")["results"]
    tls = relay["tls"]
    assert tls["placement"] in (None, {"under_test": [max(os.sched_getaffinity(0))],
                                       "load": sorted(os.sched_getaffinity(0))[:-1]})
    flood = tls["pipelined"]
    assert flood["window"] == 256 and flood["lost"] == {"direct": 0, "through": 0}
    assert set(flood["relays"]) == {"floor", "threads", "websockets"}
    assert all(r["lost"] == 0 and r["frames_per_s"] > 0 for r in flood["relays"].values())
    floor = tls["floor"]  # switchd side by side with perf.floor's relays
    for name in ("floor", "threads", "websockets", "switchd"):
        assert floor[name]["lost"] == 0
        # CPU is read in clock ticks (10 ms): a relay this short may read 0 µs, but it must have been read
        # over relayed messages (None means the process was not watched or nothing was relayed).
        assert floor[name]["us_per_relayed_message"] is not None
    # The bare Trio proxy's own capacity, searched as switchd's: its points were run through it, nothing lost.
    bare = floor["floor_capacity"]
    assert bare["points"] and all(p["lost"] == 0 for p in bare["points"].values())
    assert bare["sessions"] in (0, *map(int, bare["points"]))
    workers = tls["workers"]  # WORKERS=2 on one port: every session landed on a worker, nothing lost
    # Each worker at the load one switchd held within the limits ((d)'s capacity).
    capacity = tls["capacity"]
    assert workers["sessions_per_process"] == (capacity["sessions"] or min(map(int, capacity["points"])))
    assert workers["workers"] == 2 and workers["sessions"] == 2 * workers["sessions_per_process"]
    assert sum(workers["sessions_per_worker"]) == workers["sessions"] and workers["lost"] == 0
    assert sum(workers["frames_per_worker"]) > 0 and workers["us_per_relayed_message"] is not None
    assert all(pct is not None for pct in workers["cpu_pct_of_core_per_worker"])
    memory = tls["memory"]  # every session held its partial frame while switchd's RSS was read
    assert memory["sessions"] == relay["plan"]["memory_sessions"]
    assert memory["sessions_open_while_holding"] == memory["sessions"]
    assert all(v is not None and v > 0 for v in memory["rss_bytes"].values())
    assert memory["idle_bytes_per_session"] is not None and memory["partial_frame_bytes_per_session"] is not None


def test_results_markdown_is_rendered_from_the_json(results: Path) -> None:
    markdown = (results / "RESULTS.md").read_text()
    assert markdown.startswith("# Benchmark results") and "do not edit by hand" in markdown
    for name in EXPECTED:
        assert f"## {name}" in markdown
    summary = _load(results, "summary")["results"]
    for row in summary["targets"]:
        assert row["target"] in markdown
    assert "### Upstream over TLS (wss://)" in markdown and "### Upstream over plain ws://" in markdown
    # The command regenerates the very same page from the JSON alone.
    again = results / "again.md"
    done = subprocess.run([sys.executable, "-m", "perf.results", "--results-dir", str(results), "--out", str(again)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert again.read_text() == markdown


def test_overload_storm_was_refused_and_counted(results: Path) -> None:
    """A full switchd refused the storm with 503s that both sides counted; the held sessions lost nothing."""
    overload = _load(results, "overload")["results"]
    cost = overload["rejection_cost"]
    for run in [p for s in overload["storms"] for p in (s["baseline"], s["storm"])] + [cost["phase"]]:
        assert run["sessions_connected"] == overload["max_sessions"] and run["connect_failed"] == 0
        assert run["lost"] == 0 and run["dropped"] == 0
        assert run["switchd_cpu_s"] is not None and run["latency_ms"]["n"] > 0
    for s in overload["storms"]:
        assert set(s["checks"]) and {"added_ms", "switchd_us_per_rejection", "graceful"} <= set(s)
        assert s["baseline"]["storm"] is None
    for storm in [s["storm"] for s in overload["storms"]] + [cost["phase"]]:
        st = storm["storm"]
        assert st["attempts"] > 0 and st["over_capacity_503"] > 0
        assert st["rejection_ms"]["n"] == st["over_capacity_503"]
        assert st["accepted_while_full"] == 0  # never a session past MAX_SESSIONS while every held one was open
        # switchd's own counter saw at least every 503 the storm received.
        assert storm["switchd_handshakes_rejected"] >= st["over_capacity_503"]
    assert cost["switchd_us_per_rejection"] is not None


def test_storm_has_help() -> None:
    done = subprocess.run([sys.executable, "-m", "perf.storm", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0
    for flag in ("--url", "--key", "--rate", "--duration", "--control-stdin"):
        assert flag in done.stdout


def test_metering_methods_did_the_same_work_and_the_scan_is_fooled(results: Path) -> None:
    metering = _load(results, "metering")["results"]
    assert {"production", "json.loads", "byte scan (forgeable)"} <= set(metering["us_per_frame"])
    assert metering["same_work_totals"]["reports"] > 0
    assert any(case["byte_scan_fooled"] for case in metering["forgery"])


def test_summary_lists_every_target(results: Path) -> None:
    summary = _load(results, "summary")["results"]
    assert summary["failed"] == []
    assert [row["target"] for row in summary["targets"]] == [t.name for t in targets.TARGETS]
    assert {row["status"] for row in summary["targets"]} <= {targets.MET, targets.NOT_MET, targets.NOT_MEASURED,
                                                             targets.REPORTED}
    # The relay's targets read the TLS path and show the plain one beside it.
    relay_rows = [row for row in summary["targets"] if row["benchmark"] == "relay"]
    assert relay_rows and all(row["measured"].startswith("TLS: ") and " | plain ws://: " in row["measured"]
                              for row in relay_rows)
    assert not any("unreadable" in row["measured"] for row in summary["targets"])


def test_load_generator_has_help() -> None:
    done = subprocess.run([sys.executable, "-m", "perf.load", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0
    for flag in ("--url", "--key", "--sessions", "--duration", "--rate", "--frame-ms"):
        assert flag in done.stdout


def test_engine_direct_run_is_complete() -> None:
    """The lean load engine alone (clients + peer, no switchd): every append echoed, every field there."""
    done = subprocess.run([sys.executable, "-m", "perf.engine", "--direct", "--sessions", "3", "--duration", "0.5",
                           "--warmup", "0.2", "--transcript-every", "5", "--response-every", "20", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["mode"] == "direct" and result["sessions_connected"] == 3 and result["connect_failed"] == 0
    assert result["lost"] == 0 and result["echoes_received"] == result["sent"] == result["peer"]["appends"] > 0
    assert result["other_received"] > 0  # session.created, transcripts, response.done reached the clients
    assert result["latency_ms"]["n"] > 0 and result["errors"] == {}
    assert result["cpu"]["engine"]["cpu_s"] is not None


def test_engine_direct_run_over_tls(tmp_path: Path) -> None:
    """The engine's peer serving TLS with a certificate made here, its clients trusting the CA: all echoed."""
    tls = make_certs(tmp_path)
    done = subprocess.run([sys.executable, "-m", "perf.engine", "--direct", "--sessions", "2", "--duration", "0.4",
                           "--warmup", "0.1", "--transcript-every", "5", "--response-every", "20", "--json",
                           *tls.peer_args()], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["sessions_connected"] == 2 and result["errors"] == {} and result["lost"] == 0
    assert result["echoes_received"] == result["sent"] == result["peer"]["appends"] > 0
    assert result["config"]["peer_cert"] == str(tls.chain)


def test_engine_clients_refuse_a_peer_they_do_not_trust(tmp_path: Path) -> None:
    """Without the CA a client fails its TLS handshake: counted as a failed connect with the reason, never a hang."""
    tls = make_certs(tmp_path / "served")
    other = make_certs(tmp_path / "other")
    done = subprocess.run([sys.executable, "-m", "perf.engine", "--direct", "--sessions", "1", "--duration", "0.2",
                           "--warmup", "0", "--json", "--peer-cert", str(tls.chain), "--peer-key", str(tls.key),
                           "--ca", str(other.ca)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["sessions_connected"] == 0 and result["connect_failed"] == 1
    # The client's reason, and the peer's: the alert the client sent it.
    assert result["errors"] == {"tls CERTIFICATE_VERIFY_FAILED": 1, "tls TLSV1_ALERT_UNKNOWN_CA": 1}


def test_engine_has_help() -> None:
    done = subprocess.run([sys.executable, "-m", "perf.engine", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0
    for flag in ("--url", "--direct", "--key", "--sessions", "--peer-fd", "--watch"):
        assert flag in done.stdout
