"""Fault plans: ordered, per session and endpoint, from the file, the control API or the
x-ozwell-fault header; the official SDK's own retries driven by them; streams cut and stalled.
"""
import json
import time

import openai
import pytest

import ozwell
from conftest import API_KEY
from rigkit import control, data_events, post_json, raw_post

MODEL = ozwell.OFFLINE_MODEL
HELLO = [{"role": "user", "content": "Hello"}]

FILE_FAULTS = {"faults": [
    {"name": "third-embedding-fails", "type": "error", "endpoint": "embeddings", "calls": 3, "status": 500},
]}


@pytest.fixture
def settings(tmp_path, backend):
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(FILE_FAULTS))
    return ozwell.Settings(data_dir=str(tmp_path / "data"), fixtures=str(path),
                           llama_base_url=backend.url, keepalive_seconds=0.05)


def retrying_client(base_url, retries=2):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=retries)


async def plan(http_client, base_url, fault, session=None):
    status, listed = await control(http_client, base_url, "POST", "faults", fault, session=session)
    assert status == 200, listed
    return listed


async def journal(http_client, base_url, session=None, **filters):
    query = "&".join(f"{name}={value}" for name, value in filters.items())
    status, body = await control(http_client, base_url, "GET", f"requests?{query}", session=session)
    assert status == 200
    return body["data"]


# --- errors and the SDK's retries ---------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_two_planned_429s_drive_the_sdks_retries_for_as_long_as_retry_after_ms_says(
        http_client, base_url):
    # 1.1 s is longer than the SDK's own backoff before a first or second retry (at most 0.5 s
    # and 1 s): the waits below can only come from retry-after-ms.
    await plan(http_client, base_url, {"type": "error", "calls": "1-2", "endpoint": "chat", "status": 429,
                                       "headers": {"retry-after-ms": "1100", "x-should-retry": "true"}})
    client = retrying_client(base_url)
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
    await client.close()
    assert reply.choices[0].message.content.startswith('You said: "Hello"')
    calls = await journal(http_client, base_url, endpoint="chat")
    assert [call["status"] for call in calls] == [429, 429, 200]
    assert [call["fault"] and call["fault"]["call"] for call in calls] == [1, 2, None]
    assert [call["headers"]["x-stainless-retry-count"] for call in calls] == ["0", "1", "2"]
    for failed, retried in zip(calls, calls[1:]):
        assert retried["received_at"] - failed["finished_at"] >= 1.1


@pytest.mark.gen_test
async def test_x_should_retry_false_stops_the_sdk_retrying(http_client, base_url):
    await plan(http_client, base_url, {"type": "error", "calls": "1", "status": 500,
                                       "headers": {"x-should-retry": "false"}})
    client = retrying_client(base_url)
    with pytest.raises(openai.InternalServerError) as raised:
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    await client.close()
    assert raised.value.body["type"] == "server_error"
    assert "the planned fault 'session fault 0' on chat call 1 of session 'default'" in raised.value.body["message"]
    assert len(await journal(http_client, base_url)) == 1


@pytest.mark.gen_test
async def test_calls_are_counted_per_endpoint_and_the_first_fault_that_applies_fires(http_client, base_url, client):
    await plan(http_client, base_url, {"type": "error", "endpoint": "chat", "calls": [2, "4-"], "status": 503})
    await plan(http_client, base_url, {"type": "error", "calls": 2, "status": 418})
    embed = dict(model="text-embedding-3-small", input="x", dimensions=4)
    outcomes = []
    for _ in range(5):
        for call in (lambda: client.chat.completions.create(model=MODEL, messages=HELLO),
                     lambda: client.responses.create(model=MODEL, input="x"),
                     lambda: client.embeddings.create(**embed)):
            try:
                await call()
                outcomes.append(200)
            except openai.APIStatusError as error:
                outcomes.append(error.status_code)
    chat, responses, embeddings = outcomes[0::3], outcomes[1::3], outcomes[2::3]
    assert chat == [200, 503, 200, 503, 503]  # the first fault that applies fires
    assert responses == [200, 418, 200, 200, 200]
    assert embeddings == [200, 418, 500, 200, 200]  # the file's fault comes after the session's
    status, listed = await control(http_client, base_url, "GET", "faults")
    assert listed["calls"] == {"chat": 5, "responses": 5, "embeddings": 5}
    assert [item["fired"] for item in listed["data"]] == [
        [{"endpoint": "chat", "call": call} for call in (2, 4, 5)],
        [{"endpoint": "responses", "call": 2}, {"endpoint": "embeddings", "call": 2}],
        [{"endpoint": "embeddings", "call": 3}]]
    status, cleared = await control(http_client, base_url, "DELETE", "faults")
    assert cleared["deleted"] == 2
    status, listed = await control(http_client, base_url, "GET", "faults")
    assert listed["calls"] == {"chat": 0, "responses": 0, "embeddings": 0}
    assert [item["name"] for item in listed["data"]] == ["third-embedding-fails"]


