"""GET /metrics, read with Prometheus' own parser: requests by route and status, latency,
streams in flight, calls to the Llama backend and their failures; with workers, the whole server."""
import json
import os
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ozwell
from conftest import AUTH, free_port
from test_chat import HELLO
from test_upstream import rogue  # noqa: F401 (the backend process, a fixture)


class Metrics:
    """/metrics as prometheus_client parses it: each family's type, and every sample's value."""

    def __init__(self, text: str) -> None:
        self.types, self.samples = {}, {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0)

    def by(self, name: str, label: str) -> dict:
        return {dict(labels)[label]: value for (sample, labels), value in self.samples.items()
                if sample == name}


async def scrape(http_client, base_url: str) -> Metrics:
    reply = await http_client.fetch(f"{base_url}/metrics", headers=AUTH)
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Metrics(reply.body.decode())


def requests_total(metrics: Metrics, route: str, method: str, status: str) -> float:
    return metrics.value("ozwell_requests_total", route=route, method=method, status=status)


@pytest.mark.gen_test
async def test_requests_are_counted_by_route_method_and_status_with_their_latency(
        http_client, base_url):
    for _ in range(3):
        await http_client.fetch(f"{base_url}/v1/models", headers=AUTH)
    await http_client.fetch(f"{base_url}/v1/models/nope", headers=AUTH, raise_error=False)
    await http_client.fetch(f"{base_url}/v1/models", raise_error=False)  # no key: 401
    await http_client.fetch(f"{base_url}/no/such/path", raise_error=False)
    metrics = await scrape(http_client, base_url)

    assert metrics.types["ozwell_requests"] == "counter"
    assert requests_total(metrics, "/v1/models", "GET", "200") == 3
    assert requests_total(metrics, "/v1/models", "GET", "401") == 1
    assert requests_total(metrics, "/v1/models/{model:path}", "GET", "404") == 1
    assert requests_total(metrics, "(unmatched)", "GET", "404") == 1

    assert metrics.types["ozwell_request_duration_seconds"] == "histogram"
    buckets = sorted((float(dict(labels)["le"]), value)
                     for (name, labels), value in metrics.samples.items()
                     if name.endswith("_bucket") and ("route", "/v1/models") in labels)
    counts = [value for _, value in buckets]
    assert len(buckets) > 5 and counts == sorted(counts) and buckets[-1] == (float("inf"), 4)
    assert metrics.value("ozwell_request_duration_seconds_count", route="/v1/models") == 4
    assert 0 < metrics.value("ozwell_request_duration_seconds_sum", route="/v1/models") < 60


@pytest.mark.gen_test
async def test_metrics_need_a_key_as_v1_does_and_are_in_the_openapi_document(
        http_client, base_url):
    refused = await http_client.fetch(f"{base_url}/metrics", raise_error=False)
    assert refused.code == 401 and json.loads(refused.body)["error"]["message"]
    document = json.loads((await http_client.fetch(f"{base_url}/openapi.json")).body)
    operation = document["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"ApiKeyAuth": []}]
    assert "text/plain" in operation["responses"]["200"]["content"]


@pytest.fixture
def settings(tmp_path):
    # A stream of the built-in model that lasts while the test looks at it.
    return ozwell.Settings(data_dir=str(tmp_path / "data"), stream_tokens_per_second=20)


@pytest.mark.gen_test(timeout=30)
async def test_streams_in_flight_are_counted_while_they_are_open(client, http_client, base_url):
    def gauge(metrics: Metrics) -> float:
        return metrics.value("ozwell_streams_in_flight")

    assert gauge(await scrape(http_client, base_url)) == 0
    streams = [await client.chat.completions.create(
        model="ozwell-deterministic", messages=[{"role": "user", "content": "tell me a long story"}],
        stream=True) for _ in range(2)]
    firsts = [await stream.__anext__() for stream in streams]
    assert all(first.choices for first in firsts)
    during = await scrape(http_client, base_url)
    assert gauge(during) == 2
    assert during.value("ozwell_requests_in_flight") == 3
    for stream in streams:
        async for _ in stream:
            pass
    assert gauge(await scrape(http_client, base_url)) == 0


@pytest.mark.gen_test
async def test_upstream_calls_and_their_failures_are_counted_by_kind(
        ozwell_with, sdk, http_client, rogue):
    import openai

    base_url = ozwell_with(llama_base_url=rogue.url)
    client = sdk(base_url)
    await client.chat.completions.create(model="llama3", messages=HELLO)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="llama3", messages=HELLO,
            extra_body={"rogue": {"status": 503, "content_type": "application/json",
                                  "body": '{"error": {"message": "busy"}}'}})
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="llama3", messages=HELLO,
                                             extra_body={"rogue": {"reset_body": True}})
    offline_url = ozwell_with(llama_base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.APIStatusError):
        await sdk(offline_url).chat.completions.create(model="llama3", messages=HELLO)

    metrics = await scrape(http_client, base_url)
    assert metrics.by("ozwell_upstream_errors_total", "kind") == \
        {"http_503": 1, "upstream_interrupted": 1}
    assert metrics.by("ozwell_upstream_calls_total", "answered_by") == {"upstream": 3, "replay": 0}
    offline = await scrape(http_client, offline_url)
    assert offline.by("ozwell_upstream_errors_total", "kind") == {"upstream_unavailable": 1}


