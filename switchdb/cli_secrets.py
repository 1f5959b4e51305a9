"""`switchdb secret list|revoke`: an operator's view of the client secrets (`ek_…`, issue 17).

A secret is named by its id (the sha256 hex of its plaintext, which is never stored: what
`secret list` shows) or by the plaintext itself, e.g. one that leaked. Revoking one refuses it
from now on; the sessions and calls it opened end at their next check (CHECK_SECRET, every 5 s).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from switchdb import cli_ledger, secrets
from switchdb.db import Connection, transaction, utc_now


def _text(secret: secrets.SecretInfo, now: str) -> str:
    state = secret.state(now)
    when = f"revoked {secret.revoked_at}" if state == "revoked" else f"{state}, expires {secret.expires_at}"
    return f"{secret.id}  {secret.type:<13}  minted by {secret.key_indicator}  created {secret.created_at}  {when}"


def cmd_secret_list(args: argparse.Namespace, conn: Connection) -> None:
    account_id = cli_ledger.account_id(conn, args.account)
    now = utc_now()
    found = secrets.list_secrets(conn, account_id)
    cli_ledger.emit(args, {"account_id": account_id, "secrets": [s.as_json(now) for s in found]},
          "\n".join(_text(s, now) for s in found) or f"no client secrets for {account_id}")


def cmd_secret_revoke(args: argparse.Namespace, conn: Connection) -> None:
    now = utc_now()
    with transaction(conn):
        secret = secrets.revoke_secret(conn, args.secret, now)
    cli_ledger.emit(args, secret.as_json(now), f"revoked client secret {secret.id} at {secret.revoked_at}")


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `secret list` and `secret revoke` (`command(group, name, run, help)`)."""
    group = commands.add_parser("secret", help="client secrets (ek_...)").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    sub = command(group, "list", cmd_secret_list, "list an account's client secrets (newest first)")
    sub.add_argument("--account", required=True, metavar="ID_OR_EMAIL")
    sub = command(group, "revoke", cmd_secret_revoke, "revoke a client secret; its sessions end within 5 s")
    sub.add_argument("secret", metavar="SECRET_OR_ID")
