"""The end-to-end tests start the real daemons with the same launcher as the benchmarks."""
from perf.procs import BIN, Daemon, base_env, daemon

__all__ = ["BIN", "Daemon", "base_env", "daemon"]
