import asyncio
import json

import pytest

import ozwell


@pytest.mark.gen_test
async def test_models_list_with_the_sdk(client):
    models = await client.models.list()
    assert "ozwell-deterministic" in [m.id for m in models.data]


@pytest.mark.gen_test
async def test_health(http_client, base_url):
    reply = await http_client.fetch(f"{base_url}/health")
    assert json.loads(reply.body)["status"] == "ok"


class _ThreeEventsHandler(ozwell.BaseHandler):
    requires_auth = False

    async def get(self):
        stream = ozwell.EventStream(self, keepalive_seconds=0.05)
        await stream.open()
        await stream.send({"n": 1})
        await asyncio.sleep(0.12)
        await stream.send({"n": 2}, event="second")
        await stream.send("[DONE]")
        stream.close()


@pytest.mark.gen_test
async def test_event_stream_flushes_events_and_keeps_alive(http_client, base_url, app):
    app.wildcard_router.add_rules([(r"/three", _ThreeEventsHandler, {"context": app.settings["ozwell"]})])
    chunks = []
    await http_client.fetch(f"{base_url}/three", streaming_callback=chunks.append)
    body = b"".join(chunks).decode()
    assert body.startswith('data: {"n":1}\n\n')
    assert ": keep-alive\n\n" in body
    assert body.endswith('event: second\ndata: {"n":2}\n\ndata: [DONE]\n\n')


def test_write_atomically_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "index.json"
    ozwell.write_atomically(str(target), b"old")
    ozwell.write_atomically(str(target), b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]
