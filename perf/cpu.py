"""CPU accounting from /proc: per process (user and kernel time apart) and the whole machine.

No trio here: the lean load engine (perf.engine) samples with it from inside its epoll loop.
The user/kernel split matters on loopback: a ~1.3 KB TCP write costs the writer tens of µs of
kernel time, so "system" is mostly the TCP stack and "user" mostly Python.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None when the process is gone or not on Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    return text[text.rindex(")") + 2 :].split()


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process from /proc/<pid>/stat; None when it is gone or not on Linux."""
    rest = stat_fields(pid)
    if rest is None:
        return None
    return int(rest[11]) / CLOCK_TICKS, int(rest[12]) / CLOCK_TICKS


def machine_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of all cores since boot (/proc/stat).

    Busy excludes steal: on a VM, steal is time the hypervisor ran something else on our vCPUs.
    It is no process's work here, but it shows as latency, so it is reported on its own.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuWindow:
    """CPU used by some processes and by the machine between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, tuple[float, float] | None] = {}
        self._machine: tuple[float, float] | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._before = {n: cpu_times(p) for n, p in self.pids.items()}
        self._machine = machine_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        # The real span between the two snapshots, not the nominal window: a late sample stays honest.
        span = max(1e-9, time.perf_counter() - self._t0)
        out: dict[str, Any] = {}
        ours = 0.0
        for name, pid in self.pids.items():
            after, before = cpu_times(pid), self._before.get(name)
            if before is None or after is None:
                out[name] = None
                continue
            user, system = after[0] - before[0], after[1] - before[1]
            ours += user + system
            out[name] = {"pid": pid, "cpu_s": user + system, "user_s": user, "system_s": system,
                         "pct_of_one_core": 100 * (user + system) / span}
        after = machine_seconds()
        if after is not None and self._machine is not None:
            busy, steal = after[0] - self._machine[0], after[1] - self._machine[1]
            # Everything else on the machine (other users' work, the kernel's softirq share) in the window.
            out["machine"] = {"busy_cores": busy / span, "others_cores": max(0.0, (busy - ours) / span),
                              "steal_cores": steal / span, "cores": os.cpu_count(), "span_s": span}
        return out
