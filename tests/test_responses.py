"""POST /v1/responses and the stored-response routes, through the official SDK and raw HTTP."""
import json
import os
import time

import openai
import openapi_spec_validator
import pytest

import ozwell
from conftest import AUTH

MODEL = ozwell.OFFLINE_MODEL

STREAM_ORDER = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
    "response.content_part.done", "response.output_item.done",
]

SCHEMA_OF_EVENT = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
}


@pytest.fixture
def settings(tmp_path, request):
    """The default settings; a test may set a stream pace with indirect parametrization."""
    pace = getattr(request, "param", 0.0)
    return ozwell.Settings(data_dir=str(tmp_path / "data"), stream_tokens_per_second=pace)


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def schema_errors(registry, name, instance):
    return [f"{list(e.absolute_path)}: {e.message}" for e in registry.errors(name, instance)]


def reply_to(conversation, max_tokens=None, model=MODEL):
    return ozwell.deterministic_reply(model, conversation, max_tokens)


async def post(http_client, base_url, body, path="/v1/responses"):
    reply = await http_client.fetch(f"{base_url}{path}", method="POST", headers=AUTH,
                                    body=json.dumps(body), raise_error=False)
    return reply.code, json.loads(reply.body)


async def fetch_events(http_client, base_url, path, body=None):
    """A stream's raw text and its events as (event name, data) pairs."""
    chunks = []
    await http_client.fetch(
        f"{base_url}{path}", method="POST" if body is not None else "GET", headers=AUTH,
        body=json.dumps(body) if body is not None else None, streaming_callback=chunks.append)
    text = b"".join(chunks).decode()
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2
            events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return text, events


# --- Must work 1: validation ------------------------------------------------------------

@pytest.mark.gen_test
async def test_every_documented_field_is_accepted_and_echoed(client):
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    response = await client.responses.create(
        model=MODEL, input="Which tools?", instructions="Be brief.", max_output_tokens=200,
        temperature=0.2, top_p=0.9, metadata={"ticket": "42"}, store=True, tools=tools,
        tool_choice="auto", text={"format": {"type": "text"}}, user="user-7",
        parallel_tool_calls=False, truncation="auto", reasoning={"effort": "low"},
        include=["message.output_text.logprobs"], service_tier="auto", top_logprobs=0,
        safety_identifier="s-1", prompt_cache_key="k-1", background=False, max_tool_calls=3,
        extra_body={"some_future_field": {"nested": True}})
    assert response.status == "completed"
    assert (response.instructions, response.temperature, response.top_p) == ("Be brief.", 0.2, 0.9)
    assert response.metadata == {"ticket": "42"} and response.user == "user-7"
    assert response.tools[0].name == "lookup" and response.tool_choice == "auto"
    assert response.parallel_tool_calls is False and response.truncation == "auto"
    assert response.max_output_tokens == 200 and response.max_tool_calls == 3


