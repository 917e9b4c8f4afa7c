"""/v1/responses answered by the Llama backend (OZWELL_RESPONSES_BACKEND=upstream): each rule of
the translation to chat completions and back, through the official SDK and raw HTTP, against a
recording fake backend (tests/fake_backend.py) on a real socket."""
import asyncio
import json
import os
import socket
import subprocess
import sys

import openai
import pydantic
import pytest

import ozwell
import test_responses
from conftest import API_KEY, AUTH, ROOT, free_port, raw_chat_post, served_in_a_thread
from fake_backend import DEFAULT_USAGE, FakeBackend

UPSTREAM_KEY = "upstream-secret"
LLAMA = "llama3"

SCHEMA_OF_EVENT = {
    **test_responses.SCHEMA_OF_EVENT,
    "response.refusal.delta": "ResponseRefusalDeltaEvent",
    "response.refusal.done": "ResponseRefusalDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.failed": "ResponseFailedEvent",
}

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Today's weather.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False},
                "strict": True}
CALLS = [{"id": "call_a", "name": "get_weather", "arguments": ['{"city":', '"Paris"}']},
         {"id": "call_b", "name": "get_weather", "arguments": ['{"city":"Oslo"}']}]
# The same two calls as a chat request carries them.
CHAT_CALLS = [{"id": call["id"], "type": "function",
               "function": {"name": call["name"], "arguments": "".join(call["arguments"])}}
              for call in CALLS]


@pytest.fixture
def settings(tmp_path, backend):
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=backend.url,
                           llama_api_key=UPSTREAM_KEY, responses_backend="upstream")


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def schema_errors(registry, name, instance):
    return [f"{list(e.absolute_path)}: {e.message}" for e in registry.errors(name, instance)]


def fake(**plan):
    return {"fake": plan}


async def post(http_client, base_url, body, path="/v1/responses"):
    reply = await http_client.fetch(f"{base_url}{path}", method="POST", headers=AUTH,
                                    body=json.dumps(body), raise_error=False)
    return reply


def parse_events(raw: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2
            events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return events


async def stream_events(http_client, base_url, body=None, path="/v1/responses", **kwargs):
    chunks = []
    reply = await http_client.fetch(
        f"{base_url}{path}", method="POST" if body is not None else "GET", headers=AUTH,
        body=json.dumps(body) if body is not None else None, streaming_callback=chunks.append,
        **kwargs)
    return reply, parse_events(b"".join(chunks))


def assert_events_valid(registry, events):
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    for name, data in events:
        assert data["type"] == name
        assert not schema_errors(registry, "ResponseStreamEvent", data), name
        assert not schema_errors(registry, SCHEMA_OF_EVENT[name], data), name


def collapsed(names):
    """Event names with runs of the same name shown once."""
    return [name for i, name in enumerate(names) if i == 0 or name != names[i - 1]]


# --- who answers --------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_other_models_go_to_the_backend_and_the_header_says_so(client, backend, registry):
    reply = await client.responses.with_raw_response.create(model=LLAMA, input="Hello there")
    response = reply.parse()
    assert reply.headers["x-ozwell-generator"] == "upstream"
    assert response.output_text == "echo: Hello there"
    assert len(backend.requests) == 1
    path, headers, _ = backend.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" and API_KEY not in str(dict(headers))


@pytest.mark.gen_test
async def test_any_model_id_goes_to_the_backend_which_may_refuse_it(client, backend):
    response = await client.responses.create(model="qwen3:0.6b", input="hi")  # not in LLAMA_MODELS
    assert response.model == "qwen3:0.6b" and backend.bodies()[0]["model"] == "qwen3:0.6b"
    error = {"message": "model 'nope' not found", "type": "not_found_error", "param": None,
             "code": None}
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model="nope", input="hi", extra_body=fake(status=404, error=error))
    assert caught.value.body["message"] == "model 'nope' not found"


@pytest.mark.gen_test
async def test_the_built_in_model_still_answers_here(client, backend):
    reply = await client.responses.with_raw_response.create(model=ozwell.OFFLINE_MODEL, input="hi")
    assert reply.headers["x-ozwell-generator"] == "deterministic"
    assert reply.parse().output_text == ozwell.deterministic_reply(
        ozwell.OFFLINE_MODEL, [("user", "hi")]).text
    assert backend.requests == []


