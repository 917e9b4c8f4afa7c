"""Running the server for real: descriptors, the listen queue, idle connections, a data dir
removed under it, and the access log."""
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from conftest import API_KEY, ROOT

resource = pytest.importorskip("resource", reason="descriptor limits are POSIX")


def with_descriptor_limit(soft: int, hard: int) -> dict:
    """What server_process() needs to start the server with this limit on open files."""
    return {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))}


def open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise LookupError("Max open files")


def health_status(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(f"{url}/health", timeout=timeout) as reply:
        return reply.status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(server_process):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit here is too low to tell")
    server = server_process(**with_descriptor_limit(256, hard))
    soft, reported_hard = open_files_limit(server.process.pid)
    assert soft == reported_hard and soft > 256


def test_a_thousand_connections_arriving_at_once_are_all_queued(server_process):
    wanted = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted + 100:
        if hard != resource.RLIM_INFINITY and hard < wanted + 100:
            pytest.skip(f"this test process may open only {hard} descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 100, hard))
    server = server_process()
    clients = []
    server.process.send_signal(signal.SIGSTOP)  # nothing is accepted: all must wait in the queue
    try:
        for _ in range(wanted):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", server.port))
            clients.append(client)
        # The kernel completes the handshake of every connection the listen queue holds; the
        # others stay half-open until a SYN retry, a second or more later.
        deadline = time.monotonic() + 0.8
        connected: set[int] = set()
        poller = select.poll()
        for client in clients:
            poller.register(client, select.POLLOUT)
        while time.monotonic() < deadline and len(connected) < wanted:
            for descriptor, _ in poller.poll(50):
                connected.add(descriptor)
                poller.unregister(descriptor)
        assert len(connected) >= 1025
    finally:
        server.process.send_signal(signal.SIGCONT)
        for client in clients:
            client.close()
    assert health_status(server.url) == 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc")
def test_out_of_descriptors_the_accept_loop_says_so_once_a_second_and_resumes(server_process,
                                                                              tmp_path):
    limit = 64
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:  # a file, which a storm of messages cannot fill up
        server = server_process(stderr=log_file, **with_descriptor_limit(limit, limit))
    held = []
    try:
        # Far more connections than the server has descriptors for; each sends a request, so
        # that every accepted one is answered (and so known to be accepted).
        for _ in range(2 * limit):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(client)
        time.sleep(2.5)  # long enough for a storm of messages, were there one
        log = log_path.read_text()
        assert "Traceback" not in log and len(log) < 20_000
        messages = [line for line in log.splitlines() if "cannot accept new connections" in line]
        assert 1 <= len(messages) <= 4 and "Too many open files" in messages[0], messages
        answered = [client for client in held if select.select([client], [], [], 0)[0]]
        assert 0 < len(answered) < len(held)
        waiting = [client for client in held if client not in answered]
        for client in answered:  # descriptors free up as these connections close
            client.close()
        for client in waiting[:limit // 4]:  # the queued connections are accepted and answered
            client.settimeout(10)
            assert client.recv(200).startswith(b"HTTP/1.1 200")
    finally:
        for client in held:
            client.close()
    assert health_status(server.url) == 200


def read_until_closed(client: socket.socket, timeout: float) -> float:
    """Seconds until the server closes the connection (reading and dropping what it sends)."""
    client.settimeout(timeout)
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        while client.recv(4096):
            pass
    return time.monotonic() - started


def test_idle_connections_and_slow_headers_are_closed(server_process):
    server = server_process(args=("--idle-timeout", "1"))
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        assert read_until_closed(slow, timeout=20) < 15
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.settimeout(10)
        assert idle.recv(200).startswith(b"HTTP/1.1 200")
        assert read_until_closed(idle, timeout=20) < 15  # kept alive, then closed when idle
    assert health_status(server.url) == 200


def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_removing_the_data_dir_while_serving_resets_it_and_serving_goes_on(server_process,
                                                                           tmp_path):
    server = server_process(args=("--workers", "2") if hasattr(os, "fork") else ())
    old_file = sdk(server).files.create(file=("old.txt", b"old"), purpose="batch")
    old_response = sdk(server).responses.create(model="ozwell-deterministic", input="old")

    shutil.rmtree(tmp_path / "data")

    for number in range(6):  # through both workers
        client = sdk(server)
        assert [file.id for file in client.files.list()] == []
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(old_response.id)
        with pytest.raises(openai.NotFoundError):
            client.files.content(old_file.id)
        created = client.files.create(file=(f"{number}.txt", b"new"), purpose="batch")
        assert client.files.content(created.id).content == b"new"
        response = client.responses.create(model="ozwell-deterministic", input=f"new {number}")
        assert client.responses.retrieve(response.id).output_text == response.output_text
        assert client.files.delete(created.id).deleted
    assert sorted(os.listdir(tmp_path / "data")) == ["files", "responses"]
    assert server.stop() == 0


def access_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " tornado.access: " in line]


@pytest.mark.parametrize("quiet", [(), ("--quiet",), ({"OZWELL_ACCESS_LOG": "off"},)],
                         ids=["default", "--quiet", "OZWELL_ACCESS_LOG=off"])
def test_the_access_log_is_one_line_per_request_unless_turned_off(server_process, quiet):
    env = quiet[0] if quiet and isinstance(quiet[0], dict) else {}
    args = quiet if quiet and not env else ()
    server = server_process(env=env, args=args)
    with urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})) as reply:
        request_id = reply.headers["x-request-id"]
        json.loads(reply.read())
    health_status(server.url)
    assert server.stop() == 0
    lines = access_lines(server.process.stderr.read())
    if quiet:
        assert lines == []
    else:
        models = [line for line in lines if "/v1/models" in line]
        assert len(models) == 1 and len(lines) >= 2  # the start-up's /health checks, and ours
        assert " INFO [" in models[0] and models[0].split(" tornado.access: ")[1].startswith(
            "200 GET /v1/models ") and models[0].endswith(request_id)


def test_an_unknown_access_log_setting_is_refused_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "ozwell.py"), "--port", "0", "--data-dir",
         str(tmp_path / "data")], env={**os.environ, "OZWELL_ACCESS_LOG": "loud"},
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "ozwell: OZWELL_ACCESS_LOG=loud is not valid: use on or off"
