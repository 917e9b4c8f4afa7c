"""Several worker processes on one port, and what a first start tells the user."""
import json
import os
import urllib.request

import pytest

from conftest import free_port

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork(); Windows serves with one process")


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:  # a new connection each time
        return json.loads(reply.read())


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def test_two_workers_share_the_port_and_stop_together_on_sigterm(server_process):
    server = server_process(args=("--workers", "2"))
    seen = set()
    for _ in range(300):
        seen.add(health(server.url)["pid"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, "only one worker answered 300 connections"
    assert {parent_of(pid) for pid in seen} == {server.process.pid}
    assert server.stop() == 0
    for pid in seen:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_workers_zero_means_one_per_cpu(server_process):
    server = server_process(env={"OZWELL_WORKERS": "0"})
    assert server.stop() == 0
    assert f" workers={os.cpu_count()} " in server.process.stdout.readline()


def test_first_start_without_a_backend_says_so_once_and_serves(server_process, tmp_path):
    upstream = f"http://127.0.0.1:{free_port()}/v1"
    server = server_process(env={"LLAMA_BASE_URL": upstream, "LLAMA_MODELS": "llama3,qwen"})
    assert health(server.url)["status"] == "ok"
    assert server.stop() == 0
    log = server.process.stderr.read()
    warnings = [line for line in log.splitlines() if "is not reachable now" in line]
    assert len(warnings) == 1
    assert upstream in warnings[0] and "ozwell-deterministic works meanwhile" in warnings[0]
    banner = server.process.stdout.read()
    assert f"docs:     {server.url}/docs" in banner
    assert f"data dir: {tmp_path / 'data'}" in banner
    assert "ozwell-deterministic (built in)" in banner and "llama3, qwen (upstream)" in banner
    assert f"upstream: {upstream}" in banner


def test_uploads_through_any_worker_are_listed_and_served_by_every_worker(server_process):
    import openai
    server = server_process(args=("--workers", "2"))
    # A new client for every call means a new connection, which either worker may accept.
    def fresh():
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
    uploaded = {fresh().files.create(file=(f"f{i}.txt", f"body {i}".encode()), purpose="assistants").id: i
                for i in range(16)}
    seen = set()
    for _ in range(16):
        listed = {f.id for f in fresh().files.list()}
        assert set(uploaded) <= listed
        seen.add(health(server.url)["pid"])
    for file_id, i in uploaded.items():
        assert fresh().files.content(file_id).text == f"body {i}"
    for _ in range(300):
        if len(seen) == 2:
            break
        seen.add(health(server.url)["pid"])
    assert len(seen) == 2
    assert server.stop() == 0
