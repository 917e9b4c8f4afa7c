"""Test rigs: fixtures from a file and from the control API, what they match, what they reply,
how a bad fixture file is refused, and strict mode.

The official SDK is the client; a fixtures file with every kind of match and reply is loaded
by the app under test (and by a real server process for the sync SDK).
"""
import json
import random
import socket

import openai
import pydantic
import pytest

import ozwell
from conftest import API_KEY, assert_valid
from rigkit import control, data_events, post_json

MODEL = ozwell.OFFLINE_MODEL
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
HELLO = [{"role": "user", "content": "Hello"}]
ORDER_SCHEMA = {"type": "object", "properties": {"status": {"type": "string"}},
                "required": ["status"], "additionalProperties": False}

FIXTURES = {
    "fixtures": [
        {"name": "greeting", "match": {"user": {"contains": "hi", "ignore_case": True}},
         "reply": {"text": "Hello from the greeting fixture."}},
        {"name": "exact", "match": {"user": {"exact": "ping"}}, "reply": {"text": "pong"}},
        {"name": "order", "match": {"endpoint": "chat", "user": {"regex": r"^order (\d+)$"}},
         "reply": {"json": {"status": "shipped"}}},
        {"name": "gpt", "match": {"model": "gpt-4o", "user": {"contains": "model"}},
         "reply": {"text": "I am the gpt-4o fixture."}},
        {"name": "pirate", "match": {"system": {"contains": "pirate"}},
         "reply": {"text": "Arr."}, "latency": {"ttft_ms": 1}},
        {"name": "weather-result",
         "match": {"tool_result": {"call_id": "call_1", "text": {"regex": r"-?\d+ ?C"}}},
         "reply": {"text": "It is 4 C in Oslo."}},
        {"name": "weather-call", "match": {"tool": "get_weather", "turn": 1, "user": {"contains": "weather", "ignore_case": True}},
         "reply": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "call_1"}]}},
        {"name": "second-turn", "match": {"turn": 2, "user": {"contains": "again"}},
         "reply": {"text": "Second turn."}},
        {"name": "case", "match": {"headers": {"x-test-case": "refuse"}},
         "reply": {"refusal": "I can't help with that."}},
        {"name": "only-in-ci", "match": {"session": "ci", "user": {"contains": "where"}},
         "reply": {"text": "In CI."}},
        {"name": "throttled", "match": {"user": {"contains": "throttle"}},
         "reply": {"status": 429, "headers": {"retry-after-ms": "10"},
                   "error": {"message": "Slow down."}}},
        {"name": "counted", "match": {"user": {"contains": "count"}},
         "reply": {"text": "Counted.", "usage": {"prompt_tokens": 100, "completion_tokens": 7}}},
        {"name": "steps", "match": {"user": {"contains": "step"}},
         "reply": {"sequence": [{"text": "one"}, {"text": "two"}]}},
        {"name": "once-each", "match": {"user": {"contains": "falls"}},
         "reply": {"sequence": [{"text": "first"}, {"text": "second"}], "then": "fall_through"}},
        {"name": "limited", "match": {"user": {"contains": "limited"}}, "uses": 2,
         "reply": {"text": "limited reply"}},
        {"name": "embeddings-down", "match": {"endpoint": "embeddings", "user": {"contains": "outage"}},
         "reply": {"status": 503, "error": {"message": "Overloaded.", "type": "server_error"}}},
        {"name": "stubborn-call", "match": {"user": {"contains": "stubborn"}}, "deliberate": True,
         "reply": {"tool_calls": [{"name": "launch", "arguments": {}}]}},
        {"name": "unoffered-call", "match": {"user": {"contains": "launch"}},
         "reply": {"tool_calls": [{"name": "launch", "arguments": {}}]}},
        {"name": "bad-json", "match": {"user": {"contains": "invoice"}},
         "reply": {"json": {"status": 5}}},
    ],
}


@pytest.fixture
def rig(request):
    """The fixtures file's document and whether strict mode is on (indirectly parametrized)."""
    return getattr(request, "param", (FIXTURES, False))


