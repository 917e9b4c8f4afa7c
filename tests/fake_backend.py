"""A recording OpenAI-compatible backend (chat completions and embeddings) for the tests.

It listens on a real loopback port and records every request it gets. What it answers is
scripted by the request's own `fake` object, an unknown field that Ozwell passes on untouched
(for embeddings, JSON text in `user`):

    {"content": ["He", "llo"], "refusal": [...], "finish_reason": "stop",
     "tool_calls": [{"id": "call_1", "name": "f", "arguments": ["{\\"a\\":", "1}"]}],
     "usage": {...} | null, "status": 404, "error": {...} | "text", "headers": {...},
     "pause_after": n, "cut_after": n, "error_after": n, "garbage_after": n, "delay": s,
     "hang": true,
     "json_to_a_stream": true, "pad": n}

Each string of `content`, `refusal` and a call's `arguments` is one delta of a stream (joined
when the answer is not streamed). Without a script the answer is "echo: " and the last message's
text. A stream sends its usage last only when `stream_options.include_usage` asks for it.
"""
import asyncio
import json

import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.web

DEFAULT_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class FakeBackend:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, bytes]] = []  # (path, headers, raw body)
        self.disconnected = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = asyncio.Event()
        self.sent_bytes = 0
        self.url = ""

    def start(self) -> tornado.httpserver.HTTPServer:
        """Listen on a free loopback port, in the current event loop."""
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(tornado.web.Application([
            (r"/v1/chat/completions", _ChatHandler, {"fake": self}),
            (r"/v1/embeddings", _EmbeddingsHandler, {"fake": self}),
        ]))
        server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{port}/v1"
        return server

    def bodies(self, path: str = "/v1/chat/completions") -> list[dict]:
        return [json.loads(raw) for at, _, raw in self.requests if at == path]


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeBackend) -> None:
        self.fake = fake

    def on_connection_close(self) -> None:
        self.fake.disconnected.set()

    async def answered_with_a_failure(self, plan: dict) -> bool:
        """Delay, hang or answer with an error status, as the plan says."""
        await asyncio.sleep(plan.get("delay", 0))
        if plan.get("hang"):
            await self.fake.disconnected.wait()
            return True
        if "status" not in plan:
            return False
        self.set_status(plan["status"])
        for name, value in plan.get("headers", {}).items():
            self.set_header(name, value)
        error = plan.get("error", {"message": "the backend says no", "param": None,
                                   "type": "invalid_request_error", "code": "nope"})
        if isinstance(error, str):
            self.set_header("Content-Type", "text/plain")
            self.finish(error)
        else:
            self.finish({"error": error})
        return True


class _ChatHandler(_Handler):
    async def post(self) -> None:
        self.fake.requests.append((self.request.path, self.request.headers, self.request.body))
        body = json.loads(self.request.body)
        plan = body.get("fake", {})
        if await self.answered_with_a_failure(plan):
            return
        if "content" in plan:
            content = plan["content"]
        else:
            last = body["messages"][-1]
            said = last.get("content") if isinstance(last.get("content"), str) else json.dumps(last)
            content = ["echo: ", said]
        usage = plan.get("usage", DEFAULT_USAGE)
        head = {"id": "chatcmpl-fake", "created": 1767225600, "model": body["model"]}
        finish_reason = plan.get("finish_reason",
                                 "tool_calls" if plan.get("tool_calls") else "stop")
        if body.get("stream") and not plan.get("json_to_a_stream"):
            await self._stream(plan, body, head, content, finish_reason, usage)
            return
        message = {"role": "assistant", "content": None if content is None else "".join(content)}
        if plan.get("refusal"):
            message["refusal"] = "".join(plan["refusal"])
        if plan.get("tool_calls"):
            message["tool_calls"] = [
                {"id": call["id"], "type": "function",
                 "function": {"name": call["name"], "arguments": "".join(call["arguments"])}}
                for call in plan["tool_calls"]]
        answer = {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]}
        if usage is not None:
            answer["usage"] = usage
        self.finish(answer)

    async def _stream(self, plan, body, head, content, finish_reason, usage) -> None:
        fake = self.fake
        self.set_header("Content-Type", "text/event-stream")
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        extra = {"usage": None} if include_usage else {}
        padding = "x" * plan.get("pad", 0)

        def chunk(delta, finish=None):
            return {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

        deltas = [{"content": piece + padding} for piece in content or ()]
        deltas += [{"refusal": piece} for piece in plan.get("refusal", ())]
        for index, call in enumerate(plan.get("tool_calls", ())):
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": call["name"], "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                       for piece in call["arguments"]]
        try:
            await self._send(chunk({"role": "assistant", "content": ""}))
            for number, delta in enumerate(deltas):
                if number == plan.get("pause_after"):
                    await fake.release.wait()
                if number == plan.get("cut_after"):
                    self.request.connection.stream.close()
                    return
                if number == plan.get("error_after"):
                    await self._send({"error": {"message": "the model crashed", "type": "server_error"}})
                    self.finish()
                    return
                if number == plan.get("garbage_after"):
                    self.write("data: {not json\n\n")
                await self._send(chunk(delta))
            await self._send(chunk({}, finish_reason))
            if include_usage and usage is not None:
                await self._send({**head, "object": "chat.completion.chunk", "choices": [],
                                  "usage": usage})
            self.write("data: [DONE]\n\n")
            self.finish()
            fake.finished.set()
        except tornado.iostream.StreamClosedError:
            pass

    async def _send(self, event: dict) -> None:
        data = f"data: {json.dumps(event)}\n\n".encode()
        self.write(data)
        await self.flush()
        self.fake.sent_bytes += len(data)


class _EmbeddingsHandler(_Handler):
    """Floats only, as Ollama gives them: [index + 0.5, -0.25, the text's length / 3]. An
    embeddings request takes no unknown field: its script is JSON text in `user`."""

    async def post(self) -> None:
        self.fake.requests.append((self.request.path, self.request.headers, self.request.body))
        body = json.loads(self.request.body)
        if await self.answered_with_a_failure(json.loads(body.get("user") or "{}")):
            return
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        self.finish({"object": "list", "model": body["model"],
                     "data": [{"object": "embedding", "index": index,
                               "embedding": [index + 0.5, -0.25, len(text) / 3]}
                              for index, text in enumerate(texts)],
                     "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})
