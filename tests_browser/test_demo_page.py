"""The demo page in a real browser: headless Chromium against the stack `make run` starts.

`python -m switchd.devrun` runs as a process (its daemons and the demo app server with it) on free
ports in a fresh directory; Chromium loads the printed page, which gets client secrets from the
app server, makes one WebSocket turn and one WebRTC call to the switch; the account pays for both.
Playwright's sync API runs in a worker thread (it brings its own asyncio loop); its waits are
bounded, so the thread always comes back. Chromium is the system's (CHROMIUM, else `chromium`):
no browser is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from playwright.sync_api import sync_playwright

from tests.daemons import BIN, base_env, start_make_run

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # A microphone that beeps, granted without asking.
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    # Real host candidates: aiortc (the simulator's peer) cannot resolve Chromium's mDNS names.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
TURN_TIMEOUT_MS = 60_000


@asynccontextmanager
async def make_run(tmp: Path) -> AsyncIterator[str]:
    """`make run` in `tmp` (its ./var): the output up to the ready line; Ctrl-C (SIGINT to the group) after."""
    proc, out = await start_make_run(tmp)
    assert proc.stdout is not None
    try:
        yield out.decode()
        os.killpg(proc.pid, signal.SIGINT)
        with trio.fail_after(60):
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
            assert await proc.wait() == 0, out.decode()
        assert b"stopped" in out
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def drive_page(url: str, profile: Path) -> dict[str, Any]:
    """Both buttons, one after the other; what the page showed (blocking: run in a thread)."""
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: install it (apt-get install chromium) or set CHROMIUM"
    console: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.goto(url)
            shown: dict[str, Any] = {}
            for which in ("ws", "rtc"):
                page.click(f"#{which}-run")
                status = f"#{which}-status"
                page.wait_for_selector(f'{status}[data-state="done"], {status}[data-state="error"]',
                                       timeout=TURN_TIMEOUT_MS)
                assert page.get_attribute(status, "data-state") == "done", (
                    page.text_content(status), page.text_content("#log"), console)
                shown[which] = {"tokens": int(page.get_attribute(status, "data-tokens") or 0),
                                "session": page.get_attribute(status, "data-session")}
            shown["log"] = page.text_content("#log") or ""
            shown["html"] = page.content()
            return shown
        finally:
            context.close()


async def switchdb(tmp: Path, *args: str) -> Any:
    env = base_env(DB_PATH=str(tmp / "var" / "switch.db"))
    done = await trio.run_process([str(BIN / "switchdb"), *args, "--json"], env=env, cwd=tmp, capture_stdout=True)
    return json.loads(done.stdout)


async def test_the_demo_page_makes_a_websocket_turn_and_a_webrtc_call_and_the_account_pays(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with make_run(tmp_path) as out:
            page_url = re.search(r"Or in a browser.*?:\s+(http://\S+)", out).group(1)  # type: ignore[union-attr]
            key = (tmp_path / "var" / "demo-key").read_text().strip()
            assert key.startswith("rsk_")
            account = (await switchdb(tmp_path, "seed", "--key-file", str(tmp_path / "var" / "demo-key")))["account_id"]
            before = (await switchdb(tmp_path, "account", "show", account))["credits"]

            shown = await trio.to_thread.run_sync(drive_page, page_url, tmp_path / "chromium-profile")

            assert key not in shown["html"] and key not in shown["log"]  # the page never holds the rsk_ key
            assert "ws response.done" in shown["log"] and "rtc session.created" in shown["log"]
            assert "rtc response.done" in shown["log"]
            assert shown["ws"]["tokens"] > 0 and shown["rtc"]["tokens"] > 0
            # Both sessions are billed: the WebSocket one by the relay, the call through the sideband.
            # The fake microphone may set off the simulator's VAD: more responses, never fewer.
            while True:
                usage = await switchdb(tmp_path, "usage", "--account", account, "--by", "session")
                billed = {group["session"]: group["total_tokens"] for group in usage["groups"]}
                if all(billed.get(shown[w]["session"], 0) >= shown[w]["tokens"] for w in ("ws", "rtc")):
                    break
            after = (await switchdb(tmp_path, "account", "show", account))["credits"]
            assert after == before - usage["total_tokens"] < before
    log = (tmp_path / "var" / "demo.log").read_text()
    assert key not in log and "ek_" not in log  # the app server logs neither the key nor a secret
