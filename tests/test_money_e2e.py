"""Money accounts end to end: switchd lowers a USD account's balance by each report's exact cost × markup."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.stack import Stack, client_url
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