@pytest.mark.gen_test
async def test_a_fault_answers_before_the_upstream_is_called(http_client, base_url, client, backend):
    await plan(http_client, base_url, {"type": "error", "calls": 1, "status": 429})
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="llama3", messages=HELLO)
    assert backend.requests == []
    reply = await client.chat.completions.create(model="llama3", messages=HELLO)
    assert reply.choices[0].message.content == "echo: Hello" and len(backend.requests) == 1


@pytest.mark.gen_test
async def test_the_fault_header_applies_to_its_own_request(client, http_client, base_url):
    with pytest.raises(openai.RateLimitError) as raised:
        await client.responses.create(model=MODEL, input="x", extra_headers={
            "x-ozwell-fault": json.dumps({"type": "error", "status": 429, "headers": {"retry-after": "1"},
                                          "error": {"message": "Planned.", "code": "my_code"}})})
    assert raised.value.body == {"message": "Planned.", "type": "requests", "param": None, "code": "my_code"}
    assert raised.value.response.headers["retry-after"] == "1"
    assert (await client.responses.create(model=MODEL, input="x")).status == "completed"
    [first, _] = await journal(http_client, base_url)
    assert first["fault"] == {"name": "x-ozwell-fault", "type": "error", "call": 1}


@pytest.mark.gen_test
@pytest.mark.parametrize("header, message", [
    ("{oops", "The x-ozwell-fault header is not JSON"),
    ('{"type": "error"}', "The x-ozwell-fault header: a fault of type error needs 'status'."),
    ('{"type": "eror"}', "The x-ozwell-fault header: type: 'eror' is not one of"),
    ('{"type": "cut", "status": 500}', "status does not apply to a fault of type cut"),
])
async def test_a_bad_fault_header_is_a_400_saying_why(http_client, base_url, header, message):
    reply = await post_json(http_client, base_url, "chat/completions", {"model": MODEL, "messages": HELLO},
                            headers={"x-ozwell-fault": header})
    assert reply.code == 400
    error = json.loads(reply.body)["error"]
    assert message in error["message"] and error["param"] == "x-ozwell-fault"


# --- stalls, cuts and broken replies ---------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_stall_before_the_headers_trips_the_sdks_timeout(http_client, base_url):
    await plan(http_client, base_url, {"type": "stall", "calls": 1, "ms": 1500})
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model=MODEL, messages=HELLO)
    started = time.monotonic()
    await client.chat.completions.create(model=MODEL, messages=HELLO)  # call 2: no stall
    await client.close()
    assert time.monotonic() - started < 1.5


@pytest.mark.gen_test
async def test_a_stall_then_the_normal_answer(http_client, base_url, client):
    await plan(http_client, base_url, {"type": "stall", "ms": 300})
    started = time.monotonic()
    answer = await client.responses.create(model=MODEL, input="x")
    assert time.monotonic() - started >= 0.3 and answer.status == "completed"