@pytest.mark.gen_test
async def test_by_default_the_generator_answers_every_model(ozwell_with, sdk, backend):
    api = sdk(ozwell_with(responses_backend="deterministic"))
    reply = await api.responses.with_raw_response.create(model=LLAMA, input="hi")
    assert reply.headers["x-ozwell-generator"] == "deterministic"
    assert "deterministic answer from llama3" in reply.parse().output_text
    assert backend.requests == []


# --- the request, translated --------------------------------------------------------------------

@pytest.mark.gen_test
async def test_fields_are_translated_kept_or_passed_on(client, backend):
    await client.responses.create(
        model=LLAMA, input="Hello there", instructions="Be brief.", temperature=0.2, top_p=0.9,
        max_output_tokens=50, user="u1", metadata={"ticket": "42"}, store=True,
        parallel_tool_calls=False, safety_identifier="s-1", prompt_cache_key="k-1",
        truncation="auto", reasoning={"effort": "low"}, text={"verbosity": "low"},
        extra_body={"options": {"num_ctx": 4096}, "top_k": 20})
    assert backend.bodies()[0] == {
        "model": LLAMA,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hello there"}],
        "temperature": 0.2, "top_p": 0.9, "parallel_tool_calls": False, "user": "u1",
        "safety_identifier": "s-1", "prompt_cache_key": "k-1",
        "max_completion_tokens": 50, "max_tokens": 50, "verbosity": "low",
        "reasoning_effort": "low", "stream": False,
        "options": {"num_ctx": 4096}, "top_k": 20,  # a backend's own options, untouched
    }


@pytest.mark.gen_test
async def test_message_items_and_their_parts_become_chat_messages(client, backend):
    image = "data:image/png;base64,iVBORw0KGgo="
    await client.responses.create(model=LLAMA, input=[
        {"role": "developer", "content": "Answer in French."},
        {"role": "system", "content": [{"type": "input_text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "first part"},
                                     {"type": "input_text", "text": "second part"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "ok"}, {"type": "refusal", "refusal": "not that"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": image, "detail": "low"}]},
    ])
    assert backend.bodies()[0]["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "first part\nsecond part"},
        {"role": "assistant", "content": "ok\nnot that"},  # a conversation's turns are text
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": image, "detail": "low"}}]},
    ]


@pytest.mark.gen_test
async def test_function_calls_and_their_outputs_become_tool_calls_and_tool_messages(client, backend):
    await client.responses.create(model=LLAMA, tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"type": "message", "role": "assistant", "content": "Let me look."},
        *({"type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
           "arguments": call["function"]["arguments"]} for call in CHAT_CALLS),
        {"type": "function_call_output", "call_id": "call_a", "output": "21 C"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [{"type": "input_text", "text": "4 C"}, {"type": "input_text", "text": "snow"}]},
    ])
    sent = backend.bodies()[0]
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": CHAT_CALLS},
        {"role": "tool", "tool_call_id": "call_a", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "4 C\nsnow"},
    ]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Today's weather.",
        "parameters": WEATHER_TOOL["parameters"], "strict": True}}]


