"""The Conversations API, `conversation` on POST /v1/responses, and openai-agents' sessions on it."""
import json
import os
import subprocess
import urllib.error
import urllib.request

import openai
import pytest

import ozwell
from conftest import AUTH, assert_valid, call_api as call

MODEL = ozwell.OFFLINE_MODEL
UNKNOWN = "conv_0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()



def reply_to(conversation, model=MODEL):
    return ozwell.deterministic_reply(model, conversation).text


# --- conversations and their items ----------------------------------------------------------

@pytest.mark.gen_test
async def test_a_conversation_is_created_retrieved_updated_and_deleted(client, http_client, base_url,
                                                                       registry):
    created = await client.conversations.create(metadata={"topic": "demo"},
                                                items=[{"role": "user", "content": "Hello!"}])
    assert created.id.startswith("conv_") and created.object == "conversation"
    assert created.metadata == {"topic": "demo"}
    assert (await client.conversations.retrieve(created.id)).model_dump() == created.model_dump()

    updated = await client.conversations.update(created.id, metadata={"topic": "other", "n": "2"})
    assert updated.metadata == {"topic": "other", "n": "2"} and updated.created_at == created.created_at
    status, body = await call(http_client, base_url, "GET", f"/v1/conversations/{created.id}")
    assert status == 200 and body["metadata"] == {"topic": "other", "n": "2"}
    assert_valid(registry, "ConversationResource", body)

    status, deleted = await call(http_client, base_url, "DELETE", f"/v1/conversations/{created.id}")
    assert deleted == {"id": created.id, "object": "conversation.deleted", "deleted": True}
    assert_valid(registry, "DeletedConversationResource", deleted)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.list(created.id)


@pytest.mark.gen_test
async def test_items_are_added_in_order_listed_paged_retrieved_and_deleted(client, http_client, base_url,
                                                                           registry):
    conversation = await client.conversations.create(items=[
        {"role": "system", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "part one"},
                                                         {"type": "input_text", "text": "part two"}]}])
    added = await client.conversations.items.create(conversation.id, include=["message.output_text.logprobs"], items=[
        {"role": "assistant", "content": "an answer"},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"q": "x"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "found"},
        {"role": "user", "content": "thanks"},
    ])
    assert [item.type for item in added.data] == ["message", "function_call", "function_call_output",
                                                  "message"]
    assert added.first_id == added.data[0].id and added.last_id == added.data[-1].id
    assert added.has_more is False

    everything = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert len(everything) == 6 and len({item.id for item in everything}) == 6
    assert [item.id for item in everything[2:]] == [item.id for item in added.data]
    assert everything[0].role == "system" and everything[0].content[0].text == "Be terse."
    assert [part.text for part in everything[1].content] == ["part one", "part two"]
    assert everything[2].role == "assistant" and everything[2].content[0].type == "output_text"
    assert (everything[3].call_id, everything[3].name, everything[3].arguments) == ("call_1", "lookup", '{"q": "x"}')
    assert everything[4].output == "found" and everything[4].status == "completed"

    paged = [item async for item in client.conversations.items.list(conversation.id, limit=4)]
    assert [item.id for item in paged] == [item.id for item in reversed(everything)]
    status, page = await call(http_client, base_url, "GET",
                              f"/v1/conversations/{conversation.id}/items?limit=4&order=asc"
                              "&include[]=message.output_text.logprobs")
    assert status == 200 and page["has_more"] is True and page["last_id"] == everything[3].id
    assert_valid(registry, "ConversationItemList", page)
    status, rest = await call(http_client, base_url, "GET",
                              f"/v1/conversations/{conversation.id}/items?order=asc&after={page['last_id']}")
    assert [item["id"] for item in rest["data"]] == [item.id for item in everything[4:]]
    assert rest["has_more"] is False

    one = await client.conversations.items.retrieve(everything[3].id, conversation_id=conversation.id)
    assert one.model_dump() == everything[3].model_dump()
    for item in page["data"] + rest["data"]:
        assert_valid(registry, "ConversationItem", item)

    after_delete = await client.conversations.items.delete(everything[3].id, conversation_id=conversation.id)
    assert after_delete.id == conversation.id and after_delete.object == "conversation"
    left = [item.id async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert left == [item.id for item in everything if item.id != everything[3].id]
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.retrieve(everything[3].id, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.delete(everything[3].id, conversation_id=conversation.id)


@pytest.mark.gen_test
async def test_an_empty_conversation_lists_an_empty_page(client, http_client, base_url, registry):
    conversation = await client.conversations.create(items=[])
    status, page = await call(http_client, base_url, "GET", f"/v1/conversations/{conversation.id}/items")
    assert status == 200 and page == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                      "has_more": False}
    assert_valid(registry, "ConversationItemList", page)
    assert [item async for item in client.conversations.items.list(conversation.id)] == []


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/conversations/{id}"), ("POST", "/v1/conversations/{id}"),
    ("DELETE", "/v1/conversations/{id}"), ("GET", "/v1/conversations/{id}/items"),
    ("POST", "/v1/conversations/{id}/items"), ("GET", "/v1/conversations/{id}/items/msg_1"),
    ("DELETE", "/v1/conversations/{id}/items/msg_1"),
])
@pytest.mark.parametrize("conversation_id", [UNKNOWN, "conv_..%2F..%2Fsecrets", "conv_ABC"])
@pytest.mark.gen_test
async def test_unknown_or_malformed_conversation_ids_get_a_404(http_client, base_url, registry, method,
                                                              path, conversation_id):
    body = {"metadata": {}} if path.endswith("{id}") else {"items": []}
    status, reply = await call(http_client, base_url, method, path.format(id=conversation_id),
                               body if method == "POST" else None)
    assert status == 404 and "No conversation found with id" in reply["error"]["message"]
    assert_valid(registry, "ErrorResponse", reply)


