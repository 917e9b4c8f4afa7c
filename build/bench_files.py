"""Benchmark rows for /v1/files: `python build/bench_files.py` prints them.

Starts its own servers (`python -m ozwell` on 127.0.0.1, temporary data dirs), measures with
bounded loops over one keep-alive connection, and small uploads with wrk against the baseline
revision (see benchmark.py), and stops them. The 1 GB upload is made by a
generator as it is sent, never held in memory; the server's memory is read from /proc (Linux).
"""
from __future__ import annotations

import http.client
import json
import os
import statistics
import tempfile
import time
import uuid

from benchmark import BASELINE, Server, ozwell_server, ratio, rss_mb, wrk_run

MiB = 1024 * 1024
UPLOAD_BYTES = 1024 * MiB
LISTED_FILES = 10_000
BOUNDARY = "bench-files-boundary"
AUTH = {"Authorization": "Bearer bench"}
SECONDS_PER_ROW = 3.0
MAX_REQUESTS = 200


def rows() -> list[tuple[str, str]]:
    result = []
    with tempfile.TemporaryDirectory() as data_dir, _server(data_dir) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        try:
            _upload(connection, 4 * MiB)  # warm up: imports, threads, buffers
            peak_before = rss_mb(server.process.pid, "VmHWM")
            started = time.perf_counter()
            file_id = _upload(connection, UPLOAD_BYTES)
            upload_rate = UPLOAD_BYTES / MiB / (time.perf_counter() - started)
            # The kernel updates the peak lazily: a difference below zero is noise.
            growth = max(0.0, rss_mb(server.process.pid, "VmHWM") - peak_before)
            started = time.perf_counter()
            downloaded = _download(connection, file_id)
            download_rate = downloaded / MiB / (time.perf_counter() - started)
        finally:
            connection.close()
    result += [
        ("files: upload of a 1 GiB file (multipart, streamed to disk, fsynced)", f"{upload_rate:.0f} MiB/s"),
        ("files: server's peak memory growth during that upload", f"{growth:.1f} MiB"),
        ("files: download of that file (content endpoint)", f"{download_rate:.0f} MiB/s"),
    ]
    with tempfile.TemporaryDirectory() as data_dir:
        _fill_store(os.path.join(data_dir, "files"), LISTED_FILES)
        with _server(data_dir) as server:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                whole = _median_ms(connection, "/v1/files")
                page = _median_ms(connection, "/v1/files?limit=100")
                upload = _median_upload_ms(connection)
            finally:
                connection.close()
    result += [
        (f"files: list all {LISTED_FILES:,} files (one page, median)", f"{whole:.1f} ms"),
        (f"files: list a page of 100 of {LISTED_FILES:,} files (median)", f"{page:.1f} ms"),
        (f"files: upload a small file into a store of {LISTED_FILES:,} (median)", f"{upload:.1f} ms"),
    ]
    return result + _small_uploads_against_baseline()


def _small_uploads_against_baseline() -> list[tuple[str, str]]:
    """100-byte uploads at concurrency 16 (wrk), on this version and on the baseline."""
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="s.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n").encode() + b"x" * 100 + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    rates = {}
    for baseline in (None, BASELINE):
        with tempfile.TemporaryDirectory() as data_dir, _server(data_dir, baseline) as server:
            load = {"body": body, "content_type": f"multipart/form-data; boundary={BOUNDARY}"}
            wrk_run(f"{server.url}/v1/files", seconds=1, **load)  # warm up
            rates[baseline] = wrk_run(f"{server.url}/v1/files", **load)["rps"]
    now, before = rates[None], rates[BASELINE]
    return [("files: small uploads, c16 (wrk), against " + BASELINE + " (goal 371/s)",
             f"{now:,.0f}/s: {ratio(now, before)} of {before:,.0f}/s")]


def _upload(connection: http.client.HTTPConnection, size: int) -> str:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    block = os.urandom(MiB)

    def body():
        yield head
        for start in range(0, size, len(block)):
            yield block[:min(len(block), size - start)]
        yield tail

    connection.request("POST", "/v1/files", body=body(), headers={
        **AUTH, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(head) + size + len(tail))})
    reply = connection.getresponse()
    created = json.loads(reply.read())
    if reply.status != 200 or created["bytes"] != size:
        raise RuntimeError(f"upload answered {reply.status}: {created}")
    return created["id"]


def _download(connection: http.client.HTTPConnection, file_id: str) -> int:
    connection.request("GET", f"/v1/files/{file_id}/content", headers=AUTH)
    reply = connection.getresponse()
    received = 0
    while chunk := reply.read(MiB):
        received += len(chunk)
    if reply.status != 200:
        raise RuntimeError(f"download answered {reply.status}")
    return received


def _fill_store(directory: str, count: int) -> None:
    """`count` small files, one blob each, and the index.json of earlier versions listing them
    (which this version takes into its index at start)."""
    os.makedirs(directory)
    files = []
    created_at = int(time.time())
    for number in range(count):
        file_id = "file-" + uuid.uuid4().hex
        with open(os.path.join(directory, file_id), "wb") as blob:
            blob.write(b"%d\n" % number)
        files.append({"id": file_id, "object": "file", "bytes": len(b"%d\n" % number),
                      "created_at": created_at, "filename": f"{number}.txt", "purpose": "batch",
                      "status": "processed", "expires_at": None, "status_details": None})
    with open(os.path.join(directory, "index.json"), "w", encoding="utf-8") as index:
        json.dump({"version": 1, "files": files}, index)


def _median_ms(connection: http.client.HTTPConnection, path: str) -> float:
    timings = []
    deadline = time.perf_counter() + SECONDS_PER_ROW
    while len(timings) < MAX_REQUESTS and time.perf_counter() < deadline:
        started = time.perf_counter()
        connection.request("GET", path, headers=AUTH)
        reply = connection.getresponse()
        reply.read()
        timings.append(1000 * (time.perf_counter() - started))
        if reply.status != 200:
            raise RuntimeError(f"GET {path} answered {reply.status}")
    return statistics.median(timings)


def _median_upload_ms(connection: http.client.HTTPConnection) -> float:
    timings = []
    deadline = time.perf_counter() + SECONDS_PER_ROW
    while len(timings) < MAX_REQUESTS and time.perf_counter() < deadline:
        started = time.perf_counter()
        _upload(connection, 100)
        timings.append(1000 * (time.perf_counter() - started))
    return statistics.median(timings)


def _server(data_dir: str, baseline: str | None = None) -> Server:
    """`python -m ozwell` with a 2 GiB upload limit, configured by its command line alone."""
    return ozwell_server(data_dir, "--max-upload-bytes", str(2 * UPLOAD_BYTES),
                         inherit_ozwell_env=False, baseline=baseline)


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what}: {figure}")