@pytest.mark.gen_test
@pytest.mark.parametrize("choice, sent", [
    ("required", "required"),
    ("none", "none"),
    ({"type": "function", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]},
     {"type": "allowed_tools", "allowed_tools": {
         "mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}),
])
async def test_tool_choice(client, backend, choice, sent):
    response = await client.responses.create(model=LLAMA, input="hi", tools=[WEATHER_TOOL],
                                             tool_choice=choice)
    assert backend.bodies()[0]["tool_choice"] == sent
    assert response.tool_choice == choice or response.tool_choice.model_dump(exclude_none=True) == choice


@pytest.mark.gen_test
@pytest.mark.parametrize("text_format, response_format", [
    ({"type": "json_schema", "name": "city", "strict": True, "description": "A city.",
      "schema": {"type": "object", "properties": {"name": {"type": "string"}}}},
     {"type": "json_schema", "json_schema": {
         "name": "city", "description": "A city.", "strict": True,
         "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}),
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "text"}, None),
])
async def test_text_format_becomes_response_format(client, backend, text_format, response_format):
    response = await client.responses.create(model=LLAMA, input="A city, as JSON.",
                                             text={"format": text_format})
    assert backend.bodies()[0].get("response_format") == response_format
    assert response.text.format.type == text_format["type"]


@pytest.mark.gen_test
async def test_previous_response_id_sends_the_earlier_turns_whichever_backend_answered(client, backend):
    # A turn the built-in model answered, then one the backend answered with function calls.
    first = await client.responses.create(model=ozwell.OFFLINE_MODEL, input="My name is Ada.",
                                          instructions="Not carried over.")
    second = await client.responses.create(
        model=LLAMA, input="Weather?", previous_response_id=first.id, tools=[WEATHER_TOOL],
        extra_body=fake(content=None, tool_calls=CALLS))
    assert [item.type for item in second.output] == ["function_call", "function_call"]
    third = await client.responses.create(model=LLAMA, previous_response_id=second.id, input=[
        {"type": "function_call_output", "call_id": "call_a", "output": "21 C"},
        {"type": "function_call_output", "call_id": "call_b", "output": "4 C"}])
    turns = [{"role": "user", "content": "My name is Ada."},
             {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "Weather?"}]
    assert backend.bodies()[0]["messages"] == turns
    assert backend.bodies()[1]["messages"] == turns + [
        {"role": "assistant", "content": None, "tool_calls": CHAT_CALLS},
        {"role": "tool", "tool_call_id": "call_a", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "4 C"}]
    # And the built-in model continues the backend's answer, reading its turns.
    fourth = await client.responses.create(model=ozwell.OFFLINE_MODEL, input="Thanks!",
                                           previous_response_id=third.id)
    Turn, ToolCall = ozwell.Turn, ozwell.ToolCall
    assert fourth.output_text == ozwell.deterministic_reply(ozwell.OFFLINE_MODEL, [
        Turn("user", "My name is Ada."), Turn("assistant", first.output_text),
        Turn("user", "Weather?"),
        Turn("assistant", "", (ToolCall("call_a", "get_weather", '{"city":"Paris"}'),
                               ToolCall("call_b", "get_weather", '{"city":"Oslo"}'))),
        Turn("tool", "21 C", call_id="call_a"), Turn("tool", "4 C", call_id="call_b"),
        Turn("assistant", third.output_text), Turn("user", "Thanks!")]).text


@pytest.mark.gen_test
async def test_a_conversation_sends_its_items_and_gets_the_new_ones(client, backend):
    conversation = await client.conversations.create(
        items=[{"role": "user", "content": "My name is Ada."},
               {"type": "message", "role": "assistant", "content": "Hello Ada."}])
    response = await client.responses.create(model=LLAMA, input="What is my name?",
                                             conversation=conversation.id,
                                             extra_body=fake(content=["Ada."]))
    assert response.conversation.id == conversation.id
    assert backend.bodies()[0]["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"}]
    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert [(item.role, item.content[0].text) for item in items] == [
        ("user", "My name is Ada."), ("assistant", "Hello Ada."),
        ("user", "What is my name?"), ("assistant", "Ada.")]
    # The model may be left out: the conversation's last answer says which.
    await client.post("/responses", cast_to=object, body={
        "input": "Thanks.", "conversation": conversation.id})
    assert backend.bodies()[1]["model"] == LLAMA and len(backend.bodies()[1]["messages"]) == 5


@pytest.mark.gen_test
async def test_a_continuation_without_a_model_goes_to_the_model_that_answered(client, backend):
    first = await client.responses.create(model="qwen3:0.6b", input="hi")
    second = await client.post("/responses", cast_to=object, body={
        "input": "again", "previous_response_id": first.id})
    assert second["model"] == "qwen3:0.6b"
    assert [body["model"] for body in backend.bodies()] == ["qwen3:0.6b", "qwen3:0.6b"]


@pytest.mark.gen_test
async def test_a_background_response_is_refused(client, backend):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=LLAMA, input="hi", background=True)
    assert caught.value.body["param"] == "background"
    assert backend.requests == []


@pytest.mark.gen_test
async def test_an_item_reference_sends_the_item_it_names(client, backend):
    first = await client.responses.create(model=LLAMA, input="Remember 42.")
    items = [item async for item in client.responses.input_items.list(first.id)]
    await client.responses.create(model=LLAMA, input=[
        {"type": "item_reference", "id": items[0].id},
        {"type": "item_reference", "id": first.output[0].id},
        {"role": "user", "content": "Which number?"}])
    assert backend.bodies()[1]["messages"] == [
        {"role": "user", "content": "Remember 42."},
        {"role": "assistant", "content": "echo: Remember 42."},
        {"role": "user", "content": "Which number?"}]
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model=LLAMA, input=[
            {"type": "item_reference", "id": "msg_0123456789abcdef0123456789abcdef"}])
    assert caught.value.body["param"] == "input"
    assert len(backend.requests) == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER_TOOL, {"type": "web_search"}]}, "tools[1].type"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0]"),
])
async def test_what_chat_cannot_carry_is_a_400_naming_it(http_client, base_url, backend, registry,
                                                        extra, param):
    reply = await post(http_client, base_url, {"model": LLAMA, "input": "hi", **extra})
    body = json.loads(reply.body)
    assert reply.code == 400 and not schema_errors(registry, "ErrorResponse", body)
    assert body["error"]["param"] == param and param in body["error"]["message"]
    assert backend.requests == []


