"""Responses beyond one request: `model` left out, input token counts, reasoning, and background
responses (polled, streamed, followed, cancelled)."""
import asyncio
import json
import time

import openai
import pytest

import ozwell
from conftest import AUTH, assert_valid, call_api as call

MODEL = ozwell.OFFLINE_MODEL


@pytest.fixture
def settings(tmp_path, request):
    """The default settings; a test may set the built-in pace with indirect parametrization."""
    return ozwell.Settings(data_dir=str(tmp_path / "data"),
                           stream_tokens_per_second=getattr(request, "param", 0.0))


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def reply_to(conversation, model=MODEL):
    return ozwell.deterministic_reply(model, conversation).text



async def events_of(http_client, base_url, path, body=None):
    """The (event name, data) pairs of a stream, in order."""
    chunks = []
    await http_client.fetch(f"{base_url}{path}", method="GET" if body is None else "POST",
                            headers=AUTH, body=None if body is None else json.dumps(body),
                            streaming_callback=chunks.append, request_timeout=60)
    events = []
    for block in b"".join(chunks).decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            events.append((lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))))
    return events


async def poll_until_done(client, response_id):
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await client.responses.retrieve(response_id)
        statuses.append(response.status)
        if response.status not in ("queued", "in_progress"):
            return response, statuses
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} still {statuses[-1]} after 60 s")


def runs(statuses):
    """The statuses with repeats folded: ['queued', 'queued', 'in_progress'] -> ['queued', 'in_progress']."""
    return [status for n, status in enumerate(statuses) if n == 0 or status != statuses[n - 1]]


# --- model left out, input tokens, reasoning ------------------------------------------------

@pytest.mark.gen_test
async def test_model_may_be_left_out_when_continuing_a_stored_response(client):
    first = await client.responses.create(model="llama3", input="My name is Ada.")
    second = await client.responses.create(input="What is my name?", previous_response_id=first.id)
    assert second.model == "llama3"
    assert second.output_text == reply_to(
        [("user", "My name is Ada."), ("assistant", first.output_text), ("user", "What is my name?")],
        model="llama3")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(input="Who am I?")
    assert raised.value.param == "model" and "previous_response_id" in raised.value.message


@pytest.mark.gen_test
async def test_input_tokens_equal_what_create_reports_for_the_same_body(client, http_client, base_url,
                                                                        registry):
    earlier = await client.responses.create(model=MODEL, input="An earlier question, rather long.")
    conversation = await client.conversations.create(items=[
        {"role": "user", "content": "Kept in a conversation."}, {"role": "assistant", "content": "Noted."}])
    bodies = [
        {"model": MODEL, "input": "count me"},
        {"model": MODEL, "input": "count me", "instructions": "Be brief, and kind."},
        {"model": MODEL, "input": [{"role": "system", "content": "Terse."},
                                   {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                {"type": "input_text", "text": "b c"}]}]},
        {"input": "and then?", "previous_response_id": earlier.id},
        {"model": MODEL, "input": "and now?", "conversation": conversation.id, "reasoning": {"effort": "low"}},
    ]
    for body in bodies:
        counted = await client.responses.input_tokens.count(**body)
        created = await client.responses.create(**body)
        assert counted.input_tokens == created.usage.input_tokens > 0, body
        assert counted.object == "response.input_tokens"
    # Counting keeps nothing: the conversation holds its two items and the one create added.
    assert len([item async for item in client.conversations.items.list(conversation.id)]) == 4

    status, raw = await call(http_client, base_url, "POST", "/v1/responses/input_tokens",
                             {"input": "no model needed to count"})
    assert status == 200 and raw == {"object": "response.input_tokens",
                                     "input_tokens": ozwell.count_tokens("no model needed to count")}
    assert_valid(registry, "TokenCountsResource", raw)
    status, raw = await call(http_client, base_url, "POST", "/v1/responses/input_tokens",
                             {"previous_response_id": "resp_0123456789abcdef0123456789abcdef"})
    assert status == 404 and raw["error"]["param"] == "previous_response_id"
    status, raw = await call(http_client, base_url, "POST", "/v1/responses/input_tokens", {"input": 3})
    assert status == 400 and raw["error"]["param"] == "input"


@pytest.mark.gen_test
async def test_reasoning_is_accepted_and_echoed(client, http_client, base_url, registry):
    told = await client.responses.create(model=MODEL, input="think", reasoning={"effort": "low"})
    assert (told.reasoning.effort, told.reasoning.summary) == ("low", None)
    assert told.usage.output_tokens_details.reasoning_tokens == 0
    status, raw = await call(http_client, base_url, "POST", "/v1/responses",
                             {"model": MODEL, "input": "think", "reasoning": {"summary": "auto"}})
    assert raw["reasoning"] == {"effort": None, "summary": "auto"}
    assert_valid(registry, "Response", raw)
    status, raw = await call(http_client, base_url, "POST", "/v1/responses", {"model": MODEL, "input": "x"})
    assert raw["reasoning"] == {"effort": None, "summary": None}
    assert (await client.responses.retrieve(told.id)).reasoning.effort == "low"