@pytest.mark.gen_test
@pytest.mark.parametrize("endpoint, body", [
    ("chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}),
    ("responses", {"model": MODEL, "input": "Hello", "stream": True}),
])
async def test_a_stream_cut_after_three_chunks(http_server, http_port, endpoint, body):
    fault = {"type": "cut", "after_chunks": 3}
    raw, _ = await raw_post(http_port, f"/v1/{endpoint}", body, {"x-ozwell-fault": json.dumps(fault)})
    events = data_events(raw)
    assert len(events) == 3 and all(json.loads(event) for event in events)
    assert not raw.endswith(b"0\r\n\r\n")  # no last chunk: the connection was cut, not ended


@pytest.mark.gen_test
async def test_the_sdk_sees_a_cut_stream_as_broken_on_chat_and_responses(http_client, base_url, client):
    await plan(http_client, base_url, {"type": "cut", "after_chunks": 3})
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            chunks.append(chunk)
    assert len(chunks) == 3
    events = []
    with pytest.raises(openai.APIError):
        async with client.responses.stream(model=MODEL, input="Hello") as stream:
            async for event in stream:
                events.append(event.type)
    assert events == ["response.created", "response.in_progress", "response.output_item.added"]


@pytest.mark.gen_test
async def test_a_cut_without_a_stream_closes_before_answering(http_client, base_url, client):
    await plan(http_client, base_url, {"type": "cut", "calls": 1})
    with pytest.raises(openai.APIConnectionError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert (await journal(http_client, base_url))[0]["fault"]["type"] == "cut"


@pytest.mark.gen_test
@pytest.mark.parametrize("endpoint, body", [
    ("chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}),
    ("responses", {"model": MODEL, "input": "Hello", "stream": True}),
])
async def test_a_stream_that_stalls_sends_no_keep_alives_then_is_cut(http_server, http_port, endpoint, body):
    fault = {"type": "stream_stall", "after_chunks": 2, "ms": 400}
    raw, took = await raw_post(http_port, f"/v1/{endpoint}", body, {"x-ozwell-fault": json.dumps(fault)})
    assert len(data_events(raw)) == 2
    assert took >= 0.4
    # Keep-alives every 0.05 s would have filled the stall; only the stream's start has one at most.
    assert raw.count(b": keep-alive") <= 1


@pytest.mark.gen_test
async def test_the_sdks_read_timeout_ends_a_stalled_stream(client):
    stalled = openai.AsyncOpenAI(base_url=str(client.base_url), api_key=API_KEY, max_retries=0, timeout=0.5)
    fault = {"type": "stream_stall", "after_chunks": 1, "ms": 3000}
    stream = await stalled.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, extra_headers={"x-ozwell-fault": json.dumps(fault)})
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        async for _ in stream:
            pass
    await stalled.close()
    assert time.monotonic() - started < 3.0


@pytest.mark.gen_test
async def test_malformed_json_with_status_200(http_server, http_port, client):
    fault = json.dumps({"type": "malformed_json"})
    raw, _ = await raw_post(http_port, "/v1/chat/completions", {"model": MODEL, "messages": HELLO},
                            {"x-ozwell-fault": fault})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Type: application/json" in head
    with pytest.raises(ValueError):
        json.loads(body)
    assert body.startswith(b'{"id":"chatcmpl-')
    raw, _ = await raw_post(http_port, "/v1/responses", {"model": MODEL, "input": "x", "stream": True},
                            {"x-ozwell-fault": fault})
    [event] = data_events(raw)
    assert event.startswith('{"type":"response.created"')
    with pytest.raises(ValueError):
        json.loads(event)
    with pytest.raises(Exception):
        await client.chat.completions.create(model=MODEL, messages=HELLO, extra_headers={"x-ozwell-fault": fault})


@pytest.mark.gen_test
async def test_a_wrong_content_type_on_a_reply_and_a_stream(http_client, base_url):
    fault = json.dumps({"type": "content_type", "content_type": "text/plain"})
    whole = await post_json(http_client, base_url, "embeddings",
                            {"model": "text-embedding-3-small", "input": "x", "dimensions": 2},
                            headers={"x-ozwell-fault": fault})
    assert whole.headers["Content-Type"] == "text/plain" and json.loads(whole.body)["data"]
    streamed = await post_json(http_client, base_url, "chat/completions",
                               {"model": MODEL, "messages": HELLO, "stream": True},
                               headers={"x-ozwell-fault": json.dumps({"type": "content_type"})})
    assert streamed.headers["Content-Type"] == "text/html; charset=utf-8"
    assert data_events(streamed.body)[-1] == "[DONE]"


@pytest.mark.gen_test
async def test_slow_paces_time_to_first_token_and_tokens_per_second(client, http_client, base_url):
    await plan(http_client, base_url, {"type": "slow", "ttft_ms": 300, "tokens_per_second": 50})
    started = time.monotonic()
    stream = await client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                                  max_tokens=11)
    arrivals = [time.monotonic() async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) == 11
    # Lower bounds only: the first token after 300 ms, the eleventh 10/50 s later.
    assert arrivals[0] - started >= 0.3
    assert arrivals[-1] - started >= 0.3 + 10 / 50
    started = time.monotonic()
    await client.responses.create(model=MODEL, input="x", max_output_tokens=16)
    assert time.monotonic() - started >= 0.3 + 15 / 50