# --- the reply, translated ----------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_text_reply_becomes_a_response_like_the_built_in_models(http_client, base_url,
                                                                       backend, registry):
    usage = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
             "prompt_tokens_details": {"cached_tokens": 12},
             "completion_tokens_details": {"reasoning_tokens": 2}}
    reply = await post(http_client, base_url, {"model": LLAMA, "input": "hi", "metadata": {"k": "v"},
                                               **fake(content=["Hello", "!"], usage=usage)})
    response = json.loads(reply.body)
    local = json.loads((await post(http_client, base_url,
                                   {"model": ozwell.OFFLINE_MODEL, "input": "hi"})).body)
    assert not schema_errors(registry, "Response", response)
    assert set(response) == set(local)
    assert response["status"] == "completed" and response["model"] == LLAMA
    assert response["metadata"] == {"k": "v"} and response["error"] is None
    assert response["output"][0]["content"] == [
        {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert response["usage"] == {
        "input_tokens": 30, "input_tokens_details": {"cached_tokens": 12, "cache_write_tokens": 0},
        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 35}


@pytest.mark.gen_test
async def test_tool_calls_become_function_call_items(client, backend, registry):
    reply = await client.responses.with_raw_response.create(
        model=LLAMA, input="Weather?", tools=[WEATHER_TOOL],
        extra_body=fake(content=["Checking."], tool_calls=CALLS))
    response = reply.parse()
    assert [item.type for item in response.output] == ["message", "function_call", "function_call"]
    calls = response.output[1:]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_a", "get_weather", '{"city":"Paris"}', "completed"),
        ("call_b", "get_weather", '{"city":"Oslo"}', "completed")]
    assert all(c.id.startswith("fc_") for c in calls) and response.output_text == "Checking."
    assert not schema_errors(registry, "Response", json.loads(reply.content))


@pytest.mark.gen_test
@pytest.mark.parametrize("plan, status, reason, kinds", [
    ({"finish_reason": "length"}, "incomplete", "max_output_tokens", ["output_text"]),
    ({"finish_reason": "content_filter"}, "incomplete", "content_filter", ["output_text"]),
    ({"content": None, "refusal": ["I can't ", "help."]}, "completed", None, ["refusal"]),
    ({"content": []}, "completed", None, ["output_text"]),
])
async def test_how_the_reply_ended(client, registry, plan, status, reason, kinds):
    reply = await client.responses.with_raw_response.create(model=LLAMA, input="hi",
                                                            extra_body=fake(**plan))
    response = reply.parse()
    assert response.status == status
    assert (response.incomplete_details.reason if response.incomplete_details else None) == reason
    assert [part.type for part in response.output[0].content] == kinds
    assert response.output[0].status == ("incomplete" if reason else "completed")
    assert (response.completed_at is None) == (status != "completed")
    assert not schema_errors(registry, "Response", json.loads(reply.content))


@pytest.mark.gen_test
async def test_a_backend_without_usage_gives_zeros(client):
    response = await client.responses.create(model=LLAMA, input="hi", extra_body=fake(usage=None))
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (0, 0, 0)


@pytest.mark.gen_test
@pytest.mark.parametrize("stream", [False, True])
async def test_backend_errors_come_back_as_on_the_chat_proxy(client, stream, backend):
    error = {"message": "request (2024 tokens) exceeds the available context size (512 tokens)",
             "type": "exceed_context_size_error", "code": 400}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=LLAMA, input="hi", stream=stream,
                                      extra_body=fake(status=400, error=error))
    assert caught.value.body["code"] == "context_length_exceeded"
    assert caught.value.response.headers["x-ozwell-generator"] == "upstream"
    with pytest.raises(openai.RateLimitError) as caught:
        await client.responses.create(model=LLAMA, input="hi", stream=stream,
                                      extra_body=fake(status=429, headers={"Retry-After": "7"}))
    assert caught.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.InternalServerError) as caught:
        await client.responses.create(model=LLAMA, input="hi", stream=stream,
                                      extra_body=fake(status=200, error="<html>a login page</html>"))
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_invalid_response"


