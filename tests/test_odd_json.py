"""Odd but valid JSON gets an answer, never a 500; what is not JSON gets a 400 saying why.

Bodies are written by hand here (NaN, lone surrogate escapes, 2.0 for 2, deep nesting), since
json.dumps would not write them that way.
"""
import json
import random

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web

import ozwell
from conftest import AUTH

MODEL = ozwell.OFFLINE_MODEL
REGISTRY = ozwell.SchemaRegistry.load()
MAX_DEPTH = getattr(ozwell, "MAX_JSON_DEPTH", 128)


async def post(http_client, base_url, path, body, **kwargs):
    """POST `body` (text: sent as it is written) and return (status, parsed JSON or raw text)."""
    reply = await http_client.fetch(f"{base_url}{path}", method="POST", headers=AUTH,
                                    body=body if isinstance(body, (str, bytes)) else json.dumps(body),
                                    raise_error=False, **kwargs)
    text = reply.body.decode("utf-8")  # strict: a lone surrogate could not have been encoded
    try:
        return reply.code, json.loads(text, parse_constant=_not_json)
    except ValueError:
        return reply.code, text


def _not_json(name):
    raise AssertionError(f"the server wrote {name}, which is not JSON")


def chat(content='"Hello"', extra=""):
    return (f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {content}}}]'
            f'{extra}}}')


# --- NaN and Infinity ------------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", chat(extra=', "temperature": NaN')),
    ("/v1/chat/completions", chat(extra=', "temperature": Infinity')),
    ("/v1/responses", f'{{"model": "{MODEL}", "input": "hi", "temperature": -Infinity}}'),
    ("/v1/responses", f'{{"model": "{MODEL}", "input": "hi", "top_p": 1e999}}'),
    ("/v1/embeddings", '{"model": "text-embedding-3-small", "input": [NaN]}'),
])
async def test_nan_and_infinity_are_not_json(http_client, base_url, path, body):
    status, answer = await post(http_client, base_url, path, body)
    assert status == 400
    message = answer["error"]["message"]
    assert "could not parse the JSON body" in message
    assert "NaN" in message or "Infinity" in message or "too large" in message


# --- integers written as floats --------------------------------------------------------------

@pytest.mark.gen_test
async def test_integral_floats_are_integers_on_chat(http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               chat(extra=', "n": 2.0, "max_tokens": 3.0'))
    assert status == 200
    assert [choice["index"] for choice in reply["choices"]] == [0, 1]
    assert reply["usage"]["completion_tokens"] == 6
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               chat(extra=', "max_completion_tokens": 3e0, "stream": true'))
    assert status == 200 and reply.rstrip().endswith("data: [DONE]")
    contents = [json.loads(line[6:])["choices"][0]["delta"].get("content")
                for line in reply.split("\n") if line.startswith("data: {")]
    assert len([c for c in contents if c]) == 3


@pytest.mark.gen_test
async def test_integral_floats_are_integers_on_responses_and_embeddings(http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/responses",
                               f'{{"model": "{MODEL}", "input": "hi", "max_output_tokens": 16.0}}')
    assert status == 200
    assert reply["max_output_tokens"] == 16 and isinstance(reply["max_output_tokens"], int)
    status, reply = await post(http_client, base_url, "/v1/embeddings",
                               '{"model": "text-embedding-3-small", "input": "hi", '
                               '"dimensions": 8.0, "encoding_format": "float"}')
    assert status == 200 and len(reply["data"][0]["embedding"]) == 8


@pytest.mark.gen_test
async def test_a_fraction_where_an_integer_belongs_is_still_a_400(http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/chat/completions", chat(extra=', "n": 1.5'))
    assert status == 400 and reply["error"]["param"] == "n"


# --- lone surrogates -------------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("written, read", [
    ('"a\\ud800b\\udc00c"', "a\ufffdb\ufffdc"),    # lone: the replacement character
    ('"smile \\ud83d\\ude00"', "smile \U0001F600"),  # a pair: the one character it stands for
])
async def test_surrogate_escapes_in_chat(http_client, base_url, written, read):
    status, reply = await post(http_client, base_url, "/v1/chat/completions", chat(content=written))
    assert status == 200
    assert f'You said: "{read}"' in reply["choices"][0]["message"]["content"]


