"""Benchmark rows for chat completions: what the proxy costs, against a fast local upstream.

    python build/bench_chat.py                      # prints the rows
    python build/bench_chat.py --baseline REF       # the old proxy: ozwell.py at git REF

Starts a minimal OpenAI-compatible upstream (this file with --upstream PORT), an Ozwell server
(`python -m ozwell`) pointed at it, and a baseline Ozwell: ozwell.py as it was at BASELINE_REF
(by default the last version whose upstream client opened a new connection per request),
all on 127.0.0.1. A small keep-alive HTTP/1.1 client alternates calls straight to the upstream
("direct"), through Ozwell ("proxied") and through the baseline in the same run; each figure is
printed beside its baselines and as a ratio. CPU is the server process's own (every thread's
time on a CPU, from /proc: Linux). Everything stops at the end. On a shared machine the
figures are indicative only.
"""
import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import time

from benchmark import Server, ozwell_server, rss_mb

BASELINE_REF = "7dcd44bbaca5ed6ac5abc596c00db548dc3c6106"
LATENCY_CALLS = 1000          # of each kind, alternating, at concurrency 1
THROUGHPUT_SECONDS = 1.5      # per phase; phases alternate over the kinds, twice
CONCURRENCY = 16
FIRST_CHUNK_STREAMS = 200     # of each kind, alternating
RELAY_EVENTS = 100_000        # events on the one long stream
BIG_EVENT_BYTES = 12_000_000  # relayed whole (under the 16 MiB limit)
HUGE_EVENT_BYTES = 50_000_000  # over the limit: the stream ends with an error event
RESET_AFTER = 0.1             # seconds between the upstream's first event and its reset
RESET_GIVE_UP = 5.0           # seconds: the baseline never ends a reset stream
EVENT_GIVE_UP = 20.0          # seconds: the baseline takes quadratic time over a huge event

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


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve_upstream(port: int) -> None:
    """Answers every POST at once; `"stream": true` gets `events` SSE events, one write each,
    or one event of `huge` bytes, or one event then a reset `reset_after` seconds later.
    `GET /connections` counts the connections that carried a POST, `GET /last-reset` says when
    (time.monotonic(), the same clock in every process here) the latest reset went out; other
    GETs get an empty 200."""
    connections = 0
    last_reset = 0.0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, last_reset
        counted = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    body = (str(connections) if head.startswith(b"GET /connections") else
                            repr(last_reset) if head.startswith(b"GET /last-reset") else "").encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                if not counted:
                    counted = True
                    connections += 1
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                body = json.loads(await reader.readexactly(length))
                if body.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    if "reset_after" in body:
                        writer.write(CHUNKED_EVENT)
                        await writer.drain()
                        await asyncio.sleep(body["reset_after"])
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        last_reset = time.monotonic()
                        writer.transport.abort()
                        return
                    if "huge" in body:
                        text = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {
                            "content": "x" * body["huge"]}}]}).encode() + b"\n\n"
                        for start in range(0, len(text), 1 << 20):
                            writer.write(chunked(text[start:start + (1 << 20)]))
                            await writer.drain()
                    for _ in range(body.get("events", 3)):
                        writer.write(CHUNKED_EVENT)
                        await writer.drain()
                    writer.write(chunked(DONE) + b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(COMPLETION), COMPLETION))
                await writer.drain()
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

    async def request(self, method: str, path: str, body: bytes = b"", on_data=None) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                     limit=1 << 26)
        self.writer.write(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer bench\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (method.encode(), path.encode(), len(body), body))
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

    async def post(self, body: bytes, on_data=None) -> bytes:
        return await self.request("POST", "/v1/chat/completions", body, on_data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """Time every thread of a process has spent on a CPU (/proc/PID/task/*/schedstat, in ns)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total / 1e9


async def measure(upstream_port: int, servers: dict[str, int], pids: dict[str, int]) -> dict:
    """`servers` maps each proxy's name to its port; "direct" is the upstream itself."""
    ports = {"direct": upstream_port, **servers}
    kinds = list(ports)
    figures: dict = {}
    connections = {kind: Connection(port) for kind, port in ports.items()}
    upstream_stats = Connection(upstream_port)

    async def upstream_connections() -> int:
        return int(await upstream_stats.request("GET", "/connections"))

    # Latency and CPU per request at concurrency 1 (the servers do nothing else meanwhile).
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, float] = {}
    for call in range(len(kinds) * (LATENCY_CALLS + 100)):
        if call == len(kinds) * 100:  # the first hundred of each warm up
            cpu = {kind: cpu_seconds(pids[kind]) for kind in servers}
        kind = kinds[call % len(kinds)]
        started = time.perf_counter()
        await connections[kind].post(REQUEST)
        times[kind].append(time.perf_counter() - started)
    for kind in servers:
        figures[kind, "cpu per request"] = (cpu_seconds(pids[kind]) - cpu[kind]) / LATENCY_CALLS
    for kind in kinds:
        figures[kind, "p50"] = percentile(times[kind][100:], 0.5)
        figures[kind, "p99"] = percentile(times[kind][100:], 0.99)

    # Requests per second at concurrency 16, and upstream connections per request.
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    opened: dict[str, list[float]] = {kind: [] for kind in servers}
    for phase in range(2 * len(kinds)):
        kind = kinds[phase % len(kinds)]
        pool = [Connection(ports[kind]) for _ in range(CONCURRENCY)]
        deadline = time.perf_counter() + THROUGHPUT_SECONDS
        done = 0

        async def worker(connection: Connection) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await connection.post(REQUEST)
                done += 1

        connections_before = await upstream_connections()
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in pool))
        rates[kind].append(done / (time.perf_counter() - started))
        if kind in servers:
            opened[kind].append((await upstream_connections() - connections_before) / done)
        for connection in pool:
            connection.close()
    for kind in kinds:
        figures[kind, "rps"] = max(rates[kind])
    for kind in servers:
        figures[kind, "connections per request"] = statistics.mean(opened[kind])

    # Time to the first event of a stream.
    stream_request = json.dumps({**json.loads(REQUEST), "stream": True, "events": 3}).encode()
    firsts: dict[str, list[float]] = {kind: [] for kind in kinds}
    for call in range(len(kinds) * FIRST_CHUNK_STREAMS):
        kind = kinds[call % len(kinds)]
        started = time.perf_counter()
        first: list[float] = []

        def on_data(data: bytes, first=first) -> None:
            if not first and b"data: " in data:
                first.append(time.perf_counter())

        await connections[kind].post(stream_request, on_data)
        firsts[kind].append(first[0] - started)
    for kind in kinds:
        figures[kind, "first chunk"] = statistics.median(firsts[kind])

    # Events per second on one long stream.
    long_request = json.dumps({**json.loads(REQUEST), "stream": True, "events": RELAY_EVENTS}).encode()
    for kind in kinds:
        started = time.perf_counter()
        body = await connections[kind].post(long_request)
        elapsed = time.perf_counter() - started
        events = body.count(b"\n\n")
        if events != RELAY_EVENTS + 1:
            raise RuntimeError(f"the {kind} stream had {events} events, not {RELAY_EVENTS + 1}")
        figures[kind, "events/s"] = RELAY_EVENTS / elapsed

    # A reset mid-stream, one big event (relayed whole), one huge event (over the limit): last,
    # as the baseline may still be chewing on it when the client gives up.
    reset_request = json.dumps({**json.loads(REQUEST), "stream": True,
                                "reset_after": RESET_AFTER}).encode()
    for kind in servers:
        started = time.monotonic()
        took = await timed(connections, kind, reset_request, RESET_GIVE_UP)
        reset_at = float(await upstream_stats.request("GET", "/last-reset"))
        figures[kind, "reset"] = None if took is None else started + took - reset_at
    for name, size in (("big event", BIG_EVENT_BYTES), ("huge event", HUGE_EVENT_BYTES)):
        request = json.dumps({**json.loads(REQUEST), "stream": True, "huge": size,
                              "events": 0}).encode()
        for kind in kinds:
            figures[kind, name] = await timed(connections, kind, request, EVENT_GIVE_UP)
    for connection in (*connections.values(), upstream_stats):
        connection.close()
    return figures


