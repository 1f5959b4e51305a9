"""switchd's edges, pure parts: redaction, the request-head checks, config validation, the
resource alarm, the handshake timeout (on trio's virtual clock), stopping on signals."""
from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from common.config import Settings, load_settings
from common.errors import ErrorCode, SwitchError
from common.logs import escape_controls
from switchd.accept import ResourceAlarm
from switchd.handshake import check_request_head, redact
from switchd.metrics import Metrics
from switchd.server import HANDSHAKE_TIMEOUT_S, Stop, handle, serve

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# --- the key never reaches a log line, and neither do control characters -------------------

# Every key holds a Z, which nothing else in the target does: a Z in the output is a leak.
keys = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~!$'()*,:@/?#=",
               max_size=64).map(lambda s: "rsk_Z" + s)
names = st.sampled_from(["rs_key", "RS_KEY", "rs%5Fkey", "rs%5fkey", "Rs_Key", " rs_key"])


@given(st.text(st.characters(blacklist_characters="Z"), max_size=40), st.sampled_from("?#&;/"), names, keys,
       st.sampled_from(["", "&", ";", "&rs_sessid=s", " x"]))
def test_redact_hides_the_key_wherever_it_sits(prefix: str, sep: str, name: str, key: str, suffix: str) -> None:
    target = f"{prefix}{sep}{name}={key}{suffix}"
    shown = redact(target)
    assert "Z" not in shown
    assert not CONTROL.search(shown)


@pytest.mark.parametrize("target", ["/#?rs_key=rsk_SECRETSECRET", "/v1/realtime#x?rs_key=rsk_SECRETSECRET&rs_sessid=s",
                                    "/?rs_sessid=s#rs_key=rsk_SECRETSECRET", "/rs_key=rsk_SECRETSECRET",
                                    "/?a=1;rs_key=rsk_SECRETSECRET", "/?rs%5Fkey=rsk_SECRETSECRET"])
def test_redact_examples(target: str) -> None:
    assert "SECRETSECRET" not in redact(target)
    assert "rs_sessid=s" in redact("/?rs_key=k&rs_sessid=s")  # the rest stays readable


@given(st.text())
def test_redact_and_log_escaping_leave_no_control_character(text: str) -> None:
    assert not CONTROL.search(redact(text))
    assert not CONTROL.search(escape_controls(text))


def test_control_characters_are_escaped_visibly() -> None:
    assert redact("/\x1b[2J\x07x?y=1") == "/\\x1b[2J\\x07x?y=1"


# --- the request head -------------------------------------------------------------------------

