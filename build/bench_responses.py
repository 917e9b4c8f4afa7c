"""Benchmark rows for the Responses API: `python build/bench_responses.py` prints them.

Starts its own server (`python ozwell.py` on 127.0.0.1, a temporary data dir, streams
unpaced), measures over one keep-alive connection with bounded loops, and stops it.
"""
from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import time

from benchmark import ozwell_server, requests_per_second

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