async def timed(connections: dict[str, Connection], kind: str, request: bytes,
                give_up: float) -> float | None:
    """Seconds until the answer ends (None: not within `give_up`, or the connection broke)."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(connections[kind].post(request), give_up)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        connections[kind].close()  # reopened by the next call
        return None
    return time.monotonic() - started


# --- processes -------------------------------------------------------------------------------------

def rows(baseline_ref: str = BASELINE_REF) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch, \
            Server([sys.executable, __file__, "--upstream", "{port}"]) as upstream:
        env = {"LLAMA_BASE_URL": f"{upstream.url}/v1"}
        with ozwell_server(os.path.join(scratch, "data"), env=env) as server, \
                ozwell_server(os.path.join(scratch, "baseline-data"), env=env,
                              baseline=baseline_ref) as baseline:
            servers = {"proxied": server.port, "baseline": baseline.port}
            pids = {"proxied": server.process.pid, "baseline": baseline.process.pid}
            figures = asyncio.run(measure(upstream.port, servers, pids))
            rss = rss_mb(server.process.pid)
    return table(figures, baseline_ref, rss)


def table(figures: dict, baseline_ref: str, rss: float) -> list[tuple[str, str]]:
    ms = 1000.0

    def added(kind: str, what: str) -> float:
        return figures[kind, what] - figures["direct", what]

    def seconds(value: float | None) -> str:
        return "never (gave up)" if value is None else f"{value * ms:,.1f} ms"

    def ratio(new: float | None, old: float | None) -> str:
        if new is None or old is None or old <= 0:
            return "n/a"
        return f"{new / old:.2f}x"

    out = [("chat proxy: baseline", f"ozwell.py at {baseline_ref[:12]} (per-request connections)")]
    for what, name in (("p50", "added latency p50, concurrency 1"),
                       ("p99", "added latency p99, concurrency 1"),
                       ("first chunk", "added time to first stream event")):
        new, old = added("proxied", what), added("baseline", what)
        out.append((f"chat proxy: {name}",
                    f"{new * ms:.2f} ms (baseline {old * ms:.2f} ms, {ratio(new, old)}; "
                    f"direct {figures['direct', what] * ms:.2f} ms)"))
    new, old = figures["proxied", "cpu per request"], figures["baseline", "cpu per request"]
    out.append(("chat proxy: server CPU per request, concurrency 1",
                f"{new * ms:.3f} ms (baseline {old * ms:.3f} ms, {ratio(new, old)})"))
    new, old = figures["proxied", "rps"], figures["baseline", "rps"]
    out.append(("chat proxy: requests/s, concurrency 16",
                f"{new:,.0f} req/s (baseline {old:,.0f}, {ratio(new, old)}; "
                f"direct {figures['direct', 'rps']:,.0f})"))
    out.append(("chat proxy: upstream connections per request, c16",
                f"{figures['proxied', 'connections per request']:.4f} "
                f"(baseline {figures['baseline', 'connections per request']:.4f})"))
    new, old = figures["proxied", "events/s"], figures["baseline", "events/s"]
    out.append(("chat proxy: events/s relayed on one stream",
                f"{new:,.0f} events/s (baseline {old:,.0f}, {ratio(new, old)}; "
                f"direct {figures['direct', 'events/s']:,.0f})"))
    for what, size in (("big event", BIG_EVENT_BYTES), ("huge event", HUGE_EVENT_BYTES)):
        new, old = figures["proxied", what], figures["baseline", what]
        verdict = "relayed whole" if size == BIG_EVENT_BYTES else "ended by an error event"
        out.append((f"chat proxy: one {size / 1e6:.0f} MB upstream event ({verdict})",
                    f"{seconds(new)} (baseline {seconds(old)}, {ratio(new, old)}; "
                    f"direct {seconds(figures['direct', what])})"))
    out.append(("chat proxy: client learns of an upstream reset after",
                f"{seconds(figures['proxied', 'reset'])} "
                f"(baseline {seconds(figures['baseline', 'reset'])})"))
    out.append(("chat proxy: server RSS after the load", f"{rss:.1f} MB"))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        asyncio.run(serve_upstream(int(sys.argv[2])))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--baseline", default=BASELINE_REF, metavar="REF",
                            help="git ref of the ozwell.py to compare with")
        for what, figure in rows(parser.parse_args().baseline):
            print(f"{what:<52} {figure}")
