"""The official OpenAI Python SDK's realtime client, pointed at switchd, works unchanged."""
from __future__ import annotations

import trio
from openai import OpenAI

from tests.stack import Stack
from tests.upstream import ScriptedProvider


def sdk_conversation(base_url: str, key: str) -> tuple[str, str]:
    client = OpenAI(api_key=key, base_url=base_url, max_retries=0)
    with client.realtime.connect(model="gpt-realtime", extra_query={"rs_sessid": "sdk-session"}) as connection:
        connection.response.create()
        event = connection.recv()
        return event.type, event.delta  # type: ignore[union-attr]


async def test_openai_sdk_realtime_client_through_switchd(stack: Stack, provider: ScriptedProvider) -> None:
    if True:
        _, key = await stack.account()
        async with stack.switchd(provider.url) as sw:
            base_url = sw.address.replace("ws://", "http://") + "/v1"
            async with trio.open_nursery() as nursery:
                result: list[tuple[str, str]] = []

                async def run_sdk() -> None:
                    result.append(await trio.to_thread.run_sync(sdk_conversation, base_url, key))

                nursery.start_soon(run_sdk)
                with trio.fail_after(20):
                    up = await provider.next()
                    assert "model=gpt-realtime" in up.path and "rs_" not in up.path  # our parameters stay here
                    assert await up.receive_json() == {"type": "response.create"}
                    await up.send_json({
                        "type": "response.output_audio_transcript.delta", "event_id": "event_1", "response_id": "resp_1",
                        "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": "Hello from the switch",
                    })
            assert result == [("response.output_audio_transcript.delta", "Hello from the switch")]
