"""/v1/embeddings through the Llama backend (OZWELL_EMBEDDINGS_BACKEND=upstream), and the
x-ozwell-generator header on every endpoint that generates replies."""
import array
import base64
import json

import openai
import pytest

import ozwell
from conftest import AUTH

UPSTREAM_KEY = "upstream-secret"


@pytest.fixture
def settings(tmp_path, backend):
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=backend.url,
                           llama_api_key=UPSTREAM_KEY, embeddings_backend="upstream")


def float32(values):
    return list(array.array("f", values))


@pytest.mark.gen_test
async def test_floats_come_back_as_the_backend_sent_them(http_client, base_url, backend):
    raw = b'{"model": "nomic-embed-text", "input": ["a cat", "a mat"], "dimensions": 3}'
    reply = await http_client.fetch(f"{base_url}/v1/embeddings", method="POST", headers=AUTH, body=raw)
    assert reply.headers["x-ozwell-generator"] == "upstream"
    path, headers, sent = backend.requests[0]
    assert (path, sent) == ("/v1/embeddings", raw)  # forwarded as received
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    body = json.loads(reply.body)
    assert [item["embedding"] for item in body["data"]] == [[0.5, -0.25, 5 / 3], [1.5, -0.25, 5 / 3]]


@pytest.mark.gen_test
async def test_base64_is_made_here_from_the_backends_floats(client, backend, http_client, base_url):
    # The SDK asks for base64 when the caller sets no format, and decodes it.
    reply = await client.embeddings.create(model="nomic-embed-text", input=["a cat", "a mat"])
    assert [item.embedding for item in reply.data] == [float32([0.5, -0.25, 5 / 3]),
                                                       float32([1.5, -0.25, 5 / 3])]
    assert backend.bodies("/v1/embeddings")[0]["encoding_format"] == "float"
    raw = await http_client.fetch(f"{base_url}/v1/embeddings", method="POST", headers=AUTH, body=json.dumps(
        {"model": "nomic-embed-text", "input": "a cat", "encoding_format": "base64"}))
    encoded = json.loads(raw.body)["data"][0]["embedding"]
    assert base64.b64decode(encoded) == array.array("f", [0.5, -0.25, 5 / 3]).tobytes()
    assert json.loads(raw.body)["usage"] == {"prompt_tokens": 1, "total_tokens": 1}


@pytest.mark.gen_test
async def test_the_built_in_models_still_answer_here(client, backend):
    reply = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hi")
    assert reply.headers["x-ozwell-generator"] == "deterministic"
    assert len(reply.parse().data[0].embedding) == 1536
    assert backend.requests == []


@pytest.mark.gen_test
async def test_backend_errors_come_back_with_their_status(client):
    with pytest.raises(openai.NotFoundError) as caught:
        await client.embeddings.create(model="nope", input="hi", user=json.dumps({
            "status": 404, "error": {"message": "model 'nope' not found", "type": "not_found_error"}}))
    assert caught.value.body["message"] == "model 'nope' not found"
    with pytest.raises(openai.InternalServerError) as caught:
        await client.embeddings.create(model="nomic-embed-text", input="hi", user=json.dumps({
            "status": 200, "error": {"message": "not a list of embeddings"}}))
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_invalid_response"


@pytest.mark.gen_test
async def test_by_default_other_models_are_a_404_and_never_reach_the_backend(backend, ozwell_with,
                                                                             sdk):
    with pytest.raises(openai.NotFoundError):
        await sdk(ozwell_with(embeddings_backend="deterministic")).embeddings.create(
            model="nomic-embed-text", input="hi")
    assert backend.requests == []


# --- x-ozwell-generator on chat completions -----------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("model, stream, generator", [
    (ozwell.OFFLINE_MODEL, False, "deterministic"), (ozwell.OFFLINE_MODEL, True, "deterministic"),
    ("llama3", False, "upstream"), ("llama3", True, "upstream"),
])
async def test_chat_replies_say_what_answered(http_client, base_url, model, stream, generator):
    reply = await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST", headers=AUTH,
                                    body=json.dumps({"model": model, "stream": stream,
                                                     "messages": [{"role": "user", "content": "hi"}]}))
    assert reply.headers["x-ozwell-generator"] == generator
    assert "x-ozwell-generator" in reply.headers["Access-Control-Expose-Headers"]


@pytest.mark.gen_test
@pytest.mark.parametrize("model, generator", [(ozwell.OFFLINE_MODEL, "deterministic"),
                                              ("llama3", "upstream")])
async def test_a_stored_chat_completion_given_back_says_what_answered(client, model, generator):
    created = await client.chat.completions.create(
        model=model, store=True, messages=[{"role": "user", "content": "hi"}])
    reply = await client.chat.completions.with_raw_response.retrieve(created.id)
    assert reply.headers["x-ozwell-generator"] == generator


@pytest.mark.gen_test
async def test_errors_of_this_server_say_nothing_generated_them(http_client, base_url):
    reply = await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST", headers=AUTH,
                                    body=json.dumps({"model": "llama3"}), raise_error=False)
    assert reply.code == 400 and "x-ozwell-generator" not in reply.headers
