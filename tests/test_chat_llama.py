"""The Llama tier: chat completions through Ozwell to a real llama-server.

Deselected by default; run it with `python build/llama_server.py -- pytest -m llama`, which
starts llama-server with a small model and sets OZWELL_LLAMA_URL to its /v1 URL.
"""
import json
import os
import urllib.request

import openai
import pytest

import ozwell
from conftest import AUTH

pytestmark = pytest.mark.llama

LLAMA_URL = os.environ.get("OZWELL_LLAMA_URL", "")
SAY_HI = [{"role": "user", "content": "Say hello in three words."}]
# Longer than the context llama_server.py gives the model (1,024 tokens).
TOO_LONG = [{"role": "user", "content": "word " * 3000}]


@pytest.fixture(scope="module")
def llama_model():
    if not LLAMA_URL:
        pytest.fail("OZWELL_LLAMA_URL is not set: run this tier with "
                    "`python build/llama_server.py -- pytest -m llama`")
    with urllib.request.urlopen(f"{LLAMA_URL}/models", timeout=10) as reply:
        return json.load(reply)["data"][0]["id"]


@pytest.fixture
def settings(tmp_path, llama_model):
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=LLAMA_URL,
                           llama_models=(llama_model,))


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


@pytest.mark.gen_test(timeout=120)
async def test_plain_completion(client, llama_model, http_client, base_url, registry):
    reply = await client.chat.completions.create(model=llama_model, messages=SAY_HI, max_tokens=8,
                                                 temperature=0)
    assert reply.object == "chat.completion"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 8
    raw = await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST", headers=AUTH,
                                  body=json.dumps({"model": llama_model, "messages": SAY_HI, "max_tokens": 4}))
    assert list(registry.errors("CreateChatCompletionResponse", json.loads(raw.body))) == []


@pytest.mark.gen_test(timeout=120)
async def test_streaming(client, llama_model, http_client, base_url, registry):
    stream = await client.chat.completions.create(model=llama_model, messages=SAY_HI, max_tokens=8,
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chunks_received = []
    await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST", headers=AUTH,
                            body=json.dumps({"model": llama_model, "messages": SAY_HI, "max_tokens": 4,
                                             "stream": True}),
                            streaming_callback=chunks_received.append)
    events = [block[len("data: "):] for block in b"".join(chunks_received).decode().split("\n\n")
              if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert list(registry.errors("CreateChatCompletionStreamResponse", json.loads(event))) == []


@pytest.mark.gen_test(timeout=120)
async def test_streaming_with_usage(client, llama_model):
    stream = await client.chat.completions.create(model=llama_model, messages=SAY_HI, max_tokens=8,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert 0 < chunks[-1].usage.completion_tokens <= 8
    assert all(chunk.usage is None for chunk in chunks[:-1])


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_longer_than_the_context_is_a_400(client, llama_model, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=llama_model, messages=TOO_LONG, stream=stream)
    assert caught.value.status_code == 400
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "context" in caught.value.body["message"]