@pytest.mark.gen_test
async def test_a_json_answer_that_is_not_a_chat_completion_is_a_502(client, backend):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.responses.create(model=LLAMA, input="hi", extra_body=fake(
            status=200, error={"message": "no choices here"}))
    assert caught.value.status_code == 502 and "not a chat completion" in caught.value.message


@pytest.mark.gen_test
async def test_an_unreachable_backend_is_a_502(ozwell_with, sdk):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    api = sdk(ozwell_with(llama_base_url=dead))
    with pytest.raises(openai.InternalServerError) as caught:
        await api.responses.create(model=LLAMA, input="hi")
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_unavailable"
    assert dead not in caught.value.body["message"]  # the URL goes to the log only


# --- streams ------------------------------------------------------------------------------------



@pytest.mark.gen_test
async def test_a_stream_becomes_openais_events_in_order(http_client, base_url, backend, registry):
    reply, events = await stream_events(http_client, base_url, {
        "model": LLAMA, "input": "hi", "stream": True, **fake(content=["Hel", "lo", " there"])})
    assert reply.headers["x-ozwell-generator"] == "upstream"
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert collapsed([name for name, _ in events]) == test_responses.STREAM_ORDER + ["response.completed"]
    assert [data["delta"] for name, data in events if name.endswith("text.delta")] == ["Hel", "lo", " there"]
    assert_events_valid(registry, events)
    assert backend.bodies()[0]["stream"] is True
    assert backend.bodies()[0]["stream_options"] == {"include_usage": True}
    started, final = events[0][1]["response"], events[-1][1]["response"]
    assert started["status"] == "in_progress" and started["usage"] is None and started["output"] == []
    assert final["id"] == started["id"] and final["output"][0]["content"][0]["text"] == "Hello there"
    assert final["usage"]["input_tokens"] == DEFAULT_USAGE["prompt_tokens"]
    assert final["usage"]["output_tokens"] == DEFAULT_USAGE["completion_tokens"]


