"""Tool calls and structured output from the built-in model, on chat and on Responses.

Arguments and JSON replies are checked against the caller's schema with jsonschema, every
reply and streamed event against the server's own schemas, and the SDK's parse() and stream()
helpers rebuild what was sent.
"""
import json
import os
import subprocess
import sys

import jsonschema
import openai
import pydantic
import pytest

import ozwell
from conftest import AUTH, ROOT

MODEL = ozwell.OFFLINE_MODEL
REGISTRY = ozwell.SchemaRegistry.load()

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": TIME}},
]
RESPONSE_TOOLS = [{"type": "function", **tool["function"]} for tool in CHAT_TOOLS]
ASK = [{"role": "user", "content": "What is the weather in New York for 3 days, in fahrenheit?"}]


def schema_errors(name, instance):
    return [f"{list(e.absolute_path)}: {e.message}" for e in REGISTRY.errors(name, instance)]


def valid_against(schema, instance):
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(instance)]


async def post(http_client, base_url, path, body):
    reply = await http_client.fetch(f"{base_url}{path}", method="POST", headers=AUTH,
                                    body=json.dumps(body), raise_error=False)
    return reply.code, reply.body


def sse_data(raw: bytes) -> list:
    events = []
    for block in raw.decode().split("\n\n"):
        data = [line[len("data: "):] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append(data[0] if data[0] == "[DONE]" else json.loads(data[0]))
    return events


def reply_options(**fields):
    fields.setdefault("tools", tuple(ozwell.function_tool(t["function"], "p", ozwell.CheckedSchemas())
                                     for t in CHAT_TOOLS))
    return ozwell.ReplyOptions(**fields)


# --- the generator of schema-valid JSON -------------------------------------------------------

def instance(schema, text="What is the weather in Paris, in celsius, for 3 days?"):
    turns = [ozwell.Turn("user", text)]
    return ozwell.schema_instance(schema, ozwell.ValueSource(turns, b"seed"), "test", "p")


def test_values_are_drawn_from_the_last_user_message():
    value = instance({
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["kelvin", "celsius"]},
                       "days": {"type": "integer"}, "celsius": {"type": "boolean"},
                       "forecast": {"type": "boolean"}, "query": {"type": "string"}},
        "required": ["city", "unit", "days", "celsius", "forecast", "query"]},
        "Weather in São Paulo for 3 days, in celsius please")
    assert value == {"city": "São Paulo", "unit": "celsius", "days": 3, "celsius": True,
                     "forecast": False, "query": "Weather in São Paulo for 3 days, in celsius please"}


