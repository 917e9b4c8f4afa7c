"""Responses against a real server process: the sync Python SDK, a restart, and the Node SDK."""
import json
import os

import openai

import ozwell
from conftest import API_KEY

MODEL = ozwell.OFFLINE_MODEL

NODE_SCRIPT = r"""
const OpenAI = require("openai");
const client = new OpenAI({ baseURL: process.argv[2], apiKey: process.argv[3], maxRetries: 0 });
const request = { model: process.argv[4], input: process.argv[5] };
(async () => {
  const created = await client.responses.create(request);
  let deltas = "";
  for await (const event of await client.responses.create({ ...request, stream: true })) {
    if (event.type === "response.output_text.delta") deltas += event.delta;
  }
  const helper = await client.responses.stream(request).finalResponse();
  const retrieved = await client.responses.retrieve(created.id);
  console.log(JSON.stringify({ created: created.output_text, deltas, helper: helper.output_text,
                               retrieved: retrieved.output_text }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def sync_client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_sync_sdk_create_stream_and_input_items(server_process):
    client = sync_client(server_process())
    expected = ozwell.deterministic_reply(MODEL, [("user", "sync hello")]).text
    created = client.responses.create(model=MODEL, input="sync hello")
    assert created.output_text == expected
    with client.responses.stream(model=MODEL, input="sync hello") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert stream.get_final_response().output_text == expected == "".join(deltas)
    items = list(client.responses.input_items.list(created.id, limit=1))
    assert [item.content[0].text for item in items] == ["sync hello"]


def test_stored_responses_survive_a_restart(server_process, tmp_path):
    first_server = server_process()
    client = sync_client(first_server)
    created = client.responses.create(model=MODEL, input="remember me", metadata={"run": "1"})
    assert first_server.stop() == 0

    client = sync_client(server_process())
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    follow_up = client.responses.create(model=MODEL, input="who?", previous_response_id=created.id)
    turns = [("user", "remember me"), ("assistant", created.output_text), ("user", "who?")]
    assert follow_up.output_text == ozwell.deterministic_reply(MODEL, turns).text
    names = os.listdir(tmp_path / "data" / "responses")
    assert sorted(names) == sorted(f"{r.id}.json" for r in (created, follow_up))


def test_node_sdk_output_text(server_process, node_sdk):
    server = server_process()
    result = node_sdk(NODE_SCRIPT, f"{server.url}/v1", API_KEY, MODEL, "hello from node", suffix=".cjs")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    expected = ozwell.deterministic_reply(MODEL, [("user", "hello from node")]).text
    assert seen == {"created": expected, "deltas": expected, "helper": expected, "retrieved": expected}
