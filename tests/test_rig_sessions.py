"""Sessions (x-ozwell-session), the request journal, seeded ids and a fixed clock (byte-identical
replies across server processes), and simulated latency."""
import asyncio
import io
import json
import random
import time
import urllib.request

import openai
import pytest

import ozwell
from conftest import API_KEY, AUTH, assert_valid
from rigkit import control

MODEL = ozwell.OFFLINE_MODEL
HELLO = [{"role": "user", "content": "Hello"}]
CLOCK = 1767225600  # 2026-01-01T00:00:00Z

LATENCY = {"latency": {"ozwell-deterministic": {"ttft_ms": 250, "tokens_per_second": 40}},
           "fixtures": [{"match": {"user": {"exact": "quick"}}, "reply": {"text": "Quick."},
                         "latency": {"ttft_ms": 0}}]}


@pytest.fixture
def settings(tmp_path, request):
    """Seeded, with a fixed clock and a model latency; a test may ask for other values."""
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(LATENCY))
    values = {"seed": "s1", "clock": str(CLOCK), "fixtures": str(path),
              **getattr(request, "param", {})}
    return ozwell.Settings(data_dir=str(tmp_path / "data"), **values)


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def in_session(client, name):
    return client.with_options(default_headers={"x-ozwell-session": name})


# --- sessions -----------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_two_sessions_interleaving_never_see_each_other(http_client, base_url, client):
    for session, word in (("a", "alpha"), ("b", "beta")):
        await control(http_client, base_url, "POST", "fixtures", session=session, body={
            "match": {"user": {"contains": "next"}},
            "reply": {"sequence": [{"text": f"{word} 1"}, {"text": f"{word} 2"}]}})
        await control(http_client, base_url, "POST", "faults", session=session, body={
            "type": "error", "endpoint": "chat", "calls": 3, "status": 500})
    a, b = in_session(client, "a"), in_session(client, "b")

    async def ask(who):
        try:
            reply = await who.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next"}])
            return reply.choices[0].message.content
        except openai.InternalServerError:
            return 500

    answers = [await ask(who) for who in (a, b, a, b, a, b, a)]
    assert answers == ["alpha 1", "beta 1", "alpha 2", "beta 2", 500, 500, "alpha 2"]
    # Neither session's fixtures reach the default session, whose call count is its own.
    assert (await ask(client)).startswith("You said")
    status, listed = await control(http_client, base_url, "GET", "fixtures", session="a")
    assert [(item["source"], item["used"]) for item in listed["data"]] == [("session", 3), ("file", 0)]
    journal_a = (await control(http_client, base_url, "GET", "requests", session="a"))[1]["data"]
    assert [entry["status"] for entry in journal_a] == [200, 200, 500, 200]
    assert {entry["session"] for entry in journal_a} == {"a"}
    status, by_query = await control(http_client, base_url, "GET", "requests?session=b")
    assert [entry["status"] for entry in by_query["data"]] == [200, 200, 500]


@pytest.mark.gen_test
async def test_seeded_ids_of_a_session_do_not_depend_on_other_sessions(http_client, base_url, client):
    alone = [(await in_session(client, "x").chat.completions.create(model=MODEL, messages=HELLO)).id
             for _ in range(2)]
    await control(http_client, base_url, "POST", "reset", session="x")
    interleaved = []
    for _ in range(2):
        await in_session(client, "y").chat.completions.create(model=MODEL, messages=HELLO)
        interleaved.append((await in_session(client, "x").chat.completions.create(
            model=MODEL, messages=HELLO)).id)
    assert interleaved == alone and alone[0] != alone[1]
    other = (await in_session(client, "y").chat.completions.create(model=MODEL, messages=HELLO)).id
    assert other not in alone