@pytest.mark.gen_test
async def test_a_stream_with_text_and_tool_calls(http_client, base_url, registry):
    _, events = await stream_events(http_client, base_url, {
        "model": LLAMA, "input": "Weather?", "stream": True, "tools": [WEATHER_TOOL],
        **fake(content=["Checking", "."], tool_calls=CALLS)})
    assert_events_valid(registry, events)
    names = collapsed([name for name, _ in events])
    call_events = ["response.output_item.added", "response.function_call_arguments.delta",
                   "response.function_call_arguments.done", "response.output_item.done"]
    assert names == test_responses.STREAM_ORDER + call_events + call_events + ["response.completed"]
    arguments = [(data["output_index"], data["delta"]) for name, data in events
                 if name == "response.function_call_arguments.delta"]
    assert arguments == [(1, '{"city":'), (1, '"Paris"}'), (2, '{"city":"Oslo"}')]
    added = [data["item"] for name, data in events if name == "response.output_item.added"][1]
    assert added["arguments"] == "" and added["status"] == "in_progress" and added["call_id"] == "call_a"
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][1]["arguments"] == '{"city":"Paris"}'
    done = [data for name, data in events if name == "response.function_call_arguments.done"]
    assert [(d["name"], d["arguments"]) for d in done] == [
        ("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Oslo"}')]


@pytest.mark.gen_test
@pytest.mark.parametrize("plan, last, kinds", [
    ({"finish_reason": "length"}, "response.incomplete", ["response.output_text.delta"]),
    ({"content": None, "refusal": ["I can't", " help."]}, "response.completed", ["response.refusal.delta"]),
    ({"content": []}, "response.completed", []),
])
async def test_how_a_stream_ended(http_client, base_url, registry, plan, last, kinds):
    _, events = await stream_events(http_client, base_url,
                                    {"model": LLAMA, "input": "hi", "stream": True, **fake(**plan)})
    assert_events_valid(registry, events)
    assert events[-1][0] == last
    assert {name for name, _ in events if name.endswith(".delta")} == set(kinds)
    final = events[-1][1]["response"]
    assert len(final["output"]) == 1 and final["output"][0]["status"] == (
        "incomplete" if last == "response.incomplete" else "completed")


def released_once_seen(backend, received, marker=b'"delta":"one "'):
    """A streaming callback that keeps what arrives and lets the paused backend go on once
    `marker` has reached the client."""
    def on_chunk(data):
        received.append(data)
        if marker in b"".join(received):
            backend.release.set()
    return on_chunk


@pytest.mark.gen_test
async def test_each_event_is_relayed_as_it_arrives(http_client, base_url, backend):
    received = []
    reply = asyncio.ensure_future(http_client.fetch(
        f"{base_url}/v1/responses", method="POST", headers=AUTH,
        streaming_callback=released_once_seen(backend, received),
        body=json.dumps({"model": LLAMA, "input": "hi", "stream": True,
                         **fake(content=["one ", "two "], pause_after=1)})))
    await asyncio.wait_for(backend.release.wait(), 5)
    assert b"two " not in b"".join(received)
    await reply
    assert b"two " in b"".join(received)


@pytest.mark.gen_test
async def test_a_stream_the_backend_breaks_off_ends_with_response_failed(
        http_client, base_url, client, registry, backend):
    # The backend sends one delta, waits for the client to have it, then hangs up.
    received = []
    await http_client.fetch(f"{base_url}/v1/responses", method="POST", headers=AUTH,
                            streaming_callback=released_once_seen(backend, received),
                            body=json.dumps({
                                "model": LLAMA, "input": "hi", "stream": True,
                                **fake(content=["one ", "two "], pause_after=1, cut_after=1)}))
    events = parse_events(b"".join(received))
    assert_events_valid(registry, events)
    assert events[-1][0] == "response.failed"
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "broke off" in failed["error"]["message"] and backend.url not in failed["error"]["message"]
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "one "
    stored = await client.responses.retrieve(failed["id"])
    assert stored.status == "failed" and stored.error.message == failed["error"]["message"]


@pytest.mark.gen_test
async def test_an_error_event_from_the_backend_ends_with_response_failed(http_client, base_url, registry):
    _, events = await stream_events(http_client, base_url, {
        "model": LLAMA, "input": "hi", "stream": True, **fake(content=["one ", "two "], error_after=1)})
    assert_events_valid(registry, events)
    assert events[-1][0] == "response.failed"
    assert "the model crashed" in events[-1][1]["response"]["error"]["message"]
    assert [data["delta"] for name, data in events if name.endswith("text.delta")] == ["one "]


@pytest.mark.gen_test
async def test_a_stream_event_that_is_not_a_chunk_ends_with_response_failed(
        http_client, base_url, registry, backend):
    _, events = await stream_events(http_client, base_url, {
        "model": LLAMA, "input": "hi", "stream": True,
        **fake(content=["one ", "two ", "three "], garbage_after=1, pause_after=2)})
    assert_events_valid(registry, events)
    assert events[-1][0] == "response.failed"
    assert "not a chat completion chunk" in events[-1][1]["response"]["error"]["message"]
    assert [data["delta"] for name, data in events if name.endswith("text.delta")] == ["one "]
    await asyncio.wait_for(backend.disconnected.wait(), 1.0)  # the rest is not waited for


@pytest.mark.gen_test
async def test_a_whole_answer_to_a_stream_request_is_still_streamed(http_client, base_url, registry):
    _, events = await stream_events(http_client, base_url, {
        "model": LLAMA, "input": "hi", "stream": True,
        **fake(content=["Hello there"], json_to_a_stream=True)})
    assert_events_valid(registry, events)
    assert events[-1][0] == "response.completed"
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == "Hello there"


@pytest.mark.gen_test
async def test_client_hang_up_closes_the_backend_request_within_a_second(client, backend):
    stream = await client.responses.create(model=LLAMA, input="hi", stream=True,
                                           extra_body=fake(content=["one "] * 400, pause_after=1))
    async for event in stream:
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    await asyncio.wait_for(backend.disconnected.wait(), 1.0)
    assert not backend.finished.is_set()


@pytest.mark.gen_test(timeout=60)
async def test_a_slow_client_slows_the_backend_read(http_server, base_url, backend):
    # 24 MB of deltas; the client stops reading after the headers. With backpressure the
    # backend stalls once the socket buffers on the way are full; without it, it would send all.
    count, pad = 3000, 8000
    body = json.dumps({"model": LLAMA, "input": "hi", "stream": True, "store": False,
                       **fake(content=["w"] * count, pad=pad)}).encode()
    reader, writer = await raw_chat_post(base_url, body, path="/v1/responses")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(backend.finished.wait(), 1.0)
    assert backend.sent_bytes < count * pad / 2
    # Reading the deltas lets the backend finish (the done events that repeat the text are
    # left unread).
    received = 0
    while received < count * pad:
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data, "the stream ended early"
        received += len(data)
    await asyncio.wait_for(backend.finished.wait(), 10)
    writer.close()


# --- the official SDK ---------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_sdk_stream_helper_gives_deltas_and_the_final_response(client):
    deltas = []
    async with client.responses.stream(model=LLAMA, input="hi", extra_body=fake(
            content=["Hel", "lo"])) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert deltas == ["Hel", "lo"] and final.output_text == "Hello" and final.status == "completed"


@pytest.mark.gen_test
async def test_sdk_stream_helper_with_function_calls(client):
    async with client.responses.stream(model=LLAMA, input="Weather?", tools=[WEATHER_TOOL],
                                       extra_body=fake(content=None, tool_calls=CALLS)) as stream:
        snapshots = [event.snapshot async for event in stream
                     if event.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    assert snapshots == ['{"city":', '{"city":"Paris"}', '{"city":"Oslo"}']
    assert [(item.call_id, item.arguments) for item in final.output] == [
        ("call_a", '{"city":"Paris"}'), ("call_b", '{"city":"Oslo"}')]


class City(pydantic.BaseModel):
    name: str
    population: int


@pytest.mark.gen_test
@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_parse_with_structured_output(client, backend, stream):
    content = ['{"name": "Oslo", ', '"population": 709000}']
    if stream:
        async with client.responses.stream(model=LLAMA, input="A city.", text_format=City,
                                           extra_body=fake(content=content)) as events:
            final = await events.get_final_response()
    else:
        final = await client.responses.parse(model=LLAMA, input="A city.", text_format=City,
                                             extra_body=fake(content=content))
    assert final.output_parsed == City(name="Oslo", population=709000)
    sent = backend.bodies()[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "City"
    assert sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["required"] == ["name", "population"]


@pytest.mark.gen_test
async def test_sdk_parse_raises_when_the_reply_does_not_fit(client):
    with pytest.raises(pydantic.ValidationError):
        await client.responses.parse(model=LLAMA, input="A city.", text_format=City,
                                     extra_body=fake(content=['{"name": "Oslo"}']))


# --- state stays with Ozwell --------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_stored_stream_is_retrieved_and_replayed_event_for_event(
        client, http_client, base_url, registry):
    body = {"model": LLAMA, "input": "hi", "stream": True, "tools": [WEATHER_TOOL],
            **fake(content=["Hel", "lo ", "there"], tool_calls=CALLS)}
    _, original = await stream_events(http_client, base_url, body)
    response_id = original[0][1]["response"]["id"]
    reply, replayed = await stream_events(http_client, base_url,
                                          path=f"/v1/responses/{response_id}?stream=true")
    assert replayed == original
    assert reply.headers["x-ozwell-generator"] == "upstream"
    _, later = await stream_events(http_client, base_url,
                                   path=f"/v1/responses/{response_id}?stream=true&starting_after=6")
    assert later == original[7:]
    retrieved = await http_client.fetch(f"{base_url}/v1/responses/{response_id}", headers=AUTH)
    assert json.loads(retrieved.body) == original[-1][1]["response"]
    items = [item async for item in client.responses.input_items.list(response_id)]
    assert [(item.type, item.role, item.content[0].text) for item in items] == [("message", "user", "hi")]


@pytest.mark.gen_test
async def test_input_items_list_function_calls_and_outputs(client, http_client, base_url, registry):
    created = await client.responses.create(model=LLAMA, input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "21 C"}])
    reply = await http_client.fetch(f"{base_url}/v1/responses/{created.id}/input_items?order=asc",
                                    headers=AUTH)
    page = json.loads(reply.body)
    assert not schema_errors(registry, "ResponseItemList", page)
    assert [item["type"] for item in page["data"]] == ["message", "function_call", "function_call_output"]
    assert page["data"][2]["output"] == "21 C" and page["data"][1]["call_id"] == "call_a"


