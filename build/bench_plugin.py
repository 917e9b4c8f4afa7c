"""Benchmark rows for the pytest plugin: how soon the `ozwell` fixture is ready, and how many
requests a test gets through it, beside a server in a subprocess (the other way the plugin
could have served).

    python build/bench_plugin.py          # prints the rows

Readiness is what pytest reports as the setup time of a downstream project's first test (the
plugin imports the server, builds the app and listens, then resets the test's session), in a
fresh pytest process each time; the subprocess is `python -m ozwell --port 0 --ready-file`,
started and asked for /health. Both load ozwell.py from Python's bytecode cache, as an installed
`ozwell` does. Throughput is the official SDK's sync client making chat
completions, one after another, as a test does. Figures are printed, never asserted.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from benchmark import bytecode_cached

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ozwell  # noqa: E402
import ozwell_pytest  # noqa: E402

ROUNDS = 5
SECONDS = 1
CHAT = {"model": ozwell.OFFLINE_MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
DOWNSTREAM_TEST = "def test_first(ozwell):\n    pass\n\n\ndef test_second():\n    pass\n"


def rows() -> list[tuple[str, str]]:
    """Each round measures both ways in turn, and the medians are compared: on a machine
    shared with other work, measuring one way after the other mostly measures the others."""
    bytecode_cached(ROOT / "ozwell.py")
    with tempfile.TemporaryDirectory() as scratch:
        starts = [(_fixture_setup_seconds(scratch), _subprocess_ready_seconds(scratch, n))
                  for n in range(ROUNDS)]
        settings = ozwell.Settings.from_environment(
            {}, data_dir=os.path.join(scratch, "rate"), **ozwell_pytest.FIXED)
        server = ozwell_pytest.Server(settings)
        try:
            with _subprocess_server(scratch, "rate-process") as separate_url:
                rates = [(_chats_per_second(server.base_url), _chats_per_second(separate_url))
                         for _ in range(ROUNDS)]
        finally:
            server.stop()
    in_process, separate = (statistics.median(column) for column in zip(*starts))
    threaded, separate_rate = (statistics.median(column) for column in zip(*rates))
    return [
        (f"plugin: `ozwell` fixture ready (first test's setup, median of {ROUNDS})",
         f"{1000 * in_process:.0f} ms, {in_process / separate:.2f} of a subprocess "
         f"server's start to /health ({1000 * separate:.0f} ms)"),
        ("plugin: chat completions through the fixture (sync SDK, one at a time)",
         f"{threaded:,.0f} req/s, {threaded / separate_rate:.2f} of a subprocess server "
         f"({separate_rate:,.0f} req/s)"),
    ]


def _fixture_setup_seconds(scratch: str) -> float:
    """pytest's own figure for the setup of the first test using the fixture."""
    project = Path(tempfile.mkdtemp(dir=scratch))
    (project / "test_ready.py").write_text(DOWNSTREAM_TEST)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
         "--durations-min=0", "-p", "no:tornado", f"--basetemp={project / 'tmp'}"],
        cwd=project, capture_output=True, text=True, timeout=120)
    found = re.search(r"([\d.]+)s setup\s+test_ready.py::test_first", result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"the downstream run failed:\n{result.stdout}\n{result.stderr}")
    return float(found.group(1))


def _subprocess_ready_seconds(scratch: str, number: int) -> float:
    started = time.perf_counter()
    with _subprocess_server(scratch, f"start-{number}"):
        return time.perf_counter() - started


class _subprocess_server:
    """`python -m ozwell --port 0 --ready-file` (as `.venv/bin/ozwell`), waited for until /health
    answers."""

    def __init__(self, scratch: str, name: str) -> None:
        self.folder = Path(scratch) / name
        self.ready_file = self.folder / "ready.json"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ozwell", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(self.folder / "data"), "--ready-file", str(self.ready_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 60
        while not self.ready_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the subprocess server did not start")
            time.sleep(0.005)
        base_url = json.loads(self.ready_file.read_text())["base_url"]
        urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10).close()
        return base_url

    def __exit__(self, *_) -> None:
        self.process.terminate()
        self.process.wait(30)


def _chats_per_second(base_url: str) -> float:
    with openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0) as client:
        for _ in range(20):  # warm up
            client.chat.completions.create(**CHAT)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < SECONDS:
            client.chat.completions.create(**CHAT)
            count += 1
        return count / (time.perf_counter() - started)


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what:<72}  {figure}")