@pytest.mark.parametrize("body, param, code", [
    ({"input": "hi"}, "model", "missing_required_parameter"),
    ({"model": MODEL}, "input", "missing_required_parameter"),
    ({"model": 7, "input": "hi"}, "model", "invalid_type"),
    ({"model": MODEL, "input": 12}, "input", "invalid_type"),
    ({"model": MODEL, "input": []}, "input", "empty_array"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "invalid_value"),
    ({"model": MODEL, "input": [{"role": "user"}]}, "input[0].content", "missing_required_parameter"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "invalid_value"),
    ({"model": MODEL, "input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "invalid_value"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments", "missing_required_parameter"),
    ({"model": MODEL, "input": "hi", "instructions": 3}, "instructions", "invalid_type"),
    ({"model": MODEL, "input": "hi", "max_output_tokens": 5}, "max_output_tokens", "invalid_value"),
    ({"model": MODEL, "input": "hi", "max_output_tokens": "many"}, "max_output_tokens", "invalid_type"),
    ({"model": MODEL, "input": "hi", "temperature": 2.5}, "temperature", "invalid_value"),
    ({"model": MODEL, "input": "hi", "top_p": -1}, "top_p", "invalid_value"),
    ({"model": MODEL, "input": "hi", "metadata": {"k": 1}}, "metadata.k", "invalid_type"),
    ({"model": MODEL, "input": "hi", "store": "yes"}, "store", "invalid_type"),
    ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream", "invalid_type"),
    ({"model": MODEL, "input": "hi", "previous_response_id": 5}, "previous_response_id", "invalid_type"),
    ({"model": MODEL, "input": "hi", "tools": [{"name": "x"}]}, "tools[0].type", "missing_required_parameter"),
    ({"model": MODEL, "input": "hi", "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"model": MODEL, "input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value"),
    ({"model": MODEL, "input": "hi", "user": 9}, "user", "invalid_type"),
    ({"model": "gpt-nonexistent", "input": "hi"}, "model", "model_not_found"),
    ({"model": MODEL, "input": "hi", "conversation": "conv_1", "previous_response_id": "resp_1"},
     "conversation", "mutually_exclusive_parameters"),
    ({"model": MODEL, "input": "hi", "conversation": 5}, "conversation", "invalid_value"),
    ({"model": MODEL, "input": "hi", "background": True, "store": False}, "store", "invalid_value"),
    ({"model": MODEL, "input": "hi", "reasoning": {"effort": "enormous"}}, "reasoning.effort", "invalid_value"),
])
@pytest.mark.gen_test
async def test_bad_input_gets_a_400_naming_the_field(http_client, base_url, registry, body, param, code):
    status, reply = await post(http_client, base_url, body)
    assert status == 400
    assert not schema_errors(registry, "ErrorResponse", reply)
    assert reply["error"]["param"] == param and reply["error"]["code"] == code
    assert reply["error"]["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in reply["error"]["message"]


@pytest.mark.gen_test
async def test_sdk_raises_bad_request_for_an_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model="gpt-nonexistent", input="hi")
    assert raised.value.code == "model_not_found" and "/v1/models" in raised.value.message


@pytest.mark.gen_test
async def test_listed_upstream_models_are_answered_by_the_generator(client):
    response = await client.responses.create(model="llama3", input="hi")
    assert response.model == "llama3"
    assert response.output_text == reply_to([("user", "hi")], model="llama3").text


# --- Must work 2 and 3: the generator and the Response object --------------------------

@pytest.mark.gen_test
async def test_output_text_is_the_deterministic_reply(client):
    response = await client.responses.create(model=MODEL, input="Tell me about lighthouses")
    assert response.output_text == reply_to([("user", "Tell me about lighthouses")]).text
    assert "Tell me about lighthouses" in response.output_text


@pytest.mark.gen_test
async def test_same_request_same_text_and_different_input_different_text(client):
    first = await client.responses.create(model=MODEL, input="alpha question")
    again = await client.responses.create(model=MODEL, input="alpha question")
    other = await client.responses.create(model=MODEL, input="beta question")
    told = await client.responses.create(model=MODEL, input="alpha question", instructions="Be formal.")
    assert first.output_text == again.output_text and first.id != again.id
    assert other.output_text != first.output_text and "beta question" in other.output_text
    assert told.output_text == reply_to([("developer", "Be formal."), ("user", "alpha question")]).text
    assert told.output_text != first.output_text


@pytest.mark.gen_test
async def test_input_messages_in_both_forms_reach_the_generator(client):
    response = await client.responses.create(model=MODEL, input=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "first part"},
                                     {"type": "input_text", "text": "second part"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "message", "role": "user", "content": "go on"},
    ])
    expected = reply_to([("system", "You are terse."), ("user", "first part\nsecond part"),
                         ("assistant", "ok"), ("user", "go on")])
    assert response.output_text == expected.text


@pytest.mark.gen_test
async def test_usage_counts_with_the_one_token_rule(client):
    response = await client.responses.create(model=MODEL, input="count these words please",
                                             instructions="Short answers.")
    usage = response.usage
    assert usage.input_tokens == ozwell.count_tokens("Short answers.") + ozwell.count_tokens(
        "count these words please")
    assert usage.output_tokens == ozwell.count_tokens(response.output_text)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


@pytest.mark.gen_test
async def test_max_output_tokens_cuts_and_marks_incomplete(client):
    full = reply_to([("user", "a long story")])
    response = await client.responses.create(model=MODEL, input="a long story", max_output_tokens=16)
    assert len(full.tokens) > 16
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.completed_at is None
    assert response.output_text == "".join(full.tokens[:16])
    assert response.usage.output_tokens == 16


@pytest.mark.gen_test
async def test_a_bound_the_reply_fits_in_leaves_it_complete(client):
    full = reply_to([("user", "short")])
    response = await client.responses.create(model=MODEL, input="short",
                                             max_output_tokens=len(full.tokens))
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == full.text


@pytest.mark.gen_test
async def test_response_object_has_every_field_of_openais(http_client, base_url, registry):
    status, response = await post(http_client, base_url, {"model": MODEL, "input": "hello"})
    assert status == 200
    assert not schema_errors(registry, "Response", response)
    for field in ("error", "incomplete_details", "instructions", "metadata", "temperature", "top_p",
                  "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens", "usage"):
        assert field in response
    assert response["id"].startswith("resp_") and response["object"] == "response"
    assert response["output"][0]["content"][0]["annotations"] == []
    assert response["error"] is None and response["instructions"] is None


# --- Must work 4: streaming -----------------------------------------------------------

@pytest.mark.gen_test
async def test_stream_sends_openais_events_in_order_and_each_validates(http_client, base_url, registry):
    body = {"model": MODEL, "input": "stream me a reply", "stream": True}
    text, events = await fetch_events(http_client, base_url, "/v1/responses", body)
    names = [name for name, _ in events]
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    expected = reply_to([("user", "stream me a reply")])

    assert [name for i, name in enumerate(names) if i == 0 or name != names[i - 1]] == \
        STREAM_ORDER + ["response.completed"]
    assert deltas == list(expected.tokens) and "".join(deltas) == expected.text
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert "[DONE]" not in text
    for name, data in events:
        assert data["type"] == name
        assert not schema_errors(registry, "ResponseStreamEvent", data), name
        assert not schema_errors(registry, SCHEMA_OF_EVENT[name], data), name
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == expected.text
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[0][1]["response"]["usage"] is None


@pytest.mark.gen_test
async def test_cut_stream_ends_with_response_incomplete(http_client, base_url, registry):
    body = {"model": MODEL, "input": "stream and stop", "stream": True, "max_output_tokens": 16}
    _, events = await fetch_events(http_client, base_url, "/v1/responses", body)
    name, last = events[-1]
    assert name == "response.incomplete" and not schema_errors(registry, "ResponseIncompleteEvent", last)
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert sum(1 for n, _ in events if n == "response.output_text.delta") == 16


@pytest.mark.gen_test
async def test_sdk_stream_helper_and_final_response(client):
    deltas = []
    async with client.responses.stream(model=MODEL, input="helper please") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert final.output_text == reply_to([("user", "helper please")]).text == "".join(deltas)
    assert final.status == "completed" and final.usage.output_tokens == len(deltas)


@pytest.mark.gen_test
async def test_sdk_create_with_stream_true_iterates_events(client):
    stream = await client.responses.create(model=MODEL, input="iterate", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == reply_to([("user", "iterate")]).text


@pytest.mark.parametrize("settings", [40.0], indirect=True)
@pytest.mark.gen_test
async def test_stream_is_paced_at_the_configured_tokens_per_second(http_client, base_url, settings):
    started = time.monotonic()
    _, events = await fetch_events(http_client, base_url, "/v1/responses",
                                   {"model": MODEL, "input": "slowly", "stream": True})
    elapsed = time.monotonic() - started
    tokens = sum(1 for name, _ in events if name == "response.output_text.delta")
    assert tokens > 20
    assert elapsed >= tokens / 40.0 * 0.95  # a floor only: pacing must not be skipped


# --- Must work 5: stored responses and conversation state ------------------------------

@pytest.mark.gen_test
async def test_stored_response_is_retrieved_whole(client, http_client, base_url, settings):
    created = await client.responses.create(model=MODEL, input="keep this")
    retrieved = await client.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()
    stored = ozwell.ResponseStore(settings.data_dir).load(created.id)
    assert stored["response"]["output"][0]["content"][0]["text"] == created.output_text


@pytest.mark.gen_test
async def test_retrieve_with_stream_true_replays_the_events(client, http_client, base_url, registry):
    body = {"model": MODEL, "input": "replay me", "stream": True}
    _, original = await fetch_events(http_client, base_url, "/v1/responses", body)
    response_id = original[0][1]["response"]["id"]
    _, replayed = await fetch_events(http_client, base_url, f"/v1/responses/{response_id}?stream=true")
    assert replayed == original
    _, later = await fetch_events(http_client, base_url,
                                  f"/v1/responses/{response_id}?stream=true&starting_after=5")
    assert later == original[6:]

    stream = await client.responses.retrieve(response_id, stream=True)
    events = [event async for event in stream]
    assert events[-1].response.output_text == reply_to([("user", "replay me")]).text


@pytest.mark.gen_test
async def test_delete_removes_the_response(client, http_client, base_url, registry):
    created = await client.responses.create(model=MODEL, input="forget me")
    reply = await http_client.fetch(f"{base_url}/v1/responses/{created.id}", method="DELETE", headers=AUTH)
    body = json.loads(reply.body)
    assert body == {"id": created.id, "object": "response", "deleted": True}
    assert not schema_errors(registry, "DeleteResponseResponse", body)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)


@pytest.mark.gen_test
async def test_sdk_delete(client):
    created = await client.responses.create(model=MODEL, input="delete with the sdk")
    assert await client.responses.delete(created.id) is None
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(created.id)


@pytest.mark.parametrize("response_id", [
    "resp_0123456789abcdef0123456789abcdef",  # well formed, never made
    "resp_..%2F..%2Fsecrets",
    "..%2Fresponses%2Fx",
    "resp_0123456789ABCDEF0123456789ABCDEF",
    "resp_0123456789abcdef0123456789abcdef%0A",
])
@pytest.mark.gen_test
async def test_unknown_or_malformed_ids_get_openais_404(http_client, base_url, registry, response_id):
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/input_items")):
        reply = await http_client.fetch(f"{base_url}/v1/responses/{response_id}{path}", method=method,
                                        headers=AUTH, raise_error=False)
        body = json.loads(reply.body)
        assert reply.code == 404 and not schema_errors(registry, "ErrorResponse", body)
        assert "No response found with id" in body["error"]["message"]


@pytest.mark.gen_test
async def test_previous_response_id_continues_the_conversation(client):
    first = await client.responses.create(model=MODEL, input="My name is Ada.", instructions="Be kind.")
    second = await client.responses.create(model=MODEL, input="What is my name?",
                                           previous_response_id=first.id)
    third = await client.responses.create(model=MODEL, input="Thanks!", previous_response_id=second.id,
                                          instructions="Be brief.")
    # Instructions are not carried over to the next response, as with OpenAI.
    turns = [("user", "My name is Ada."), ("assistant", first.output_text),
             ("user", "What is my name?")]
    assert second.output_text == reply_to(turns).text
    assert second.previous_response_id == first.id and "turn 3" in second.output_text
    turns += [("assistant", second.output_text), ("user", "Thanks!")]
    assert third.output_text == reply_to([("developer", "Be brief.")] + turns).text
    assert third.usage.input_tokens == sum(ozwell.count_tokens(t) for _, t in turns) + \
        ozwell.count_tokens("Be brief.")


@pytest.mark.gen_test
async def test_unknown_previous_response_id_gets_a_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        await client.responses.create(model=MODEL, input="hi",
                                      previous_response_id="resp_0123456789abcdef0123456789abcdef")
    assert raised.value.param == "previous_response_id"
    assert raised.value.code == "previous_response_not_found"


@pytest.mark.gen_test
async def test_store_false_keeps_nothing(client, settings):
    response = await client.responses.create(model=MODEL, input="ephemeral", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=MODEL, input="more", previous_response_id=response.id)


@pytest.mark.gen_test
async def test_input_items_page_through_with_the_sdk(client, registry, http_client, base_url):
    messages = [{"role": "user", "content": f"message {n}"} for n in range(5)]
    messages.insert(2, {"role": "assistant", "content": "an earlier reply"})
    created = await client.responses.create(model=MODEL, input=messages)

    newest_first = [item async for item in client.responses.input_items.list(created.id, limit=2)]
    oldest_first = [item async for item in client.responses.input_items.list(created.id, order="asc")]
    assert [item.id for item in newest_first] == [item.id for item in reversed(oldest_first)]
    assert len({item.id for item in oldest_first}) == 6
    texts = [item.content[0].text for item in oldest_first]
    assert texts == [m["content"] for m in messages]
    assert oldest_first[2].role == "assistant" and oldest_first[2].content[0].type == "output_text"

    reply = await http_client.fetch(f"{base_url}/v1/responses/{created.id}/input_items?limit=4&order=asc",
                                    headers=AUTH)
    page = json.loads(reply.body)
    assert not schema_errors(registry, "ResponseItemList", page)
    assert page["has_more"] is True and page["last_id"] == oldest_first[3].id
    reply = await http_client.fetch(
        f"{base_url}/v1/responses/{created.id}/input_items?limit=4&order=asc&after={page['last_id']}",
        headers=AUTH)
    rest = json.loads(reply.body)
    assert [i["id"] for i in rest["data"]] == [i.id for i in oldest_first[4:]] and not rest["has_more"]


@pytest.mark.parametrize("query, param", [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=ten", "limit"),
    ("order=sideways", "order"), ("after=msg_nothere", "after"),
])
@pytest.mark.gen_test
async def test_bad_input_items_query_gets_a_400(client, http_client, base_url, query, param):
    created = await client.responses.create(model=MODEL, input="hi")
    reply = await http_client.fetch(f"{base_url}/v1/responses/{created.id}/input_items?{query}",
                                    headers=AUTH, raise_error=False)
    assert reply.code == 400 and json.loads(reply.body)["error"]["param"] == param


@pytest.mark.gen_test
async def test_stored_as_one_json_file_per_response_and_read_by_a_new_app(client, settings):
    created = await client.responses.create(model=MODEL, input="persist me")
    folder = ozwell.ResponseStore(settings.data_dir).directory
    assert os.listdir(folder) == [f"{created.id}.json"]  # no temporary file left behind
    fresh_app = ozwell.make_app(settings)
    record = fresh_app.settings["ozwell"].responses.load(created.id)
    assert record["response"]["id"] == created.id


def test_openapi_documents_the_responses_routes():
    document = ozwell.build_openapi(ozwell.ROUTES, ozwell.SchemaRegistry.load())
    openapi_spec_validator.validate_spec(document)
    create = document["paths"]["/v1/responses"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CreateResponse")
    event = create["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert event["properties"]["data"]["contentSchema"]["$ref"].endswith("/ResponseStreamEvent")
    assert set(document["paths"]["/v1/responses/{response_id}"]) == {"get", "delete"}
    assert "/v1/responses/{response_id}/input_items" in document["paths"]