@pytest.fixture
def fixtures_file(tmp_path, rig):
    path = tmp_path / "fixtures.json"
    path.write_text(json.dumps(rig[0]))
    return path


@pytest.fixture
def settings(tmp_path, fixtures_file, backend, rig):
    return ozwell.Settings(data_dir=str(tmp_path / "data"), fixtures=str(fixtures_file),
                           llama_base_url=backend.url, fixtures_strict=rig[1])


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


async def chat(client, text, **kwargs):
    kwargs.setdefault("model", MODEL)
    reply = await client.chat.completions.create(
        messages=[{"role": "user", "content": text}], **kwargs)
    return reply.choices[0].message.content


async def chat_stream(client, text, **kwargs):
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], stream=True, **kwargs)
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


# --- matching ----------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_fixture_answers_chat_and_responses_streamed_and_not_with_the_same_text(client):
    expected = "Hello from the greeting fixture."
    assert await chat(client, "Hi there") == expected
    assert await chat_stream(client, "HI!") == expected
    assert (await client.responses.create(model=MODEL, input="hi, you")).output_text == expected
    async with client.responses.stream(model=MODEL, input="hi, you") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == expected
    assert len(deltas) == len(ozwell.tokenize(expected))


@pytest.mark.gen_test
@pytest.mark.parametrize("text", ["architecture", "this and that", "chi", "hit me"])
async def test_contains_is_whole_words_only(client, http_client, base_url, text):
    assert not (await chat(client, text)).startswith("Hello from the greeting")
    # The same through the control API (a session's own fixtures are tried one by one).
    await control(http_client, base_url, "POST", "fixtures", session="words",
                  body={"match": {"user": {"contains": "hi"}}, "reply": {"text": "matched"}})
    words = client.with_options(default_headers={"x-ozwell-session": "words"})
    assert await chat(words, text) != "matched"
    assert await chat(words, "oh, hi!") == "matched"


@pytest.mark.gen_test
async def test_exact_and_regex_match_as_written(client):
    assert await chat(client, "ping") == "pong"
    assert (await chat(client, "ping ")).startswith("You said")
    assert json.loads(await chat(client, "order 42")) == {"status": "shipped"}
    assert (await chat(client, "my order 42")).startswith("You said")


@pytest.mark.gen_test
async def test_model_system_header_and_session_matches(client, backend):
    assert await chat(client, "which model?", model="gpt-4o") == "I am the gpt-4o fixture."
    assert backend.requests == []  # a fixture answers before the upstream is called
    assert (await chat(client, "which model?")).startswith("You said")
    pirate = await client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Ahoy"}])
    assert pirate.choices[0].message.content == "Arr."
    answer = await client.responses.create(model=MODEL, input="Ahoy", instructions="Talk like a pirate")
    assert answer.output_text == "Arr."
    assert (await chat(client, "where am I?")).startswith("You said")
    assert await chat(client, "where am I?", extra_headers={"x-ozwell-session": "ci"}) == "In CI."


@pytest.mark.gen_test
async def test_fixtures_answer_before_a_responses_or_embeddings_backend(ozwell_with, sdk, backend):
    api = sdk(ozwell_with(responses_backend="upstream", embeddings_backend="upstream"))
    reply = await api.responses.with_raw_response.create(model="llama3", input="ping")
    assert reply.parse().output_text == "pong" and reply.headers["x-ozwell-generator"] == "fixture"
    with pytest.raises(openai.InternalServerError):
        await api.embeddings.create(model="my-embedder", input="an outage")
    assert backend.requests == []
    reply = await api.responses.with_raw_response.create(model="llama3", input="Hello")
    assert reply.parse().output_text == "echo: Hello" and reply.headers["x-ozwell-generator"] == "upstream"
    assert len(backend.requests) == 1


