"""switchd-sim over `wss://`: a certificate from a CA made here (trustme), in process and as the CLI daemon."""
from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from switchd.sim import SimOptions, serve
from switchd.sim.server import tls_context
from tests.daemons import BIN, base_env, daemon

PATH = "/v1/realtime?model=gpt-realtime"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pem_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(ca.pem, chain.pem, key.pem): the CA to trust, and the simulator's certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    with open(d / "chain.pem", "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return d / "ca.pem", d / "chain.pem", d / "key.pem"


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def tls_sim(pem_files: tuple[Path, Path, Path], **options: bool) -> AsyncIterator[int]:
    _, chain, key = pem_files
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve, "127.0.0.1", 0, options=SimOptions(**options),
                                           ssl_context=tls_context(str(chain), str(key))))
        yield port
        nursery.cancel_scope.cancel()


async def test_sim_serves_wss_to_a_client_that_trusts_its_ca(ca: trustme.CA,
                                                            pem_files: tuple[Path, Path, Path]) -> None:
    with trio.fail_after(20):
        async with tls_sim(pem_files) as port, \
                open_websocket_url(f"wss://127.0.0.1:{port}{PATH}", client_context(ca)) as ws:
            first = json.loads(await ws.get_message())
            assert first["type"] == "session.created" and first["session"]["model"] == "gpt-realtime"
            await ws.send_message('{"type":"input_audio_buffer.clear"}')
            assert json.loads(await ws.get_message())["type"] == "input_audio_buffer.cleared"


async def test_an_untrusting_client_fails_cleanly_and_the_sim_keeps_serving(ca: trustme.CA,
                                                                          pem_files: tuple[Path, Path, Path]) -> None:
    with trio.fail_after(20):
        async with tls_sim(pem_files, echo=True) as port:
            # A client that does not trust the CA refuses the certificate: a verification error, not a hang.
            with pytest.raises(trio.BrokenResourceError) as refused:
                stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                             ssl_context=ssl.create_default_context())
                await stream.do_handshake()
            assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
            async with open_websocket_url(f"wss://127.0.0.1:{port}{PATH}", client_context(ca)) as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"


async def test_cli_serves_wss_with_a_certificate(ca: trustme.CA, pem_files: tuple[Path, Path, Path],
                                                tmp_path: Path) -> None:
    _, chain, key = pem_files
    with trio.fail_after(30):
        async with daemon(["switchd-sim", "--port", "0", "--fast", "--tls-cert", str(chain), "--tls-key", str(key)],
                          base_env(), tmp_path / "sim.log") as d:
            assert d.ready_line.startswith("switchd-sim listening wss://127.0.0.1:")
            async with open_websocket_url(d.address + PATH, client_context(ca)) as ws:
                assert json.loads(await ws.get_message())["type"] == "session.created"


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "{chain}"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "{key}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{missing}", "--tls-key", "{key}"], "cannot use --tls-cert/--tls-key"),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "cannot use --tls-cert/--tls-key"),  # a key is not a certificate
])
async def test_cli_refuses_an_incomplete_or_unreadable_certificate(pem_files: tuple[Path, Path, Path],
                                                                   tmp_path: Path, flags: list[str],
                                                                   message: str) -> None:
    _, chain, key = pem_files
    argv = [f.format(chain=chain, key=key, missing=tmp_path / "missing.pem") for f in flags]
    with trio.fail_after(30):
        done = await trio.run_process([str(BIN / "switchd-sim"), "--port", "0", *argv], env=base_env(),
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode != 0 and b"listening" not in done.stdout
    assert message in done.stderr.decode()


def test_tls_context_rejects_a_key_that_does_not_match(ca: trustme.CA, pem_files: tuple[Path, Path, Path],
                                                        tmp_path: Path) -> None:
    _, chain, _ = pem_files
    other = ca.issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    with pytest.raises(ssl.SSLError):
        tls_context(str(chain), str(tmp_path / "other-key.pem"))
