"""Money accounts end to end: switchd lowers a USD account's balance by each report's exact cost × markup."""
from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from decimal import Decimal

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.stack import Stack, client_url, metrics_url
from tests.test_switchd_e2e import http_get
from tests.upstream import ScriptedProvider, response_done, session_created


async def test_usd_account_is_cut_after_the_response_that_costs_more_than_it_holds(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account = await stack.cli("account", "create", "--email", "usd@example.test", "--usd", "0.01", "--markup", "1.3")
    key = (await stack.cli("key", "create", "--account", account["id"], "--label", "usd"))["key"]
    book = {p["model"]: p for p in (await stack.cli("price", "list"))["prices"]}["gpt-realtime"]
    # 100 audio tokens in and 233 out, at the book's list prices (USD per 1M tokens), then the markup.
    cost = (100 * Decimal(book["audio_in"]) + 233 * Decimal(book["audio_out"])) / 10**6
    charged = cost * Decimal("1.3")
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "usd")) as ws:
            up = await provider.next()
            await up.send_json(session_created())
            await up.send_json(response_done(100, 233))  # more than the $0.01 the account holds
            with trio.fail_after(10):
                kinds = [json.loads(await ws.get_message())["type"] for _ in range(3)]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert kinds == ["session.created", "response.done", "error"]  # the response, then the cut
            assert closed.value.reason.code == 4402
    with trio.fail_after(15):
        while (shown := await stack.cli("account", "show", account["id"]))["balance_usd"] == "0.01":
            await trio.lowlevel.checkpoint()  # billed once the session has handed its usage over
    assert Decimal(shown["balance_usd"]) == Decimal("0.01") - charged
    usage = await stack.cli("usage", "--account", account["id"])
    assert Decimal(usage["cost_usd"]) == cost and Decimal(usage["charged_usd"]) == charged


async def test_metrics_count_the_exact_cost_and_charge_switchdb_records(
    stack: Stack, provider: ScriptedProvider
) -> None:
    """/metrics' switch_cost_nano_usd_total and switch_charged_nano_usd_total: what switchd priced
    the USD account's reports at, to the nano-USD what switchdb stored for them; token accounts add nothing."""
    account = await stack.cli("account", "create", "--email", "usdm@example.test", "--usd", "5", "--markup", "1.3")
    key = (await stack.cli("key", "create", "--account", account["id"], "--label", "usd"))["key"]
    _, token_key = await stack.account(tokens=100_000)
    responses = [(100, 233), (1234, 567), (7, 1), (40_000, 2_500)]
    async with stack.switchd(provider.url) as sw:
        _, body = await http_get(metrics_url(sw))
        assert counters(body) == (0, 0)
        for api_key, name in ((token_key, "tokens"), (key, "usd")):
            async with open_websocket_url(client_url(sw, api_key, name)) as ws:
                up = await provider.next()
                await up.send_json(session_created())
                for audio_in, audio_out in responses:
                    await up.send_json(response_done(audio_in, audio_out))
                with trio.fail_after(10):
                    kinds = [json.loads(await ws.get_message())["type"] for _ in range(1 + len(responses))]
                assert kinds == ["session.created"] + ["response.done"] * len(responses)
        with trio.fail_after(15):
            while (usage := await stack.cli("usage", "--account", account["id"]))["total_tokens"] < sum(
                a + b for a, b in responses
            ):
                await trio.lowlevel.checkpoint()  # recorded once the session has handed its usage over
        _, body = await http_get(metrics_url(sw))
    with closing(sqlite3.connect(f"file:{stack.tmp / 'switch.db'}?mode=ro", uri=True)) as db:
        cost, charged = db.execute(
            "SELECT sum(cost_nano), sum(charged_nano) FROM usage_metrics WHERE account_id = ?",
            (account["id"],),
        ).fetchone()
    assert Decimal(usage["cost_usd"]) * 10**9 == cost and Decimal(usage["charged_usd"]) * 10**9 == charged
    assert 0 < cost < charged
    assert counters(body) == (cost, charged)


def counters(body: str) -> tuple[int, int]:
    """(switch_cost_nano_usd_total, switch_charged_nano_usd_total) from a /metrics page."""
    values = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    return int(values["switch_cost_nano_usd_total"]), int(values["switch_charged_nano_usd_total"])
