"""POST /v1/chat/completions: the built-in offline model, and the proxy to a Llama backend.

The proxy tests run a small OpenAI-compatible upstream (FakeLlama) on a free port. It records
what it receives; the request's own `fake` object, an unknown field that Ozwell passes through
untouched, tells it how to answer: slowly, streaming slowly, with an error status, cutting the
stream, or never.
"""
import asyncio
import json
import logging
import time

import openai
import openapi_spec_validator
import pytest
import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.web

import ozwell
from conftest import API_KEY, AUTH, free_port, raw_chat_post, served_in_a_thread

UPSTREAM_KEY = "upstream-secret"
HELLO = [{"role": "user", "content": "Hello there"}]


# --- the fake upstream -------------------------------------------------------------------------

class FakeLlama:
    """An OpenAI-compatible chat upstream for the tests; see the module docstring."""

    def __init__(self):
        self.requests = []          # (headers, raw body) of every request, in order
        self.active = 0
        self.disconnected = asyncio.Event()
        self.release = asyncio.Event()
        self.all_started = asyncio.Event()
        self.finished = asyncio.Event()
        self.sent_bytes = 0
        self.url = ""

    def start(self) -> tornado.httpserver.HTTPServer:
        """Listen on a free loopback port, in the current event loop."""
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/v1/chat/completions", _FakeChatHandler, {"fake": self})]))
        server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{port}/v1"
        return server

    def bodies(self):
        return [json.loads(raw) for _, raw in self.requests]