# Every construct OpenAI's strict mode allows, and a few it does not.
STRICT_SCHEMAS = {
    "nested objects and arrays": {
        "type": "object", "additionalProperties": False, "required": ["trip", "stops"],
        "properties": {
            "trip": {"type": "object", "additionalProperties": False, "required": ["from", "to"],
                     "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
            "stops": {"type": "array", "minItems": 2, "maxItems": 3, "uniqueItems": True,
                      "items": {"type": "string"}}}},
    "anyOf with null": {
        "type": "object", "additionalProperties": False, "required": ["note", "count"],
        "properties": {"note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "count": {"type": ["integer", "null"]}}},
    "recursive $ref through $defs": {
        "type": "object", "additionalProperties": False, "required": ["root"],
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "$defs": {"node": {"type": "object", "additionalProperties": False,
                           "required": ["name", "children"],
                           "properties": {"name": {"type": "string"},
                                          "children": {"type": "array",
                                                       "items": {"$ref": "#/$defs/node"}}}}}},
    "root recursion": {
        "type": "object", "additionalProperties": False, "required": ["value", "next"],
        "properties": {"value": {"type": "number"},
                       "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}},
    "string formats": {
        "type": "object", "additionalProperties": False,
        "required": ["when", "day", "at", "mail", "id", "host", "ip", "site", "span"],
        "properties": {"when": {"type": "string", "format": "date-time"},
                       "day": {"type": "string", "format": "date"},
                       "at": {"type": "string", "format": "time"},
                       "mail": {"type": "string", "format": "email"},
                       "id": {"type": "string", "format": "uuid"},
                       "host": {"type": "string", "format": "hostname"},
                       "ip": {"type": "string", "format": "ipv4"},
                       "site": {"type": "string", "format": "uri"},
                       "span": {"type": "string", "format": "duration"}}},
    "bounded numbers": {
        "type": "object", "additionalProperties": False,
        "required": ["ratio", "above", "below", "step", "score", "negative"],
        "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 0.5},
                       "above": {"type": "integer", "exclusiveMinimum": 10},
                       "below": {"type": "number", "exclusiveMaximum": 0},
                       "step": {"type": "integer", "multipleOf": 5, "minimum": 12, "maximum": 20},
                       "score": {"type": "number", "minimum": 2.5, "maximum": 2.75},
                       "negative": {"type": "integer", "maximum": -40}}},
    "const, enum and pattern": {
        "type": "object", "additionalProperties": False, "required": ["kind", "level", "code"],
        "properties": {"kind": {"const": "report"}, "level": {"enum": [1, 2, 3]},
                       "code": {"type": "string", "pattern": "^[A-Z][a-z]+$"}}},
    "allOf and oneOf (not in strict mode)": {
        "allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                  {"properties": {"b": {"oneOf": [{"type": "integer"}, {"type": "string"}]}},
                   "required": ["b"]}]},
    "string lengths": {
        "type": "object", "additionalProperties": False, "required": ["short", "long"],
        "properties": {"short": {"type": "string", "maxLength": 3},
                       "long": {"type": "string", "minLength": 40}}},
}


@pytest.mark.parametrize("name", list(STRICT_SCHEMAS))
def test_every_schema_construct_gets_a_valid_value(name):
    schema = STRICT_SCHEMAS[name]
    value = instance(schema)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert list(jsonschema.Draft202012Validator(schema, format_checker=checker).iter_errors(value)) == []


UNSATISFIABLE = [
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}},
      "required": ["a"]}, "at least 5 and at most 2"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1.2, "maximum": 1.8}},
      "required": ["n"]}, "no integer at 'n'"),
    ({"type": "object", "properties": {"e": {"enum": []}}, "required": ["e"]}, "enum at 'e' is empty"),
    ({"type": "object", "properties": {}, "required": ["x"], "additionalProperties": False},
     "'x' is required"),
    ({"type": "object", "properties": {"x": False}, "required": ["x"]}, "'x' allows no value"),
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "^[0-9]{9}$"}},
      "required": ["x"]}, "matches the pattern"),
    ({"type": "object", "properties": {"x": {"type": "string", "not": {"type": "string"}}},
      "required": ["x"]}, "fails at 'x'"),
]


@pytest.mark.parametrize("schema, reason", UNSATISFIABLE)
@pytest.mark.gen_test
async def test_a_schema_no_value_can_satisfy_gets_a_400_saying_why(http_client, base_url, schema, reason):
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    status, body = await post(http_client, base_url, "/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "tools": [tool], "tool_choice": "required"})
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "unsatisfiable_schema", error
    assert error["param"] == "tools[0].function.parameters"
    assert "function 'f'" in error["message"] and reason in error["message"]
    status, body = await post(http_client, base_url, "/v1/responses", {
        "model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "r",
                                                           "schema": schema}}})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "text.format.schema" and reason in error["message"]


SAME_BYTES_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import ozwell
schemas = json.loads(sys.argv[2])
tools = tuple(ozwell.function_tool({"name": f"tool_{i}", "parameters": s}, "p", ozwell.CheckedSchemas())
              for i, s in enumerate(schemas))
turns = [ozwell.Turn("user", "Plan a trip from Oslo to Rome via Paris, 2026-05-01, 4 people")]
calls = [ozwell.offline_reply("m", turns, ozwell.ReplyOptions(
    tools=(tool,), tool_choice="required")).tool_calls[0].arguments for tool in tools]
text = ozwell.offline_reply("m", turns, ozwell.ReplyOptions(
    json_format=ozwell.JSONFormat("r", schemas[0], True, "p"))).text
