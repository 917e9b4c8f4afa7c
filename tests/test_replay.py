"""Record and replay: exchanges with a real Llama backend process (tests/rogue_llama.py) kept in a
cassette by one server, answered offline by another, through the official SDK."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import tornado.httpclient

import ozwell
from conftest import API_KEY, AUTH, assert_valid, call_api, free_port
from test_chat import HELLO, sse_events
from test_upstream import Rogue, rogue  # noqa: F401 (rogue: the backend process, a fixture)

UPSTREAM_KEY = "sk-upstream-secret-4242"
CLIENT_KEY = "sk-client-secret-1717"
OFFLINE = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def sync_client(server, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def replay_report(client, base_url: str):
    return client.get(f"{base_url}/_ozwell/replay", cast_to=object)


def exchanges(cassette: Path) -> list:
    return [json.loads(line) for line in cassette.read_text().splitlines()]


def calls(client: openai.OpenAI, key: str) -> list:
    """A plain and a streamed completion, each as (bytes received, generator header); the text
    of the same stream as the SDK parses it; and the answer to a message holding `key`."""
    plain = client.chat.completions.with_raw_response.create(
        model="llama3", messages=HELLO, extra_body={"rogue": {"echo_authorization": True}})
    asked = {"model": "llama3", "messages": HELLO, "stream": True,
             "extra_body": {"rogue": {"events": 4, "interval": 0.05}}}
    with client.chat.completions.with_streaming_response.create(**asked) as streamed:
        streamed_bytes = b"".join(streamed.iter_bytes())
        streamed_generator = streamed.headers["x-ozwell-generator"]
    parsed = client.chat.completions.create(**asked)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in parsed if chunk.choices)
    told = client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": f"my key is {key}"}])
    return [(plain.http_response.content, plain.headers["x-ozwell-generator"]),
            (streamed_bytes, streamed_generator), text, told.choices[0].message.content]


# --- the whole round: record against a backend, replay offline ----------------------------------

def test_recorded_answers_replay_offline_byte_for_byte(server_process, tmp_path, registry):
    cassette = tmp_path / "cassettes" / "chat.jsonl"
    backend = Rogue()
    try:
        recording = server_process(env={"LLAMA_BASE_URL": backend.url, "LLAMA_API_KEY": UPSTREAM_KEY},
                                   args=("--record", str(cassette)))
        with sync_client(recording) as client:
            recorded = calls(client, CLIENT_KEY)
        assert recording.stop() == 0
    finally:
        backend.process.kill()
        backend.process.wait()
    assert recorded[0][1] == recorded[1][1] == "upstream"
    assert recorded[2] == "w0 w1 w2 w3 "
    assert recorded[3] == f"echo: my key is {CLIENT_KEY}"  # the backend had the client's words

    text = cassette.read_text()
    assert UPSTREAM_KEY not in text and CLIENT_KEY not in text
    lines = exchanges(cassette)
    assert len(lines) == 4
    for line in lines:
        assert_valid(registry, "CassetteExchange", line)
    plain, streamed, _, told = lines
    assert ["X-Seen-Authorization", "Bearer [redacted]"] in plain["response"]["headers"]
    assert told["request"]["body"]["messages"][0]["content"] == "my key is [redacted]"
    # Chunk for chunk, with their timing: the events came 0.05 s apart at least.
    times = [chunk["after"] for chunk in streamed["response"]["chunks"]]
    assert len(times) >= 5 and times == sorted(times)
    assert times[-1] - times[0] >= 0.15

    replaying = server_process(env={"LLAMA_BASE_URL": backend.url},  # gone: replay is offline
                               args=("--replay", str(cassette)), data_dir=tmp_path / "replay-data")
    other_key = "sk-another-client-2323"
    with sync_client(replaying, key=other_key) as client:
        replayed = calls(client, other_key)  # matched with either key redacted
        report = replay_report(client, replaying.url)
    assert replayed[0] == (recorded[0][0], "replay")
    assert replayed[1] == (recorded[1][0], "replay")
    assert replayed[2] == recorded[2]
    assert replayed[3] == "echo: my key is [redacted]"
    assert_valid(registry, "ReplayReport", report)
    assert (report["recordings"], report["played"], report["unplayed"]) == (4, 4, [])
    assert replaying.stop() == 0
    assert "all 4 recordings" in replaying.process.stderr.read()


def test_replay_with_the_recorded_timing_spaces_the_events_as_recorded(server_process, rogue,
                                                                       tmp_path):
    cassette = tmp_path / "slow.jsonl"
    recording = server_process(env={"LLAMA_BASE_URL": rogue.url}, args=("--record", str(cassette)))
    asked = {"rogue": {"events": 3, "interval": 0.3}}
    with sync_client(recording) as client:
        list(client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                            extra_body=asked))
    recording.stop()
    replaying = server_process(env={"LLAMA_BASE_URL": OFFLINE},
                               args=("--replay", str(cassette), "--replay-timing", "recorded"),
                               data_dir=tmp_path / "replay-data")
    with sync_client(replaying) as client:
        arrivals = []
        for chunk in client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                                    extra_body=asked):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert [text for _, text in arrivals] == ["w0 ", "w1 ", "w2 "]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.2  # each event waited for its recorded moment


def test_a_stream_the_backend_broke_off_breaks_off_the_same_way_on_replay(server_process, rogue,
                                                                          tmp_path):
    cassette = tmp_path / "broken.jsonl"
    asked = {"rogue": {"events": 3, "reset_after": 2}}
    body = json.dumps({"model": "llama3", "messages": HELLO, "stream": True, **asked})

    def stream_from(server) -> list:
        reply = tornado.httpclient.HTTPClient().fetch(
            f"{server.url}/v1/chat/completions", method="POST", body=body, headers=AUTH)
        return sse_events(reply.body)

    recording = server_process(env={"LLAMA_BASE_URL": rogue.url}, args=("--record", str(cassette)))
    recorded = stream_from(recording)
    recording.stop()
    assert recorded[-1]["error"]["code"] == "upstream_interrupted"
    assert exchanges(cassette)[0]["failure"]["code"] == "upstream_interrupted"

    replaying = server_process(env={"LLAMA_BASE_URL": OFFLINE}, args=("--replay", str(cassette)),
                               data_dir=tmp_path / "replay-data")
    assert stream_from(replaying) == recorded


# --- matching and misses --------------------------------------------------------------------------

def write_cassette(path: Path, *answers: tuple) -> Path:
    """A cassette written by hand, as a person may: (request body, reply text) per exchange."""
    lines = []
    for body, text in answers:
        reply = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1767225600,
                 "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": text}}]}
        lines.append(json.dumps({
            "request": {"method": "POST", "path": "/chat/completions", "body": body},
            "response": {"status": 200, "headers": [["Content-Type", "application/json"]],
                         "after": 0.01, "chunks": [{"after": 0.02, "text": json.dumps(reply)}]}}))
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.gen_test
async def test_a_body_is_matched_whatever_its_key_order_spacing_or_number_form(
        ozwell_with, http_client, tmp_path):
    cassette = write_cassette(tmp_path / "c.jsonl", (
        {"model": "llama3", "temperature": 1, "messages": [{"role": "user", "content": "Hi"}]},
        "recorded"))
    base_url = ozwell_with(replay=str(cassette), llama_base_url=OFFLINE)
    sent = b'{ "messages" : [ {"content":"Hi", "role":"user"} ],\n "temperature": 1.0, "model":"llama3"}'
    reply = await http_client.fetch(f"{base_url}/v1/chat/completions", method="POST", body=sent,
                                    headers=AUTH)
    assert json.loads(reply.body)["choices"][0]["message"]["content"] == "recorded"
    assert reply.headers["x-ozwell-generator"] == "replay"


@pytest.mark.gen_test
async def test_calls_alike_take_their_recordings_in_turn_then_the_last_answers_again(
        ozwell_with, sdk, tmp_path):
    asked = {"model": "llama3", "messages": HELLO}
    cassette = write_cassette(tmp_path / "c.jsonl", (asked, "first"), (asked, "second"),
                              ({**asked, "messages": [{"role": "user", "content": "Bye"}]}, "bye"))
    base_url = ozwell_with(replay=str(cassette), llama_base_url=OFFLINE)
    client = sdk(base_url)
    answers = [(await client.chat.completions.create(**asked)).choices[0].message.content
               for _ in range(3)]
    assert answers == ["first", "second", "second"]
    report = await replay_report(client, base_url)
    assert (report["played"], report["misses"]) == (2, 0)
    assert [(item["line"], item["body"]["messages"][0]["content"])
            for item in report["unplayed"]] == [(3, "Bye")]


@pytest.mark.gen_test
async def test_a_miss_is_a_400_naming_the_nearest_recording_and_where_it_differs(
        ozwell_with, sdk, tmp_path):
    cassette = write_cassette(
        tmp_path / "c.jsonl",
        ({"model": "llama3", "messages": [{"role": "user", "content": "What is the weather?"}]}, "a"),
        ({"model": "llama3", "messages": [{"role": "user", "content": "Tell me a joke"}]}, "b"))
    base_url = ozwell_with(replay=str(cassette), llama_base_url=OFFLINE)
    client = sdk(base_url)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": "Tell me a joke, please"}])
    error = refused.value.body
    assert error["code"] == "replay_miss" and error["param"] == "messages[0].content"
    assert "line 2" in error["message"]
    assert '"Tell me a joke"' in error["message"] and '"Tell me a joke, please"' in error["message"]
    report = await replay_report(client, base_url)
    assert report["misses"] == 1 and report["played"] == 0


@pytest.mark.gen_test
async def test_with_replay_miss_upstream_a_miss_goes_to_the_backend(ozwell_with, sdk, rogue,
                                                                   tmp_path):
    cassette = write_cassette(tmp_path / "c.jsonl", ({"model": "llama3", "messages": HELLO}, "kept"))
    client = sdk(ozwell_with(replay=str(cassette), replay_miss="upstream",
                             llama_base_url=rogue.url))
    kept = await client.chat.completions.with_raw_response.create(model="llama3", messages=HELLO)
    missed = await client.chat.completions.with_raw_response.create(
        model="llama3", messages=[{"role": "user", "content": "Other"}])
    assert (kept.parse().choices[0].message.content, kept.headers["x-ozwell-generator"]) == \
        ("kept", "replay")
    assert (missed.parse().choices[0].message.content, missed.headers["x-ozwell-generator"]) == \
        ("echo: Other", "upstream")


@pytest.mark.gen_test
async def test_the_replay_report_needs_a_key_and_is_in_the_openapi_document(
        ozwell_with, http_client, tmp_path):
    base_url = ozwell_with()
    refused = await http_client.fetch(f"{base_url}/_ozwell/replay", raise_error=False)
    assert refused.code == 401
    status, report = await call_api(http_client, base_url, "GET", "/_ozwell/replay")
    assert status == 200 and report["cassette"] is None
    _, document = await call_api(http_client, base_url, "GET", "/openapi.json")
    operation = document["paths"]["/_ozwell/replay"]["get"]
    assert operation["security"] == [{"ApiKeyAuth": []}]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ReplayReport"}


# --- damaged cassettes, crashes and concurrent recordings ----------------------------------------

GOOD_LINE = json.dumps({"request": {"method": "POST", "path": "/chat/completions",
                                    "body": {"model": "llama3", "messages": HELLO}},
                        "response": {"status": 200, "headers": [], "after": 0, "chunks": []}})


DAMAGED = [
    (GOOD_LINE + "\n{not json\n" + GOOD_LINE + "\n", "line 2 is not JSON"),
    (GOOD_LINE + "\n" + GOOD_LINE.replace('"status": 200', '"status": "ok"') + "\n",
     "line 2, response.status: 'ok' is not of type 'integer'"),
    ("[1, 2]\n", "line 1, the line: [1, 2] is not of type 'object'"),
]


@pytest.mark.parametrize("flag, content, said", [
    *(("--replay", content, said) for content, said in DAMAGED),
    *(("--record", content, said) for content, said in DAMAGED),  # not added to
    ("--replay", None, "does not exist"),
])
def test_a_damaged_cassette_stops_the_start_in_one_line(tmp_path, flag, content, said):
    cassette = tmp_path / "bad.jsonl"
    if content is not None:
        cassette.write_text(content)
    result = run_ozwell(flag, str(cassette), "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr
    assert result.stderr.startswith(f"ozwell: the cassette '{cassette}'")


def run_ozwell(*args: str):
    return subprocess.run([sys.executable, str(Path(ozwell.__file__)), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LLAMA_BASE_URL": OFFLINE})


def test_a_crash_leaves_the_exchanges_before_it_whole_and_the_next_recording_goes_on(
        server_process, rogue, tmp_path, registry):
    cassette = tmp_path / "c.jsonl"
    first = server_process(env={"LLAMA_BASE_URL": rogue.url}, args=("--record", str(cassette)))
    with sync_client(first) as client:
        for word in ("one", "two"):
            client.chat.completions.create(model="llama3",
                                           messages=[{"role": "user", "content": word}])
        stream = client.chat.completions.create(
            model="llama3", messages=HELLO, stream=True,
            extra_body={"rogue": {"events": 50, "interval": 0.1}})
        next(iter(stream))
        first.process.send_signal(signal.SIGKILL)  # mid-stream: that exchange never ends
        first.process.wait()
    assert [line["request"]["body"]["messages"][0]["content"]
            for line in exchanges(cassette)] == ["one", "two"]
    # As if the process had died within the write of a line:
    with cassette.open("a") as out:
        out.write(GOOD_LINE[:70])
    second = server_process(env={"LLAMA_BASE_URL": rogue.url}, args=("--record", str(cassette)),
                            data_dir=tmp_path / "d2")
    with sync_client(second) as client:
        client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "three"}])
    second.stop()
    lines = exchanges(cassette)
    assert [line["request"]["body"]["messages"][0]["content"] for line in lines] == \
        ["one", "two", "three"]
    for line in lines:
        assert_valid(registry, "CassetteExchange", line)
    assert "cut off mid-write" in second.process.stderr.read()


def test_a_cut_off_last_line_is_left_out_of_a_replay_with_a_warning(server_process, tmp_path):
    cassette = write_cassette(tmp_path / "c.jsonl", ({"model": "llama3", "messages": HELLO}, "kept"))
    with cassette.open("a") as out:
        out.write(GOOD_LINE[:70])
    server = server_process(env={"LLAMA_BASE_URL": OFFLINE}, args=("--replay", str(cassette)))
    with sync_client(server) as client:
        assert client.chat.completions.create(model="llama3", messages=HELLO) \
            .choices[0].message.content == "kept"
        assert replay_report(client, server.url)["recordings"] == 1
    server.stop()
    assert "line 2" in server.process.stderr.read()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
def test_concurrent_recordings_from_several_workers_never_interleave(server_process, rogue,
                                                                     tmp_path, registry):
    cassette = tmp_path / "c.jsonl"
    server = server_process(env={"LLAMA_BASE_URL": rogue.url},
                            args=("--record", str(cassette), "--workers", "2"))
    count = 24

    async def many() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        async def one(number: int) -> str:
            stream = await client.chat.completions.create(
                model="llama3", messages=[{"role": "user", "content": f"n{number}"}], stream=True,
                extra_body={"rogue": {"events": 5, "interval": 0.02,
                                      "huge_event": 100_000 * (number % 3)}})
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        try:
            return await asyncio.gather(*(one(number) for number in range(count)))
        finally:
            await client.close()

    assert all(text.endswith("w0 w1 w2 w3 w4 ") for text in asyncio.run(many()))
    assert server.stop() == 0
    lines = exchanges(cassette)
    assert sorted(line["request"]["body"]["messages"][0]["content"] for line in lines) == \
        sorted(f"n{number}" for number in range(count))
    for line in lines:
        assert_valid(registry, "CassetteExchange", line)
        text = "".join(chunk["text"] for chunk in line["response"]["chunks"])
        assert text.endswith("data: [DONE]\n\n") and text.count("data: ") == 9


@pytest.mark.gen_test
async def test_recording_while_replaying_keeps_the_misses_that_went_upstream(ozwell_with, sdk, rogue,
                                                                            tmp_path):
    played = write_cassette(tmp_path / "played.jsonl", ({"model": "llama3", "messages": HELLO}, "kept"))
    new = tmp_path / "new.jsonl"
    client = sdk(ozwell_with(replay=str(played), replay_miss="upstream", record=str(new),
                             llama_base_url=rogue.url))
    await client.chat.completions.create(model="llama3", messages=HELLO)
    await client.chat.completions.create(model="llama3",
                                         messages=[{"role": "user", "content": "Other"}])
    assert [line["request"]["body"]["messages"][0]["content"] for line in exchanges(new)] == \
        ["Other"]


@pytest.mark.gen_test
async def test_a_replayed_completion_is_stored_as_a_proxied_one_is(ozwell_with, sdk, tmp_path):
    asked = {"model": "llama3", "messages": HELLO, "store": True, "metadata": {"run": "replay"}}
    client = sdk(ozwell_with(replay=str(write_cassette(tmp_path / "c.jsonl", (asked, "kept"))),
                             llama_base_url=OFFLINE))
    reply = await client.chat.completions.create(**asked)
    given_back = await client.chat.completions.with_raw_response.retrieve(reply.id)
    assert given_back.headers["x-ozwell-generator"] == "replay"
    stored = given_back.parse()
    assert stored.choices[0].message.content == "kept" and stored.metadata == {"run": "replay"}
    messages = await client.chat.completions.messages.list(reply.id)
    assert [message.content for message in messages.data] == ["Hello there"]


@pytest.mark.parametrize("args, said", [
    (("--replay-miss", "maybe"), "--replay-miss maybe is not error or upstream"),
    (("--replay-timing", "slow"), "--replay-timing slow is not fast or recorded"),
])
def test_a_replay_setting_out_of_its_choices_is_named(tmp_path, args, said):
    result = run_ozwell(*args, "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert (result.returncode, result.stderr) == (2, f"ozwell: {said}\n")


@pytest.mark.gen_test
async def test_responses_and_embeddings_through_the_backend_are_recorded_and_replayed(
        ozwell_with, sdk, backend, tmp_path):
    cassette = str(tmp_path / "c.jsonl")
    through_backend = {"responses_backend": "upstream", "embeddings_backend": "upstream"}

    async def ask(client) -> list:
        plain = await client.responses.with_raw_response.create(model="llama3", input="Hello")
        stream = await client.responses.create(model="llama3", input="Stream me", stream=True)
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        vectors = await client.embeddings.with_raw_response.create(
            model="nomic-embed-text", input=["one", "three"], encoding_format="base64")
        return [plain.parse().output_text, plain.headers["x-ozwell-generator"], deltas,
                [item.embedding for item in vectors.parse().data],
                vectors.headers["x-ozwell-generator"]]

    recorded = await ask(sdk(ozwell_with(record=cassette, llama_base_url=backend.url,
                                         **through_backend)))
    assert [line["request"]["path"] for line in exchanges(Path(cassette))] == \
        ["/chat/completions", "/chat/completions", "/embeddings"]
    replayed = await ask(sdk(ozwell_with(replay=cassette, llama_base_url=OFFLINE,
                                         **through_backend)))
    assert recorded[0] == "echo: Hello" and len(recorded[2]) > 1 and len(recorded[3]) == 2
    assert (recorded[1], recorded[4]) == ("upstream", "upstream")
    assert (replayed[1], replayed[4]) == ("replay", "replay")
    assert [replayed[0], replayed[2], replayed[3]] == [recorded[0], recorded[2], recorded[3]]
