"""`python -m perf.results [--results-dir DIR] [--out FILE]`: perf/RESULTS.md from perf/results/*.json.

The figures of the last `make perf` as Markdown, written whole from the JSON the benchmarks left
(the summary of targets, the relay on both upstream paths, each other benchmark's headline
fields, the machine and the commit). `make perf` runs it at the end; never edit the output by
hand. The hand-written story of earlier runs is perf/HISTORY.md.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perf.bench_relay import RELAY_NAMES, SIDE_BY_SIDE_TITLE, UPSTREAMS, capacity_text, side_by_side
from perf import targets
from perf.report import DEFAULT_RESULTS, fmt

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
# The order the suite runs them in; any other result file follows, by name.
ORDER = ("summary", "relay", "overload", "connect", "metering", "usage", "switchdb")


def load(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every `<name>.json` envelope in `results_dir`, by name; unreadable files are skipped."""
    found = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    def cell(value: Any) -> str:
        return fmt(value, digits).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalars(data: dict[str, Any], prefix: str = "", depth: int = 1) -> list[list[Any]]:
    """The numbers and short strings of a result, nested dicts flattened `depth` levels deep."""
    rows: list[list[Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, (int, float, str, bool)) or value is None:
            if not isinstance(value, str) or len(value) <= 80:
                rows.append([name, value])
        elif isinstance(value, dict) and depth > 0:
            rows += _scalars(value, f"{name}.", depth - 1)
    return rows


def _envelope_line(env: dict[str, Any]) -> str:
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (with local changes)" if git.get("dirty") else "")
    return f"mode `{env.get('mode')}`, started {env.get('started_at')}, {fmt(env.get('duration_s'), 0)} s, " \
           f"commit {commit}"


def _relay_section(env: dict[str, Any]) -> list[str]:
    r = env["results"]
    if "error" in r:
        return ["The relay benchmark failed:", "", "```", r["error"][-2000:], "```"]
    out = [md_table(["measure", *UPSTREAMS], side_by_side(r)), ""]
    for kind in UPSTREAMS:
        path = r.get(kind)
        if not path:
            continue
        out += [f"### Upstream over {'TLS (wss://)' if kind == 'tls' else 'plain ws://'}", ""]
        c = path["closed_loop"]
        ws = c["websockets_relay"]
        bare = c["bare_proxies"]
        out += ["(a) One session, closed loop, 1 KB frames: round trip.", "",
                md_table(["path", "p50 ms", "added p50 µs"],
                         [["direct", c["p50_ms"]["direct"], 0.0],
                          ["through switchd", c["p50_ms"]["through"], c["added_median_rtt_us"]],
                          ["asyncio + websockets relay", ws["p50_ms"], ws["added_p50_us"]],
                          ["bare Trio TCP proxy", bare["floor"]["p50_ms"], bare["floor"]["added_p50_us"]],
                          ["blocking threads TCP proxy", bare["threads"]["p50_ms"], bare["threads"]["added_p50_us"]]],
                         digits=3), ""]
        f = path.get("pipelined")
        if f:
            rows = [["direct", f["frames_per_s"]["direct"], 1.0],
                    ["through switchd", f["frames_per_s"]["through"], f["frames_per_s"]["ratio"]]]
            rows += [[f"through the {RELAY_NAMES.get(name, name)}", x["frames_per_s"], x["ratio_to_direct"]]
                     for name, x in (f.get("relays") or {}).items()]
            out += [f"(b) One session, pipelined ({f['window']} in flight), 1 KB frames.", "",
                    md_table(["path", "frames/s", "× direct"], rows), ""]
        out += ["(c) Realtime sessions (50 appends of 20 ms a second each).", "",
                md_table(["N", "direct p99 ms", "through p99 ms", "+p50 ms", "+p99 ms", "+p99.9 ms", "lost",
                          "switchd % core", "switchd µs/msg", "holds"],
                         [[p["sessions"], (p["latency_ms"]["direct"] or {}).get("p99"),
                           (p["latency_ms"]["through"] or {}).get("p99"), p["added_ms"]["p50"], p["added_ms"]["p99"],
                           p["added_ms"]["p99.9"], p["lost"]["through"], p["switchd_cpu_pct_of_core"],
                           p["switchd_us_per_relayed_message"], "yes" if p["holds"] else "no"]
                          for p in path["realtime"]]), ""]
        cap = path.get("capacity")
        if cap:
            out += [f"(d) Capacity: {capacity_text(cap)} sessions per switchd process ({cap['criterion']}).", ""]
        fl = path.get("floor")
        if fl:
            out += [f"(e) In switchd's place, {fl['sessions']} realtime sessions and a closed loop.", "",
                    md_table(["relay", "closed p50 ms", "realtime p99 ms", "lost", "µs/msg", "user µs", "sys µs"],
                             [[name, x["closed_p50_ms"], (x["realtime_latency_ms"] or {}).get("p99"), x["lost"],
                               x["us_per_relayed_message"], x.get("user_us_per_relayed_message"),
                               x.get("system_us_per_relayed_message")]
                              for name, x in (("switchd", fl["switchd"]), ("asyncio + websockets relay",
                                                                           fl.get("websockets")),
                                              ("bare Trio TCP proxy", fl["floor"]),
                                              ("blocking threads TCP proxy", fl["threads"])) if x], digits=3), ""]
            if fl.get("floor_capacity"):
                out += ["The bare Trio TCP proxy's own capacity in switchd's place, by (d)'s search and limits: "
                        f"{capacity_text(fl['floor_capacity'])} sessions.", ""]
        w = path.get("workers")
        if w:
            out += [f"(f) WORKERS={w['workers']}: {w['sessions']} sessions "
                    f"({'/'.join(map(str, w['sessions_per_worker']))} per worker), {fmt(w['us_per_relayed_message'])}"
                    f" µs per message against {fmt(w['one_process_us_per_relayed_message'])} for one process "
                    f"(×{fmt(w['ratio_us_per_message'])}); {w['lost']} lost.", ""]
        m = path.get("memory")
        if m:
            out += [f"Memory ({m['sessions']} sessions, switchd's RSS): {fmt(_kib(m['idle_bytes_per_session']), 1)} "
                    f"KiB per idle session, {fmt(_kib(m['partial_frame_bytes_per_session']), 1)} KiB per session "
                    f"holding a {fmt(m['max_payload_length'])}-byte frame but its last byte "
                    f"({m['sessions_open_while_holding']} of {m['sessions']} sessions still open then).", ""]
    return out


def _kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def render(found: dict[str, dict[str, Any]]) -> str:
    out = ["# Benchmark results", "",
           "Generated by `python -m perf.results` (run at the end of `make perf`) from `perf/results/*.json`: "
           "do not edit by hand. What earlier runs measured, and why the code changed, is in `perf/HISTORY.md`.",
           ""]
    summary = found.get("summary")
    anyone = summary or next(iter(found.values()), None)
    if anyone is None:
        return "\n".join(out + ["No results: run `make perf` first.", ""])
    machine, python, libs = anyone.get("machine") or {}, anyone.get("python") or {}, anyone.get("libraries") or {}
    out += [f"Machine: {machine.get('cpu_model')}, {machine.get('cores')} cores "
            f"({machine.get('usable_cores')} usable), "
            f"{machine.get('platform')}; Python {python.get('version')}; "
            + ", ".join(f"{k} {v}" for k, v in libs.items() if v) + ".", ""]
    # Judged again from every benchmark's own file, so a run of a few benchmarks leaves the others' standing.
    rows = targets.evaluate({name: env.get("results") for name, env in found.items()
                             if name != "summary" and "error" not in (env.get("results") or {})})
    out += ["## Targets", ""]
    if summary is not None:
        out += [f"Last suite run: {_envelope_line(summary)}; each benchmark's own run is under its heading.", ""]
    out += [md_table(["target", "goal", "measured", "status"],
                     [[t["target"], t["goal"], t["measured"], t["status"]] for t in rows]), ""]
    if summary is not None:
        out += [f"- {note}" for note in summary.get("notes", [])] + [""]
    for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        if name == "summary":
            continue
        env = found[name]
        out += [f"## {name}", "", _envelope_line(env) + ".", ""]
        if name == "relay":
            out += [SIDE_BY_SIDE_TITLE + ".", ""] + _relay_section(env)
        elif "error" in env.get("results", {}):
            out += ["Failed:", "", "```", str(env["results"]["error"])[-2000:], "```", ""]
        else:
            out += [md_table(["field", "value"], _scalars(env.get("results", {}))), ""]
        out += [f"- {note}" for note in env.get("notes", [])] + [""]
    return "\n".join(out)


def write(results_dir: Path, out: Path) -> Path:
    out.write_text(render(load(results_dir)))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m perf.results", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    print(write(args.results_dir, args.out))


if __name__ == "__main__":
    main()