print(json.dumps([calls, text]))
"""


def test_the_same_request_gives_the_same_bytes_in_every_process():
    schemas = json.dumps([s for s in STRICT_SCHEMAS.values() if s.get("type") == "object"])
    outputs = {subprocess.run(
        [sys.executable, "-c", SAME_BYTES_SCRIPT, str(ROOT), schemas], capture_output=True,
        text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("0", "1", "random")}
    assert len(outputs) == 1
    calls, text = json.loads(outputs.pop())
    assert len(calls) == 8 and json.loads(text)


# --- which tool the model calls --------------------------------------------------------------

def chosen(text, **fields):
    return [tool.name for tool in ozwell.choose_tools(reply_options(**fields),
                                                      [ozwell.Turn("user", text)])]


def test_the_tool_choice_rule():
    assert chosen("What's the weather in Paris?") == ["get_weather"]
    assert chosen("What's the weather and the time in Paris?") == ["get_weather", "get_time"]
    assert chosen("What's the weather and the time?", parallel_tool_calls=False) == ["get_weather"]
    assert chosen("What's the weather and the time?", max_tool_calls=1) == ["get_weather"]
    assert chosen("Tell me a joke") == []
    assert chosen("Tell me a joke", tool_choice="required") == ["get_weather"]
    assert chosen("Tell me a joke", tool_choice="required", allowed_tools=("get_time",)) == ["get_time"]
    assert chosen("What's the weather?", tool_choice="none") == []
    assert chosen("Weather and times", allowed_tools=("get_time",)) == ["get_time"]


def test_tools_already_called_since_the_user_spoke_are_not_called_again():
    call = ozwell.ToolCall("call_1", "get_weather", "{}")
    turns = [ozwell.Turn("user", "The weather and the time in Paris?"),
             ozwell.Turn("assistant", "", (call,)), ozwell.Turn("tool", "Sunny", call_id="call_1")]
    options = reply_options(parallel_tool_calls=False)
    assert [t.name for t in ozwell.choose_tools(options, turns)] == ["get_time"]
    turns += [ozwell.Turn("assistant", "", (ozwell.ToolCall("call_2", "get_time", "{}"),)),
              ozwell.Turn("tool", "noon", call_id="call_2")]
    assert ozwell.choose_tools(options, turns) == []
    assert [t.name for t in ozwell.choose_tools(reply_options(tool_choice="required"), turns)] == [
        "get_weather"]


# --- chat completions ------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_required_gives_a_call_whose_arguments_fit_the_schema(client, http_client, base_url):
    reply = await client.chat.completions.create(model=MODEL, messages=ASK, tools=CHAT_TOOLS,
                                                 tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert arguments == {"city": "New York", "unit": "fahrenheit", "days": 3}
    assert valid_against(WEATHER, arguments) == []
    assert reply.usage.completion_tokens == ozwell.count_tokens(call.function.arguments)
    status, raw = await post(http_client, base_url, "/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "tools": CHAT_TOOLS, "tool_choice": "required"})
    assert status == 200 and schema_errors("CreateChatCompletionResponse", json.loads(raw)) == []


@pytest.mark.gen_test
async def test_every_tool_choice_form(client):
    async def calls(**kwargs):
        reply = await client.chat.completions.create(model=MODEL, tools=CHAT_TOOLS, **kwargs)
        return [call.function.name for call in reply.choices[0].message.tool_calls or ()]

    joke = [{"role": "user", "content": "Tell me a joke"}]
    both = [{"role": "user", "content": "The weather and the time in Oslo?"}]
    assert await calls(messages=both) == ["get_weather", "get_time"]
    assert await calls(messages=both, tool_choice="auto", parallel_tool_calls=False) == ["get_weather"]
    assert await calls(messages=both, tool_choice="none") == []
    assert await calls(messages=joke) == []
    assert await calls(messages=joke, tool_choice="required") == ["get_weather"]
    assert await calls(messages=joke, tool_choice={"type": "function",
                                                   "function": {"name": "get_time"}}) == ["get_time"]
    allowed = {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}
    assert await calls(messages=joke, tool_choice=allowed) == ["get_time"]
    allowed["allowed_tools"]["mode"] = "auto"
    assert await calls(messages=joke, tool_choice=allowed) == []


@pytest.mark.gen_test
async def test_a_tool_loop_ends_with_an_answer_quoting_the_results(client):
    messages = [{"role": "user", "content": "The weather and the time in Oslo?"}]
    first = await client.chat.completions.create(model=MODEL, messages=messages, tools=CHAT_TOOLS)
    calls = first.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    results = {"get_weather": "Snow, -3 C", "get_time": "14:05"}
    messages += [{"role": "tool", "tool_call_id": call.id, "content": results[call.function.name]}
                 for call in calls]
    final = await client.chat.completions.create(model=MODEL, messages=messages, tools=CHAT_TOOLS)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    text = final.choices[0].message.content
    assert 'get_weather returned "Snow, -3 C"' in text and 'get_time returned "14:05"' in text


@pytest.mark.gen_test
async def test_streamed_tool_calls_are_openais_deltas(client, http_client, base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather and time in Oslo?"}],
            "tools": CHAT_TOOLS, "stream": True, "stream_options": {"include_usage": True}}
    status, raw = await post(http_client, base_url, "/v1/chat/completions", body)
    events = sse_data(raw)
    assert status == 200 and events[-1] == "[DONE]"
    for event in events[:-1]:
        assert schema_errors("CreateChatCompletionStreamResponse", event) == []
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    openings = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [(o["index"], o["type"], o["function"]["name"], o["function"]["arguments"])
            for o in openings] == [(0, "function", "get_weather", ""), (1, "function", "get_time", "")]
    fragments = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert fragments and all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"}
                             for f in fragments)
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls" and events[-3]["choices"][0]["delta"] == {}

    whole = await client.chat.completions.create(**{k: v for k, v in body.items()
                                                     if k not in ("stream", "stream_options")})
    async with client.chat.completions.stream(**{k: v for k, v in body.items() if k != "stream"}) as stream:
        final = await stream.get_final_completion()
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert final.usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}],
     "messages.[1].role", "must be a response to a preceeding message with 'tool_calls'"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [
          {"id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
          {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_a", "content": "noon"},
      {"role": "user", "content": "and?"}],
     "messages.[1].role", "did not have response messages: call_b"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [
          {"id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
      {"role": "user", "content": "and?"},
      {"role": "tool", "tool_call_id": "call_a", "content": "noon"}],
     "messages.[1].role", "did not have response messages: call_a"),
])
@pytest.mark.gen_test
async def test_tool_messages_out_of_place_get_openais_400(http_client, base_url, messages, param, words):
    status, body = await post(http_client, base_url, "/v1/chat/completions",
                              {"model": MODEL, "messages": messages, "tools": CHAT_TOOLS})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == param and words in error["message"]


@pytest.mark.parametrize("extra, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools' are specified"),
    ({"tools": CHAT_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope'"),
    ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "tools[0].type", "function tools only"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "does not match"),
    ({"tools": []}, "tools", "empty array"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools[0].function.parameters", "Invalid schema for function 'f'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "'type: \"object\"'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}]},
     "tools[0].function.parameters", "'additionalProperties' is required to be supplied and to be false"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
        "type": "object", "additionalProperties": False,
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                             "required": ["b"], "additionalProperties": False},
                       "c": {"type": "string"}}, "required": ["a"]}}}},
     "response_format", "In context=(), 'required' is required to be supplied and to be an array "
                        "including every key in properties. Missing 'c'."),
    ({"response_format": {"type": "json_object"}}, "messages", "must contain the word 'json'"),
])
@pytest.mark.gen_test
async def test_bad_tools_and_formats_get_openais_400(http_client, base_url, extra, param, words):
    status, body = await post(http_client, base_url, "/v1/chat/completions",
                              {"model": MODEL, "messages": ASK, **extra})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == param and words in error["message"], error


class Forecast(pydantic.BaseModel):
    city: str
    days: int
    summary: str
    kind: str = pydantic.Field(json_schema_extra={"enum": ["sunny", "rainy"]})


@pytest.mark.gen_test
async def test_structured_output_parses_into_the_callers_model(client):
    parsed = await client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast)
    forecast = parsed.choices[0].message.parsed
    assert forecast == Forecast(city="New York", days=3, summary=ASK[0]["content"], kind="sunny")
    async with client.chat.completions.stream(model=MODEL, messages=ASK, response_format=Forecast) as stream:
        assert (await stream.get_final_completion()).choices[0].message.parsed == forecast
    loose = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Answer in JSON: hello?"}],
        response_format={"type": "json_object"})
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


@pytest.mark.gen_test
async def test_a_json_schema_reply_cut_short_is_length_and_parse_says_so(client):
    whole = await client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast)
    with pytest.raises(openai.LengthFinishReasonError) as raised:
        await client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast,
                                            max_completion_tokens=3)
    cut = raised.value.completion.choices[0]
    assert cut.finish_reason == "length"
    assert cut.message.content == "".join(ozwell.tokenize(whole.choices[0].message.content)[:3])


# --- Responses ------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_responses_call_a_function_then_answer_with_its_output(client, http_client, base_url):
    first = await client.responses.create(model=MODEL, input=ASK[0]["content"], tools=RESPONSE_TOOLS)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert valid_against(WEATHER, json.loads(call.arguments)) == []
    stored = await http_client.fetch(f"{base_url}/v1/responses/{first.id}", headers=AUTH)
    assert schema_errors("Response", json.loads(stored.body)) == []

    output = {"type": "function_call_output", "call_id": call.call_id, "output": "Hail, 2 C"}
    chained = await client.responses.create(model=MODEL, previous_response_id=first.id,
                                            input=[output], tools=RESPONSE_TOOLS)
    replayed = await client.responses.create(model=MODEL, tools=RESPONSE_TOOLS, input=[
        ASK[0], {"type": "function_call", "call_id": call.call_id, "name": call.name,
                 "arguments": call.arguments}, output])
    assert 'get_weather returned "Hail, 2 C"' in chained.output_text
    assert chained.output_text == replayed.output_text

    items = await http_client.fetch(f"{base_url}/v1/responses/{replayed.id}/input_items?order=asc",
                                    headers=AUTH)
    page = json.loads(items.body)
    assert schema_errors("ResponseItemList", page) == []
    assert [item["type"] for item in page["data"]] == ["message", "function_call", "function_call_output"]


@pytest.mark.gen_test
async def test_streamed_function_calls_follow_openais_event_order(client, http_client, base_url):
    body = {"model": MODEL, "input": "The weather and the time in Oslo?", "tools": RESPONSE_TOOLS,
            "stream": True}
    status, raw = await post(http_client, base_url, "/v1/responses", body)
    events = sse_data(raw)
    assert status == 200
    for event in events:
        assert schema_errors("ResponseStreamEvent", event) == [], event["type"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    expected = ["response.created", "response.in_progress"]
    for item in events[-1]["response"]["output"]:
        expected += ["response.output_item.added"]
        expected += ["response.function_call_arguments.delta"] * len(ozwell.tokenize(item["arguments"]))
        expected += ["response.function_call_arguments.done", "response.output_item.done"]
    assert kinds == expected + ["response.completed"]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [(i["name"], i["arguments"], i["status"]) for i in added] == [
        ("get_weather", "", "in_progress"), ("get_time", "", "in_progress")]

    response_id = events[0]["response"]["id"]
    replay = await http_client.fetch(f"{base_url}/v1/responses/{response_id}?stream=true", headers=AUTH)
    assert sse_data(replay.body) == events
    async with client.responses.stream(**{k: v for k, v in body.items() if k != "stream"}) as stream:
        final = await stream.get_final_response()
    assert [(o.name, o.arguments) for o in final.output] == [
        (i["name"], i["arguments"]) for i in events[-1]["response"]["output"]]


@pytest.mark.gen_test
async def test_an_item_reference_to_a_stored_item_reads_it(client, http_client, base_url):
    first = await client.responses.create(model=MODEL, input="My name is Ada.")
    referenced = await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "My name is Ada."},
        {"type": "item_reference", "id": first.output[0].id},
        {"role": "user", "content": "What is my name?"}])
    inline = await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert referenced.output_text == inline.output_text and "turn 3" in inline.output_text
    items = [item async for item in client.responses.input_items.list(referenced.id, order="asc")]
    assert items[1].id == first.output[0].id

    status, body = await post(http_client, base_url, "/v1/responses", {"model": MODEL, "input": [
        {"type": "item_reference", "id": "msg_0123456789abcdef0123456789abcdef"}]})
    assert status == 404 and json.loads(body)["error"]["param"] == "input"


@pytest.mark.gen_test
async def test_responses_structured_output_and_every_tool_choice(client):
    parsed = await client.responses.parse(model=MODEL, input=ASK[0]["content"], text_format=Forecast)
    assert parsed.output_parsed.city == "New York" and parsed.output_parsed.days == 3
    assert parsed.text.format.type == "json_schema"
    loose = await client.responses.create(model=MODEL, input="Reply in json",
                                          text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(loose.output_text), dict)

    async def names(**kwargs):
        response = await client.responses.create(model=MODEL, input="Tell me a joke",
                                                 tools=RESPONSE_TOOLS, **kwargs)
        return [item.name for item in response.output if item.type == "function_call"]

    assert await names() == [] and await names(tool_choice="none") == []
    assert await names(tool_choice="required") == ["get_weather"]
    assert await names(tool_choice={"type": "function", "name": "get_time"}) == ["get_time"]
    assert await names(tool_choice={"type": "allowed_tools", "mode": "required",
                                    "tools": [{"type": "function", "name": "get_time"}]}) == ["get_time"]


@pytest.mark.parametrize("tool", ["web_search", "web_search_preview", "file_search", "code_interpreter",
                                  "computer_use_preview", "mcp", "image_generation", "local_shell"])
@pytest.mark.gen_test
async def test_hosted_tools_get_a_400_naming_the_tool(http_client, base_url, tool):
    status, body = await post(http_client, base_url, "/v1/responses",
                              {"model": MODEL, "input": "hi", "tools": [{"type": tool}]})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "tools[0].type" and f"'{tool}'" in error["message"]


@pytest.mark.parametrize("body, param, words", [
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
     "input", "No tool call found for function call output with call_id call_x."),
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "function_call", "call_id": "call_y", "name": "get_time", "arguments": "{}"},
                {"role": "user", "content": "and?"}], "tools": RESPONSE_TOOLS},
     "input", "No tool output found for function call call_y."),
    ({"input": "hi", "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "'web_search_preview'"),
    ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "'nope'"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "at least one function"),
    ({"input": "hi", "text": {"format": {"type": "json_object"}}}, "input", "the word 'json'"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "r", "strict": True,
                                         "schema": {"type": "object", "properties": {}}}}},
     "text.format.schema", "'additionalProperties' is required"),
])
@pytest.mark.gen_test
async def test_responses_bad_calls_and_formats_get_a_400(http_client, base_url, body, param, words):
    status, raw = await post(http_client, base_url, "/v1/responses", {"model": MODEL, **body})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param and words in error["message"], error


# --- the renderers, for replies the built-in model does not write (refusals) ------------------

def test_a_refusal_renders_in_every_wire_format():
    refusal = ozwell.Generation((), "stop", 3, refusal="I can't help with that.")
    head = {"id": "chatcmpl-1", "created": 1, "model": MODEL}
    body = ozwell.chat_completion(head, [refusal])
    assert schema_errors("CreateChatCompletionResponse", body) == []
    assert body["choices"][0]["message"]["content"] is None
    assert body["choices"][0]["message"]["refusal"] == "I can't help with that."
    chunks = list(ozwell.chat_completion_chunks(head, [refusal], include_usage=False))
    assert "".join(c["choices"][0]["delta"].get("refusal") or "" for c in chunks[:-1]) == refusal.refusal
    response = ozwell.render_response({"model": MODEL, "input": "x"}, refusal, MODEL)
    assert schema_errors("Response", response) == []
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": refusal.refusal}]
    events = [{**e, "sequence_number": n} for n, e in enumerate(ozwell.response_events(response))]
    for event in events:
        assert schema_errors("ResponseStreamEvent", event) == [], event["type"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.refusal.delta") == refusal.refusal