@pytest.mark.gen_test
async def test_an_unknown_item_of_a_known_conversation_gets_a_404(client, http_client, base_url):
    conversation = await client.conversations.create()
    for method in ("GET", "DELETE"):
        status, reply = await call(http_client, base_url, method,
                                   f"/v1/conversations/{conversation.id}/items/msg_nothere")
        assert status == 404 and "No item found with id 'msg_nothere'" in reply["error"]["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ("/v1/conversations", {"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
    ("/v1/conversations", {"items": [{"type": "item_reference", "id": "msg_1"}]}, "items[0].type"),
    ("/v1/conversations", {"items": [{"role": "robot", "content": "x"}]}, "items[0].role"),
    ("/v1/conversations", {"items": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "items[0].call_id"),
    ("/v1/conversations/{id}/items", {}, "items"),
    ("/v1/conversations/{id}/items", {"items": [{"type": "function_call_output", "call_id": "c"}]},
     "items[0].output"),
    ("/v1/conversations/{id}", {}, "metadata"),
    ("/v1/conversations/{id}", {"metadata": {"k": 1}}, "metadata"),
    ("/v1/conversations/{id}/items?include[]=everything", {"items": []}, "include"),
])
@pytest.mark.gen_test
async def test_bad_requests_get_a_400_naming_the_field(client, http_client, base_url, registry, path,
                                                       body, param):
    conversation = await client.conversations.create()
    status, reply = await call(http_client, base_url, "POST", path.format(id=conversation.id), body)
    assert status == 400 and reply["error"]["param"].startswith(param), reply
    assert_valid(registry, "ErrorResponse", reply)
    assert len([item async for item in client.conversations.items.list(conversation.id)]) == 0


