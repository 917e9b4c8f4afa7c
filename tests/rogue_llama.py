"""A Llama backend that misbehaves on request: its own process, for the upstream tests.

    python tests/rogue_llama.py        # prints its port on the first line, serves until killed

`POST .../chat/completions` answers as an OpenAI-compatible server would (a JSON completion, or
with `"stream": true` server-sent events in a chunked body), over keep-alive connections. The
request body's `rogue` object, which Ozwell forwards untouched, picks what goes wrong:

    events: n           content events in a stream (default 3), `interval` seconds apart
    reset_after: n      a stream: after n events, reset the connection (RST)
    stall_after: n      a stream: after n events, send nothing more
    stall_body: true    a JSON answer: headers and half the body, then nothing more
    reset_body: true    a JSON answer: headers and half the body, then a reset
    huge_event: n       a stream: one event carrying n bytes of text, then [DONE]
    tail: "text"        a stream: after the events, `text` instead of [DONE], then a clean end
    then_drop: true     answer, then close the connection when its next request arrives (as a
                        server does whose idle timer fires just then)
    status, content_type, body, headers: answer exactly this instead
    echo_authorization: true   a JSON answer: the Authorization header received, sent back in
                        an `x-seen-authorization` header
    location: url       a redirect (status 307 unless `status` says otherwise)

`GET /stats` answers {"connections": connections that carried a chat request, "open": those
still open, "requests": chat requests, "authorization": the last one's Authorization header}.
"""
import asyncio
import json
import socket
import struct

stats = {"connections": 0, "open": 0, "requests": 0, "authorization": None}
COMPLETION_HEAD = {"id": "chatcmpl-rogue", "created": 1767225600}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(model: str, delta: dict, finish_reason=None) -> bytes:
    body = {**COMPLETION_HEAD, "object": "chat.completion.chunk", "model": model, "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def answer(request: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Answer one chat request; False when the connection is done with."""
    plan = request.get("rogue") or {}
    model = request.get("model", "llama3")
    if "location" in plan or "body" in plan:
        status = plan.get("status", 307 if "location" in plan else 200)
        body = plan.get("body", "").encode()
        headers = {"Content-Type": plan.get("content_type", "text/plain"), **plan.get("headers", {})}
        if "location" in plan:
            headers["Location"] = plan["location"]
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"HTTP/1.1 {status} Rogue\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        return True
    if not request.get("stream"):
        last = request["messages"][-1]["content"]
        body = json.dumps({**COMPLETION_HEAD, "object": "chat.completion", "model": model,
                           "choices": [{"index": 0, "message": {"role": "assistant",
                                                                "content": f"echo: {last}"},
                                        "logprobs": None, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                     "total_tokens": 5}}).encode()
        echoed = (f"x-seen-authorization: {stats['authorization']}\r\n".encode()
                  if plan.get("echo_authorization") else b"")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s"
                     b"Content-Length: %d\r\n\r\n" % (echoed, len(body)))
        if plan.get("stall_body") or plan.get("reset_body"):
            writer.write(body[:len(body) // 2])
            await writer.drain()
            if plan.get("reset_body"):
                reset(writer)
                return False
            await reader.read()  # nothing more, until the client hangs up
            return False
        writer.write(body)
        return True
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    writer.write(chunk(event(model, {"role": "assistant", "content": ""})))
    await writer.drain()
    if "huge_event" in plan:
        text = json.dumps({**COMPLETION_HEAD, "object": "chat.completion.chunk", "model": model,
                           "choices": [{"index": 0, "delta": {"content": "x" * plan["huge_event"]},
                                        "logprobs": None, "finish_reason": None}]}).encode()
        data = b"data: " + text + b"\n\n"
        for start in range(0, len(data), 1 << 16):
            writer.write(chunk(data[start:start + (1 << 16)]))
            await writer.drain()
    for number in range(plan.get("events", 3)):
        if number == plan.get("reset_after"):
            reset(writer)
            return False
        if number == plan.get("stall_after"):
            await reader.read()
            return False
        await asyncio.sleep(plan.get("interval", 0))
        writer.write(chunk(event(model, {"content": f"w{number} "})))
        await writer.drain()
    if plan.get("reset_after") == plan.get("events", 3):
        reset(writer)
        return False
    writer.write(chunk(event(model, {}, "stop")))
    writer.write(chunk(plan["tail"].encode() if "tail" in plan else b"data: [DONE]\n\n"))
    writer.write(b"0\r\n\r\n")
    return True


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    counted = drop_next = False
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if drop_next:
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if lines[0].startswith("GET /stats"):
                data = json.dumps(stats).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                await writer.drain()
                continue
            if not counted:
                counted = True
                stats["connections"] += 1
                stats["open"] += 1
            stats["requests"] += 1
            stats["authorization"] = headers.get("authorization")
            request = json.loads(body)
            if not await answer(request, reader, writer):
                return
            drop_next = bool((request.get("rogue") or {}).get("then_drop"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        if counted:
            stats["open"] -= 1
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(serve_connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