@pytest.mark.gen_test
async def test_tool_offered_tool_result_and_turn(http_client, base_url, client):
    first = await post_json(http_client, base_url, "chat/completions", {
        "model": MODEL, "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "Weather in Oslo?"}]})
    assert first.code == 200 and first.headers["x-ozwell-generator"] == "fixture"
    second = await client.chat.completions.create(model=MODEL, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": "4 C"}'}])
    assert second.choices[0].message.content == "It is 4 C in Oslo."
    # The prompt is counted as the built-in model counts it: texts and the call's arguments.
    assert second.usage.prompt_tokens == sum(map(ozwell.count_tokens, (
        "Weather in Oslo?", '{"city": "Oslo"}', '{"temperature": "4 C"}')))
    again = await client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "again please"}])
    assert again.choices[0].message.content == "Second turn."
    assert (await chat(client, "again please")).startswith("You said")


@pytest.mark.gen_test
async def test_first_match_in_order_wins(client):
    # "hi" (greeting, first) and "count" (counted, later) both match; the earlier answers.
    assert await chat(client, "hi count") == "Hello from the greeting fixture."


# --- replies -------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_json_reply_parses_with_the_sdk(client):
    class Order(pydantic.BaseModel):
        status: str

    parsed = await client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "order 7"}], response_format=Order)
    assert parsed.choices[0].message.parsed == Order(status="shipped")


@pytest.mark.gen_test
async def test_a_tool_call_reply_on_chat_whole_and_streamed_in_fragments(client, http_client, base_url, registry):
    ask = dict(model=MODEL, tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "Weather in Oslo?"}])
    reply = await client.chat.completions.create(**ask)
    [call] = reply.choices[0].message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_1", "get_weather", {"city": "Oslo"})
    assert reply.choices[0].message.content is None and reply.choices[0].finish_reason == "tool_calls"
    async with client.chat.completions.stream(**ask) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    raw = await post_json(http_client, base_url, "chat/completions", {**ask, "stream": True})
    chunks = [json.loads(event) for event in data_events(raw.body)[:-1]]
    for chunk in chunks:
        assert_valid(registry, "CreateChatCompletionStreamResponse", chunk)
    deltas = [chunk["choices"][0]["delta"]["tool_calls"][0] for chunk in chunks
              if chunk["choices"][0]["delta"].get("tool_calls")]
    assert deltas[0] == {"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert len(deltas) > 2 and all(set(delta) == {"index", "function"} for delta in deltas[1:])
    assert "".join(delta["function"]["arguments"] for delta in deltas) == call.function.arguments


@pytest.mark.gen_test
async def test_a_tool_call_reply_on_responses_whole_and_streamed(client, registry):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    answer = await client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[tool])
    [item] = answer.output
    assert (item.type, item.call_id, item.name, json.loads(item.arguments)) == (
        "function_call", "call_1", "get_weather", {"city": "Oslo"})
    async with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[tool]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert final.output[0].arguments == item.arguments


@pytest.mark.gen_test
async def test_a_tool_result_on_responses_gets_the_fixtures_answer(client):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    first = await client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[tool])
    call = first.output[0]
    second = await client.responses.create(model=MODEL, tools=[tool], previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": "4 C"}'}])
    assert second.output_text == "It is 4 C in Oslo."
    assert second.usage.input_tokens == sum(map(ozwell.count_tokens, (
        "Weather in Oslo?", call.arguments, '{"temperature": "4 C"}')))


@pytest.mark.gen_test
async def test_a_json_reply_parses_on_responses_and_a_schema_that_refuses_it_is_a_400(
        client, http_client, base_url):
    class Order(pydantic.BaseModel):
        status: str

    session = {"x-ozwell-session": "receipts"}
    await control(http_client, base_url, "POST", "fixtures", session="receipts",
                  body={"match": {"user": {"contains": "receipt"}}, "reply": {"json": {"status": "paid"}}})
    parsed = await client.responses.parse(model=MODEL, input="my receipt", text_format=Order,
                                          extra_headers=session)
    assert parsed.output_parsed == Order(status="paid")
    refusing = {"type": "json_schema", "name": "count", "schema": {
        "type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}}
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model=MODEL, input="my receipt", text={"format": refusing},
                                      extra_headers=session)
    assert "json_schema refuses: the top level: 'count' is a required property" in raised.value.body["message"]


@pytest.mark.gen_test
async def test_a_refusal_reply_on_chat_and_responses(client):
    refusing = {"extra_headers": {"x-test-case": "refuse"}}
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, **refusing)
    assert reply.choices[0].message.refusal == "I can't help with that."
    assert reply.choices[0].message.content is None
    async with client.chat.completions.stream(model=MODEL, messages=HELLO, **refusing) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.refusal == "I can't help with that."
    answer = await client.responses.create(model=MODEL, input="Hello", **refusing)
    assert answer.output[0].content[0].type == "refusal"
    assert answer.output[0].content[0].refusal == "I can't help with that."
    async with client.responses.stream(model=MODEL, input="Hello", **refusing) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.refusal.delta"]
    assert "".join(deltas) == "I can't help with that."


@pytest.mark.gen_test
async def test_a_json_reply_streams_into_the_sdks_parse_helper(client):
    class Order(pydantic.BaseModel):
        status: str

    async with client.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "order 9"}], response_format=Order) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == Order(status="shipped")
    answer = await client.responses.create(model=MODEL, input="order 9")
    assert answer.output_text != '{"status":"shipped"}'  # that fixture is for chat only


