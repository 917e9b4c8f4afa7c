"""Started by a script: the ready file and the start banner say where the server listens."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

import ozwell
from conftest import API_KEY, ROOT


def start(tmp_path, *args: str) -> subprocess.Popen:
    """`python ozwell.py --port 0` with `args`; its log goes to a file, its stdout to a pipe."""
    log = open(tmp_path / "log", "ab")
    return subprocess.Popen([sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1",
                             "--port", "0", "--data-dir", str(tmp_path / "data"), *args],
                            stdout=subprocess.PIPE, stderr=log, text=True)


def wait_for_file(path, process: subprocess.Popen, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"exited with {process.returncode}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.01)
    return json.loads(path.read_text())


def health(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as reply:
        return json.loads(reply.read())


def stop(process: subprocess.Popen) -> int:
    process.terminate()
    try:
        return process.wait(15)
    finally:
        process.kill()


def test_ready_file_says_where_it_listens_once_it_answers_and_goes_at_exit(tmp_path):
    ready_file = tmp_path / "not-yet-made" / "ready.json"
    process = start(tmp_path, "--ready-file", str(ready_file))
    try:
        ready = wait_for_file(ready_file, process)
        # No retry: once the file is there, the first request is answered.
        assert health(ready["base_url"])["main_pid"] == process.pid
        assert list(ozwell.SchemaRegistry.load().errors("ReadyFile", ready)) == []
        assert (ready["host"], ready["pid"]) == ("127.0.0.1", process.pid)
        assert ready["base_url"] == f"http://127.0.0.1:{ready['port']}/v1"
        sdk = openai.OpenAI(base_url=ready["base_url"], api_key=API_KEY, max_retries=0)
        assert "ozwell-deterministic" in {model.id for model in sdk.models.list()}
        sdk.close()
        assert os.listdir(ready_file.parent) == ["ready.json"]  # no temporary file left
        banner = process.stdout.readline().split()
        assert banner[:2] == ["ozwell", "listening"]
        fields = dict(field.split("=", 1) for field in banner[2:])
        assert fields == {**{key: str(value) for key, value in ready.items()}, "workers": "1",
                          "version": ozwell.__version__}
    finally:
        assert stop(process) == 0
    assert not ready_file.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork()")
def test_with_workers_the_ready_file_and_health_name_their_parent(tmp_path):
    ready_file = tmp_path / "ready.json"
    process = start(tmp_path, "--workers", "2", "--ready-file", str(ready_file))
    try:
        ready = wait_for_file(ready_file, process)
        assert ready["pid"] == process.pid
        answered = {}
        for _ in range(300):
            reply = health(ready["base_url"])
            answered[reply["pid"]] = reply["main_pid"]
            if len(answered) == 2:
                break
        assert len(answered) == 2 and set(answered.values()) == {process.pid}
        assert process.pid not in answered
    finally:
        assert stop(process) == 0
    assert not ready_file.exists()


def test_a_ready_file_left_by_an_earlier_run_is_removed_even_if_this_start_fails(tmp_path):
    ready_file = tmp_path / "ready.json"
    ready_file.write_text('{"host": "127.0.0.1", "port": 1, "base_url": "http://127.0.0.1:1/v1", "pid": 1}')
    held = start(tmp_path, "--ready-file", str(tmp_path / "held.json"))
    try:
        port = wait_for_file(tmp_path / "held.json", held)["port"]
        result = subprocess.run([sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1",
                                 "--port", str(port), "--data-dir", str(tmp_path / "data"),
                                 "--ready-file", str(ready_file)],
                                capture_output=True, text=True, timeout=60)
    finally:
        stop(held)
    assert result.returncode == 2 and "cannot listen" in result.stderr
    assert not ready_file.exists()


def test_a_ready_file_that_cannot_be_written_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1",
                             "--port", "0", "--data-dir", str(tmp_path / "data"),
                             "--ready-file", "/dev/null/ready.json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "ready file '/dev/null/ready.json'" in result.stderr and "--ready-file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