@pytest.mark.gen_test
async def test_reset_puts_a_session_back_to_its_start(http_client, base_url, client, registry):
    await control(http_client, base_url, "POST", "fixtures", body={"reply": {"text": "scripted"}})
    await control(http_client, base_url, "POST", "faults", body={"type": "error", "calls": 2, "status": 500})
    first = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert first.choices[0].message.content == "scripted"
    status, reset = await control(http_client, base_url, "POST", "reset")
    assert reset == {"object": "session", "session": "default", "reset": True}
    assert_valid(registry, "RigReset", reset)
    again = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert again.id == first.id  # the id counter starts over
    assert again.choices[0].message.content.startswith("You said")
    second = await client.chat.completions.create(model=MODEL, messages=HELLO)  # call 2: no fault left
    assert second.id != first.id
    journal = (await control(http_client, base_url, "GET", "requests"))[1]["data"]
    assert len(journal) == 2


@pytest.mark.gen_test
async def test_a_bad_session_header_is_a_400(http_client, base_url):
    status, body = await control(http_client, base_url, "GET", "fixtures", session="x" * 201)
    assert status == 400 and body["error"]["param"] == "x-ozwell-session"


# --- the journal --------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_the_journal_lists_what_arrived_redacted_and_filterable(http_client, base_url, client, registry):
    await client.chat.completions.create(model=MODEL, messages=HELLO, extra_headers={
        "Cookie": "id=secret", "x-api-key": "sk-secret", "x-trace": "t1"})
    await client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=2)
    await client.files.create(file=("a.txt", io.BytesIO(b"hello")), purpose="assistants")
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=MODEL, messages=[])
    status, listed = await control(http_client, base_url, "GET", "requests")
    assert_valid(registry, "JournalList", listed)
    entries = listed["data"]
    assert [(entry["method"], entry["endpoint"], entry["status"]) for entry in entries] == [
        ("POST", "chat", 200), ("POST", "embeddings", 200), ("POST", "files", 200), ("POST", "chat", 400)]
    chat = entries[0]
    assert chat["body"] == {"model": MODEL, "messages": HELLO}
    assert chat["headers"]["authorization"] == chat["headers"]["cookie"] == "[redacted]"
    assert chat["headers"]["x-api-key"] == "[redacted]" and chat["headers"]["x-trace"] == "t1"
    assert "secret" not in json.dumps(entries) and API_KEY not in json.dumps(entries)
    assert entries[2]["body"] is None and entries[2]["body_bytes"] > 5  # a multipart upload
    assert entries[0]["seq"] < entries[1]["seq"] and chat["received_at"] <= chat["finished_at"]
    only = (await control(http_client, base_url, "GET", "requests?endpoint=embeddings"))[1]["data"]
    assert [entry["model"] for entry in only] == ["text-embedding-3-small"]
    only = (await control(http_client, base_url, "GET", f"requests?model={MODEL}"))[1]["data"]
    assert len(only) == 1  # the 400 was refused before its body could be read
    status, cleared = await control(http_client, base_url, "DELETE", "requests")
    assert cleared["deleted"] == 4
    assert (await control(http_client, base_url, "GET", "requests"))[1]["data"] == []


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"journal_size": 6}], indirect=True)
async def test_the_journal_is_a_ring_of_the_set_size(http_client, base_url, client, settings):
    for number in range(8):
        await client.models.retrieve(MODEL)
    entries = (await control(http_client, base_url, "GET", "requests"))[1]["data"]
    assert len(entries) == 6 and entries[-1]["seq"] == 8


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"journal_size": 0}], indirect=True)
async def test_a_journal_of_size_zero_keeps_nothing(http_client, base_url, client, settings):
    await client.models.list()
    assert (await control(http_client, base_url, "GET", "requests"))[1]["data"] == []


# --- seeded ids and the clock -------------------------------------------------------------------

@pytest.mark.gen_test
async def test_ids_are_seeded_and_created_is_the_fixed_clock(client):
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
    mint = ozwell.Mint("s1", "default", CLOCK)
    assert reply.id == mint.new_id("chatcmpl-") and reply.created == CLOCK
    answer = await client.responses.create(model=MODEL, input="x")
    assert answer.id == mint.new_id("resp_") and answer.created_at == CLOCK
    # A large body is answered on a worker thread: the ids made there are seeded as well.
    large = await client.responses.create(model=MODEL, input="word " * 20_000)
    assert large.id == mint.new_id("resp_") and large.created_at == CLOCK
    uploaded = await client.files.create(file=("a.txt", io.BytesIO(b"a")), purpose="assistants")
    assert uploaded.id == mint.new_id("file-") and uploaded.created_at == CLOCK
    assert (await client.files.retrieve(uploaded.id)).filename == "a.txt"


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"seed": "", "clock": "start"}], indirect=True)
async def test_clock_start_fixes_created_at_the_servers_start(client, settings):
    before = int(time.time())
    first = await client.chat.completions.create(model=MODEL, messages=HELLO)
    await asyncio.sleep(1.1)
    second = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert first.created == second.created <= before and first.id != second.id


