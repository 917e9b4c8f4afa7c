"""Benchmark rows for POST /v1/embeddings: `python build/bench_embeddings.py` prints them.

Starts its own server (`python ozwell.py` on 127.0.0.1, a temporary data dir), measures with
bounded loads, and stops it. Requests per second come from `wrk` (one thread, 16 keep-alive
connections) when it is installed, else from one keep-alive http.client connection; each row
says which.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
SHORT = {"model": "text-embedding-3-small", "input": "The quick brown fox jumps over the lazy dog"}
MANY = {"model": "text-embedding-3-small",
        "input": [f"Document {i}: notes on topic {i % 37}, filed under section {i % 11}."
                  for i in range(2048)]}
SECONDS_PER_ROW = 5
WRK_CONNECTIONS = 16
MAX_REQUESTS = 20000
LARGE_REPEATS = 5


def rows() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch, _Server(scratch) as port:
        out = []
        for encoding in ("float", "base64"):
            body = {**SHORT, "encoding_format": encoding}
            rate, tool = _requests_per_second(port, body, scratch)
            out.append((f"embeddings: one short input, 1536 dims, {encoding} ({tool})",
                        f"{rate:,.0f} req/s"))
        for encoding in ("base64", "float"):
            seconds, size = _one_large_request(port, {**MANY, "encoding_format": encoding})
            out.append((f"embeddings: one request of 2,048 inputs, 1536 dims, {encoding} "
                        f"({size / 1e6:.1f} MB reply, median of {LARGE_REPEATS})",
                        f"{seconds:.3f} s"))
    return out


def _requests_per_second(port: int, body: dict, scratch: str) -> tuple[float, str]:
    _check(port, body)
    if shutil.which("wrk"):
        return _wrk(port, body, scratch), f"wrk -t1 -c{WRK_CONNECTIONS}, {SECONDS_PER_ROW} s"
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


def _wrk(port: int, body: dict, scratch: str) -> float:
    script = Path(scratch) / "post.lua"
    headers = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in HEADERS.items())
    script.write_text(f'wrk.method = "POST"\n{headers}wrk.body = [[{json.dumps(body)}]]\n')
    output = subprocess.run(
        ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{SECONDS_PER_ROW}s", "-s", str(script),
         f"http://127.0.0.1:{port}/v1/embeddings"],
        capture_output=True, text=True, check=True, timeout=SECONDS_PER_ROW + 30).stdout
    errors = [line for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    if errors:
        raise RuntimeError(f"wrk saw errors: {errors}")
    return float(next(line for line in output.splitlines()
                      if line.startswith("Requests/sec")).split()[1])


def _one_large_request(port: int, body: dict) -> tuple[float, int]:
    """Median seconds from sending the request to having read the whole reply, and its size."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = json.dumps(body)
    times = []
    try:
        for _ in range(LARGE_REPEATS):
            started = time.perf_counter()
            connection.request("POST", "/v1/embeddings", payload, HEADERS)
            reply = connection.getresponse()
            data = reply.read()
            times.append(time.perf_counter() - started)
            if reply.status != 200:
                raise RuntimeError(f"POST /v1/embeddings answered {reply.status}: {data[:300]!r}")
    finally:
        connection.close()
    return statistics.median(times), len(data)


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


class _Server:
    """A `python ozwell.py` process on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir

    def __enter__(self) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", os.path.join(self.data_dir, "data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    return port
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what:<92}  {figure}")