# --- several workers -------------------------------------------------------------------------------

def get(url: str, headers: dict | None = None) -> bytes:
    """A GET on a connection of its own, so that any worker may take it."""
    request = urllib.request.Request(url, headers={**(headers or {}), "Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.read()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
def test_with_workers_each_scrape_shows_the_whole_server(server_process):
    server = server_process(args=("--workers", "2"))
    pids, asked = set(), 1  # the start waited for one /health answer
    while len(pids) < 2 and asked < 400:
        pids.add(json.loads(get(f"{server.url}/health"))["pid"])
        asked += 1
    assert len(pids) == 2, "one worker took every connection"
    folder = ozwell.metrics_folder(server.process.pid)

    def health_answers() -> float:
        return requests_total(Metrics(get(f"{server.url}/metrics", AUTH).decode()),
                              "/health", "GET", "200")

    # Counts the other workers made reach a scrape within a second or so.
    seen = [health_answers()]
    deadline = time.monotonic() + 20
    while seen[-1] != asked and time.monotonic() < deadline:
        time.sleep(0.2)
        seen.append(health_answers())
    # From then on every scrape, whichever worker answers it, counts every /health answer.
    seen += [health_answers() for _ in range(10)]
    assert seen[-11:] == [asked] * 11
    assert seen == sorted(seen)  # never going back
    assert os.path.isdir(folder)
    assert server.stop() == 0
    assert not os.path.exists(folder)


@pytest.mark.gen_test
async def test_calls_answered_from_a_cassette_are_counted_as_replayed(ozwell_with, sdk, http_client,
                                                                      tmp_path):
    from test_replay import OFFLINE, write_cassette

    cassette = write_cassette(tmp_path / "c.jsonl", ({"model": "llama3", "messages": HELLO}, "hi"))
    base_url = ozwell_with(replay=str(cassette), llama_base_url=OFFLINE)
    for _ in range(2):
        await sdk(base_url).chat.completions.create(model="llama3", messages=HELLO)
    metrics = await scrape(http_client, base_url)
    assert metrics.by("ozwell_upstream_calls_total", "answered_by") == {"upstream": 0, "replay": 2}


@pytest.mark.gen_test
async def test_fixture_replies_and_faults_fired_are_counted(http_client, base_url, client):
    import openai

    async def rig(path: str, body: dict) -> None:
        await http_client.fetch(f"{base_url}/_ozwell/{path}", method="POST", headers=AUTH,
                                body=json.dumps(body))

    await rig("fixtures", {"match": {"user": {"contains": "weather"}}, "reply": {"text": "Sunny."}})
    await rig("faults", {"type": "error", "calls": "1", "endpoint": "chat", "status": 503})
    weather = [{"role": "user", "content": "What's the weather?"}]
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="ozwell-deterministic", messages=weather)
    for _ in range(2):
        await client.chat.completions.create(model="ozwell-deterministic", messages=weather)
    await client.responses.create(model="ozwell-deterministic", input="What's the weather?",
                                  extra_headers={"x-ozwell-fault": '{"type": "stall", "ms": 1}'})
    metrics = await scrape(http_client, base_url)
    assert metrics.by("ozwell_fixture_replies_total", "endpoint") == \
        {"chat": 2, "responses": 1, "embeddings": 0}
    assert {(dict(labels)["endpoint"], dict(labels)["type"]): value
            for (name, labels), value in metrics.samples.items()
            if name == "ozwell_faults_fired_total"} == {("chat", "error"): 1,
                                                        ("responses", "stall"): 1}
