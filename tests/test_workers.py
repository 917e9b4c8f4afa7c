"""Several worker processes on one port, and what a first start tells the user."""
import collections
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, free_port

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


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if parent_of(int(entry)) == pid:
                    found.add(int(entry))
            except (OSError, IndexError):
                pass  # gone meanwhile
    return found


def listening_sockets(port: int) -> set[str]:
    """The inodes of the sockets listening on `port`, from the kernel's TCP tables."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def sockets_of(pid: int) -> set[str]:
    found = set()
    for descriptor in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
            if target.startswith("socket:["):
                found.add(target[len("socket:["):-1])
    return found


def until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return found


def pid_behind(connection: http.client.HTTPConnection) -> int:
    connection.request("GET", "/health")
    reply = connection.getresponse()
    return json.loads(reply.read())["pid"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances on Linux")
def test_each_worker_listens_on_its_own_socket_and_takes_its_share_of_keep_alive_connections(
        server_process):
    server = server_process(args=("--workers", "2", "--quiet"))
    workers = until(lambda: len(children_of(server.process.pid)) == 2
                    and children_of(server.process.pid), what="two workers")
    listening = until(lambda: len(listening_sockets(server.port)) == 2
                      and listening_sockets(server.port), what="two listening sockets")
    assert not sockets_of(server.process.pid) & listening  # the parent listens on none
    assert sorted(len(sockets_of(pid) & listening) for pid in workers) == [1, 1]

    def keep_alive_load(_):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            pids = {pid_behind(connection) for _ in range(20)}
        finally:
            connection.close()
        assert len(pids) == 1  # one connection, kept alive, stays with its worker
        return pids.pop()

    with ThreadPoolExecutor(32) as pool:  # 32 connections opened at once, all kept busy
        served = collections.Counter(pool.map(keep_alive_load, range(32)))
    assert set(served) == workers
    assert min(served.values()) >= 6, served  # an even split is 16 each
    assert server.stop() == 0


def test_port_0_with_workers_is_one_port_picked_by_the_parent_and_said_once_they_listen(
        tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1", "--port", "0",
         "--workers", "2", "--quiet", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner = process.stdout.readline()
        port = int(re.search(r"^ozwell listening host=127\.0\.0\.1 port=(\d+) .*workers=2 ",
                             banner).group(1))
        if sys.platform.startswith("linux"):  # said once both workers listen, not before
            assert len(listening_sockets(port)) == 2
        url = f"http://127.0.0.1:{port}"
        assert {health(url)["pid"] for _ in range(50)} <= children_of(process.pid)
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_the_restart_allowance_comes_back_over_a_minute_and_a_crash_loop_still_stops(
        server_process):
    server = server_process(args=("--workers", "2"))
    parent = server.process.pid
    workers = until(lambda: len(children_of(parent)) == 2 and children_of(parent),
                    what="two workers")

    def kill_one() -> None:
        nonlocal workers
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        workers = until(lambda: (now := children_of(parent)) and len(now) == 2
                        and victim not in now and now, what="a replacement worker")

    for _ in range(10):  # the whole allowance of two workers: 5 restarts a minute each
        kill_one()
    time.sleep(7)  # one restart's worth comes back every 6 s
    kill_one()
    assert health(server.url)["status"] == "ok"

    deadline = time.monotonic() + 30
    while server.process.poll() is None:  # and now faster than it comes back
        assert time.monotonic() < deadline, "a crash loop never stopped the server"
        for pid in children_of(parent):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    assert server.process.returncode == 1
    assert "workers keep dying" in server.process.stderr.read()
