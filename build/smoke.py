"""Start a built ozwell.pyz from an empty folder and check that it serves; used by the tests
and by the release workflows.

    python build/smoke.py build/ozwell.pyz [PYTHON]     # exit 0 when every check passes
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": "Bearer smoke"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.status, reply.read()


def _embedding(url: str, input) -> list[float]:
    body = json.dumps({"model": "text-embedding-3-small", "input": input, "encoding_format": "float"})
    request = urllib.request.Request(f"{url}/v1/embeddings", data=body.encode(), headers={
        "Authorization": "Bearer smoke", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())["data"][0]["embedding"]


def check(pyz: Path, python: str, folder: Path, shiv_root: Path, timeout: float = 60.0) -> None:
    """Copy the pyz into `folder` (empty), run it there with `python`, check the public routes."""
    shutil.copy(pyz, folder / "ozwell.pyz")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SHIV_ROOT": str(shiv_root), "PORT": str(port), "HOST": "127.0.0.1"}
    process = subprocess.Popen([python, "ozwell.pyz"], cwd=folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the pyz exited with {process.returncode}: {process.stderr.read()}")
            try:
                status, body = _get(f"{url}/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer from the pyz within {timeout} s") from None
                time.sleep(0.05)
        assert json.loads(body)["status"] == "ok"
        models = {m["id"] for m in json.loads(_get(f"{url}/v1/models")[1])["data"]}
        assert "ozwell-deterministic" in models, models
        assert json.loads(_get(f"{url}/openapi.json")[1])["openapi"] == "3.1.0"
        assert b"swagger-ui" in _get(f"{url}/docs")[1]
        assert _get(f"{url}/docs/assets/swagger-ui-bundle.js")[0] == 200
        assert (folder / "data").is_dir(), "the default data dir ./data was not made"
        # Token ids are decoded with the cl100k_base vocabulary the pyz carries.
        hello = [_embedding(url, input) for input in ("hello world", [[15339, 1917]])]
        assert hello[0] == hello[1], "token ids did not embed as the text they spell"
    finally:
        process.terminate()
        code = process.wait(10)
    # SIGTERM is a graceful stop (exit 0) on POSIX; Windows' terminate() is a hard kill.
    assert code == 0 or os.name == "nt", f"exit {code}: {process.stderr.read()}"


if __name__ == "__main__":
    pyz = Path(sys.argv[1]).resolve()
    python = sys.argv[2] if len(sys.argv) > 2 else sys.executable
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "run").mkdir()
        check(pyz, python, Path(scratch) / "run", Path(scratch) / "shiv")
    print(f"smoke test passed: {pyz.name} on {python}")