class _FakeChatHandler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeLlama):
        self.fake = fake

    def on_connection_close(self):
        self.fake.disconnected.set()

    async def post(self):
        fake = self.fake
        fake.requests.append((self.request.headers, self.request.body))
        body = json.loads(self.request.body)
        plan = body.get("fake", {})
        await asyncio.sleep(plan.get("delay", 0))
        if plan.get("hang"):
            await fake.disconnected.wait()
            return
        if "status" in plan:
            self.set_status(plan["status"])
            for name, value in plan.get("headers", {}).items():
                self.set_header(name, value)
            error = plan.get("error", {"message": "upstream says no", "type": "invalid_request_error",
                                       "param": None, "code": "nope"})
            if isinstance(error, str):
                self.set_header("Content-Type", "text/plain")
                return self.finish(error)
            return self.finish({"error": error})
        text_pieces = [f"w{i} " for i in range(plan.get("chunks", 3))]
        usage = {"prompt_tokens": 7, "completion_tokens": len(text_pieces), "total_tokens": 7 + len(text_pieces)}
        head = {"id": "chatcmpl-fake", "created": 1767225600, "model": body["model"]}
        if not body.get("stream"):
            last = body["messages"][-1]["content"]
            return self.finish({**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"echo: {last}"},
                 "logprobs": None, "finish_reason": "stop"}]})
        await self._stream(plan, body, head, text_pieces, usage)

    async def _stream(self, plan, body, head, text_pieces, usage):
        fake = self.fake
        fake.active += 1
        if fake.active == plan.get("barrier"):
            fake.all_started.set()
        self.set_header("Content-Type", "text/event-stream")
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        extra = {"usage": None} if include_usage else {}
        padding = "x" * plan.get("pad", 0)

        async def send(chunk):
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            self.write(data)
            await self.flush()
            fake.sent_bytes += len(data)

        def chunk(delta, finish_reason=None):
            return {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}

        try:
            await send(chunk({"role": "assistant", "content": ""}))
            if "barrier" in plan:
                await asyncio.wait_for(fake.all_started.wait(), 20)
            for number, piece in enumerate(text_pieces):
                if number == plan.get("pause_after"):
                    await fake.release.wait()
                if number == plan.get("cut_after"):
                    self.request.connection.stream.close()
                    return
                await asyncio.sleep(plan.get("chunk_delay", 0))
                await send(chunk({"content": piece + padding}))
            await send(chunk({}, "stop"))
            if include_usage:
                await send({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            if not plan.get("no_done"):
                self.write("data: [DONE]\n\n")
            self.finish()
            fake.finished.set()
        except tornado.iostream.StreamClosedError:
            pass


@pytest.fixture
def llama(io_loop):
    fake = FakeLlama()
    server = fake.start()
    yield fake
    server.stop()


@pytest.fixture
def settings(tmp_path, llama):
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=llama.url,
                           llama_api_key=UPSTREAM_KEY)


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def sse_events(raw: bytes) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except `[DONE]`."""
    events = []
    for block in raw.decode().split("\n\n"):
        data = [line[len("data:"):].strip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            text = "\n".join(data)
            events.append(text if text == "[DONE]" else json.loads(text))
    return events


async def post_chat(http_client, base_url, body, **kwargs):
    return await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST",
                                   headers=AUTH, body=json.dumps(body), raise_error=False, **kwargs)


def server_errors(caplog) -> list:
    """Errors logged by the server: Tornado's and Ozwell's loggers, or tasks of ozwell.py's.

    (Earlier tests' SDK clients log too, as they are collected: those are not the server's.)
    """
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and (
        r.name.startswith(("tornado", "ozwell")) or "ozwell.py" in r.getMessage())]


def assert_valid(registry, name, instance):
    assert [e.message for e in registry.errors(name, instance)] == []


# --- the built-in offline model ----------------------------------------------------------------

@pytest.mark.gen_test
async def test_offline_model_answers_with_the_sdk_the_same_text_for_the_same_request(client, llama):
    first = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=HELLO)
    again = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=HELLO)
    text = first.choices[0].message.content
    assert text.startswith('You said: "Hello there".')
    assert again.choices[0].message.content == text
    assert first.id.startswith("chatcmpl-") and first.id != again.id
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.prompt_tokens == ozwell.count_tokens("Hello there")
    assert first.usage.completion_tokens == ozwell.count_tokens(text)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert llama.requests == []


@pytest.mark.gen_test
async def test_offline_reply_matches_the_response_schema(http_client, base_url, registry):
    reply = await post_chat(http_client, base_url, {"model": ozwell.OFFLINE_MODEL, "messages": HELLO})
    assert reply.code == 200
    assert_valid(registry, "CreateChatCompletionResponse", json.loads(reply.body))


@pytest.mark.gen_test
async def test_offline_n_choices_and_token_limits(client):
    reply = await client.chat.completions.create(
        model=ozwell.OFFLINE_MODEL, messages=HELLO, n=3, max_completion_tokens=5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert {c.finish_reason for c in reply.choices} == {"length"}
    assert [len(ozwell.tokenize(c.message.content)) for c in reply.choices] == [5, 5, 5]
    assert reply.usage.completion_tokens == 15
    unlimited = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=HELLO, n=2)
    assert unlimited.choices[0].message.content != unlimited.choices[1].message.content
    legacy = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=HELLO, max_tokens=4)
    assert len(ozwell.tokenize(legacy.choices[0].message.content)) == 4
    assert legacy.choices[0].finish_reason == "length"


@pytest.mark.gen_test
async def test_offline_content_parts_read_as_their_joined_text(client):
    as_parts = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                     {"type": "text", "text": "there"}]}])
    as_text = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


@pytest.mark.gen_test
async def test_offline_stream_with_the_sdk_gives_the_same_text_and_usage_last(client):
    whole = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=HELLO)
    stream = await client.chat.completions.create(
        model=ozwell.OFFLINE_MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.gen_test
async def test_offline_stream_events_match_the_chunk_schema(http_client, base_url, registry):
    reply = await post_chat(http_client, base_url, {
        "model": ozwell.OFFLINE_MODEL, "messages": HELLO, "n": 2, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(reply.body)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert_valid(registry, "CreateChatCompletionStreamResponse", event)
    finishes = [e["choices"][0] for e in events[:-2] if e["choices"][0]["finish_reason"]]
    assert [(f["index"], f["finish_reason"]) for f in finishes] == [(0, "length"), (1, "length")]
    assert events[-2]["usage"]["completion_tokens"] == 6


@pytest.mark.gen_test
async def test_offline_stream_helper_gives_the_final_completion(client):
    whole = await client.chat.completions.create(model=ozwell.OFFLINE_MODEL, messages=HELLO)
    async with client.chat.completions.stream(model=ozwell.OFFLINE_MODEL, messages=HELLO) as stream:
        kinds = {event.type async for event in stream}
        final = await stream.get_final_completion()
    assert "content.delta" in kinds
    assert final.choices[0].message.content == whole.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"


@pytest.mark.gen_test
async def test_offline_streams_are_paced(ozwell_with, sdk):
    api = sdk(ozwell_with(stream_tokens_per_second=200.0))
    started = time.monotonic()
    stream = await api.chat.completions.create(
        model=ozwell.OFFLINE_MODEL, messages=HELLO, stream=True, max_tokens=21)
    tokens = [c async for c in stream if c.choices[0].delta.content]
    # Token k goes out no earlier than k / 200 s after the first: a lower bound, never flaky.
    assert len(tokens) == 21
    assert time.monotonic() - started >= 20 / 200.0


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("body, param, code", [
    ({"model": "llama3"}, "messages", "missing_required_parameter"),
    ({"messages": HELLO}, "model", "missing_required_parameter"),
    ({"model": "llama3", "messages": []}, "messages", "empty_array"),
    ({"model": "llama3", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"model": "llama3", "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"model": "llama3", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"model": "llama3", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
     "missing_required_parameter"),
    ({"model": "llama3", "messages": HELLO, "n": 0}, "n", "invalid_value"),
    ({"model": "llama3", "messages": HELLO, "stream": "yes"}, "stream", "invalid_type"),
])
async def test_bad_requests_get_a_400_naming_the_field_and_never_reach_the_upstream(
        client, llama, body, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/chat/completions", body=body, cast_to=object)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and caught.value.body["code"] == code
    assert llama.requests == []


@pytest.mark.gen_test
async def test_every_role_and_content_form_is_accepted(client, llama):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Really brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = await client.chat.completions.create(model="llama3", messages=messages)
    assert reply.choices[0].message.content == "echo: sunny"
    assert llama.bodies()[0]["messages"] == messages


# --- the proxy ----------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_proxy_forwards_the_body_as_received_with_the_upstream_key(client, llama):
    reply = await client.chat.completions.with_raw_response.create(
        model="llama3", messages=HELLO, temperature=0.2, top_p=0.9, seed=7, stop=["\n"], user="u1",
        max_tokens=50, max_completion_tokens=40, logprobs=False, metadata={"team": "a"},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        extra_body={"num_ctx": 4096, "options": {"mirostat": 2}})
    completion = reply.parse()
    assert completion.choices[0].message.content == "echo: Hello there"
    assert reply.headers["x-request-id"].startswith("req_")
    headers, raw = llama.requests[0]
    sent = json.loads(raw)
    assert sent["num_ctx"] == 4096 and sent["options"] == {"mirostat": 2}
    assert sent["response_format"]["json_schema"]["name"] == "x" and sent["seed"] == 7
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert API_KEY not in str(dict(headers))


@pytest.mark.gen_test
async def test_proxy_passes_the_raw_bytes_through(http_client, base_url, llama):
    raw = b'{"model":"llama3",  "messages":[{"role":"user","content":"Hello there"}], "x-odd":[1, 2.50]}'
    reply = await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST", headers=AUTH, body=raw)
    assert llama.requests[0][1] == raw
    assert json.loads(reply.body)["object"] == "chat.completion"


@pytest.mark.gen_test
async def test_without_an_upstream_key_no_authorization_is_sent(ozwell_with, llama, sdk):
    await sdk(ozwell_with(llama_api_key="")).chat.completions.create(model="llama3", messages=HELLO)
    assert "Authorization" not in llama.requests[0][0]


@pytest.mark.gen_test
async def test_proxy_stream_with_the_sdk_includes_usage(client, llama):
    stream = await client.chat.completions.create(
        model="llama3", messages=HELLO, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": {"chunks": 4}})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "w0 w1 w2 w3 "
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert llama.bodies()[0]["stream_options"] == {"include_usage": True}


@pytest.mark.gen_test
async def test_proxy_stream_events_match_the_chunk_schema_and_end_with_done(http_client, base_url, registry):
    reply = await post_chat(http_client, base_url, {"model": "llama3", "messages": HELLO, "stream": True})
    assert reply.code == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(reply.body)
    assert events[-1] == "[DONE]" and reply.body.endswith(b"data: [DONE]\n\n")
    assert reply.body.count(b"[DONE]") == 1
    for event in events[:-1]:
        assert_valid(registry, "CreateChatCompletionStreamResponse", event)


@pytest.mark.gen_test
async def test_proxy_stream_helper_gives_the_final_completion(client):
    async with client.chat.completions.stream(
            model="llama3", messages=HELLO, extra_body={"fake": {"chunks": 2}}) as stream:
        deltas = [event.delta async for event in stream if event.type == "content.delta" and event.delta]
        final = await stream.get_final_completion()
    assert deltas == ["w0 ", "w1 "]
    assert final.choices[0].message.content == "w0 w1 " and final.choices[0].finish_reason == "stop"


@pytest.mark.gen_test
async def test_each_event_is_relayed_as_it_arrives(http_client, base_url, llama):
    # The upstream sends one piece of text, then waits: the client has it before anything more.
    received = []

    def on_chunk(data):
        received.append(data)
        if b"w0 " in b"".join(received):
            llama.release.set()

    reply = asyncio.ensure_future(post_chat(
        http_client, base_url, {"model": "llama3", "messages": HELLO, "stream": True,
                                "fake": {"pause_after": 1}}, streaming_callback=on_chunk))
    await asyncio.wait_for(llama.release.wait(), 5)
    assert b"w1 " not in b"".join(received)
    await reply
    assert b"w2 " in b"".join(received)


@pytest.mark.gen_test
async def test_an_idle_stream_gets_keep_alive_comments_between_whole_events(ozwell_with, http_client, llama):
    base = ozwell_with(keepalive_seconds=0.05)
    received = []

    def on_chunk(data):
        received.append(data)
        if b": keep-alive\n\n" in b"".join(received):
            llama.release.set()

    await post_chat(http_client, base, {"model": "llama3", "messages": HELLO, "stream": True,
                                        "fake": {"pause_after": 1}}, streaming_callback=on_chunk)
    body = b"".join(received)
    assert b": keep-alive\n\n" in body
    assert b"data: \n" not in body and b"data:\n" not in body
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(body)[:-1]) == "w0 w1 w2 "


@pytest.mark.gen_test
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_comes_back_with_its_status(client, stream):
    error = {"message": "model 'nope' not found", "type": "invalid_request_error", "param": "model",
             "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="nope", messages=HELLO, stream=stream,
                                             extra_body={"fake": {"status": 404, "error": error}})
    assert caught.value.status_code == 404
    assert caught.value.body == error


@pytest.mark.gen_test
async def test_upstream_error_in_another_shape_is_wrapped_into_openais(client, llama, registry):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO,
                                             extra_body={"fake": {"status": 503, "error": "overloaded, come back later"}})
    assert caught.value.status_code == 503
    assert_valid(registry, "Error", caught.value.body)
    assert "overloaded, come back later" in caught.value.body["message"]
    assert "Llama backend" in caught.value.body["message"] and llama.url not in caught.value.body["message"]
    assert caught.value.body["type"] == "server_error"
    llama_cpp = {"code": 400, "message": "request (2024 tokens) exceeds the available context size (512 tokens)",
                 "type": "exceed_context_size_error", "n_ctx": 512}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO,
                                             extra_body={"fake": {"status": 400, "error": llama_cpp}})
    assert_valid(registry, "Error", caught.value.body)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert caught.value.body["message"] == llama_cpp["message"] and caught.value.body["n_ctx"] == 512


@pytest.mark.gen_test
async def test_the_upstreams_retry_after_reaches_the_client(client):
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO, extra_body={"fake": {
            "status": 429, "headers": {"Retry-After": "7"}}})
    assert caught.value.response.headers["retry-after"] == "7"


@pytest.mark.gen_test
async def test_a_plain_answer_that_is_not_json_is_a_502(client):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO, extra_body={"fake": {
            "status": 200, "error": "<html>a login page</html>"}})
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_invalid_response"
    assert "text/plain" in caught.value.body["message"] and "a login page" in caught.value.body["message"]


@pytest.mark.gen_test
async def test_a_stream_the_upstream_ends_without_done_still_ends_with_done(http_client, base_url):
    reply = await post_chat(http_client, base_url, {"model": "llama3", "messages": HELLO, "stream": True,
                                                    "fake": {"no_done": True}})
    assert reply.body.endswith(b"data: [DONE]\n\n") and reply.body.count(b"[DONE]") == 1


@pytest.mark.gen_test
async def test_connection_refused_is_a_502_naming_the_fix_and_logging_the_url(ozwell_with, sdk, caplog):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk(ozwell_with(llama_base_url=dead)).chat.completions.create(model="llama3", messages=HELLO)
    assert caught.value.status_code == 502
    body = caught.value.body
    assert body["code"] == "upstream_unavailable" and body["type"] == "server_error"
    assert "Llama backend" in body["message"] and "connection refused" in body["message"]
    assert "ollama serve" in body["message"] and "LLAMA_BASE_URL" in body["message"]
    assert dead not in body["message"] and "127.0.0.1" not in body["message"]
    assert any(f"{dead}/chat/completions" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test
@pytest.mark.parametrize("stream", [False, True])
async def test_no_headers_within_the_timeout_is_a_504_and_the_upstream_is_let_go(ozwell_with, llama, stream, sdk):
    api = sdk(ozwell_with(upstream_header_timeout=0.2))
    with pytest.raises(openai.APIStatusError) as caught:
        await api.chat.completions.create(model="llama3", messages=HELLO, stream=stream,
                                          extra_body={"fake": {"hang": True}})
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"
    assert "OZWELL_UPSTREAM_HEADER_TIMEOUT" in caught.value.body["message"]
    await asyncio.wait_for(llama.disconnected.wait(), 1)


@pytest.mark.gen_test
async def test_a_slow_answer_within_the_timeout_still_comes_through(ozwell_with, sdk):
    api = sdk(ozwell_with(upstream_header_timeout=5))
    reply = await api.chat.completions.create(model="llama3", messages=HELLO, extra_body={"fake": {"delay": 0.3}})
    assert reply.choices[0].message.content == "echo: Hello there"


@pytest.mark.gen_test
async def test_a_stream_cut_by_the_upstream_ends_with_one_error_event(
        client, http_client, base_url, registry, llama):
    # The upstream sends two pieces of text, waits for the client to have them, then hangs up.
    stream = await client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                                  extra_body={"fake": {"pause_after": 2, "cut_after": 2}})
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
            if chunk.choices[0].delta.content == "w1 ":
                llama.release.set()
    assert seen == ["", "w0 ", "w1 "]
    assert "broke off" in caught.value.message
    reply = await post_chat(http_client, base_url, {"model": "llama3", "messages": HELLO, "stream": True,
                                                    "fake": {"cut_after": 2}})
    events = sse_events(reply.body)
    assert "[DONE]" not in events
    assert_valid(registry, "ErrorResponse", events[-1])
    assert events[-1]["error"]["code"] == "upstream_interrupted"


@pytest.mark.gen_test
@pytest.mark.parametrize("plan", [{"pause_after": 1}, {"chunks": 400, "chunk_delay": 0.02}],
                         ids=["idle-upstream", "streaming-upstream"])
async def test_client_hang_up_closes_the_upstream_request_within_a_second(client, llama, caplog, plan):
    stream = await client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                                  extra_body={"fake": plan})
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    await stream.close()
    await asyncio.wait_for(llama.disconnected.wait(), 1.0)
    assert not llama.finished.is_set()
    await asyncio.sleep(0.05)  # let the server finish its side before looking at the log
    assert server_errors(caplog) == []


@pytest.mark.gen_test
async def test_client_hang_up_before_the_upstream_answers_lets_it_go(client, llama, caplog):
    request = asyncio.ensure_future(client.chat.completions.create(
        model="llama3", messages=HELLO, extra_body={"fake": {"hang": True}}))
    while not llama.requests:
        await asyncio.sleep(0.01)
    request.cancel()
    await asyncio.wait_for(llama.disconnected.wait(), 1.0)
    assert server_errors(caplog) == []


@pytest.mark.gen_test(timeout=60)
async def test_two_hundred_concurrent_streams_complete(client, llama):
    # The upstream holds every stream open until all 200 have reached it: a pool limit fails this.
    async def one():
        stream = await client.chat.completions.create(
            model="llama3", messages=HELLO, stream=True, extra_body={"fake": {"barrier": 200}})
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    texts = await asyncio.gather(*(one() for _ in range(200)))
    assert texts == ["w0 w1 w2 "] * 200
    assert llama.active == 200


@pytest.mark.gen_test(timeout=60)
async def test_a_slow_client_slows_the_upstream_read(http_server, base_url, llama):
    # 24 MB of events; the client stops reading after the headers. With backpressure the upstream
    # stalls once the socket buffers on the way are full; without it, it would send everything.
    count, pad = 3000, 8000
    body = json.dumps({"model": "llama3", "messages": HELLO, "stream": True,
                       "fake": {"chunks": count, "pad": pad}}).encode()
    reader, writer = await raw_chat_post(base_url, body)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(llama.finished.wait(), 1.0)
    stalled_at = llama.sent_bytes
    assert stalled_at < count * pad / 2
    received, tail = 0, b""
    while b"data: [DONE]" not in tail:
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data, "the stream ended without [DONE]"
        received += len(data)
        tail = (tail + data)[-64:]
    writer.close()
    assert llama.finished.is_set() and received > count * pad


@pytest.mark.gen_test
async def test_the_upstream_cutting_a_plain_answer_is_a_502(client, llama, sdk):
    # A Content-Length promise the upstream does not keep.
    async def short_answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\"")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(short_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    llama.url = f"http://127.0.0.1:{port}/v1"
    try:
        app = ozwell.make_app(ozwell.Settings(llama_base_url=llama.url))
        sock, ozwell_port = tornado.testing.bind_unused_port()
        http = tornado.httpserver.HTTPServer(app)
        http.add_sockets([sock])
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk(f"http://127.0.0.1:{ozwell_port}").chat.completions.create(model="llama3", messages=HELLO)
        http.stop()
    finally:
        server.close()
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_interrupted"


@pytest.mark.gen_test
async def test_openapi_documents_the_operation_and_its_stream(http_client, base_url):
    document = json.loads((await http_client.fetch(f"{base_url}/openapi.json")).body)
    operation = document["paths"]["/v1/chat/completions"]["post"]
    content = operation["responses"]["200"]["content"]
    chunk, done = content["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert chunk["contentSchema"]["anyOf"][0]["$ref"].endswith("/CreateChatCompletionStreamResponse")
    assert done["const"] == "[DONE]"
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CreateChatCompletionRequest")
    assert {"502", "504"} <= set(operation["responses"])
    openapi_spec_validator.validate_spec(document)


def test_chat_schema_examples_are_valid(registry):
    names = [n for n in registry.schemas if "ChatCompletion" in n or n == "CompletionUsage"]
    assert len(names) >= 7
    for name in names:
        for example in registry.schemas[name]["examples"]:
            assert_valid(registry, name, example)


# --- the sync SDK against a real server process -------------------------------------------------

def test_the_sync_sdk_against_a_server_process(server_process):
    with served_in_a_thread(FakeLlama) as llama:
        server = server_process(env={"LLAMA_BASE_URL": llama.url, "LLAMA_API_KEY": UPSTREAM_KEY})
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        proxied = api.chat.completions.create(model="llama3", messages=HELLO)
        assert proxied.choices[0].message.content == "echo: Hello there"
        assert llama.requests[0][0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        streamed = api.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                               stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "w0 w1 w2 "
        assert chunks[-1].usage.total_tokens == 10
        with api.chat.completions.stream(model=ozwell.OFFLINE_MODEL, messages=HELLO) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].message.content.startswith('You said: "Hello there".')