# --- responses in a conversation ------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_response_reads_the_conversation_and_adds_its_input_and_output(client, registry,
                                                                               http_client, base_url):
    conversation = await client.conversations.create(items=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."}])
    first = await client.responses.create(model=MODEL, input="What is my name?",
                                          conversation=conversation.id, instructions="Be kind.")
    turns = [("user", "My name is Ada."), ("assistant", "Hello Ada."), ("user", "What is my name?")]
    assert first.output_text == reply_to([("developer", "Be kind.")] + turns)
    assert first.conversation.id == conversation.id and first.previous_response_id is None

    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    input_items = [item async for item in client.responses.input_items.list(first.id, order="asc")]
    assert [item.id for item in items[2:]] == [input_items[0].id, first.output[0].id]
    assert items[3].content[0].text == first.output_text

    # `model` may be left out: the conversation's last response tells it; the object form works too.
    second = await client.responses.create(input="And again?", conversation={"id": conversation.id})
    turns += [("assistant", first.output_text), ("user", "And again?")]
    assert second.model == MODEL and second.output_text == reply_to(turns)
    assert second.usage.input_tokens == sum(ozwell.count_tokens(text) for _, text in turns)
    status, raw = await call(http_client, base_url, "GET", f"/v1/responses/{second.id}")
    assert raw["conversation"] == {"id": conversation.id}
    assert_valid(registry, "Response", raw)
    assert len([item async for item in client.conversations.items.list(conversation.id)]) == 6


@pytest.mark.gen_test
async def test_an_unstored_response_still_joins_its_conversation(client):
    conversation = await client.conversations.create()
    response = await client.responses.create(model=MODEL, input="ephemeral", store=False,
                                             conversation=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert [item.role for item in items] == ["user", "assistant"]
    assert items[1].content[0].text == response.output_text


@pytest.mark.gen_test
async def test_conversation_errors_on_create(client):
    with pytest.raises(openai.NotFoundError) as raised:
        await client.responses.create(model=MODEL, input="hi", conversation=UNKNOWN)
    assert raised.value.param == "conversation"
    empty = await client.conversations.create(items=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(input="hi", conversation=empty.id)  # no response has told a model
    assert raised.value.param == "model" and raised.value.code == "missing_required_parameter"
    assert len([item async for item in client.conversations.items.list(empty.id)]) == 1


def test_openapi_documents_the_conversation_routes():
    document = ozwell.build_openapi(ozwell.ROUTES, ozwell.SchemaRegistry.load())
    paths = document["paths"]
    assert set(paths["/v1/conversations"]) == {"post"}
    assert set(paths["/v1/conversations/{conversation_id}"]) == {"get", "post", "delete"}
    assert set(paths["/v1/conversations/{conversation_id}/items"]) == {"get", "post"}
    assert set(paths["/v1/conversations/{conversation_id}/items/{item_id}"]) == {"get", "delete"}
    listing = paths["/v1/conversations/{conversation_id}/items"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"after", "limit", "order", "include"}


# --- openai-agents ---------------------------------------------------------------------------

AGENTS_SCRIPT = """
import asyncio, json, sys
from openai import AsyncOpenAI
from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled
from agents.memory import OpenAIConversationsSession

set_tracing_disabled(True)


async def main(base_url):
    client = AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0)
    agent = Agent(name="assistant", instructions="Answer briefly.",
                  model=OpenAIResponsesModel(model="ozwell-deterministic", openai_client=client))
    session = OpenAIConversationsSession(openai_client=client)
    first = await Runner.run(agent, "My name is Ada.", session=session)
    second = await Runner.run(agent, "What is my name?", session=session)
    items = await session.get_items()
    last_two = await session.get_items(limit=2)
    popped = await session.pop_item()
    after_pop = await session.get_items()
    session_id = session.session_id
    await session.clear_session()

    managed = await client.conversations.create()
    third = await Runner.run(agent, "Remember lighthouses.", conversation_id=managed.id)
    fourth = await Runner.run(agent, "What did I ask?", conversation_id=managed.id)
    listed = [item.model_dump() async for item in client.conversations.items.list(managed.id, order="asc")]
    print(json.dumps({"first": first.final_output, "second": second.final_output, "items": items,
                      "last_two": last_two, "popped": popped, "after_pop": after_pop,
                      "session_id": session_id, "third": third.final_output,
                      "fourth": fourth.final_output, "listed": listed}))


asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
def test_openai_agents_conversation_sessions_run_on_the_conversations_api(
        server_process, openai_agents_python, tmp_path):
    server = server_process()
    result = subprocess.run([str(openai_agents_python), "-c", AGENTS_SCRIPT, f"{server.url}/v1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)

    said = [("developer", "Answer briefly."), ("user", "My name is Ada.")]
    assert out["first"] == reply_to(said)
    said += [("assistant", out["first"]), ("user", "What is my name?")]
    assert out["second"] == reply_to(said)  # the session's history reached the model
    assert [(item["role"], item["content"][0]["text"]) for item in out["items"]] == \
        said[1:] + [("assistant", out["second"])]
    assert out["last_two"] == out["items"][2:]
    assert out["popped"] == out["items"][3] and out["after_pop"] == out["items"][:3]
    with pytest.raises(urllib.error.HTTPError) as gone:  # clear_session deleted the conversation
        urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/v1/conversations/{out['session_id']}", headers=AUTH))
    assert gone.value.code == 404

    managed = [("developer", "Answer briefly."), ("user", "Remember lighthouses.")]
    assert out["third"] == reply_to(managed)
    managed += [("assistant", out["third"]), ("user", "What did I ask?")]
    assert out["fourth"] == reply_to(managed)  # `conversation` on responses.create read it back
    assert [(item["role"], item["content"][0]["text"]) for item in out["listed"]] == \
        managed[1:] + [("assistant", out["fourth"])]
    assert os.path.isdir(tmp_path / "data" / "conversations")


@pytest.mark.gen_test
async def test_a_call_kept_in_the_conversation_is_answered_by_the_next_input(client):
    conversation = await client.conversations.create(items=[
        {"role": "user", "content": "What is the weather in Lisbon?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Lisbon"}'}])
    response = await client.responses.create(
        model=MODEL, conversation=conversation.id,
        input=[{"type": "function_call_output", "call_id": "call_1", "output": "Foggy, 61 F"}])
    assert 'get_weather returned "Foggy, 61 F"' in response.output_text
    kinds = [item.type async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert kinds == ["message", "function_call", "function_call_output", "message"]
    unanswered = await client.conversations.create(items=[
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"}])
    with pytest.raises(openai.BadRequestError) as raised:  # as OpenAI checks
        await client.responses.create(model=MODEL, conversation=unanswered.id, input="hi")
    assert "No tool output found for function call call_2" in raised.value.message
