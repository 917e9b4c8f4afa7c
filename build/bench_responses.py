"""Benchmark rows for the Responses API: `python build/bench_responses.py` prints them.

Starts its own servers (`python ozwell.py` on 127.0.0.1, temporary data dirs, streams
unpaced), measures over one keep-alive connection with bounded loops, and with wrk at
concurrency 16 against the baseline revision (see benchmark.py), and stops them.
"""
from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import threading
import time

from benchmark import (BASELINE, ozwell_server, p99, probe_health, ratio, requests_per_second,
                       wrk_run)

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
    ] + _stored_against_baseline()


def _stored_against_baseline() -> list[tuple[str, str]]:
    """Stored responses at concurrency 16, and /health's p99 meanwhile, on this version and on
    the baseline; and /health's p99 under the same load with store false, where no disk is
    involved: what saturating the server costs /health on this machine anyway."""
    figures = {}
    for name, baseline, body in (("now", None, BODY), ("before", BASELINE, BODY),
                                 ("unstored", None, {**BODY, "store": False})):
        with tempfile.TemporaryDirectory() as data_dir, \
                ozwell_server(data_dir, inherit_ozwell_env=False, baseline=baseline) as server:
            url = f"{server.url}/v1/responses"
            wrk_run(url, seconds=1, post=body)  # warm up
            load: dict[str, float] = {}
            loader = threading.Thread(target=lambda: load.update(wrk_run(url, post=body)))
            loader.start()
            busy = probe_health(server.port, lambda _: loader.is_alive())
            loader.join()
            figures[name] = (load["rps"], 1000 * p99(busy))
    (rate, health), (before_rate, before_health) = figures["now"], figures["before"]
    return [
        ("responses: stored, c16 (wrk), against " + BASELINE + " (goal 8x)",
         f"{ratio(rate, before_rate)} ({rate:,.0f} against {before_rate:,.0f} req/s)"),
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


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what}: {figure}")
