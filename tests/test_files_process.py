"""/v1/files across real server processes: a shared data dir, kill -9, a damaged index, a big upload."""
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import API_KEY, ROOT

BOUNDARY = "process-boundary-7"
MiB = 1024 * 1024
PATTERN = bytes(range(256)) * 4096  # 1 MiB


def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def temporary_files(files_dir):
    return [name for name in os.listdir(files_dir) if name.endswith(".tmp")]


def upload_head(filename="big.bin", purpose="batch"):
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def request_head(port, content_length):
    return (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def stream_upload(port, size):
    """Upload `size` bytes of PATTERN, made as they are sent (never whole in memory)."""
    head, tail = upload_head(), f"\r\n--{BOUNDARY}--\r\n".encode()

    def body():
        yield head
        for start in range(0, size, len(PATTERN)):
            yield PATTERN[:min(len(PATTERN), size - start)]
        yield tail

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/files", body=body(), headers={
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(len(head) + size + len(tail))})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def pattern_digest(size):
    digest = hashlib.sha256()
    for start in range(0, size, len(PATTERN)):
        digest.update(PATTERN[:min(len(PATTERN), size - start)])
    return digest.hexdigest()


def test_two_processes_sharing_a_data_dir_lose_no_upload_or_delete(server_process, tmp_path):
    servers = [server_process(), server_process()]  # the same data dir
    clients = [sdk(server) for server in servers]

    def upload(number):
        return clients[number % 2].files.create(file=(f"{number}.txt", str(number).encode()),
                                                purpose="batch")

    with ThreadPoolExecutor(16) as pool:
        created = list(pool.map(upload, range(50)))
    ids = {file.id for file in created}
    assert len(ids) == 50
    for client in clients:
        assert {file.id for file in client.files.list(limit=20)} == ids
    files_dir = tmp_path / "data" / "files"
    assert {name for name in os.listdir(files_dir) if name.startswith("file-")} == ids
    for file in created:
        other = clients[1 - int(file.filename.split(".")[0]) % 2]
        assert other.files.content(file.id).content == file.filename.split(".")[0].encode()

    with ThreadPoolExecutor(16) as pool:
        deleted = list(pool.map(lambda pair: clients[pair[0] % 2].files.delete(pair[1].id),
                                enumerate(created)))
    assert all(result.deleted for result in deleted)
    for client in clients:
        assert client.files.list().data == []
    assert sorted(os.listdir(files_dir)) == ["index.jsonl", "index.lock"]


def test_kill_9_mid_upload_lists_nothing_partial_and_restart_cleans_up(server_process, tmp_path):
    server = server_process()
    kept = sdk(server).files.create(file=("kept.txt", b"whole"), purpose="assistants")
    files_dir = tmp_path / "data" / "files"
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        head = upload_head("cut.bin")
        connection.sendall(request_head(server.port, len(head) + 50 * MiB) + head + PATTERN)
        deadline = time.monotonic() + 20
        while not any((files_dir / name).stat().st_size > MiB // 2
                      for name in temporary_files(files_dir)):
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.02)
        server.process.kill()
        server.process.wait(10)
    assert len(temporary_files(files_dir)) == 1  # what the killed process left

    restarted = server_process()
    assert temporary_files(files_dir) == []
    client = sdk(restarted)
    assert [file.id for file in client.files.list()] == [kept.id]
    assert client.files.content(kept.id).content == b"whole"
    assert sorted(os.listdir(files_dir)) == sorted([kept.id, "index.jsonl", "index.lock"])
    assert client.files.create(file=("after.txt", b"ok"), purpose="batch").bytes == 2


def test_a_damaged_index_stops_a_real_server_with_one_line(tmp_path):
    files_dir = tmp_path / "data" / "files"
    files_dir.mkdir(parents=True)
    (files_dir / "index.json").write_text('{"version": 1, "files": [', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"ozwell: the files index {files_dir / 'index.json'} is damaged: "
                               "it is not valid JSON")
    assert (files_dir / "index.json").read_text(encoding="utf-8") == '{"version": 1, "files": ['


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads the server's peak memory from /proc (Linux only)")
def test_a_200_mb_upload_streams_to_disk_in_flat_memory(server_process, tmp_path):
    server = server_process()
    size = 200 * MiB
    assert stream_upload(server.port, MiB)[0] == 200  # warm up: imports, threads, buffers
    peak_before = memory_kib(server.process.pid, "VmHWM")

    status, created = stream_upload(server.port, size)

    assert status == 200 and created["bytes"] == size
    growth_mib = (memory_kib(server.process.pid, "VmHWM") - peak_before) / 1024
    assert growth_mib < 40, f"the server's peak memory grew by {growth_mib:.0f} MiB"
    blob = tmp_path / "data" / "files" / created["id"]
    assert blob.stat().st_size == size
    digest = hashlib.sha256()
    with sdk(server).files.with_streaming_response.content(created["id"]) as reply:
        for chunk in reply.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == pattern_digest(size)