@pytest.mark.gen_test
async def test_a_reply_the_request_contradicts_is_a_400_unless_deliberate(client):
    with pytest.raises(openai.BadRequestError) as raised:
        await chat(client, "launch it", tools=[WEATHER_TOOL])
    assert raised.value.code == "fixture_contradicts_request"
    assert "'launch', which the request does not offer (it offers 'get_weather')" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        await chat(client, "launch it", tools=[WEATHER_TOOL], tool_choice="none")
    assert "tool_choice 'none'" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "my invoice"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "order", "schema": ORDER_SCHEMA}})
    assert "json_schema refuses: status: 5 is not of type 'string'" in raised.value.body["message"]
    # Without a json_schema, any JSON goes; a deliberate fixture sends what it has.
    assert json.loads(await chat(client, "my invoice")) == {"status": 5}
    stubborn = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stubborn"}])
    assert stubborn.choices[0].finish_reason == "tool_calls"


@pytest.mark.gen_test
async def test_error_reply_with_headers_and_the_sdk_sees_it(client, registry, http_client, base_url):
    with pytest.raises(openai.RateLimitError) as raised:
        await chat(client, "throttle me")
    assert raised.value.body["message"] == "Slow down."
    assert raised.value.code == "rate_limit_exceeded" and raised.value.type == "requests"
    assert raised.value.response.headers["retry-after-ms"] == "10"
    assert raised.value.response.headers["x-ozwell-generator"] == "fixture"
    with pytest.raises(openai.InternalServerError) as raised:
        await client.embeddings.create(model="text-embedding-3-small", input="an outage")
    assert raised.value.body["message"] == "Overloaded."
    embedded = await client.embeddings.create(model="text-embedding-3-small", input="hi there")
    assert len(embedded.data[0].embedding) == 1536  # a text fixture cannot answer embeddings
    reply = await post_json(http_client, base_url, "responses", {"model": MODEL, "input": "throttle"})
    assert reply.code == 429
    assert_valid(registry, "ErrorResponse", json.loads(reply.body))


@pytest.mark.gen_test
async def test_usage_numbers_are_reported_as_set(client):
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count me"}])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (100, 7, 107)
    answer = await client.responses.create(model=MODEL, input="count me")
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (100, 7)


@pytest.mark.gen_test
async def test_counted_usage_and_max_tokens_cut_like_the_model(client):
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices[0].message.content == "Hello from"
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1, 2)


@pytest.mark.gen_test
async def test_sequence_then_repeat_last_or_fall_through(client):
    assert [await chat(client, "step") for _ in range(4)] == ["one", "two", "two", "two"]
    answers = [await chat(client, "it falls") for _ in range(3)]
    assert answers[:2] == ["first", "second"] and answers[2].startswith("You said")