@pytest.mark.gen_test
async def test_a_streamed_chat_with_a_lone_surrogate_ends_with_done(http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               chat(content='"a\\ud800b"', extra=', "stream": true'))
    assert status == 200
    assert reply.endswith("data: [DONE]\n\n")
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in reply.split("\n") if line.startswith("data: {"))
    assert 'You said: "a\ufffdb"' in text


@pytest.mark.gen_test
async def test_lone_surrogates_in_responses_input_and_metadata(http_client, base_url):
    body = (f'{{"model": "{MODEL}", "input": "x\\udfffy", '
            '"metadata": {"k\\ud801": "v\\ud802"}}')
    status, reply = await post(http_client, base_url, "/v1/responses", body)
    assert status == 200
    assert reply["metadata"] == {"k\ufffd": "v\ufffd"}
    assert 'You said: "x\ufffdy"' in reply["output"][0]["content"][0]["text"]
    again = await http_client.fetch(f"{base_url}/v1/responses/{reply['id']}", headers=AUTH)
    assert json.loads(again.body)["metadata"] == {"k\ufffd": "v\ufffd"}


# --- nesting ---------------------------------------------------------------------------------

def nested(depth):
    """A value that, placed in a body's top-level object, makes the body `depth` levels deep."""
    return "[" * (depth - 1) + "]" * (depth - 1)


@pytest.mark.gen_test
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
async def test_nesting_over_the_limit_is_a_400_naming_it(http_client, base_url, depth):
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               chat(extra=f', "deep": {nested(depth)}'))
    assert status == 400
    assert f"more than {MAX_DEPTH} levels" in reply["error"]["message"]


@pytest.mark.gen_test
async def test_nesting_up_to_the_limit_is_answered(http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/responses",
                               f'{{"model": "{MODEL}", "input": "hi", '
                               f'"reasoning": {{"x": {nested(MAX_DEPTH - 1)}}}}}')
    assert status == 200, reply


# --- what OpenAI accepts ---------------------------------------------------------------------

def optional_fields(schema_name):
    schema = REGISTRY.schemas[schema_name]
    return sorted(set(schema["properties"]) - set(schema["required"]))


@pytest.mark.gen_test
@pytest.mark.parametrize("field", optional_fields("CreateChatCompletionRequest"))
async def test_null_for_any_optional_chat_field_is_like_leaving_it_out(http_client, base_url, field):
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    status, with_null = await post(http_client, base_url, "/v1/chat/completions", {**plain, field: None})
    assert status == 200, with_null
    _, without = await post(http_client, base_url, "/v1/chat/completions", plain)
    assert with_null["choices"] == without["choices"]


@pytest.mark.gen_test
@pytest.mark.parametrize("field", optional_fields("CreateResponse"))
async def test_null_for_any_optional_responses_field_is_like_leaving_it_out(http_client, base_url, field):
    plain = {"model": MODEL, "input": "Hello"}
    status, with_null = await post(http_client, base_url, "/v1/responses", {**plain, field: None})
    without_status, without = await post(http_client, base_url, "/v1/responses",
                                         {k: v for k, v in plain.items() if k != field})
    assert status == without_status, (with_null, without)
    if status != 200:  # a `model` left out is refused alike
        assert with_null == without
        return
    assert with_null["output"][0]["content"] == without["output"][0]["content"]
    ignored = {"id", "created_at", "completed_at", "output"}
    assert {k: v for k, v in with_null.items() if k not in ignored} == {
        k: v for k, v in without.items() if k not in ignored}


