"""Benchmark rows for the Responses API: `python build/bench_responses.py` prints them.

Starts its own servers (`python -m ozwell` on 127.0.0.1, temporary data dirs, streams
unpaced), measures over one keep-alive connection with bounded loops, and stops them. Stored
responses are also made at concurrency 16 with wrk, on this version and on the baseline
revision (see benchmark.py). The rows of the translation to chat completions
(OZWELL_RESPONSES_BACKEND=upstream) use bench_chat.py's fast upstream and client, and compare
with the chat proxy in the same run: its added latency and its relay rate are the baselines,
printed as ratios.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_chat import REQUEST, Connection, percentile
from benchmark import (BASELINE, Server, ozwell_server, p99, probe_health, ratio,
                       requests_per_second, wrk_run)

HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
BODY = {"model": "ozwell-deterministic", "input": "How fast can you answer this question?"}
SECONDS_PER_ROW = 3.0
MAX_REQUESTS = 5000


def rows() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as data_dir, \
            ozwell_server(data_dir, "--stream-tokens-per-second", "0", inherit_ozwell_env=False) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            stored = _requests_per_second(connection, BODY)
            unstored = _requests_per_second(connection, {**BODY, "store": False})
            events, rate = _stream_events_per_second(connection)
        finally:
            connection.close()
    return [
        ("responses: non-streaming create, stored (one connection)", f"{stored:.0f} requests/s"),
        ("responses: non-streaming create, store=false (one connection)", f"{unstored:.0f} requests/s"),
        (f"responses: one unpaced stream ({events} events)", f"{rate:.0f} events/s"),
    ] + _stored_against_baseline() + _translation_rows()


# Added to every fsync in the slow-disk rows: the disk on which the goal was set made about 129
# stored responses a second, two fsyncs each, one after another.
SLOW_FSYNC_SECONDS = 0.004


def _stored_against_baseline() -> list[tuple[str, str]]:
    """Stored responses at concurrency 16, and /health's p99 meanwhile, on this version and on
    the baseline, on this machine's disk and with every fsync made SLOW_FSYNC_SECONDS slower;
    and /health's p99 under the same load with store false, where no disk is involved: what
    saturating the server costs /health on this machine anyway."""
    figures = {}
    for name, baseline, body, slow in (
            ("now", None, BODY, 0.0), ("before", BASELINE, BODY, 0.0),
            ("unstored", None, {**BODY, "store": False}, 0.0),
            ("now, slow disk", None, BODY, SLOW_FSYNC_SECONDS),
            ("before, slow disk", BASELINE, BODY, SLOW_FSYNC_SECONDS)):
        with tempfile.TemporaryDirectory() as data_dir, \
                ozwell_server(data_dir, inherit_ozwell_env=False, baseline=baseline,
                              slow_fsync=slow) as server:
            url = f"{server.url}/v1/responses"
            wrk_run(url, seconds=1, post=body)  # warm up
            load: dict[str, float] = {}
            loader = threading.Thread(target=lambda: load.update(wrk_run(url, post=body)))
            loader.start()
            busy = probe_health(server.port, lambda _: loader.is_alive())
            loader.join()
            figures[name] = (load["rps"], 1000 * p99(busy))
    (rate, health), (before_rate, before_health) = figures["now"], figures["before"]
    (slow_rate, slow_health), (slow_before_rate, slow_before_health) = (
        figures["now, slow disk"], figures["before, slow disk"])
    return [
        ("responses: stored, c16 (wrk), against " + BASELINE + " (goal 8x)",
         f"{ratio(rate, before_rate)} ({rate:,.0f} against {before_rate:,.0f} req/s)"),
        (f"responses: stored, c16, fsync {1000 * SLOW_FSYNC_SECONDS:.0f} ms slower, against "
         + BASELINE + " (goal 8x)",
         f"{ratio(slow_rate, slow_before_rate)} ({slow_rate:,.0f} against "
         f"{slow_before_rate:,.0f} req/s; /health p99 {slow_health:.1f} ms against "
         f"{slow_before_health:.1f} ms)"),
        ("responses: /health p99 while stored ones are made (goal under 10 ms)",
         f"{health:.1f} ms ({BASELINE}: {before_health:.1f} ms; under the same load with store "
         f"false: {figures['unstored'][1]:.1f} ms)"),
    ]


def _requests_per_second(connection: http.client.HTTPConnection, body: dict) -> float:
    count, seconds = requests_per_second(connection, "/v1/responses", body, SECONDS_PER_ROW,
                                         MAX_REQUESTS)
    return count / seconds


def _stream_events_per_second(connection: http.client.HTTPConnection) -> tuple[int, float]:
    """Events in one stream, and the median events/s from the request to the last event."""
    payload = json.dumps({**BODY, "stream": True, "store": False})
    rates = []
    events = 0
    deadline = time.perf_counter() + SECONDS_PER_ROW
    while len(rates) < 500 and time.perf_counter() < deadline:
        started = time.perf_counter()
        connection.request("POST", "/v1/responses", payload, HEADERS)
        text = connection.getresponse().read().decode()
        elapsed = time.perf_counter() - started
        events = sum(1 for line in text.split("\n") if line.startswith("event: "))
        rates.append(events / elapsed)
    return events, statistics.median(rates)


LATENCY_CALLS = 1000     # of each kind, in turn, at concurrency 1, after 100 of each to warm up
RELAY_EVENTS = 50_000    # deltas on the one long stream

# The chat request of bench_chat.py, asked through the Responses API.
_CHAT = json.loads(REQUEST)
TRANSLATED = {"model": _CHAT["model"], "instructions": _CHAT["messages"][0]["content"],
              "input": _CHAT["messages"][1]["content"], "store": False}


def _translation_rows() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as data_dir, \
            Server([sys.executable, str(Path(__file__).with_name("bench_chat.py")), "--upstream",
                    "{port}"]) as upstream, \
            ozwell_server(data_dir, "--responses-backend", "upstream", inherit_ozwell_env=False,
                          env={"LLAMA_BASE_URL": f"{upstream.url}/v1"}) as server:
        figures = asyncio.run(_measure_translation(upstream.port, server.port))
    ms = 1000.0
    chat, responses = figures["chat added p50"], figures["responses added p50"]
    stored = figures["stored added p50"]
    return [
        ("responses via upstream: added latency p50, c1, store=false",
         f"{responses * ms:.2f} ms = {responses / chat:.2f}x the chat proxy's {chat * ms:.2f} ms "
         f"(goal: at most 1.5x; direct {figures['direct p50'] * ms:.2f} ms)"),
        ("responses via upstream: added latency p50, c1, stored",
         f"{stored * ms:.2f} ms = {stored / chat:.2f}x the chat proxy's"),
        (f"responses via upstream: events/s on one stream ({RELAY_EVENTS} deltas)",
         f"{figures['responses events/s']:,.0f} events/s = "
         f"{figures['responses events/s'] / figures['chat events/s']:.2f}x the chat proxy's "
         f"{figures['chat events/s']:,.0f}"),
    ]


async def _measure_translation(upstream_port: int, ozwell_port: int) -> dict[str, float]:
    kinds = {  # kind: (port, path, body)
        "direct": (upstream_port, "/v1/chat/completions", REQUEST),
        "chat": (ozwell_port, "/v1/chat/completions", REQUEST),
        "responses": (ozwell_port, "/v1/responses", json.dumps(TRANSLATED).encode()),
        "stored": (ozwell_port, "/v1/responses",
                   json.dumps({**TRANSLATED, "store": True}).encode()),
    }
    connections = {kind: Connection(port) for kind, (port, _, _) in kinds.items()}
    figures: dict[str, float] = {}
    # The stored kind is timed in a run of its own: its fsyncs would slow whatever runs next.
    for run in (("direct", "chat", "responses"), ("direct", "stored")):
        times: dict[str, list[float]] = {kind: [] for kind in run}
        for call in range(len(run) * (LATENCY_CALLS + 100)):
            kind = run[call % len(run)]
            _, path, body = kinds[kind]
            started = time.perf_counter()
            await connections[kind].request("POST", path, body)
            if call >= len(run) * 100:
                times[kind].append(time.perf_counter() - started)
        direct = percentile(times["direct"], 0.5)
        figures.setdefault("direct p50", direct)
        for kind in run[1:]:
            figures[f"{kind} added p50"] = percentile(times[kind], 0.5) - direct

    streams = {"chat": ("/v1/chat/completions", {**_CHAT, "stream": True, "events": RELAY_EVENTS}),
               "responses": ("/v1/responses",
                             {**TRANSLATED, "stream": True, "events": RELAY_EVENTS})}
    for kind, (path, body) in streams.items():
        started = time.perf_counter()
        received = await connections[kind].request("POST", path, json.dumps(body).encode())
        figures[f"{kind} events/s"] = RELAY_EVENTS / (time.perf_counter() - started)
        if received.count(b" word") < RELAY_EVENTS:
            raise RuntimeError(f"the {kind} stream lost deltas")
    for connection in connections.values():
        connection.close()
    return figures


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what}: {figure}")
