import json

import pytest

from conftest import AUTH


@pytest.mark.gen_test
async def test_models_list_with_the_sdk(client):
    models = await client.models.list()
    assert "ozwell-deterministic" in [m.id for m in models.data]


@pytest.mark.gen_test
async def test_health(http_client, base_url):
    reply = await http_client.fetch(f"{base_url}/health")
    assert json.loads(reply.body)["status"] == "ok"