@pytest.mark.gen_test
async def test_what_llamaindex_sends_is_answered(client):
    reply = await client.responses.create(model=MODEL, input="Hello", user=None, tools=None,
                                          tool_choice=None, text=None, instructions=None,
                                          extra_body={"reasoning": None, "include": None})
    assert reply.status == "completed" and reply.output_text


FUNCTION_TURN = [{"role": "user", "content": "Weather in Oslo?"},
                 {"role": "assistant", "content": None,
                  "function_call": {"name": "get_weather", "arguments": "{}"}},
                 {"role": "function", "name": "get_weather", "content": '{"celsius": 4}'}]


@pytest.mark.gen_test
async def test_function_messages_are_answered_by_the_built_in_model(http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               {"model": MODEL, "messages": FUNCTION_TURN})
    assert status == 200 and reply["choices"][0]["message"]["content"]


@pytest.mark.gen_test
async def test_a_function_message_needs_its_name(http_client, base_url):
    messages = FUNCTION_TURN[:2] + [{"role": "function", "content": "{}"}]
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               {"model": MODEL, "messages": messages})
    assert status == 400 and reply["error"]["param"] == "messages[2].name"


class _RecordingUpstream(tornado.web.RequestHandler):
    def initialize(self, received):
        self.received = received

    def post(self):
        self.received.append(json.loads(self.request.body))
        self.finish({"id": "chatcmpl-up", "object": "chat.completion", "created": 1767225600,
                     "model": "llama3", "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "4 degrees"}, "logprobs": None}]})


@pytest.fixture
def upstream(io_loop):
    received = []
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application(
        [(r"/v1/chat/completions", _RecordingUpstream, {"received": received})]))
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{port}/v1", received
    server.stop()


@pytest.fixture
def settings(tmp_path, request):
    if "upstream" not in request.fixturenames:
        return ozwell.Settings(data_dir=str(tmp_path / "data"))
    url, _ = request.getfixturevalue("upstream")
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=url)


@pytest.mark.gen_test
async def test_function_messages_reach_a_proxied_model(upstream, http_client, base_url):
    _, received = upstream
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               {"model": "llama3", "messages": FUNCTION_TURN})
    assert status == 200 and reply["choices"][0]["message"]["content"] == "4 degrees"
    assert received[0]["messages"][2] == FUNCTION_TURN[2]


# --- a built-in stream always ends with [DONE] or an error event -----------------------------

@pytest.fixture
def failing_pacer(monkeypatch):
    """Make the built-in streams fail at their third token, as an unforeseen bug would."""
    original = ozwell.Pacer.wait_for

    async def wait_for(self, tick):
        if tick >= 3:
            raise RuntimeError("an unforeseen failure")
        return await original(self, tick)

    monkeypatch.setattr(ozwell.Pacer, "wait_for", wait_for)


@pytest.mark.gen_test
async def test_a_failing_chat_stream_ends_with_an_error_event(failing_pacer, http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/chat/completions",
                               chat(extra=', "stream": true'))
    assert status == 200
    events = [json.loads(line[6:]) for line in reply.split("\n") if line.startswith("data: {")]
    assert len(events) == 4  # the role, two tokens, then the error
    assert events[-1]["error"]["type"] == "server_error"
    assert "request id req_" in events[-1]["error"]["message"]
    assert reply.endswith("\n\n")


@pytest.mark.gen_test
async def test_a_failing_response_stream_ends_with_an_error_event(failing_pacer, http_client, base_url):
    status, reply = await post(http_client, base_url, "/v1/responses",
                               {"model": MODEL, "input": "Hello", "stream": True})
    assert status == 200
    blocks = [block.split("\n") for block in reply.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in blocks]
    last = json.loads(blocks[-1][1].removeprefix("data: "))
    assert names[-1] == "error" and names.count("response.output_text.delta") == 2
    assert last["sequence_number"] == len(blocks) - 1
    assert list(REGISTRY.errors("ResponseStreamEvent", last)) == []


