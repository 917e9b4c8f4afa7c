"""Work on the event loop stays bounded: a large request is worked on off the loop and read in
bounded pieces, so everyone else is still served meanwhile, and the built-in model's replies
stay exactly what they were.

(The figures, /health latencies and peak memory, are in build/bench_loop.py.)
"""
import asyncio
import hashlib
import http.client
import json
import os
import random
import threading
import time
import weakref

import pytest

import ozwell
from conftest import AUTH

MODEL = ozwell.OFFLINE_MODEL


# --- the same replies, however the conversation is read ------------------------------------

def shortened_as_first_written(text, limit):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def reply_as_first_written(model, turns, max_tokens=None, variant=0):
    """The built-in model as it was first written: every reply must stay exactly this."""
    seed = hashlib.sha256(json.dumps(
        [model, [turn.seed_material() for turn in turns], variant]).encode()).digest()
    last_user = next((turn.text for turn in reversed(turns) if turn.role == "user"), "")
    quoted = shortened_as_first_written(last_user, 160)
    words = list(ozwell._seed_words(seed, 12 + seed[0] % 13))
    results = "".join(f'{name} returned "{shortened_as_first_written(output, 300)}". '
                      for name, output in ozwell.tool_results(turns))
    text = (f'You said: "{quoted}". ' if quoted else "") + results + (
        f"Here is a deterministic answer from {model} (turn {len(turns)}): "
        f"{' '.join(words).capitalize()}.")
    tokens = ozwell.TOKEN_PATTERN.findall(text)
    finish_reason = "stop"
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish_reason = tokens[:max_tokens], "length"
    prompt_tokens = sum(len(ozwell.TOKEN_PATTERN.findall(t)) for turn in turns
                        for t in [turn.text, *(call.arguments for call in turn.tool_calls)])
    return ozwell.Generation(tuple(tokens), finish_reason, prompt_tokens)


PIECES = ["hello", "  ", "\n\t", "wörld", "日本語のテキスト", "!", "...", "a" * 20, " \u00a0 ", "x,y",
          "\U0001F600", "\x1c", "supercalifragilistic", '"quoted"', "\\", "tab\there", "\u2028"]


def random_text(rng, pieces):
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def random_turns(rng):
    """A conversation with plain turns, and now and then a call to a tool and its result."""
    turns = []
    for number in range(rng.choice([0, 1, 2, 7, 30])):
        text = random_text(rng, rng.choice([0, 1, 5, 40, 400]))
        if rng.random() < 0.2:
            call = ozwell.ToolCall(f"call_{number}", rng.choice(["lookup", "weather"]),
                                   json.dumps({"q": random_text(rng, rng.choice([1, 40]))}))
            turns += [ozwell.Turn("assistant", text, (call,)),
                      ozwell.Turn("tool", random_text(rng, 30), call_id=call.id)]
        else:
            turns.append(ozwell.Turn(rng.choice(["user", "assistant", "system", "developer"]), text))
    return turns


@pytest.mark.parametrize("piece_chars", [None, 1, 7, 64])
def test_replies_are_the_same_however_the_text_is_cut_into_pieces(monkeypatch, piece_chars):
    if piece_chars is not None:  # small pieces: every way of cutting is taken many times
        monkeypatch.setattr(ozwell, "_SEED_PIECE_CHARS", piece_chars)
        monkeypatch.setattr(ozwell, "_COUNT_SLICE_CHARS", piece_chars)
    rng = random.Random(piece_chars)
    for _ in range(300):
        turns = random_turns(rng)
        max_tokens = rng.choice([None, 1, 5, 40])
        variants = range(rng.choice([1, 3]))
        expected = [reply_as_first_written(MODEL, turns, max_tokens, v) for v in variants]
        options = ozwell.ReplyOptions(max_tokens=max_tokens)
        assert ozwell.offline_replies(MODEL, turns, options, variants) == expected
        assert ozwell.deterministic_reply(MODEL, turns, max_tokens, variants[-1]) == expected[-1]


@pytest.mark.parametrize("slice_chars", [1, 2, 5, 1 << 16])
def test_counting_in_slices_counts_the_same_tokens(monkeypatch, slice_chars):
    monkeypatch.setattr(ozwell, "_COUNT_SLICE_CHARS", slice_chars)
    rng = random.Random(slice_chars)
    for _ in range(500):
        text = random_text(rng, rng.choice([0, 1, 3, 50, 300]))
        assert ozwell.count_tokens(text) == len(ozwell.TOKEN_PATTERN.findall(text)), repr(text)


def test_a_quote_reads_only_the_first_words():
    long_word = "w" * 1_000_000
    assert ozwell._shortened(f"  {long_word} tail", 160) == "w" * 157 + "..."
    many = " ".join(["word"] * 100)
    assert ozwell._shortened(many, 160) == shortened_as_first_written(many, 160)
    assert ozwell._shortened(" a \n\t b ", 160) == "a b"


# --- the loop keeps serving while a large request is answered ------------------------------

class RepliesAtOnce:
    """A handler whose every flush is taken whole by the socket at once."""
    TURN_SECONDS = ozwell.BaseHandler.TURN_SECONDS
    _turn_began = 0.0
    flush_in_turn = ozwell.BaseHandler.flush_in_turn

    async def flush(self):
        pass


