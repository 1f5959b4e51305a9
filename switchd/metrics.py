"""Counters for /metrics (Prometheus text format) and the tiny HTTP server for /metrics and /healthz.

The server binds METRICS_HOST (loopback by default: neither page has any auth), and /healthz
answers from a PING to switchdb at most once a second, however often it is asked.
"""
from __future__ import annotations

import bisect
import logging
import attrs
import trio

from common.dbclient import DbClient
from common.errors import SwitchError
from common.wire import MessageType
from switchd.accept import ResourceAlarm, serve_accepting

log = logging.getLogger(__name__)

RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HEALTH_TIMEOUT_S = 1.0
HEALTH_CACHE_S = 1.0


@attrs.define
class Metrics:
    sessions_open: int = 0
    sessions_total: int = 0
    sessions_rejected: int = 0
    frames_in: int = 0  # client → upstream
    frames_out: int = 0  # upstream → client
    bytes_in: int = 0
    bytes_out: int = 0
    tokens_metered: int = 0
    credit_cutoffs: int = 0
    # USD accounts' reports as switchd prices them (token accounts are not priced here): at list
    # price, and at the accounts' prices (× markup). Totals only: per account would be unbounded.
    cost_nano_usd: int = 0
    charged_nano_usd: int = 0
    upstream_reconnects: int = 0
    usage_batches_spooled: int = 0
    rtt_counts: list[int] = attrs.Factory(lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_counts[bisect.bisect_left(RTT_BUCKETS, seconds)] += 1
        self.rtt_sum += seconds

    def render(self) -> str:
        lines = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("switch_sessions_open", "gauge", "Client sessions open now.", [("", self.sessions_open)])
        metric("switch_sessions_total", "counter", "Client sessions accepted.", [("", self.sessions_total)])
        metric("switch_sessions_rejected_total", "counter", "Handshakes rejected.", [("", self.sessions_rejected)])
        metric("switch_frames_relayed_total", "counter", "Frames relayed.",
               [('{direction="client_to_upstream"}', self.frames_in),
                ('{direction="upstream_to_client"}', self.frames_out)])
        metric("switch_bytes_relayed_total", "counter", "Payload characters relayed.",
               [('{direction="client_to_upstream"}', self.bytes_in),
                ('{direction="upstream_to_client"}', self.bytes_out)])
        metric("switch_tokens_metered_total", "counter", "Tokens metered from provider usage reports.",
               [("", self.tokens_metered)])
        metric("switch_cost_nano_usd_total", "counter",
               "Cost at list price of the usage reports of USD accounts, in nano-USD.", [("", self.cost_nano_usd)])
        metric("switch_charged_nano_usd_total", "counter",
               "What USD accounts were charged for their usage reports (list price x markup), in nano-USD.",
               [("", self.charged_nano_usd)])
        metric("switch_credit_cutoffs_total", "counter", "Sessions cut off for lack of credits.",
               [("", self.credit_cutoffs)])
        metric("switch_upstream_reconnects_total", "counter", "Upstream reconnect attempts.",
               [("", self.upstream_reconnects)])
        metric("switch_usage_batches_spooled_total", "counter", "Usage batches left in the journal for the next start.",
               [("", self.usage_batches_spooled)])
        cumulative, samples = 0, []
        for bound, count in zip((*RTT_BUCKETS, float("inf")), self.rtt_counts, strict=True):
            cumulative += count
            samples.append((f'{{le="{"+Inf" if bound == float("inf") else bound}"}}', cumulative))
        lines.append("# HELP switch_switchdb_rtt_seconds Round trip of requests to switchdb.")
        lines.append("# TYPE switch_switchdb_rtt_seconds histogram")
        lines.extend(f"switch_switchdb_rtt_seconds_bucket{labels} {value}" for labels, value in samples)
        lines.append(f"switch_switchdb_rtt_seconds_sum {self.rtt_sum}")
        lines.append(f"switch_switchdb_rtt_seconds_count {cumulative}")
        return "\n".join(lines) + "\n"


class Health:
    """switchdb's answer to a PING, kept for HEALTH_CACHE_S; one PING in flight at a time."""

    def __init__(self, db: DbClient) -> None:
        self.db = db
        self.pings = 0
        self._lock = trio.Lock()
        self._answer: str | None = None  # None: healthy; else the error code
        self._at = -float("inf")

    async def check(self) -> str | None:
        async with self._lock:
            if trio.current_time() - self._at >= HEALTH_CACHE_S:
                self.pings += 1
                try:
                    await self.db.request(MessageType.PING, timeout_s=HEALTH_TIMEOUT_S)
                    self._answer = None
                except SwitchError as exc:
                    self._answer = str(exc.code)
                self._at = trio.current_time()
            return self._answer


async def _respond(stream: trio.abc.Stream, metrics: Metrics, health: Health) -> None:
    request = b""
    with trio.move_on_after(5):
        try:
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)  # a reset scraper must not end the daemon
            return
    path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
    if path == b"/metrics":
        status, body, kind = "200 OK", metrics.render(), "text/plain; version=0.0.4"
    elif path == b"/healthz":
        error = await health.check()
        status, body = ("200 OK", "ok\n") if error is None else ("503 Service Unavailable", f"{error}\n")
        kind = "text/plain"
    else:
        status, body, kind = "404 Not Found", "not found\n", "text/plain"
    data = body.encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    try:
        await stream.send_all(head.encode() + data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    host: str, port: int, metrics: Metrics, db: DbClient, *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    health = Health(db)
    alarm = ResourceAlarm("accepting a /metrics request")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_accepting, lambda s: _respond(s, metrics, health), listeners, alarm)
        task_status.started(listeners[0].socket.getsockname()[1])