# --- long bodies, parsed a piece at a time -----------------------------------------------------

AWKWARD_STRINGS = ["", "plain", "a,b", "]", "}", "[", "{", ",", '\\"', "\\\\", "\\\\\\\"],",
                   "\\ud800", "\\ud83d\\ude00", "\\\\ud800", "日本", "\\n\\t", '}, {"a": 1}']


def random_json_text(rng, depth=0):
    """JSON text as people write it, and as they should not: brackets and commas inside strings,
    escapes, 2.0 for 2, duplicate keys, odd spacing, and now and then a fault."""
    space = rng.choice(["", " ", "\n  ", "\t"])
    roll = rng.random()
    if depth < 4 and roll < 0.45:
        members = [random_json_text(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 12, 40]))]
        if rng.random() < 0.5:
            return "[" + space + ("," + space).join(members) + space + "]"
        keys = [rng.choice(["a", "b", "model", ",", "}"]) for _ in members]
        return "{" + space + ("," + space).join(
            f'"{key}"{space}:{space}{member}' for key, member in zip(keys, members)) + space + "}"
    if roll < 0.75:
        return '"' + rng.choice(AWKWARD_STRINGS) + '"'
    if roll < 0.985:
        return rng.choice(["0", "-1", "2.0", "3.5", "1e3", "true", "false", "null", "-0.0"])
    return rng.choice(["NaN", "Infinity", "[1,]", '{"a" 1}', "[1 2]", '"open', "1e999", "]"])


def parsed(text):
    try:
        return "value", repr(ozwell.parse_json(text))  # repr: 2 and 2.0 differ, and key order
    except ValueError as error:
        return "refused", str(error)


@pytest.mark.parametrize("piece_chars", [4, 16, 64, 1024])
def test_a_long_text_parses_as_it_would_whole(monkeypatch, piece_chars):
    """Every text gives the same value, or is refused in the same words, in pieces as whole."""
    rng = random.Random(piece_chars)
    texts = [random_json_text(rng) for _ in range(1500)]
    texts += ["[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
              "[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH,
              '[{"a": [1, 2]}, {"a": [3]}] ', '[1, 2] [3]', '[1, 2],', '  {"a": 1}  x',
              '["' + "x," * 100 + '"]', '[' + '"]",' * 50 + '"end"]']
    whole = {}
    monkeypatch.setattr(ozwell, "_JSON_PIECES_FROM", 1 << 40)
    for text in texts:
        whole[text] = parsed(text)
    monkeypatch.setattr(ozwell, "_JSON_PIECES_FROM", 0)
    monkeypatch.setattr(ozwell, "_JSON_PIECE_CHARS", piece_chars)
    for text in texts:
        assert parsed(text) == whole[text], text
    assert {kind for kind, _ in whole.values()} == {"value", "refused"}


def test_a_long_text_is_parsed_in_calls_that_each_read_a_piece(monkeypatch):
    """No call to the parser reads much more than a piece of a long list of small messages
    (the event loop's thread gets the interpreter between calls)."""
    message = {"role": "user", "content": 'Hello, [there] {you} "all"'}
    text = json.dumps({"model": MODEL, "messages": [message] * 20_000, "n": 2.0})
    longest = []
    decoder = json.JSONDecoder(parse_float=ozwell._json_float,
                               parse_constant=ozwell._json_constant)
    scan_once = decoder.scan_once  # what decode() calls too

    def counted_scan_once(text, at):
        value, end = scan_once(text, at)
        longest.append(end - at)
        return value, end

    decoder.scan_once = counted_scan_once
    monkeypatch.setattr(ozwell, "_JSON_DECODER", decoder)
    assert ozwell.parse_json(text) == {"model": MODEL, "messages": [message] * 20_000, "n": 2}
    assert len(text) > ozwell._JSON_PIECES_FROM and max(longest) <= ozwell._JSON_PIECE_CHARS + 2
