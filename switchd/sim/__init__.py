"""switchd-sim: an OpenAI Realtime (GA) look-alike on loopback for development, tests and load tests."""
from switchd.sim.server import SimOptions, serve

__all__ = ["SimOptions", "serve"]
