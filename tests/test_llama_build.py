"""build/llama_server.py: a llama.cpp build that runs on any x86-64 host, and a start failure
told in one line with the end of llama-server's log.

(The Llama tier itself, `python build/llama_server.py -- pytest -m llama`, proves the build
serves; these run in the default suite.)
"""
import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def llama_server():
    spec = importlib.util.spec_from_file_location("llama_server", ROOT / "build" / "llama_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_builds_name_their_cpu_level_instead_of_the_build_hosts(llama_server, machine):
    args = llama_server.cmake_args(machine).split()
    assert "-DGGML_NATIVE=OFF" in args
    for level in ("AVX2", "FMA", "F16C"):
        assert f"-DGGML_{level}=ON" in args
    for unsafe in ("AVX512", "AMX_TILE", "AMX_INT8"):
        assert f"-DGGML_{unsafe}=ON" not in args


def test_other_cpus_keep_llama_cpps_own_choice(llama_server):
    assert "GGML_NATIVE" not in llama_server.cmake_args("aarch64")


def test_builds_with_other_flags_are_kept_apart(llama_server, tmp_path, monkeypatch):
    """pip's wheel cache ignores CMAKE_ARGS: the build folder is named after them instead."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = {}
    for args in ("-DA=1", "-DA=2"):
        folder = tmp_path / "ozwell" / llama_server.build_folder_name(args)
        folder.mkdir(parents=True)
        made[args] = llama_server.build_llama_cpp(args)  # found: nothing is built
    assert made["-DA=1"] != made["-DA=2"]


def start_failing(tmp_path, script: str) -> str:
    """Run `script` as a llama-server that fails while starting; return what the tool says."""
    log_path = tmp_path / "llama-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
    return log_path, process


def test_a_crash_at_start_is_one_line_with_the_logs_last_lines(llama_server, tmp_path):
    log_path, process = start_failing(tmp_path, (
        "import os, signal, sys\n"
        "for n in range(40): print(f'load_tensors: layer {n}')\n"
        "print('llama threadpool init, n_threads = 2')\n"
        "sys.stdout.flush()\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"))
    with pytest.raises(SystemExit) as stopped:
        llama_server.wait_until_ready(process, "http://127.0.0.1:9", str(log_path))
    message = str(stopped.value.code)
    assert "\n" not in message
    assert "SIGSEGV" in message and "llama threadpool init, n_threads = 2" in message
    assert "layer 39" in message and "layer 0 " not in message + " "  # only the last lines
    assert str(log_path) in message


def test_an_exit_status_is_named_as_such(llama_server, tmp_path):
    log_path, process = start_failing(tmp_path, "import sys; print('error: unknown argument'); sys.exit(1)")
    with pytest.raises(SystemExit) as stopped:
        llama_server.wait_until_ready(process, "http://127.0.0.1:9", str(log_path))
    message = str(stopped.value.code)
    assert "exited with status 1" in message and "error: unknown argument" in message