# --- background responses -------------------------------------------------------------------

@pytest.mark.parametrize("settings", [20.0], indirect=True)
@pytest.mark.gen_test(timeout=90)
async def test_background_response_is_queued_then_in_progress_then_completed(client, http_client,
                                                                            base_url, registry, settings):
    created = await client.responses.create(model=MODEL, input="work in the background",
                                            background=True)
    assert created.status == "queued" and created.background is True
    assert created.output == [] and created.usage is None and created.completed_at is None
    done, statuses = await poll_until_done(client, created.id)
    assert runs(["queued"] + statuses) == ["queued", "in_progress", "completed"]
    assert done.output_text == reply_to([("user", "work in the background")])
    assert done.usage.output_tokens == ozwell.count_tokens(done.output_text)
    assert done.completed_at >= done.created_at and done.background is True
    status, raw = await call(http_client, base_url, "GET", f"/v1/responses/{created.id}")
    assert_valid(registry, "Response", raw)


@pytest.mark.gen_test
async def test_at_full_speed_a_background_response_is_done_by_the_first_poll(client):
    created = await client.responses.create(model=MODEL, input="quick", background=True)
    assert created.status == "queued"
    retrieved = await client.responses.retrieve(created.id)
    assert retrieved.status == "completed" and retrieved.output_text == reply_to([("user", "quick")])


@pytest.mark.parametrize("settings", [20.0], indirect=True)
@pytest.mark.gen_test(timeout=90)
async def test_cancel_stops_a_background_response_and_a_second_cancel_changes_nothing(
        client, http_client, base_url, registry, settings):
    created = await client.responses.create(model=MODEL, input="cancel me soon", background=True)
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.output == [] and cancelled.usage is None
    status, again = await call(http_client, base_url, "POST", f"/v1/responses/{created.id}/cancel")
    assert status == 200 and again["status"] == "cancelled"
    assert_valid(registry, "Response", again)
    record = ozwell.ResponseStore(settings.data_dir).load(created.id)
    ends = ozwell.Pacer.from_schedule(record["schedule"]).due(record["schedule"]["ticks"])
    await asyncio.sleep(max(0.0, ends - time.time()) + 0.2)  # past the time it would have finished
    assert (await client.responses.retrieve(created.id)).status == "cancelled"


@pytest.mark.gen_test
async def test_what_cannot_be_cancelled(client, http_client, base_url, registry):
    synchronous = await client.responses.create(model=MODEL, input="done at once")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.cancel(synchronous.id)
    assert "Cannot cancel a synchronous response" in raised.value.message
    finished = await client.responses.create(model=MODEL, input="done soon", background=True)
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.cancel(finished.id)
    assert raised.value.message.endswith("Cannot cancel a completed response.")
    status, reply = await call(http_client, base_url, "POST",
                               "/v1/responses/resp_0123456789abcdef0123456789abcdef/cancel")
    assert status == 404 and "No response found" in reply["error"]["message"]
    assert_valid(registry, "ErrorResponse", reply)


