"""The chat proxy against a Llama backend that misbehaves: tests/rogue_llama.py, its own process.

Connections are kept alive and reused; a reset, a stall, a broken or refused answer, a redirect
or an oversized event each reaches the client as one clear error, and nothing secret (the
backend's address, credentials in LLAMA_BASE_URL) does.
"""
import asyncio
import base64
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing

import ozwell
from conftest import assert_valid, free_port, raw_chat_post
from test_chat import HELLO, post_chat, sse_events


class Rogue:
    """The rogue backend's process: its URL and what it has seen."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("rogue_llama.py"))],
                                        stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}/v1"

    async def stats(self) -> dict:
        client = tornado.httpclient.AsyncHTTPClient()
        return json.loads((await client.fetch(f"http://127.0.0.1:{self.port}/stats")).body)

    async def wait_until(self, condition, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats()
            if condition(stats) or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def rogue():
    backend = Rogue()
    yield backend
    backend.process.kill()
    backend.process.wait()


@pytest.fixture
def settings(tmp_path, rogue):
    return ozwell.Settings(data_dir=str(tmp_path / "data"), llama_base_url=rogue.url)


@pytest.fixture(scope="module")
def registry():
    return ozwell.SchemaRegistry.load()


def contents(events) -> list:
    return [e["choices"][0]["delta"].get("content") for e in events if isinstance(e, dict) and "choices" in e]


# --- connections kept alive ---------------------------------------------------------------------

@pytest.mark.gen_test
async def test_requests_one_after_another_share_one_upstream_connection(client, rogue):
    before = await rogue.stats()
    for _ in range(3):
        reply = await client.chat.completions.create(model="llama3", messages=HELLO)
        assert reply.choices[0].message.content == "echo: Hello there"
    for _ in range(2):
        stream = await client.chat.completions.create(model="llama3", messages=HELLO, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "w0 w1 w2 "
    after = await rogue.stats()
    assert after["requests"] - before["requests"] == 5
    assert after["connections"] - before["connections"] == 1


@pytest.mark.gen_test
async def test_concurrent_requests_open_connections_that_later_requests_reuse(client, rogue):
    async def one():
        stream = await client.chat.completions.create(
            model="llama3", messages=HELLO, stream=True, extra_body={"rogue": {"interval": 0.2}})
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    before = await rogue.stats()
    assert await asyncio.gather(*(one() for _ in range(4))) == ["w0 w1 w2 "] * 4
    during = await rogue.stats()
    for _ in range(4):
        await client.chat.completions.create(model="llama3", messages=HELLO)
    after = await rogue.stats()
    assert during["connections"] - before["connections"] == 4
    assert after["connections"] == during["connections"]


@pytest.mark.gen_test
async def test_idle_connections_kept_are_bounded_in_number(rogue):
    http = ozwell.KeepAliveHTTPClient(force_instance=True, max_idle=2)
    body = json.dumps({"model": "llama3", "messages": HELLO, "stream": True,
                       "rogue": {"interval": 0.2}})
    before = await rogue.stats()
    try:
        replies = await asyncio.gather(*(http.fetch(f"{rogue.url}/chat/completions", method="POST",
                                                    body=body) for _ in range(5)))
        assert all(b"data: [DONE]" in reply.body for reply in replies)
        stats = await rogue.wait_until(lambda s: s["open"] - before["open"] <= 2)
        assert stats["connections"] - before["connections"] == 5
        assert stats["open"] - before["open"] == 2
    finally:
        http.close()
    stats = await rogue.wait_until(lambda s: s["open"] == before["open"])
    assert stats["open"] == before["open"]


@pytest.mark.gen_test
async def test_a_connection_whose_client_hung_up_is_closed_and_never_reused(client, rogue):
    before = await rogue.stats()
    stream = await client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                                  extra_body={"rogue": {"stall_after": 1}})
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    await stream.close()
    stats = await rogue.wait_until(lambda s: s["open"] == before["open"])
    assert stats["open"] == before["open"]
    reply = await client.chat.completions.create(model="llama3", messages=HELLO)
    assert reply.choices[0].message.content == "echo: Hello there"
    assert (await rogue.stats())["connections"] - before["connections"] == 2


@pytest.mark.gen_test
async def test_a_connection_the_backend_drops_as_the_next_request_arrives_is_replaced(client, rogue):
    before = await rogue.stats()
    await client.chat.completions.create(model="llama3", messages=HELLO,
                                         extra_body={"rogue": {"then_drop": True}})
    reply = await client.chat.completions.create(model="llama3", messages=HELLO)
    assert reply.choices[0].message.content == "echo: Hello there"
    assert (await rogue.stats())["connections"] - before["connections"] == 2


@pytest.mark.gen_test
async def test_host_names_are_looked_up_once_per_ttl():
    resolver = ozwell.CachingResolver(ttl=0.2)
    first = await resolver.resolve("localhost", 80)
    assert first and await resolver.resolve("localhost", 80) is first
    await asyncio.sleep(0.3)
    assert await resolver.resolve("localhost", 80) is not first
    resolver.close()


# --- resets and silence -------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_reset_mid_stream_ends_it_with_one_error_event_at_once(
        ozwell_with, http_client, registry):
    base = ozwell_with(keepalive_seconds=0.05)
    reply = await asyncio.wait_for(post_chat(http_client, base, {
        "model": "llama3", "messages": HELLO, "stream": True, "rogue": {"reset_after": 2}}), 10)
    events = sse_events(reply.body)
    assert contents(events) == ["", "w0 ", "w1 "]
    assert_valid(registry, "ErrorResponse", events[-1])
    assert events[-1]["error"]["code"] == "upstream_interrupted"
    assert "reset the connection" in events[-1]["error"]["message"]
    assert [e for e in events if isinstance(e, dict) and "error" in e] == [events[-1]]
    assert "[DONE]" not in events


@pytest.mark.gen_test
async def test_a_reset_mid_stream_reaches_the_sdk_as_an_error(client):
    stream = await client.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                                  extra_body={"rogue": {"reset_after": 1}})
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "w0 "] and "reset the connection" in caught.value.message


@pytest.mark.gen_test
async def test_a_reset_in_the_middle_of_a_plain_answer_is_a_502(client):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO,
                                             extra_body={"rogue": {"reset_body": True}})
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_interrupted"


@pytest.mark.gen_test
async def test_a_stream_the_backend_stops_sending_ends_after_the_idle_timeout(
        ozwell_with, http_client, rogue, registry):
    # Keep-alive comments go to the client all along; they do not count as the backend's bytes.
    base = ozwell_with(upstream_idle_timeout=0.5, keepalive_seconds=0.1)
    before = await rogue.stats()
    reply = await asyncio.wait_for(post_chat(http_client, base, {
        "model": "llama3", "messages": HELLO, "stream": True, "rogue": {"stall_after": 1}}), 10)
    assert b": keep-alive\n\n" in reply.body
    events = sse_events(reply.body)
    assert contents(events) == ["", "w0 "]
    assert_valid(registry, "ErrorResponse", events[-1])
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert "OZWELL_UPSTREAM_IDLE_TIMEOUT" in events[-1]["error"]["message"]
    stats = await rogue.wait_until(lambda s: s["open"] == before["open"])
    assert stats["open"] == before["open"]


@pytest.mark.gen_test
async def test_a_backend_that_does_not_take_the_connection_in_time_is_a_504(ozwell_with, sdk):
    # A listener whose backlog is full: the kernel drops the next connection's SYN.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = [socket.socket() for _ in range(3)]
        for sock in waiting:
            sock.setblocking(False)
            sock.connect_ex(full.getsockname())
        await asyncio.sleep(0.2)
        api = sdk(ozwell_with(llama_base_url=f"http://127.0.0.1:{full.getsockname()[1]}/v1",
                              upstream_connect_timeout=0.5))
        with pytest.raises(openai.APIStatusError) as caught:
            await api.chat.completions.create(model="llama3", messages=HELLO)
        for sock in waiting:
            sock.close()
    assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"
    assert "OZWELL_UPSTREAM_CONNECT_TIMEOUT" in caught.value.body["message"]


@pytest.mark.gen_test
async def test_a_plain_answer_the_backend_stops_sending_is_a_504(ozwell_with, sdk):
    api = sdk(ozwell_with(upstream_idle_timeout=0.5))
    with pytest.raises(openai.APIStatusError) as caught:
        await api.chat.completions.create(model="llama3", messages=HELLO,
                                          extra_body={"rogue": {"stall_body": True}})
    assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"
    assert "OZWELL_UPSTREAM_IDLE_TIMEOUT" in caught.value.body["message"]


@pytest.mark.gen_test
async def test_each_byte_from_the_backend_restarts_the_idle_timeout(ozwell_with, sdk):
    api = sdk(ozwell_with(upstream_idle_timeout=1.5))
    stream = await api.chat.completions.create(model="llama3", messages=HELLO, stream=True,
                                               extra_body={"rogue": {"events": 25, "interval": 0.1}})
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "".join(f"w{n} " for n in range(25))


@pytest.mark.gen_test(timeout=60)
async def test_a_slow_reader_does_not_count_against_the_backend(ozwell_with):
    # 8 MB in one event: the client reads nothing for 2 s, so Ozwell waits on it, not on the
    # backend, for four idle timeouts.
    base = ozwell_with(upstream_idle_timeout=0.5)
    body = json.dumps({"model": "llama3", "messages": HELLO, "stream": True,
                       "rogue": {"huge_event": 8_000_000}}).encode()
    reader, writer = await raw_chat_post(base, body)
    await asyncio.sleep(2)
    received = bytearray()
    while not received.endswith(b"0\r\n\r\n"):
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data, "the stream ended early"
        received += data
    writer.close()
    assert b"data: [DONE]" in received and b"upstream_timeout" not in received


def test_sigterm_does_not_wait_out_the_grace_period_on_a_silent_backend(server_process, rogue):
    server = server_process(env={"LLAMA_BASE_URL": rogue.url, "OZWELL_SHUTDOWN_GRACE": "8"})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = json.dumps({"model": "llama3", "messages": HELLO, "stream": True,
                           "rogue": {"stall_after": 1}}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.settimeout(20)
        received = b""
        while b"w0 " not in received:
            received += sock.recv(65536)
        stopped_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while not received.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, "the stream was cut without its end"
            received += data
    assert server.process.wait(timeout=20) == 0
    # A quarter of the grace period of silence ends the stream; the whole of it is not waited out.
    assert time.monotonic() - stopped_at < 7
    assert b'"code":"upstream_timeout"' in received.replace(b" ", b"")


# --- replies checked ----------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_json_answer_that_is_not_json_is_a_502(client):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO, extra_body={"rogue": {
            "body": '{"id": "chatcmpl-1", "choices": [', "content_type": "application/json"}})
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_invalid_response"
    assert "not JSON" in caught.value.body["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_backend_refusing_our_key_is_a_502_not_the_clients_auth_error(client, status, stream):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO, stream=stream, extra_body={
            "rogue": {"status": status, "content_type": "application/json",
                      "body": '{"error": {"message": "invalid api key", "type": "auth_error"}}'}})
    assert caught.value.status_code == 502
    body = caught.value.body
    assert body["code"] == "upstream_auth_failed" and body["type"] == "server_error"
    assert "LLAMA_API_KEY" in body["message"] and "invalid api key" in body["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("status", [301, 307])
async def test_a_redirect_is_a_502_and_its_target_goes_to_the_log_only(client, status, caplog):
    target = "http://10.9.8.7:11434/v1/chat/completions"
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="llama3", messages=HELLO, extra_body={
            "rogue": {"status": status, "location": target}})
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_redirected"
    assert "10.9.8.7" not in caught.value.body["message"]
    assert any(target in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test
async def test_an_unfinished_last_event_is_not_passed_on(http_client, base_url, registry):
    reply = await post_chat(http_client, base_url, {
        "model": "llama3", "messages": HELLO, "stream": True,
        "rogue": {"tail": 'data: {"id": "chatcmpl-rogue", "object": "chat.completion.chu'}})
    assert b"chat.completion.chu\"" not in reply.body and b"completion.chu\n" not in reply.body
    events = sse_events(reply.body)  # every event parses
    assert contents(events) == ["", "w0 ", "w1 ", "w2 ", None]
    assert_valid(registry, "ErrorResponse", events[-1])
    assert events[-1]["error"]["code"] == "upstream_interrupted"


@pytest.mark.gen_test
@pytest.mark.parametrize("tail, last", [
    ('data: {"id": "chatcmpl-rogue", "object": "chat.completion.chunk", "created": 1, '
     '"model": "llama3", "choices": []}\n', "whole"),
    ("data: [DONE]", "done"),
])
async def test_a_whole_last_event_without_its_blank_line_is_passed_on(http_client, base_url, tail, last):
    reply = await post_chat(http_client, base_url, {"model": "llama3", "messages": HELLO,
                                                    "stream": True, "rogue": {"tail": tail}})
    events = sse_events(reply.body)
    assert events[-1] == "[DONE]" and reply.body.count(b"[DONE]") == 1
    assert reply.body.endswith(b"data: [DONE]\n\n")
    if last == "whole":
        assert events[-2]["choices"] == []


@pytest.mark.gen_test(timeout=60)
async def test_an_event_over_16_mib_ends_the_stream_with_an_error_event(http_client, base_url, rogue, registry):
    before = await rogue.stats()
    reply = await post_chat(http_client, base_url, {"model": "llama3", "messages": HELLO,
                                                    "stream": True, "rogue": {"huge_event": 17 << 20}},
                            request_timeout=60)
    assert len(reply.body) < 1 << 20
    events = sse_events(reply.body)
    assert contents(events) == [""]
    assert_valid(registry, "ErrorResponse", events[-1])
    assert "16 MiB" in events[-1]["error"]["message"]
    stats = await rogue.wait_until(lambda s: s["open"] == before["open"])
    assert stats["open"] == before["open"]


@pytest.mark.gen_test(timeout=60)
async def test_a_large_event_under_the_limit_arrives_whole(http_client, base_url):
    reply = await post_chat(http_client, base_url, {"model": "llama3", "messages": HELLO,
                                                    "stream": True, "rogue": {"huge_event": 6 << 20}},
                            request_timeout=60)
    events = sse_events(reply.body)
    assert [len(text or "") for text in contents(events)] == [0, 6 << 20, 3, 3, 3, 0]
    assert events[-1] == "[DONE]"


# --- nothing secret reaches clients -------------------------------------------------------------

@pytest.mark.gen_test
async def test_credentials_in_the_base_url_are_never_shown(ozwell_with, sdk, caplog):
    dead = free_port()
    api = sdk(ozwell_with(llama_base_url=f"http://someone:hunter2@127.0.0.1:{dead}/v1"))
    with pytest.raises(openai.InternalServerError) as caught:
        await api.chat.completions.create(model="llama3", messages=HELLO)
    assert caught.value.status_code == 502
    assert "hunter2" not in json.dumps(caught.value.body) and "someone" not in json.dumps(caught.value.body)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"http://127.0.0.1:{dead}/v1/chat/completions" in logged and "hunter2" not in logged


@pytest.mark.gen_test
async def test_credentials_in_the_base_url_are_sent_as_basic_auth(ozwell_with, sdk, rogue):
    base = rogue.url.replace("http://", "http://someone:hunter%32@")
    api = sdk(ozwell_with(llama_base_url=base))
    await api.chat.completions.create(model="llama3", messages=HELLO)
    assert (await rogue.stats())["authorization"] == "Basic " + base64.b64encode(b"someone:hunter2").decode()


def test_the_start_banner_shows_no_credentials(server_process):
    dead = free_port()
    server = server_process(env={"LLAMA_BASE_URL": f"http://someone:hunter2@127.0.0.1:{dead}/v1"})
    server.stop()
    logged = server.process.stdout.read() + server.process.stderr.read()
    assert f"upstream: http://127.0.0.1:{dead}/v1" in logged
    assert f"upstream http://127.0.0.1:{dead}/v1 is not reachable" in logged
    assert "hunter2" not in logged and "someone" not in logged


@pytest.mark.gen_test
async def test_api_keys_are_compared_as_the_bytes_sent(ozwell_with, http_client):
    base = ozwell_with(api_keys=("clé-secrète", "plain-key"))

    async def models(key: str):
        # Tornado writes header values as Latin-1: this puts the key's UTF-8 bytes on the wire.
        return await http_client.fetch(f"{base}/v1/models", raise_error=False, headers={
            "Authorization": "Bearer " + key.encode().decode("latin-1")})

    assert (await models("clé-secrète")).code == 200
    assert (await models("plain-key")).code == 200
    for wrong in ("clé-secrètE", "plain-kez", "ключ"):
        reply = await models(wrong)
        assert reply.code == 401 and json.loads(reply.body)["error"]["code"] == "invalid_api_key"


@pytest.mark.gen_test
@pytest.mark.skipif(sys.platform != "linux", reason="counts descriptors in /proc (Linux)")
async def test_running_out_of_descriptors_is_said_as_such(http_server, base_url, rogue):
    async def answer():
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return head, json.loads(await reader.readexactly(length))

    # The connection is accepted before the squeeze: the chat request then goes on it.
    reader, writer = await asyncio.open_connection("127.0.0.1", int(base_url.rsplit(":", 1)[1]))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await answer())[0].startswith(b"HTTP/1.1 200")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    try:
        with pytest.raises(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        body = json.dumps({"model": "llama3", "messages": HELLO}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head, reply = await answer()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        writer.close()
    assert head.startswith(b"HTTP/1.1 502")
    assert "file descriptors" in reply["error"]["message"]
    assert "ollama" not in reply["error"]["message"].lower()
