"""The Llama tier for the Responses API: /v1/responses through Ozwell's translation to a real
llama-server (OZWELL_RESPONSES_BACKEND=upstream).

Deselected by default; run it with `python build/llama_server.py -- pytest -m llama`, which
starts llama-server with a small model and sets OZWELL_LLAMA_URL to its /v1 URL.
"""
import json

import pytest

import ozwell
from conftest import AUTH
from test_chat_llama import LLAMA_URL, llama_model, registry  # noqa: F401 (the tier's fixtures)

pytestmark = pytest.mark.llama

SAY_HI = "Say hello in three words."


@pytest.fixture
def settings(tmp_path, llama_model):  # noqa: F811
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=LLAMA_URL,
                           llama_models=(llama_model,), responses_backend="upstream")


@pytest.mark.gen_test(timeout=120)
async def test_plain_response(client, llama_model, http_client, base_url, registry):  # noqa: F811
    reply = await client.responses.with_raw_response.create(
        model=llama_model, input=SAY_HI, instructions="Be brief.", max_output_tokens=16,
        temperature=0)
    response = reply.parse()
    assert reply.headers["x-ozwell-generator"] == "upstream"
    assert response.status in ("completed", "incomplete") and response.model == llama_model
    assert response.output[0].type == "message" and isinstance(response.output_text, str)
    assert 0 < response.usage.output_tokens <= 16 and response.usage.input_tokens > 0
    raw = await http_client.fetch(f"{base_url}/v1/responses/{response.id}", headers=AUTH)
    assert list(registry.errors("Response", json.loads(raw.body))) == []


@pytest.mark.gen_test(timeout=120)
async def test_streamed_response(client, llama_model, http_client, base_url, registry):  # noqa: F811
    stream = await client.responses.create(model=llama_model, input=SAY_HI, max_output_tokens=16,
                                           temperature=0, stream=True)
    events = [event async for event in stream]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    # The small model may run past 16 tokens: then the stream ends with response.incomplete.
    assert events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert deltas and "".join(deltas) == final.output_text
    assert final.usage.output_tokens > 0
    received = []
    await http_client.fetch(f"{base_url}/v1/responses/{final.id}?stream=true", headers=AUTH,
                            streaming_callback=received.append)
    events = [json.loads(block.split("\ndata: ", 1)[1])
              for block in b"".join(received).decode().split("\n\n") if "\ndata: " in block]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == deltas
    for event in events:
        assert list(registry.errors("ResponseStreamEvent", event)) == [], event["type"]


@pytest.mark.gen_test(timeout=120)
async def test_previous_response_id(client, llama_model):  # noqa: F811
    first = await client.responses.create(model=llama_model, input="My name is Ada.",
                                          max_output_tokens=16, temperature=0)
    second = await client.responses.create(model=llama_model, input="What is my name?",
                                           previous_response_id=first.id, max_output_tokens=16,
                                           temperature=0)
    assert second.previous_response_id == first.id
    # The backend read the whole conversation: more input than the new message alone.
    alone = await client.responses.create(model=llama_model, input="What is my name?",
                                          max_output_tokens=16, temperature=0)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens / 2