@pytest.mark.gen_test
async def test_a_reply_the_socket_always_takes_at_once_still_gives_others_turns():
    """A long reply written in flushes (a 52 MB embeddings reply, a file, a long stream) to a
    client reading as fast as it is written never waits for the socket, so it gives the event
    loop a turn itself, at least every TURN_SECONDS of writing."""
    turns = 0

    async def someone_else():
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.ensure_future(someone_else())
    await asyncio.sleep(0)
    handler, turns = RepliesAtOnce(), 0
    started = time.monotonic()
    while time.monotonic() - started < 50 * handler.TURN_SECONDS:
        await handler.flush_in_turn()
    other.cancel()
    assert turns >= 25


class Messages(list):
    """A list that its members can see (weakly) as they are freed."""


class Message:
    def __init__(self, seen, messages):
        self.seen, self.messages = seen, weakref.ref(messages)

    def __del__(self):
        messages = self.messages()
        self.seen.append(None if messages is None else len(messages))


def long_messages(seen):
    messages = Messages()
    messages.extend(Message(seen, messages) for _ in range(3 * ozwell.LET_GO_SLICE + 5))
    return messages


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_long_list_nothing_else_holds_is_freed_a_slice_at_a_time(as_dict):
    """Freed whole, the list is gone before its members; a slice at a time, each member sees
    what is left of it, so the event loop's thread had a turn between slices."""
    seen = []
    held = [{"messages": long_messages(seen), "model": MODEL} if as_dict else long_messages(seen)]
    ozwell.let_go(held)
    assert held == [] and len(seen) == 3 * ozwell.LET_GO_SLICE + 5
    assert None not in seen and max(seen) == 2 * ozwell.LET_GO_SLICE + 5 and min(seen) == 0


def test_what_something_else_holds_is_left_alone():
    seen = []
    body = {"messages": long_messages(seen)}
    journal = [body]  # as the request journal holds a small body
    ozwell.let_go([body])
    assert len(journal[0]["messages"]) == 3 * ozwell.LET_GO_SLICE + 5 and not seen
    messages = long_messages(seen)
    ozwell.let_go([{"messages": messages}])
    assert len(messages) == 3 * ozwell.LET_GO_SLICE + 5 and not seen


def small_messages_body(size):
    message = {"role": "user", "content": "Hello there, how are you today?"}
    return json.dumps({"model": MODEL, "messages": [message] * (size // len(json.dumps(message)))})


def health_latencies_while(server, path, body):
    """Send `body` to `path` on one connection and, while it is answered, ask for /health on
    another every 10 ms; return the big request's status, body and seconds, and the /health
    latencies."""
    result = {}

    def send():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        started = time.perf_counter()
        connection.request("POST", path, body, {**AUTH, "Content-Type": "application/json"})
        reply = connection.getresponse()
        result["status"], result["body"] = reply.status, reply.read()
        result["seconds"] = time.perf_counter() - started
        connection.close()

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.1)
    probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    latencies = []
    while sender.is_alive():
        started = time.perf_counter()
        probe.request("GET", "/health")
        probe.getresponse().read()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    sender.join()
    probe.close()
    return result["status"], result["body"], result["seconds"], latencies


def assert_never_held_up(seconds, latencies):
    """No /health waited for a large share of the big request: one that held the loop shows
    as a probe waiting for (nearly) all of it. Generous on purpose: a shared machine."""
    assert max(latencies) < max(seconds / 4, 0.25), (seconds, sorted(latencies)[-5:])


@pytest.mark.slow
def test_health_is_answered_while_a_large_chat_request_is_worked_on(server_process):
    server = server_process()
    status, body, seconds, latencies = health_latencies_while(
        server, "/v1/chat/completions", small_messages_body(3_500_000))
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] > 100_000
    assert_never_held_up(seconds, latencies)


@pytest.mark.slow
def test_health_is_answered_while_a_large_embeddings_reply_is_made(server_process):
    server = server_process()
    text = " ".join(hashlib.md5(str(j).encode()).hexdigest()[:12] for j in range(40))
    body = json.dumps({"model": "text-embedding-3-large", "encoding_format": "float",
                       "input": [f"Document {i}: {text}" for i in range(2048)]})
    status, reply, seconds, latencies = health_latencies_while(server, "/v1/embeddings", body)
    assert status == 200 and len(reply) > 50_000_000
    assert [item["index"] for item in json.loads(reply)["data"]] == list(range(2048))
    assert_never_held_up(seconds, latencies)


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_one_30_mb_message_is_answered_in_bounded_memory(server_process):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc (Linux)")
    server = server_process()
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * 600_000)[:30_000_000]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": words}]})
    before = peak_rss_mb(server.process.pid)
    status, reply, _, _ = health_latencies_while(server, "/v1/chat/completions", body)
    assert status == 200
    assert json.loads(reply)["usage"]["prompt_tokens"] == ozwell.count_tokens(words)
    # Reading the body and its text once each is about 60 MB; splitting the text into words
    # as it was first written took 400 MB more.
    assert peak_rss_mb(server.process.pid) - before < 150
