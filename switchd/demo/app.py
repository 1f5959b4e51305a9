"""The demo's example app server: what a real app runs next to the switch, in a few lines.

`python -m switchd.demo.app --switch ws://127.0.0.1:3000 --key-file var/demo-key [--port 0]`

It holds the account's long-lived `rsk_` key (read from a file, never from argv, which `ps`
shows) and never hands it out. `GET /` serves one static page; `POST /session` mints a
short-lived client secret at the switch (`POST /v1/realtime/client_secrets`, Bearer rsk_) and
returns `{"value", "expires_at"}`, which the page uses for its WebSocket and WebRTC sessions.

Prints one ready line, `switchd-demo listening http://HOST:PORT`; SIGTERM or SIGINT stops it.
The stdlib's threaded HTTP server is enough here: one page, one user, and blocking calls to the
switch only hold up the thread of the request that made them.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from common.logs import setup_logging

log = logging.getLogger("switchd.demo")

PAGE = Path(__file__).with_name("page.html")
SECRET_SECONDS = 600
SWITCH_TIMEOUT_S = 10.0
# What the app decides for the page, server-side: a browser cannot widen it (see the README).
SECRET_REQUEST = {
    "expires_after": {"anchor": "created_at", "seconds": SECRET_SECONDS},
    "session": {"type": "realtime", "instructions": "You are the Realtime Switch demo. Be brief."},
}


def http_base(switch_url: str) -> str:
    """The switch's HTTP base URL from its WebSocket one (the same port serves both)."""
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if switch_url.startswith(ws):
            return http + switch_url[len(ws):].rstrip("/")
    return switch_url.rstrip("/")


def mint_secret(switch_url: str, key: str) -> tuple[int, bytes]:
    """(status, JSON body) of the switch's answer; its errors are passed on to the page as they are."""
    request = urllib.request.Request(
        http_base(switch_url) + "/v1/realtime/client_secrets",
        data=json.dumps(SECRET_REQUEST).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=SWITCH_TIMEOUT_S) as response:
            body = json.loads(response.read())
            # Only what the page needs: the secret and when it ends.
            return response.status, json.dumps({"value": body["value"], "expires_at": body["expires_at"]}).encode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError, KeyError) as exc:
        log.warning("the switch could not mint a client secret: %s", type(exc).__name__)
        message = {"error": {"message": "the switch is unreachable", "type": "server_error", "code": None}}
        return 502, json.dumps(message).encode()


def make_handler(switch_url: str, key: str) -> type[BaseHTTPRequestHandler]:
    page = PAGE.read_text(encoding="utf-8").replace("{{SWITCH_URL}}", html.escape(switch_url, quote=True)).encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "switchd-demo"

        def do_GET(self) -> None:  # the stdlib's names
            if self.path.split("?", 1)[0] in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page)
            else:
                self._send(404, "text/plain", b"not found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)  # the page's body is not used: the app decides the session
            if self.path != "/session":
                self._send(404, "text/plain", b"not found")
                return
            status, body = mint_secret(switch_url, key)
            log.info("client secret for the page: %d", status)  # never the secret, never the key
            self._send(status, "application/json", body)

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")  # a secret must not be cached
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="switchd-demo", description="the demo page's example app server")
    parser.add_argument("--switch", required=True, help="the switch's URL, ws://HOST:PORT")
    parser.add_argument("--key-file", required=True, type=Path, help="a file holding the account's rsk_ key")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 (default) picks a free one")
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # out of serve_forever, in the main thread, which the handler runs on


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    key = args.key_file.read_text(encoding="utf-8").strip()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.switch, key))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    sys.stdout.write(f"switchd-demo listening http://{url_host}:{server.server_address[1]}\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        log.info("stopped")


if __name__ == "__main__":
    main()