def test_clock_accepts_unix_seconds_or_iso_8601_and_refuses_the_rest():
    assert ozwell.fixed_time("2026-01-01T00:00:00Z") == ozwell.fixed_time(str(CLOCK)) == CLOCK
    assert ozwell.fixed_time("2026-01-01T01:00:00+01:00") == CLOCK
    with pytest.raises(ozwell.SettingsError, match="OZWELL_CLOCK=yesterday is not valid: use"):
        ozwell.Settings.from_environment({"OZWELL_CLOCK": "yesterday"})


SNAPSHOT_SEQUENCE = [
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HELLO}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True,
                                      "stream_options": {"include_usage": True}}),
    ("POST", "/v1/responses", {"model": MODEL, "input": "Tell me a story."}),
    ("POST", "/v1/responses", {"model": MODEL, "input": "Go on.", "stream": True}),
    ("GET", "/v1/models", None),
]


def run_snapshot(url: str, session: str) -> list[bytes]:
    bodies = []
    for method, path, body in SNAPSHOT_SEQUENCE:
        request = urllib.request.Request(
            url + path, method=method, data=json.dumps(body).encode() if body else None,
            headers={**AUTH, "Content-Type": "application/json", "x-ozwell-session": session})
        with urllib.request.urlopen(request, timeout=30) as reply:
            bodies.append(reply.read())
    return bodies


def test_the_same_requests_give_byte_identical_replies_in_two_server_processes(server_process, tmp_path):
    args = ("--seed", "snapshot", "--clock", "2026-01-01T00:00:00Z")
    first = server_process(args=args, data_dir=tmp_path / "one")
    second = server_process(args=args, data_dir=tmp_path / "two")
    one = run_snapshot(first.url, "job-1")
    run_snapshot(second.url, "someone-else")  # another session first changes nothing for job-1
    assert run_snapshot(second.url, "job-1") == one
    assert b'"id":"chatcmpl-' in one[0] and b'"created_at":1767225600' in one[2]
    assert run_snapshot(second.url, "job-2") != one
    unseeded = server_process(args=args[2:], data_dir=tmp_path / "three")
    assert run_snapshot(unseeded.url, "job-1")[0] != one[0]


# --- latency ------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_models_latency_paces_its_replies_and_a_fixtures_overrides_it(client):
    started = time.monotonic()
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True, max_tokens=5)
    arrivals = [time.monotonic() async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert arrivals[0] - started >= 0.25 and arrivals[-1] - started >= 0.25 + 4 / 40
    started = time.monotonic()
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert time.monotonic() - started >= 0.25 + 4 / 40
    quick = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "quick"}])
    assert quick.choices[0].message.content == "Quick."


def test_jitter_is_drawn_from_the_seed():
    latency = ozwell.Latency(ttft_ms=100, tokens_per_second=10, jitter=0.5)

    def schedule(seed, session):
        pace = ozwell.SimulatedPace(latency, ozwell.Mint(seed, session, None).random("latency"))
        return pace.due(20) - pace.started

    assert schedule("s", "a") == schedule("s", "a")
    assert schedule("s", "a") != schedule("s", "b") != schedule("t", "a")
    # Each wait is within the jitter of its base: 0.1 s, then 19 of 0.1 s.
    assert 0.5 * 2.0 <= schedule("s", "a") <= 1.5 * 2.0
    unseeded = [schedule("", "a") for _ in range(3)]
    assert len(set(unseeded)) == 3
    assert isinstance(ozwell.Mint("", "a", None).random("latency"), random.Random)
