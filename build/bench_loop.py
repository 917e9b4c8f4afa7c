"""Benchmark rows for the event loop under large requests: `python build/bench_loop.py`.

While one large request is being answered, a second connection asks for `/health` every 10 ms;
its latencies while the request runs are printed beside those of the same server idle (the
baseline, measured just before, in the same run). Each large request gets a fresh server, so
its peak RSS (VmHWM) is the request's own. Figures are indicative: on a shared machine the
other processes' load shows in them.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmark import ozwell_server, p99, probe_health, rss_mb

HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
IDLE_PROBES = 200


def _small_messages(size: int) -> bytes:
    message = {"role": "user", "content": "Hello there, how are you today?"}
    count = size // len(json.dumps(message))
    return json.dumps({"model": "ozwell-deterministic", "messages": [message] * count}).encode()


def _one_message(size: int) -> bytes:
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * (size // 56 + 1))[:size]
    return json.dumps({"model": "ozwell-deterministic",
                       "messages": [{"role": "user", "content": words}]}).encode()


def _embeddings_52mb() -> bytes:
    """2,048 inputs of 40 long words (many features, few tokens): about 52 MB of floats back."""
    text = " ".join(hashlib.md5(str(j).encode()).hexdigest()[:12] for j in range(40))
    return json.dumps({"model": "text-embedding-3-large", "encoding_format": "float",
                       "input": [f"Document {i}: {text}" for i in range(2048)]}).encode()


LOADS = (
    ("chat, 3.5 MB of small messages", "/v1/chat/completions", lambda: _small_messages(3_500_000)),
    ("chat, 30 MB of small messages", "/v1/chat/completions", lambda: _small_messages(30_000_000)),
    ("chat, one 30 MB message", "/v1/chat/completions", lambda: _one_message(30_000_000)),
    ("embeddings, 2,048 inputs, 3072 dims, float (~52 MB reply)", "/v1/embeddings", _embeddings_52mb),
)


def rows() -> list[tuple[str, str]]:
    out = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, path, make_body in LOADS:
            body = make_body()
            with ozwell_server(os.path.join(scratch, "data")) as server:
                idle = probe_health(server.port, lambda probed: len(probed) < IDLE_PROBES)
                before = rss_mb(server.process.pid)
                status, seconds, size, busy = _while_answering(server.port, path, body)
                peak = rss_mb(server.process.pid, "VmHWM")
            out += [
                (f"{name}: answered", f"{status} in {seconds:.1f} s ({size / 1e6:.1f} MB reply)"),
                (f"{name}: /health p50 / p99 / max while it runs (n={len(busy)})", _latencies(busy)),
                (f"{name}: /health p50 / p99 / max idle, same server (baseline)", _latencies(idle)),
                (f"{name}: /health p99 as a multiple of the idle p99",
                 f"{p99(busy) / p99(idle):.1f}x"),
                (f"{name}: RSS before, and peak during", f"{before:.0f} MB, {peak:.0f} MB"),
            ]
    return out


# The large request is sent from a process of its own: from a thread of this one, its reading
# of a 52 MB reply would hold this process's interpreter, and the probes' latencies with it.
_SENDER = """
import http.client, json, sys, time
port, path, body_file, headers = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with open(body_file, "rb") as file:
    body = file.read()
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
started = time.perf_counter()
connection.request("POST", path, body, headers)
reply = connection.getresponse()
size = len(reply.read())
print(json.dumps({"status": reply.status, "seconds": time.perf_counter() - started, "size": size}))
"""


def _while_answering(port: int, path: str, body: bytes) -> tuple[int, float, int, list[float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        body_file.write(body)
        body_file.flush()
        sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(port), path, body_file.name,
                                   json.dumps(HEADERS)], stdout=subprocess.PIPE)
        time.sleep(0.3)  # the sender has started and its body is on its way
        busy = probe_health(port, lambda _: sender.poll() is None)
        result = json.loads(sender.communicate()[0])
    return result["status"], result["seconds"], result["size"], busy


def _latencies(latencies: list[float]) -> str:
    return (f"{1000 * statistics.median(latencies):.1f} / {1000 * p99(latencies):.1f} / "
            f"{1000 * max(latencies):.1f} ms")


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what:<92}  {figure}")