@pytest.mark.gen_test
async def test_uses_limit_then_the_model_answers(client):
    answers = [await chat(client, "limited") for _ in range(3)]
    assert answers[:2] == ["limited reply"] * 2 and answers[2].startswith("You said")


@pytest.mark.gen_test
async def test_fixture_reply_matches_the_response_schemas(http_client, base_url, registry):
    reply = await post_json(http_client, base_url, "chat/completions",
                            {"model": MODEL, "messages": [{"role": "user", "content": "ping"}]})
    assert_valid(registry, "CreateChatCompletionResponse", json.loads(reply.body))
    reply = await post_json(http_client, base_url, "responses", {"model": "gpt-4o", "input": "ping"})
    assert reply.code == 200  # any model id, when a fixture answers
    assert_valid(registry, "Response", json.loads(reply.body))


def test_the_sync_sdk_against_a_server_process(server_process, fixtures_file):
    server = server_process(args=("--fixtures", str(fixtures_file)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "pong"
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "ping"}]) as stream:
        assert stream.get_final_completion().choices[0].message.content == "pong"
    assert client.responses.create(model=MODEL, input="ping").output_text == "pong"


# --- the control API ---------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_fixtures_added_through_the_api_come_first_and_are_cleared(http_client, base_url, client, registry):
    status, added = await control(http_client, base_url, "POST", "fixtures",
                                  {"name": "mine", "match": {"user": {"exact": "ping"}},
                                   "reply": {"text": "pong from the API"}})
    assert status == 200 and added["source"] == "session" and added["used"] == 0
    assert_valid(registry, "ListedFixture", added)
    assert await chat(client, "ping") == "pong from the API"
    status, listed = await control(http_client, base_url, "GET", "fixtures")
    assert_valid(registry, "FixtureList", listed)
    assert [(item["name"], item["used"]) for item in listed["data"][:3]] == [
        ("mine", 1), ("greeting", 0), ("exact", 0)]
    assert len(listed["data"]) == 1 + len(FIXTURES["fixtures"])
    status, cleared = await control(http_client, base_url, "DELETE", "fixtures")
    assert cleared == {"object": "list", "session": "default", "deleted": 1}
    assert_valid(registry, "RigCleared", cleared)
    assert await chat(client, "ping") == "pong"


@pytest.mark.gen_test
@pytest.mark.parametrize("fixture, fragment", [
    ({"reply": {"txt": "x"}}, "('txt' was unexpected)"),
    ({"match": {"user": {"regex": "("}}, "reply": {"text": "x"}}, "match.user.regex: '(' is not a valid regular expression"),
    ({"match": {"user": {"exact": "a", "regex": "b"}}, "reply": {"text": "x"}}, "exactly one of exact, contains or regex"),
    ({"match": {"endpoint": "embeddings"}, "reply": {"text": "x"}}, "its reply cannot answer embeddings"),
    ({"reply": {"text": "x", "status": 500}}, "give one of text, tool_calls, json, refusal or status"),
    ({"reply": {"sequence": [{"sequence": [{"text": "x"}]}]}}, "a sequence cannot hold another sequence"),
    ({"reply": {"status": 429, "headers": {"Content-Length": "5"}}}, "Content-Length cannot be set"),
])
async def test_a_bad_fixture_through_the_api_is_a_400_saying_why(http_client, base_url, fixture, fragment):
    status, body = await control(http_client, base_url, "POST", "fixtures", fixture)
    assert status == 400
    assert fragment in body["error"]["message"] or fragment in (body["error"]["param"] or "")


@pytest.mark.gen_test
async def test_control_routes_need_the_api_key_and_are_documented(http_client, base_url):
    status, body = await control(http_client, base_url, "GET", "fixtures", auth=False)
    assert status == 401
    document = json.loads((await http_client.fetch(f"{base_url}/openapi.json")).body)
    rig_paths = {path: item for path, item in document["paths"].items() if path.startswith("/_ozwell/")}
    assert set(rig_paths) == {"/_ozwell/fixtures", "/_ozwell/faults", "/_ozwell/requests", "/_ozwell/reset",
                              "/_ozwell/replay"}
    for item in rig_paths.values():
        for operation in item.values():
            assert operation["tags"] == ["Test rig"] and operation["security"] == [{"ApiKeyAuth": []}]