GOOD = [(b"host", b"x"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade")]


@pytest.mark.parametrize(
    "start,headers",
    [
        ("GET / HTTP/1.0", GOOD),
        ("GET / HTTP/2.0", GOOD),
        ("GET / HTTP/1.1", [*GOOD, (b"content-length", b"5"), (b"transfer-encoding", b"chunked")]),
        ("GET / HTTP/1.1", [*GOOD, (b"transfer-encoding", b"chunked")]),
        ("GET / HTTP/1.1", [*GOOD, (b"content-length", b"12")]),
        ("GET / HTTP/1.1", [*GOOD, (b"x-a", b"b\x00c")]),
        ("GET / HTTP/1.1", [*GOOD, (b"x-\x00", b"c")]),
        ("GET /\x00 HTTP/1.1", GOOD),
    ],
)
def test_bad_request_heads_are_400(start: str, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(SwitchError) as exc:
        check_request_head(start, headers)
    assert exc.value.code == ErrorCode.EXTERNAL_BAD_PARAMS


def test_good_request_head_passes() -> None:
    check_request_head("GET /v1/realtime?rs_sessid=s HTTP/1.1", GOOD)
    check_request_head("GET / HTTP/1.1", [*GOOD, (b"content-length", b"0")])


@given(st.text(max_size=60), st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=6))
def test_request_head_check_only_raises_switch_error(start: str, headers: list[tuple[bytes, bytes]]) -> None:
    try:
        check_request_head(start, headers)
    except SwitchError as exc:
        assert exc.code == ErrorCode.EXTERNAL_BAD_PARAMS
    else:
        assert start.endswith(" HTTP/1.1") and not any(b"\x00" in n + v for n, v in headers)


# --- config -----------------------------------------------------------------------------------

BASE = {"ZMQ_SOCKET_PATH": "ipc:///tmp/x.sock", "UPSTREAM_URL": "ws://127.0.0.1:9/v1/realtime"}


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"PORT": "69464"}, "PORT"),
        ({"PORT": "-1"}, "PORT"),
        ({"METRICS_PORT": "65536"}, "METRICS_PORT"),
        ({"UPSTREAM_URL": "ws://127.0.0.1:99999/v1"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "ws://127.0.0.1:0/v1"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "ws://127.0.0.1:http/v1"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "https://api.example.test/v1", "OPENAI_API_KEY": "sk"}, "UPSTREAM_URL"),
        ({"UPSTREAM_URL": "wss:///v1", "OPENAI_API_KEY": "sk"}, "UPSTREAM_URL"),
        ({"TLS_CERT_FILE": "/x/cert.pem"}, "TLS_CERT_FILE"),
        ({"TLS_KEY_FILE": "/x/key.pem"}, "TLS_KEY_FILE"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(extra: dict[str, str], key: str) -> None:
    with pytest.raises(SwitchError) as exc:
        load_settings("switchd", {**BASE, **extra}, env_file=Path("/nonexistent/.env"))
    assert exc.value.code == ErrorCode.INTERNAL_BAD_CONFIG and key in exc.value.message


def test_edge_config_values_are_accepted() -> None:
    s = load_settings("switchd", {**BASE, "PORT": "65535", "METRICS_PORT": "0", "METRICS_HOST": "0.0.0.0",
                                  "TLS_CERT_FILE": "c.pem", "TLS_KEY_FILE": "k.pem"}, env_file=Path("/nonexistent"))
    assert (s.port, s.metrics_port, s.metrics_host, s.tls_cert_file) == (65535, 0, "0.0.0.0", "c.pem")
    assert Settings().metrics_host == "127.0.0.1"


# --- the resource alarm: one line per interval, with the count ----------------------------------


async def test_resource_failures_are_logged_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchd.accept")
    alarm = ResourceAlarm("accepting a client", interval=10.0)
    exc = OSError(errno.EMFILE, "Too many open files")
    async with trio.open_nursery() as nursery:
        await nursery.start(alarm.run)
        for _ in range(250):  # 25 s of failures, one every 0.1 s
            alarm.failed(exc)
            await trio.sleep(0.1)  # virtual time (autojump clock)
        await trio.sleep(20)  # virtual time (autojump clock)
        alarm.failed(exc)  # a new bout: logged at once again
        await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6, lines  # at 0, 10, 20 and 30 s, "working again" at 40 s, the new bout
    assert all("EMFILE" in line for line in lines[:4]) and not any(r.exc_info for r in caplog.records)
    counts = [int(re.search(r"(\d+) failure", line).group(1)) for line in lines[:4]]  # type: ignore[union-attr]
    assert counts[0] == 1 and 95 <= counts[1] <= 105 and sum(counts) == 250  # every failure counted once
    assert "working again" in lines[4] and "1 failure(s)" in lines[5]


# --- a slow or half-open handshake is cut at the timeout ----------------------------------------


def _switch(max_sessions: int = 1) -> SimpleNamespace:
    # Everything handle() reads before a session starts; the path under test never reaches the rest.
    return SimpleNamespace(metrics=Metrics(), settings=Settings(max_sessions=max_sessions))


@pytest.mark.parametrize("dribble", [False, True])
async def test_half_open_handshake_is_cut_at_the_timeout(autojump_clock: trio.testing.MockClock, dribble: bool) -> None:
    client, server = trio.testing.memory_stream_pair()
    switch = _switch()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, switch, server)
        await client.send_all(b"GET /v1/realtime?rs_key=k&rs_sessid=s HTTP/1.1\r\nHost: x\r\n")
        if dribble:  # a byte a second: every read succeeds, the whole handshake still has one deadline
            for _ in range(int(HANDSHAKE_TIMEOUT_S) * 3):
                try:
                    await client.send_all(b"X")
                except trio.BrokenResourceError:
                    break
                await trio.sleep(1)  # virtual time (autojump clock)
        answer = b""
        while chunk := await client.receive_some():
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 426")
    assert HANDSHAKE_TIMEOUT_S <= trio.current_time() - start < HANDSHAKE_TIMEOUT_S + 1.5
    assert switch.metrics.sessions_open == 0  # never held a MAX_SESSIONS slot


async def test_request_head_refusals_answer_400(autojump_clock: trio.testing.MockClock) -> None:
    for head in (b"GET /?rs_key=k&rs_sessid=s HTTP/1.0\r\nUpgrade: websocket\r\n\r\n",
                 b"GET /?rs_sessid=s HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET /?rs_sessid=s HTTP/1.1\r\nX-A: a\x00b\r\n\r\n"):
        client, server = trio.testing.memory_stream_pair()
        switch = _switch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle, switch, server)
            await client.send_all(head)
            answer = b""
            while chunk := await client.receive_some():
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400") and answer.endswith(b"EXTERNAL_BAD_PARAMS")
        assert switch.metrics.sessions_rejected == 1


# --- signals ------------------------------------------------------------------------------------


def test_second_signal_hurries_and_never_more() -> None:
    stop = Stop()
    stop.signal("SIGINT")
    assert stop.requested.is_set() and not stop.hurried.is_set()
    stop.signal("SIGTERM")
    stop.signal("SIGTERM")
    assert stop.hurried.is_set()


async def test_serve_stops_cleanly_when_the_second_signal_came_first(tmp_path: Path) -> None:
    # Both signals before serve got as far as listening: the sessions are cut before the
    # shutdown's own steps ran, and the shutdown must still complete.
    stop = Stop()
    stop.signal("SIGTERM")
    stop.signal("SIGTERM")
    settings = Settings(zmq_socket_path=f"ipc://{tmp_path}/nobody.sock", port=0, metrics_port=0,
                        spool_dir=str(tmp_path / "spool"), upstream_url="ws://127.0.0.1:9/v1/realtime",
                        shutdown_grace=60)
    with trio.fail_after(10):
        await serve(settings, stop=stop)