@pytest.mark.gen_test
async def test_store_false_keeps_nothing(client, backend):
    response = await client.responses.create(model=LLAMA, input="ephemeral", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    assert "store" not in backend.bodies()[0]


@pytest.mark.gen_test
async def test_a_stream_the_client_leaves_is_not_stored(client, backend, settings):
    stream = await client.responses.create(model=LLAMA, input="hi", stream=True,
                                           extra_body=fake(content=["one "] * 50, pause_after=1))
    response_id = None
    async for event in stream:
        response_id = response_id or event.response.id
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    await asyncio.wait_for(backend.disconnected.wait(), 1.0)
    await asyncio.sleep(0.05)
    assert ozwell.ResponseStore(settings.data_dir).load(response_id) is None


# --- a real server process ----------------------------------------------------------------------

def test_the_sync_sdk_through_a_server_process_and_its_banner(server_process):
    with served_in_a_thread(FakeBackend) as fake_backend:
        server = server_process(env={"LLAMA_BASE_URL": fake_backend.url,
                                     "OZWELL_RESPONSES_BACKEND": "upstream"})
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        first = api.responses.create(model=LLAMA, input="My name is Ada.")
        assert first.output_text == "echo: My name is Ada."
        with api.responses.stream(model=LLAMA, input="And mine?", previous_response_id=first.id,
                                  extra_body=fake(content=["Bob", "."])) as stream:
            deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
            final = stream.get_final_response()
        assert deltas == ["Bob", "."] and final.output_text == "Bob."
        assert fake_backend.bodies()[1]["messages"][:2] == [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "echo: My name is Ada."}]
    server.stop()
    banner = server.process.stdout.read()
    assert ("backends: responses upstream (every model but the built-in ones goes upstream), "
            "embeddings deterministic (for built-in models only)") in banner
    assert "(chat completions and responses for any other model)" in banner


@pytest.mark.parametrize("variable", ["OZWELL_RESPONSES_BACKEND", "OZWELL_EMBEDDINGS_BACKEND"])
def test_an_unknown_backend_ends_the_start_in_one_line(variable, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "ozwell.py"), "--port", "0"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, variable: "ollama"})
    assert result.returncode == 2
    assert result.stderr.strip() == (f"ozwell: {variable}=ollama is not a backend: use "
                                     "deterministic or upstream")
