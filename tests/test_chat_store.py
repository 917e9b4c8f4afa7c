"""Chat completions kept with `store: true`, built-in and proxied, streamed and not: listed,
retrieved, updated, deleted, and their messages listed, as OpenAI serves them."""
import openai
import pytest

import ozwell
from conftest import assert_valid, call_api as call
from test_chat import llama, settings, sse_events  # noqa: F401 (the fake upstream's fixtures)

MODEL = ozwell.OFFLINE_MODEL
UNKNOWN = "chatcmpl-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()



async def kept(client, **extra):
    return await client.chat.completions.create(
        model=MODEL, store=True, messages=[{"role": "user", "content": "Keep this."}], **extra)


@pytest.mark.gen_test
async def test_a_kept_completion_is_retrieved_updated_listed_and_deleted(client, http_client, base_url,
                                                                         registry):
    created = await kept(client, metadata={"run": "1"})
    retrieved = await client.chat.completions.retrieve(created.id)
    assert retrieved.choices[0].message.content == created.choices[0].message.content
    assert retrieved.model_dump(exclude={"metadata"}) == created.model_dump(exclude={"metadata"})
    assert retrieved.metadata == {"run": "1"}

    updated = await client.chat.completions.update(created.id, metadata={"run": "2", "ok": "yes"})
    assert updated.id == created.id and updated.metadata == {"run": "2", "ok": "yes"}
    status, raw = await call(http_client, base_url, "GET", f"/v1/chat/completions/{created.id}")
    assert status == 200 and raw["metadata"] == {"run": "2", "ok": "yes"}
    assert_valid(registry, "CreateChatCompletionResponse", raw)

    assert [item.id async for item in client.chat.completions.list()] == [created.id]
    status, deleted = await call(http_client, base_url, "DELETE", f"/v1/chat/completions/{created.id}")
    assert deleted == {"object": "chat.completion.deleted", "id": created.id, "deleted": True}
    assert_valid(registry, "ChatCompletionDeleted", deleted)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.delete(created.id)
    assert [item async for item in client.chat.completions.list()] == []


@pytest.mark.gen_test
async def test_without_store_nothing_is_kept(client, llama):
    plain = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    told_not = await client.chat.completions.create(model="llama3", store=False,
                                                    messages=[{"role": "user", "content": "x"}])
    for completion_id in (plain.id, told_not.id):
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.retrieve(completion_id)
    assert [item async for item in client.chat.completions.list()] == []


@pytest.mark.gen_test
async def test_the_list_pages_in_order_and_filters_by_model_and_metadata(client, http_client, base_url,
                                                                        registry):
    made = []
    for number, (model, group) in enumerate([(MODEL, "a"), ("llama3", "a"), (MODEL, "b"),
                                             ("llama3", "b"), (MODEL, "a")]):
        made.append(await client.chat.completions.create(
            model=model, store=True, metadata={"group": group, "n": str(number)},
            messages=[{"role": "user", "content": f"message {number}"}]))
    ids = [completion.id for completion in made]
    assert [item.id async for item in client.chat.completions.list(limit=2)] == ids
    assert [item.id async for item in client.chat.completions.list(order="desc")] == ids[::-1]
    assert [item.id async for item in client.chat.completions.list(model="llama3")] == [ids[1], ids[3]]
    assert [item.id async for item in client.chat.completions.list(metadata={"group": "a"})] == \
        [ids[0], ids[1], ids[4]]
    assert [item.id async for item in client.chat.completions.list(
        model=MODEL, metadata={"group": "a", "n": "4"})] == [ids[4]]

    status, page = await call(http_client, base_url, "GET", f"/v1/chat/completions?limit=2&after={ids[1]}")
    assert status == 200 and [item["id"] for item in page["data"]] == ids[2:4]
    assert page["has_more"] is True and (page["first_id"], page["last_id"]) == (ids[2], ids[3])
    assert_valid(registry, "ChatCompletionList", page)
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"),
                         (f"after={ozwell.new_id('chatcmpl-')}", "after")):
        status, raw = await call(http_client, base_url, "GET", f"/v1/chat/completions?{query}")
        assert status == 400 and raw["error"]["param"] == param


@pytest.mark.gen_test
async def test_the_messages_of_a_kept_completion_are_listed(client, http_client, base_url, registry):
    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts, "name": "ada"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go on"}]
    created = await client.chat.completions.create(model=MODEL, store=True, messages=messages)
    listed = [message async for message in client.chat.completions.messages.list(created.id, limit=3)]
    assert [message.id for message in listed] == [f"{created.id}-{n}" for n in range(4)]
    assert [message.role for message in listed] == ["system", "user", "assistant", "user"]
    assert listed[1].content == "first part\nsecond part" and listed[1].name == "ada"
    assert [part.text for part in listed[1].content_parts] == ["first part", "second part"]
    assert listed[0].content_parts is None
    newest = [message.id async for message in client.chat.completions.messages.list(created.id, order="desc")]
    assert newest == [message.id for message in reversed(listed)]
    status, page = await call(http_client, base_url, "GET",
                              f"/v1/chat/completions/{created.id}/messages?limit=2&after={created.id}-0")
    assert [item["id"] for item in page["data"]] == [f"{created.id}-1", f"{created.id}-2"]
    assert page["has_more"] is True
    assert_valid(registry, "ChatCompletionMessageList", page)


