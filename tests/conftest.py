"""Shared fixtures, in pytest-tornado's idiom: `app` is served at `base_url` for each test."""
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
import tornado.httpserver
import tornado.testing

import ozwell
from fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def settings(tmp_path):
    """The settings `app` is built from; override this fixture in a module to change them."""
    return ozwell.Settings(data_dir=str(tmp_path / "data"))


@pytest.fixture
def app(settings):
    return ozwell.make_app(settings)


@pytest.fixture
def base_url(http_port):
    # pytest-tornado says "localhost", which may resolve to ::1 first; the server listens on
    # 127.0.0.1 only.
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def backend(io_loop):
    """A recording fake Llama backend (tests/fake_backend.py) on a real loopback port."""
    fake = FakeBackend()
    server = fake.start()
    yield fake
    server.stop()


@pytest.fixture
def client(base_url, http_server):
    """The official SDK's async client, on the test's own event loop (no retries)."""
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def ozwell_with(io_loop, settings):
    """Serve another app: `settings` with the test's overrides; returns its base URL."""
    servers = []

    def serve(**overrides) -> str:
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(
            ozwell.make_app(dataclasses.replace(settings, **overrides)))
        server.add_sockets([sock])
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
def sdk(io_loop):
    """Make an async SDK client for another server; all are closed at the end."""
    made = []

    def make(base_url: str) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0))
        return made[-1]

    yield make
    for client in made:
        io_loop.run_sync(client.close)


async def raw_chat_post(base_url: str, body: bytes, receive_buffer: int = 64 * 1024,
                        path: str = "/v1/chat/completions"):
    """POST a chat completion (or another body to `path`) over a bare connection with a small
    receive buffer (a slow reader's), read the response headers, and return the (reader,
    writer) pair."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(base_url.rsplit(":", 1)[1])))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def assert_valid(registry, name: str, instance) -> None:
    """`instance` validates against the schema `name`; the errors show when it does not."""
    assert [f"{list(e.absolute_path)}: {e.message}" for e in registry.errors(name, instance)] == []


async def call_api(http_client, base_url: str, method: str, path: str, body=None):
    """One request with the test key: (status, the body: parsed when it is JSON, else bytes)."""
    reply = await http_client.fetch(f"{base_url}{path}", method=method, headers=AUTH,
                                    body=None if body is None else json.dumps(body),
                                    allow_nonstandard_methods=True, raise_error=False)
    if reply.headers.get("Content-Type", "").startswith("application/json"):
        return reply.code, json.loads(reply.body)
    return reply.code, reply.body


@contextlib.contextmanager
def served_in_a_thread(make_fake):
    """A fake upstream (`make_fake()`, whose `start()` listens in the running loop) on its own
    event loop in a thread, for tests that block (the sync SDK against a server process)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    def run():
        asyncio.set_event_loop(loop)

        async def start():
            holder["fake"] = make_fake()
            holder["server"] = holder["fake"].start()

        loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        holder["server"].stop()
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield holder["fake"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: "
                               f"{process.stderr.read() if process.stderr else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no /health answer from {url} within {timeout} s")


class ServerProcess:
    """A real `python ozwell.py` process on a free port: for the sync SDK, signals, kill -9."""

    def __init__(self, data_dir: Path, env: dict | None = None, args: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", str(data_dir), *args],
            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_health(self.url, self.process)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def server_process(tmp_path):
    """Start real server processes: `server_process(env={...})`; all are stopped at the end."""
    started = []

    def start(env: dict | None = None, args: tuple = (), data_dir: Path | None = None) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / "data", env, args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def require(found, what: str):
    """Something the test needs from the machine: in CI its absence fails, elsewhere it skips."""
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is missing; .ci/run installs it")
        pytest.skip(f"{what} is missing here (CI installs it)")
    return found


NODE_SDK_VERSION = "7.57.0"


@pytest.fixture(scope="session")
def node_sdk():
    """Run a script with the official Node SDK: `node_sdk(source, *args) -> CompletedProcess`.

    The `openai` npm package is installed once per machine into a cache folder (staged, then
    renamed, so an interrupted install is never taken for a finished one); scripts are written
    there so that `import OpenAI from "openai"` (or `require`) resolves.
    """
    node, npm = require(shutil.which("node"), "node"), require(shutil.which("npm"), "npm")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "ozwell-tests" / f"node-openai-{NODE_SDK_VERSION}"
    if not (folder / "node_modules" / "openai" / "package.json").exists():
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "package.json").write_text(
            f'{{"private": true, "dependencies": {{"openai": "{NODE_SDK_VERSION}"}}}}')
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
                                cwd=staging, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"npm install openai@{NODE_SDK_VERSION} failed:\n{result.stderr}")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)

    def run(source: str, *args: str, suffix: str = ".mjs", timeout: float = 60) -> subprocess.CompletedProcess:
        script = folder / f"script-{uuid.uuid4().hex}{suffix}"
        script.write_text(source)
        try:
            return subprocess.run([node, str(script), *args], capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            script.unlink()

    return run


OPENAI_AGENTS_VERSION = "0.24.0"


@pytest.fixture(scope="session")
def openai_agents_python():
    """A Python with openai-agents, in a venv made once per machine in the cache folder
    (staged, then renamed, so an interrupted install is never taken for a finished one).

    openai-agents cannot share the test environment: its MCP dependency needs jsonschema 4.20
    or newer, and the server keeps to 4.17, the last pure-Python line.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "ozwell-tests" / f"openai-agents-{OPENAI_AGENTS_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, timeout=120)
        staged_python = staging / python.relative_to(folder)
        result = subprocess.run([str(staged_python), "-m", "pip", "install", "-q",
                                 f"openai-agents=={OPENAI_AGENTS_VERSION}"],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.fail(f"pip install openai-agents=={OPENAI_AGENTS_VERSION} failed:\n{result.stderr}")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)  # venvs keep absolute paths only in their scripts, not in python
    return python
