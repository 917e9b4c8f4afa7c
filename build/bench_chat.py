"""Benchmark rows for chat completions: what the proxy costs, against a fast local upstream.

    python build/bench_chat.py          # prints the rows

Starts a minimal OpenAI-compatible upstream (this file with --upstream PORT) and an Ozwell server
(`python ozwell.py`) pointed at it, both on 127.0.0.1, then measures with a small keep-alive
HTTP/1.1 client, alternating calls straight to the upstream ("direct") and through Ozwell
("proxied") in the same run. Ozwell opens a new upstream connection per request (Tornado's simple
client has no keep-alive pool); the direct calls reuse theirs. Everything stops at the end.
"""
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time

from benchmark import Server, ozwell_server, rss_mb

LATENCY_CALLS = 1000          # of each kind, alternating, at concurrency 1
THROUGHPUT_SECONDS = 1.5      # per phase; phases alternate direct, proxied, direct, proxied
CONCURRENCY = 16
FIRST_CHUNK_STREAMS = 200     # of each kind, alternating
RELAY_EVENTS = 100_000        # events on the one long stream

REQUEST = json.dumps({"model": "llama3", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write one short sentence about rivers."}]}).encode()


# --- the upstream --------------------------------------------------------------------------------

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1767225600, "model": "llama3",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Rivers carve valleys."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}).encode()
EVENT = b"data: " + json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1767225600, "model": "llama3",
    "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None,
                 "finish_reason": None}]}).encode() + b"\n\n"
CHUNKED_EVENT = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
DONE = b"data: [DONE]\n\n"


async def serve_upstream(port: int) -> None:
    """Answers every POST at once; `"stream": true` gets `events` SSE events, one write each.
    A GET (the starter's health check) gets an empty 200."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                body = json.loads(await reader.readexactly(length))
                close = b"connection: close" in head.lower()
                if body.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    for _ in range(body.get("events", 3)):
                        writer.write(CHUNKED_EVENT)
                        await writer.drain()
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(COMPLETION), COMPLETION))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- the client ------------------------------------------------------------------------------------

class Connection:
    """One keep-alive HTTP/1.1 connection: small and fast, so the client costs little."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, on_data=None) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer bench\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (path.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length:
            return await self.reader.readexactly(int(length.group(1)))
        received = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return b"".join(received)
            if on_data is not None:
                on_data(data)
            received.append(data[:-2])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(upstream_port: int, ozwell_port: int) -> dict[str, float]:
    direct, proxied = Connection(upstream_port), Connection(ozwell_port)
    figures: dict[str, float] = {}

    # Added latency at concurrency 1.
    times: dict[str, list[float]] = {"direct": [], "proxied": []}
    for call in range(2 * LATENCY_CALLS + 200):
        kind, connection = ("direct", direct) if call % 2 == 0 else ("proxied", proxied)
        started = time.perf_counter()
        await connection.post("/v1/chat/completions", REQUEST)
        if call >= 200:  # the first hundred of each warm up
            times[kind].append(time.perf_counter() - started)
    for name, fraction in (("p50", 0.5), ("p99", 0.99)):
        figures[f"direct {name}"] = percentile(times["direct"], fraction)
        figures[f"added {name}"] = percentile(times["proxied"], fraction) - figures[f"direct {name}"]

    # Requests per second at concurrency 16, in alternating phases.
    rates: dict[str, list[float]] = {"direct": [], "proxied": []}
    for phase in range(4):
        kind, port = ("direct", upstream_port) if phase % 2 == 0 else ("proxied", ozwell_port)
        connections = [Connection(port) for _ in range(CONCURRENCY)]
        deadline = time.perf_counter() + THROUGHPUT_SECONDS
        done = 0

        async def worker(connection: Connection) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await connection.post("/v1/chat/completions", REQUEST)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in connections))
        rates[kind].append(done / (time.perf_counter() - started))
        for connection in connections:
            connection.close()
    figures["direct rps"] = max(rates["direct"])
    figures["proxied rps"] = max(rates["proxied"])

    # Time to the first event of a stream.
    stream_request = json.dumps({**json.loads(REQUEST), "stream": True, "events": 3}).encode()
    firsts: dict[str, list[float]] = {"direct": [], "proxied": []}
    for call in range(2 * FIRST_CHUNK_STREAMS):
        kind, connection = ("direct", direct) if call % 2 == 0 else ("proxied", proxied)
        started = time.perf_counter()
        first: list[float] = []

        def on_data(data: bytes, first=first) -> None:
            if not first and b"data: " in data:
                first.append(time.perf_counter())

        await connection.post("/v1/chat/completions", stream_request, on_data)
        firsts[kind].append(first[0] - started)
    figures["direct first chunk"] = statistics.median(firsts["direct"])
    figures["added first chunk"] = statistics.median(firsts["proxied"]) - figures["direct first chunk"]

    # Events per second on one long stream.
    long_request = json.dumps({**json.loads(REQUEST), "stream": True, "events": RELAY_EVENTS}).encode()
    for kind, connection in (("direct", direct), ("proxied", proxied)):
        started = time.perf_counter()
        body = await connection.post("/v1/chat/completions", long_request)
        elapsed = time.perf_counter() - started
        events = body.count(b"\n\n")
        if events != RELAY_EVENTS + 1:
            raise RuntimeError(f"the {kind} stream had {events} events, not {RELAY_EVENTS + 1}")
        figures[f"{kind} events/s"] = RELAY_EVENTS / elapsed
    direct.close()
    proxied.close()
    return figures


# --- processes -------------------------------------------------------------------------------------

def rows() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as data_dir, \
            Server([sys.executable, __file__, "--upstream", "{port}"]) as upstream, \
            ozwell_server(data_dir, env={"LLAMA_BASE_URL": f"{upstream.url}/v1"}) as server:
        figures = asyncio.run(measure(upstream.port, server.port))
        rss = rss_mb(server.process.pid)
    ms = 1000.0
    return [
        ("chat proxy: added latency p50, concurrency 1",
         f"{figures['added p50'] * ms:.2f} ms (direct {figures['direct p50'] * ms:.2f} ms)"),
        ("chat proxy: added latency p99, concurrency 1",
         f"{figures['added p99'] * ms:.2f} ms (direct {figures['direct p99'] * ms:.2f} ms)"),
        ("chat proxy: requests/s, concurrency 16",
         f"{figures['proxied rps']:.0f} req/s (direct {figures['direct rps']:.0f} req/s)"),
        ("chat proxy: added time to first stream event",
         f"{figures['added first chunk'] * ms:.2f} ms (direct {figures['direct first chunk'] * ms:.2f} ms)"),
        ("chat proxy: events/s relayed on one stream",
         f"{figures['proxied events/s']:,.0f} events/s (direct {figures['direct events/s']:,.0f} events/s)"),
        ("chat proxy: server RSS after the load", f"{rss:.1f} MB"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        asyncio.run(serve_upstream(int(sys.argv[2])))
    else:
        for what, figure in rows():
            print(f"{what:<50} {figure}")
