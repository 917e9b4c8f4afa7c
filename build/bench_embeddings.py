"""Benchmark rows for POST /v1/embeddings: `python build/bench_embeddings.py` prints them.

Starts its own server (`python -m ozwell` on 127.0.0.1, a temporary data dir), measures with
bounded loads, and stops it. Requests per second come from `wrk` (one thread, 16 keep-alive
connections) when it is installed, else from one keep-alive http.client connection; each row
says which.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import tempfile
import time

from benchmark import ozwell_server, rss_mb, wrk

HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
SHORT = {"model": "text-embedding-3-small", "input": "The quick brown fox jumps over the lazy dog"}
MANY = {"model": "text-embedding-3-small",
        "input": [f"Document {i}: notes on topic {i % 37}, filed under section {i % 11}."
                  for i in range(2048)]}
# "hello world" and "The quick brown fox jumps over the lazy dog" as cl100k_base token ids.
TOKEN_IDS = {"model": "text-embedding-3-small", "encoding_format": "float",
             "input": [[15339, 1917], [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679]]}
SECONDS_PER_ROW = 5
WRK_CONNECTIONS = 16
MAX_REQUESTS = 20000
LARGE_REPEATS = 5


def rows() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch, \
            ozwell_server(os.path.join(scratch, "data")) as server:
        port = server.port
        out = []
        for encoding in ("float", "base64"):
            body = {**SHORT, "encoding_format": encoding}
            rate, tool = _requests_per_second(port, body)
            out.append((f"embeddings: one short input, 1536 dims, {encoding} ({tool})",
                        f"{rate:,.0f} req/s"))
        for encoding in ("base64", "float"):
            seconds, size = _one_large_request(port, {**MANY, "encoding_format": encoding})
            out.append((f"embeddings: one request of 2,048 inputs, 1536 dims, {encoding} "
                        f"({size / 1e6:.1f} MB reply, median of {LARGE_REPEATS})",
                        f"{seconds:.3f} s"))
    return out + _token_ids()


def _token_ids() -> list[tuple[str, str]]:
    """The cl100k_base vocabulary is read on the first request with token ids: what that costs
    once, and what such a request costs after it, on a fresh server."""
    with tempfile.TemporaryDirectory() as scratch, \
            ozwell_server(os.path.join(scratch, "data")) as server:
        before = rss_mb(server.process.pid)
        first, _ = _one_request(server.port, TOKEN_IDS)
        grown = rss_mb(server.process.pid) - before
        again, _ = _one_request(server.port, TOKEN_IDS)
    return [("embeddings: first request with token ids (reads the vocabulary)", f"{1000 * first:.0f} ms"),
            ("embeddings: the same request again", f"{1000 * again:.1f} ms"),
            ("resident memory added by the first request with token ids", f"{grown:.1f} MB")]


def _requests_per_second(port: int, body: dict) -> tuple[float, str]:
    _check(port, body)
    if shutil.which("wrk"):
        rate = wrk(f"http://127.0.0.1:{port}/v1/embeddings", WRK_CONNECTIONS, SECONDS_PER_ROW, post=body)
        return rate, f"wrk -t1 -c{WRK_CONNECTIONS}, {SECONDS_PER_ROW} s"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    payload = json.dumps(body)
    count = 0
    started = time.perf_counter()
    try:
        while count < MAX_REQUESTS and time.perf_counter() - started < SECONDS_PER_ROW:
            connection.request("POST", "/v1/embeddings", payload, HEADERS)
            connection.getresponse().read()
            count += 1
    finally:
        connection.close()
    return count / (time.perf_counter() - started), "one keep-alive http.client connection"


def _one_large_request(port: int, body: dict) -> tuple[float, int]:
    """Median seconds from sending the request to having read the whole reply, and its size."""
    times, sizes = zip(*(_one_request(port, body) for _ in range(LARGE_REPEATS)))
    return statistics.median(times), sizes[-1]


def _one_request(port: int, body: dict) -> tuple[float, int]:
    """Seconds from sending the request to having read the whole reply, and its size."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/embeddings", json.dumps(body), HEADERS)
        reply = connection.getresponse()
        data = reply.read()
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    if reply.status != 200:
        raise RuntimeError(f"POST /v1/embeddings answered {reply.status}: {data[:300]!r}")
    return seconds, len(data)


def _check(port: int, body: dict) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/embeddings", json.dumps(body), HEADERS)
        reply = connection.getresponse()
        data = reply.read()
    finally:
        connection.close()
    if reply.status != 200:
        raise RuntimeError(f"POST /v1/embeddings answered {reply.status}: {data[:300]!r}")


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what:<92}  {figure}")