# --- the fixtures file and strict mode ---------------------------------------------------------

def start_main(tmp_path, *args):
    """ozwell.main() on a port that is taken: a fixtures file it accepted could not make it
    serve forever, it would fail to bind instead."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        return ozwell.main([*args, "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
                            "--port", str(taken.getsockname()[1])])


@pytest.mark.parametrize("document, message", [
    ({"fixtures": [{"reply": {"text": "ok"}}, {"reply": {"txt": "x"}}]},
     "fixtures[1].reply: unknown key 'txt' (the keys allowed here: text, tool_calls, json"),
    ({"fixtures": [{"match": {"user": {"regex": "a(b"}}, "reply": {"text": "x"}}]},
     "fixtures[0].match.user.regex: 'a(b' is not a valid regular expression (missing ), "
     "unterminated subpattern at position 1)"),
    ({"fixtures": [{"reply": {"text": "x"}}, {"reply": {"text": "y"}},
                   {"match": {"endpoint": ["chat", "embeddings"]}, "reply": {"refusal": "no"}}]},
     "fixtures[2]: its reply cannot answer embeddings"),
    ({"fixtures": [{"matches": {}, "reply": {"text": "x"}}]}, "fixtures[0]: unknown key 'matches'"),
    ({"fixtures": [{"match": {"turn": 0}, "reply": {"text": "x"}}]},
     "fixtures[0].match.turn: 0 is less than the minimum of 1"),
    ({"faults": [{"type": "stall"}]}, "faults[0]: a fault of type stall needs 'ms'"),
    ({"faults": [{"type": "cut", "ms": 5}]}, "faults[0]: ms does not apply to a fault of type cut"),
    ({"faults": [{"type": "error", "status": 500, "calls": "3-1"}]}, "faults[0].calls: '3-1' ends before it starts"),
    ({"fixture": []}, "the top level: unknown key 'fixture'"),
])
def test_a_bad_fixtures_file_stops_the_start_in_one_line(tmp_path, capsys, document, message):
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(document))
    assert start_main(tmp_path, "--fixtures", str(path)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ozwell: fixtures file {path}: {message}")
    assert error.count("\n") == 1


@pytest.mark.parametrize("raw, message", [
    (b"{", "is not valid JSON"),
    (b'{"fixtures": [{"reply": {"json": NaN}}]}', "is not valid JSON: NaN is not a JSON value"),
    (b'{"fixtures": [{"reply": {"text": "\xff"}}]}', "is not valid JSON: 'utf-8' codec can't decode"),
])
def test_a_fixtures_file_that_is_not_plain_json_is_refused(tmp_path, capsys, raw, message):
    path = tmp_path / "rig.json"
    path.write_bytes(raw)
    assert start_main(tmp_path, "--fixtures", str(path)) == 2
    assert message in capsys.readouterr().err


def test_a_missing_fixtures_file_is_named(tmp_path, capsys):
    assert start_main(tmp_path, "--fixtures", str(tmp_path / "nope.json")) == 2
    assert capsys.readouterr().err == (
        f"ozwell: fixtures file {tmp_path / 'nope.json'}: cannot be read: No such file or directory\n")


def test_a_bad_fixtures_file_stops_a_real_server_process(tmp_path, server_process):
    path = tmp_path / "rig.json"
    path.write_text(json.dumps({"fixtures": [{"reply": {"text": "ok"}}, {"reply": {}}]}))
    with pytest.raises(RuntimeError) as raised:
        server_process(args=("--fixtures", str(path)))
    assert f"ozwell: fixtures file {path}: fixtures[1].reply: {{}} does not have enough properties" in str(raised.value)


def test_every_schema_example_loads_as_a_fixture_or_fault(registry):
    for index, example in enumerate(registry.schemas["Fixture"]["examples"]):
        ozwell.parse_fixture(example, "file", index)
    for index, example in enumerate(registry.schemas["Fault"]["examples"]):
        ozwell.parse_fault(example, "file", index)


STRICT = {"fixtures": [
    {"name": "weather", "match": {"model": "gpt-4o", "user": {"contains": "weather"}}, "reply": {"text": "a"}},
    {"name": "far", "match": {"model": "llama3", "turn": 3}, "reply": {"text": "b"}},
    {"name": "responses-only", "match": {"endpoint": "responses", "user": {"contains": "hello"}},
     "reply": {"text": "c"}},
    {"name": "once", "match": {"user": {"contains": "hello"}}, "uses": 1, "reply": {"text": "d"}},
    {"name": "header", "match": {"headers": {"x-case": "7"}, "user": {"exact": "hello there"}},
     "reply": {"text": "e"}},
]}


@pytest.mark.gen_test
@pytest.mark.parametrize("rig", [(STRICT, True)], indirect=True)
async def test_strict_mode_names_the_three_nearest_fixtures_and_why(client, rig):
    assert await chat(client, "hello there", model="gpt-4o") == "d"
    with pytest.raises(openai.BadRequestError) as raised:
        await chat(client, "hello there", model="gpt-4o")
    assert raised.value.code == "no_fixture_matched"
    assert raised.value.body["message"] == (
        "No fixture matches this request, and OZWELL_FIXTURES_STRICT is on. The nearest: "
        "'weather' (fixtures[0]): the last user message \"hello there\" does not hold the "
        "words \"weather\"; "
        "'responses-only' (fixtures[2]): it answers responses, not chat; "
        "'once' (fixtures[3]): it has answered 1 time(s), its limit.")
    # Embeddings cannot be scripted with a reply, so strict mode leaves them be.
    assert (await client.embeddings.create(model="text-embedding-3-small", input="x")).data


@pytest.mark.gen_test
@pytest.mark.parametrize("rig", [({}, True)], indirect=True)
async def test_strict_mode_without_fixtures_says_so(client, rig):
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model=MODEL, input="hello")
    assert raised.value.body["message"].endswith("No fixtures are loaded.")


def test_the_index_finds_what_trying_every_fixture_in_order_finds():
    """Random fixtures of every text test against random texts: the first fixture found through
    the index is the first that trying them all in order finds."""
    draw = random.Random(7)
    # With some letters that case-insensitive regexes take for others: ſ for s, ı for i.
    words = ["order", "ticket", "Weather", "in", "oslo", "12", "hi", "ſtatus", "status", "İstanbul",
             "ping", "pıng"]

    def text_test():
        word, other = draw.choice(words), draw.choice(words)
        kind = draw.choice(["exact", "contains", "regex", "regex", "regex"])
        value = {"exact": f"{word} {other}", "contains": f"{word} {other}",
                 "regex": draw.choice([rf"\b{word} {other}", rf"^{word}\W+\d*", rf"(?i){word} (\w+)",
                                       rf"{word}{other}", rf"[a-z]+ {word}", rf"(?a)\b{other}\b"])}[kind]
        return {kind: value, "ignore_case": draw.random() < 0.3}

    tests = [{"contains": "pıng", "ignore_case": True}, {"regex": r"(?i)\bſtatus\b"},
             {"regex": r"(?i)\bweather in\b"}] + [text_test() for _ in range(300)]
    fixtures = [ozwell.parse_fixture({"match": {"user": test}, "reply": {"text": "x"}}, "file", n)
                for n, test in enumerate(tests)]
    index = ozwell.FixtureIndex(fixtures)
    texts = ["PING", "Status", "WEATHER IN oslo"] + [
        draw.choice(["", " ", "!", "-"]).join(
            draw.choice([str.lower, str.upper, str.title, str])(draw.choice(words))
            for _ in range(draw.randint(1, 4))) for _ in range(2000)]
    for text in texts:
        first = next((f.index for f in fixtures if f.user.test(text)), None)
        assert next((f.index for f in index.candidates(text) if f.user.test(text)), None) == first, text