@pytest.mark.parametrize("settings", [40.0], indirect=True)
@pytest.mark.gen_test(timeout=90)
async def test_background_stream_queues_first_and_a_replay_or_a_resume_sends_the_same_events(
        client, http_client, base_url, registry, settings):
    body = {"model": MODEL, "input": "stream it in the background", "background": True, "stream": True}
    streamed = await events_of(http_client, base_url, "/v1/responses", body)
    names = [name for name, _ in streamed]
    assert names[:4] == ["response.created", "response.queued", "response.in_progress",
                         "response.output_item.added"]
    assert names[-1] == "response.completed"
    assert [data["sequence_number"] for _, data in streamed] == list(range(len(streamed)))
    for name, data in streamed:
        assert data["type"] == name
        assert_valid(registry, "ResponseStreamEvent", data)
    assert streamed[0][1]["response"]["status"] == "queued"
    final = streamed[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == reply_to([("user", "stream it in the background")])

    response_id = final["id"]
    assert await events_of(http_client, base_url, f"/v1/responses/{response_id}?stream=true") == streamed
    assert await events_of(http_client, base_url,
                           f"/v1/responses/{response_id}?stream=true&starting_after=7") == streamed[8:]
    retrieved = await client.responses.retrieve(response_id)
    assert retrieved.model_dump() == openai.types.responses.Response.model_validate(final).model_dump()


@pytest.mark.parametrize("settings", [40.0], indirect=True)
@pytest.mark.gen_test(timeout=90)
async def test_sdk_stream_helper_follows_a_background_response(client, settings):
    async with client.responses.stream(model=MODEL, input="helper in the background",
                                       background=True) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert final.status == "completed" and final.output_text == reply_to([("user", "helper in the background")])
    # A follower that starts later picks up where it is told to.
    resumed = await client.responses.retrieve(final.id, stream=True, starting_after=len(kinds) - 2)
    assert [event.type async for event in resumed] == kinds[-1:]


@pytest.mark.parametrize("settings", [20.0], indirect=True)
@pytest.mark.gen_test(timeout=90)
async def test_a_follower_sees_events_as_they_fall_due_and_none_after_a_cancel(client, http_client,
                                                                              base_url, settings):
    created = await client.responses.create(model=MODEL, input="follow me, then stop", background=True)
    following = asyncio.ensure_future(
        events_of(http_client, base_url, f"/v1/responses/{created.id}?stream=true"))
    await asyncio.sleep(0.6)
    assert not following.done()  # the events fall due over a second or more: it is still going
    await client.responses.cancel(created.id)
    followed = await asyncio.wait_for(following, 30)
    names = [name for name, _ in followed]
    assert names[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert "response.output_text.delta" in names and "response.completed" not in names
    # The cut is kept with the response: a replay now stops at the same event.
    assert await events_of(http_client, base_url, f"/v1/responses/{created.id}?stream=true") == followed


@pytest.mark.parametrize("settings", [20.0], indirect=True)
@pytest.mark.gen_test(timeout=90)
async def test_a_background_response_joins_its_conversation_once_done_and_not_if_cancelled(client, settings):
    conversation = await client.conversations.create()
    done = await client.responses.create(model=MODEL, input="later", background=True,
                                         conversation=conversation.id)
    cancelled = await client.responses.create(model=MODEL, input="never", background=True,
                                              conversation=conversation.id)
    await client.responses.cancel(cancelled.id)
    assert [item async for item in client.conversations.items.list(conversation.id)] == []
    finished, _ = await poll_until_done(client, done.id)
    await asyncio.sleep(0.3)
    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert [(item.role, item.content[0].text) for item in items] == [
        ("user", "later"), ("assistant", finished.output_text)]


def test_the_status_of_a_background_response_follows_its_schedule_alone():
    """No task runs it: any server reading the record works out the same status."""
    response = {"id": "resp_x", "status": "completed", "completed_at": 100, "incomplete_details": None,
                "output": [{"type": "message"}], "usage": {"input_tokens": 1}, "background": True}
    record = {"response": response, "schedule": {"start": 1000.0, "per_second": 10.0, "ticks": 5}}
    assert ozwell.response_now(record, 1000.05)["status"] == "queued"
    assert ozwell.response_now(record, 1000.15)["status"] == "in_progress"
    assert ozwell.response_now(record, 1000.45)["output"] == []
    assert ozwell.response_now(record, 1000.51) == response
    assert ozwell.response_now({**record, "cancelled_at": 1000.2}, 1001)["status"] == "cancelled"


def test_openapi_documents_cancel_and_input_tokens():
    paths = ozwell.build_openapi(ozwell.ROUTES, ozwell.SchemaRegistry.load())["paths"]
    assert paths["/v1/responses/{response_id}/cancel"]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"] == {"$ref": "#/components/schemas/Response"}
    counting = paths["/v1/responses/input_tokens"]["post"]
    assert counting["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/TokenCountsBody")


@pytest.mark.slow
def test_servers_sharing_a_data_dir_agree_on_a_background_response(server_process, tmp_path):
    env = {"OZWELL_STREAM_TOKENS_PER_SECOND": "10"}
    first, second = server_process(env=env), server_process(env=env, data_dir=tmp_path / "data")
    clients = [openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0)
               for server in (first, second)]
    running = clients[0].responses.create(model=MODEL, input="started on one", background=True)
    seen = [clients[1].responses.retrieve(running.id).status]
    while seen[-1] in ("queued", "in_progress"):
        time.sleep(0.05)
        seen.append(clients[1].responses.retrieve(running.id).status)
    assert runs(["queued"] + seen) == ["queued", "in_progress", "completed"]
    assert clients[1].responses.retrieve(running.id).output_text == reply_to([("user", "started on one")])

    stopped = clients[0].responses.create(model=MODEL, input="stopped by the other", background=True)
    assert clients[1].responses.cancel(stopped.id).status == "cancelled"
    assert clients[0].responses.retrieve(stopped.id).status == "cancelled"