@pytest.mark.gen_test
async def test_a_kept_builtin_stream_is_kept_whole_under_the_chunks_id(client):
    stream = await client.chat.completions.create(
        model=MODEL, store=True, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Stream and keep."}])
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    retrieved = await client.chat.completions.retrieve(chunks[0].id)
    assert {chunk.id for chunk in chunks} == {retrieved.id}
    assert retrieved.choices[0].message.content == text
    assert retrieved.usage.model_dump() == chunks[-1].usage.model_dump()


@pytest.mark.gen_test
async def test_a_kept_proxied_completion_gets_an_id_of_its_own(client, llama):
    # The fake upstream answers every request with the same id, as Ollama's repeat.
    first = await client.chat.completions.create(model="llama3", store=True, metadata={"via": "proxy"},
                                                 messages=[{"role": "user", "content": "one"}])
    second = await client.chat.completions.create(model="llama3", store=True,
                                                  messages=[{"role": "user", "content": "two"}])
    assert first.id != second.id and first.id.startswith("chatcmpl-") and first.id != "chatcmpl-fake"
    assert (await client.chat.completions.retrieve(first.id)).choices[0].message.content == "echo: one"
    assert (await client.chat.completions.retrieve(second.id)).choices[0].message.content == "echo: two"
    assert [item.id async for item in client.chat.completions.list(metadata={"via": "proxy"})] == [first.id]
    assert llama.bodies()[0]["store"] is True  # forwarded as received


@pytest.mark.gen_test
async def test_a_kept_proxied_stream_is_kept_once_it_has_ended(client, http_client, base_url, llama):
    body = {"model": "llama3", "store": True, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "stream"}], "fake": {"chunks": 4}}
    status, raw = await call(http_client, base_url, "POST", "/v1/chat/completions", body)
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"] != "chatcmpl-fake"
    retrieved = await client.chat.completions.retrieve(chunks[0]["id"])
    assert retrieved.choices[0].message.content == "w0 w1 w2 w3 "
    assert retrieved.choices[0].finish_reason == "stop"
    assert retrieved.usage.model_dump(exclude_none=True) == chunks[-1]["usage"]
    assert retrieved.model == "llama3" and retrieved.created == chunks[0]["created"]

    helper_text = []
    async with client.chat.completions.stream(model="llama3", store=True,
                                              messages=[{"role": "user", "content": "again"}]) as stream:
        async for event in stream:
            if event.type == "content.delta":
                helper_text.append(event.delta)
        final = await stream.get_final_completion()
    assert (await client.chat.completions.retrieve(final.id)).choices[0].message.content == "".join(helper_text)


@pytest.mark.parametrize("completion_id", [UNKNOWN, "chatcmpl-..%2F..%2Fx", "chatcmpl-fake"])
@pytest.mark.gen_test
async def test_unknown_or_malformed_ids_get_a_404(http_client, base_url, registry, completion_id):
    for method, path, body in (("GET", "", None), ("POST", "", {"metadata": {}}), ("DELETE", "", None),
                               ("GET", "/messages", None)):
        status, reply = await call(http_client, base_url, method,
                                   f"/v1/chat/completions/{completion_id}{path}", body)
        assert status == 404 and "No chat completion found with id" in reply["error"]["message"]
        assert_valid(registry, "ErrorResponse", reply)


@pytest.mark.gen_test
async def test_an_update_needs_metadata(client, http_client, base_url):
    created = await kept(client)
    status, raw = await call(http_client, base_url, "POST", f"/v1/chat/completions/{created.id}", {})
    assert status == 400 and raw["error"]["param"] == "metadata"
    status, raw = await call(http_client, base_url, "POST", f"/v1/chat/completions/{created.id}",
                             {"metadata": None})
    assert status == 200 and raw["metadata"] == {}


def test_openapi_documents_the_stored_completion_routes():
    paths = ozwell.build_openapi(ozwell.ROUTES, ozwell.SchemaRegistry.load())["paths"]
    assert set(paths["/v1/chat/completions"]) == {"get", "post"}
    assert set(paths["/v1/chat/completions/{completion_id}"]) == {"get", "post", "delete"}
    assert set(paths["/v1/chat/completions/{completion_id}/messages"]) == {"get"}
    listing = paths["/v1/chat/completions"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"after", "limit", "order", "model", "metadata"}
