"""/openapi.json tells the truth about what the server answers: media types, what a request
schema accepts against what the server accepts, stream events a tool can check, and an example
per error status."""
import fnmatch
import json

import jsonschema
import pytest

import ozwell
from conftest import AUTH

REGISTRY = ozwell.SchemaRegistry.load()
DOCUMENT = ozwell.build_openapi(ozwell.ROUTES, REGISTRY)
MODEL = ozwell.OFFLINE_MODEL


def operation(path, method):
    return DOCUMENT["paths"][path][method]


def document_validator(schema):
    """A validator for a schema of the document, its `#/components/...` references resolved."""
    return jsonschema.Draft202012Validator(
        schema, resolver=jsonschema.RefResolver("", DOCUMENT))


def upload(http_client, base_url, filename, content):
    boundary = "truth-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + (
            f"\r\n--{boundary}--\r\n").encode()
    return http_client.fetch(f"{base_url}/v1/files", method="POST", body=body, headers={
        **AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.mark.gen_test
@pytest.mark.parametrize("filename", ["pixel.png", "batch.jsonl", "notes.txt", "report.pdf",
                                      "data.unknown-extension", "no-extension"])
async def test_file_content_comes_in_a_documented_media_type(http_client, base_url, filename):
    created = json.loads((await upload(http_client, base_url, filename, b"\x89PNG bytes")).body)
    reply = await http_client.fetch(f"{base_url}/v1/files/{created['id']}/content", headers=AUTH)
    served = reply.headers["Content-Type"].split(";")[0]
    documented = operation("/v1/files/{file_id}/content", "get")["responses"]["200"]["content"]
    assert any(fnmatch.fnmatch(served, media_range) for media_range in documented), served


def sse_event_objects(raw: str):
    """The events of a stream as a stream reader sees them: `event` (if any) and `data`."""
    events = []
    for block in raw.split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        if "data" in fields:
            events.append(fields)
    return events


def content_matches(schema, text):
    """What a tool does with the keywords for encoded content (jsonschema only annotates them)."""
    if "anyOf" in schema:
        return any(content_matches(branch, text) for branch in schema["anyOf"])
    if "const" in schema:
        return text == schema["const"]
    assert schema["contentMediaType"] == "application/json"
    try:
        payload = json.loads(text)
    except ValueError:
        return False
    return not list(document_validator(schema["contentSchema"]).iter_errors(payload))


def assert_events_match_the_document(raw, path, method):
    schema = operation(path, method)["responses"]["200"]["content"]["text/event-stream"]["schema"]
    events = sse_event_objects(raw)
    assert events
    for event in events:
        assert list(document_validator(schema).iter_errors(event)) == []
        assert content_matches(schema["properties"]["data"], event["data"]), event
    return events


@pytest.mark.gen_test
async def test_chat_stream_events_match_the_documented_event_schema(http_client, base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "n": 2}
    reply = await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST",
                                    headers=AUTH, body=json.dumps(body))
    events = assert_events_match_the_document(reply.body.decode(), "/v1/chat/completions", "post")
    assert events[-1]["data"] == "[DONE]"


def test_a_chat_stream_error_event_matches_the_documented_event_schema():
    schema = operation("/v1/chat/completions", "post")["responses"]["200"]["content"][
        "text/event-stream"]["schema"]["properties"]["data"]
    error = ozwell.server_error("req_0123").body()
    assert content_matches(schema, json.dumps(error))
    assert not content_matches(schema, json.dumps({"unexpected": True}))


@pytest.mark.gen_test
async def test_response_stream_events_match_the_documented_event_schema(http_client, base_url):
    body = {"model": MODEL, "input": "Hi", "stream": True}
    reply = await http_client.fetch(f"{base_url}/v1/responses", method="POST", headers=AUTH,
                                    body=json.dumps(body))
    events = assert_events_match_the_document(reply.body.decode(), "/v1/responses", "post")
    response_id = json.loads(events[0]["data"])["response"]["id"]
    replay = await http_client.fetch(f"{base_url}/v1/responses/{response_id}?stream=true",
                                     headers=AUTH)
    assert_events_match_the_document(replay.body.decode(), "/v1/responses/{response_id}", "get")


@pytest.mark.gen_test
@pytest.mark.parametrize("model", sorted(ozwell.EMBEDDING_MODELS))
async def test_the_embeddings_schema_refuses_exactly_the_dimensions_the_server_refuses(
        http_client, base_url, model):
    for dimensions in (None, 1, 256, 1536, 1537, 3072, 3073):
        body = {"model": model, "input": "hi", "dimensions": dimensions}
        reply = await http_client.fetch(f"{base_url}/v1/embeddings", method="POST", headers=AUTH,
                                        body=json.dumps(body), raise_error=False)
        refused_by_schema = bool(list(REGISTRY.errors("CreateEmbeddingRequest", body)))
        assert (reply.code == 400) == refused_by_schema, (dimensions, reply.body)


@pytest.mark.gen_test
async def test_an_ada_dimensions_error_still_says_what_to_do(http_client, base_url):
    body = {"model": "text-embedding-ada-002", "input": "hi", "dimensions": 256}
    reply = await http_client.fetch(f"{base_url}/v1/embeddings", method="POST", headers=AUTH,
                                    body=json.dumps(body), raise_error=False)
    error = json.loads(reply.body)["error"]
    assert error["param"] == "dimensions" and "text-embedding-3" in error["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("path, route", [
    ("/v1/files", ("/v1/files", "get")),
    ("/v1/responses/{id}/input_items", ("/v1/responses/{response_id}/input_items", "get")),
])
async def test_an_after_the_server_refuses_is_refused_or_described_by_the_document(
        client, http_client, base_url, path, route):
    response = await client.responses.create(model=MODEL, input="Hi")
    url = f"{base_url}{path.replace('{id}', response.id)}"
    parameter = next(p for p in operation(*route)["parameters"] if p["name"] == "after")
    empty = await http_client.fetch(f"{url}?after=", headers=AUTH, raise_error=False)
    assert empty.code == 400
    assert list(jsonschema.Draft202012Validator(parameter["schema"]).iter_errors("")), \
        "the document accepts the empty `after` the server refuses"
    unknown = await http_client.fetch(f"{url}?after=file-{'0' * 32}", headers=AUTH,
                                      raise_error=False)
    assert unknown.code == 400 and "400" in parameter["description"]


def test_a_model_id_the_server_refuses_at_once_is_refused_by_the_responses_schema():
    assert list(REGISTRY.errors("CreateResponse", {"model": "", "input": "hi"}))


def test_each_error_status_has_an_example_of_its_own():
    examples = {}
    for item in DOCUMENT["paths"].values():
        for spec in item.values():
            for status, response in spec["responses"].items():
                if status.startswith(("4", "5")):
                    example = response["content"]["application/json"]["example"]
                    assert list(REGISTRY.errors("ErrorResponse", example)) == []
                    examples.setdefault(status, set()).add(json.dumps(example))
    assert all(len(found) == 1 for found in examples.values()), examples
    messages = [json.loads(next(iter(found)))["error"]["message"] for found in examples.values()]
    assert len(set(messages)) == len(messages) >= 5
