"""The command line: settings from flags and environment, `spec`, bad settings, graceful stop."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import ozwell
from conftest import ROOT, free_port, wait_for_health


def run_cli(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, str(ROOT / "ozwell.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_lists_every_setting_with_its_default():
    result = run_cli("--help")
    assert result.returncode == 0
    for field in ozwell.dataclasses.fields(ozwell.Settings):
        assert field.metadata["env"] in result.stdout, field.name
    for shown in ("--host", "--port", "--data-dir", "0.0.0.0", "3000", "./data",
                  "http://localhost:11434/v1", "llama3"):
        assert shown in result.stdout


def test_flags_win_over_environment():
    command, settings = ozwell.settings_from_command_line(
        ["--port", "4000", "--data-dir", "/srv/x"], {"PORT": "5000", "HOST": "127.0.0.1",
                                                      "OZWELL_DATA_DIR": "/srv/y"})
    assert (command, settings.port, settings.host, settings.data_dir) == ("serve", 4000, "127.0.0.1", "/srv/x")


def test_defaults_match_the_reference():
    _, settings = ozwell.settings_from_command_line([], {})
    assert (settings.host, settings.port, settings.data_dir) == ("0.0.0.0", 3000, "./data")
    assert settings.llama_base_url == "http://localhost:11434/v1"
    assert (settings.llama_api_key, settings.llama_models) == ("", ("llama3",))


def test_spec_prints_the_openapi_document_without_network(tmp_path):
    result = run_cli("spec", env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["openapi"] == "3.1.0" and "/v1/models" in document["paths"]


@pytest.mark.parametrize("args, env, says", [
    (("--port", "70000"), {}, "--port 70000 is out of range"),
    (("--port", "abc"), {}, "--port abc is not a whole number"),
    (("--max-request-bytes", "1.5"), {}, "--max-request-bytes 1.5 is not a whole number"),
    (("--keepalive-seconds", "soon"), {}, "--keepalive-seconds soon is not a number"),
    (("--workers", "-1"), {}, "--workers -1 must be 0 (one per CPU) or more"),
    ((), {"PORT": "-1"}, "PORT=-1 is out of range"),
    ((), {"PORT": "a b"}, "PORT='a b' is not a whole number"),
    ((), {"OZWELL_WORKERS": "-2"}, "OZWELL_WORKERS=-2 must be 0"),
    ((), {"OZWELL_MAX_REQUEST_BYTES": "0"}, "OZWELL_MAX_REQUEST_BYTES=0 must be a positive"),
    (("--prot", "3000"), {}, "unknown option --prot (did you mean --port?)"),
    (("--port=3000", "--datadir", "x"), {}, "unknown option --datadir (did you mean --data-dir?)"),
    (("--po", "3000"), {}, "unknown option --po (did you mean --port?)"),
    (("--frobnicate",), {}, "unknown option --frobnicate."),
    (("--port",), {}, "argument --port: expected one argument"),
    (("serv",), {}, "invalid choice: 'serv'"),
    (("--host", "no-such-host.invalid", "--port", "0"), {}, "the host is unknown"),
])
def test_bad_settings_end_in_one_line_and_nonzero_exit(args, env, says):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if args and not env:  # a flag is named as a flag, never as its environment variable
        assert "OZWELL_" not in result.stderr and "PORT=" not in result.stderr
    assert "invalid choice: '3000'" not in result.stderr and "another --port" not in result.stderr


def test_help_table_columns_line_up_whatever_the_names(monkeypatch):
    long_name = dataclasses.field(default=1, metadata={
        "env": "OZWELL_A_SETTING_WITH_A_VERY_LONG_NAME_INDEED", "help": "a long one",
        "parse": int, "flag": True})
    longer = dataclasses.make_dataclass(
        "Longer", [("a_setting_with_a_very_long_name_indeed", int, long_name)],
        bases=(ozwell.Settings,), frozen=True)
    for settings in (ozwell.Settings, longer):
        monkeypatch.setattr(ozwell, "Settings", settings)
        table = ozwell._argument_parser().format_help().split("settings (environment variable")[1]
        rows = {field.name: next(line for line in table.splitlines()
                                 if line.startswith(f"  {field.metadata['env']} "))
                for field in dataclasses.fields(settings)}
        columns = set()
        for field in dataclasses.fields(settings):
            row, env = rows[field.name], field.metadata["env"]
            default = ozwell._shown_default(field.default)
            columns.add((row.index(default, len(env) + 2), row.index(field.metadata["help"])))
        assert len(columns) == 1, columns


def test_data_dir_that_is_a_file_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_cli("--data-dir", str(not_a_dir), "--port", "0")
    assert result.returncode == 2
    assert "is not usable" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line(server_process):
    server = server_process()
    result = run_cli("--host", "127.0.0.1", "--port", str(server.port), "--data-dir",
                     str(ROOT / "data"))
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_in_flight_requests_finish_then_exits_0(server_process, sig):
    server = server_process()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # A request whose body is half sent is in flight until the rest arrives.
        sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Content-Length: 10\r\n\r\n12345")
        time.sleep(0.3)
        server.process.send_signal(sig)
        time.sleep(0.5)
        assert server.process.poll() is None, "exited with a request in flight"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        sock.sendall(b"67890")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 405")
    assert server.process.wait(10) == 0
    log = server.process.stderr.read()
    assert "Traceback" not in log and "stopped" in log


def test_console_script_starts_the_server(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ozwell")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.strip() == f"ozwell {ozwell.__version__}"
    port = free_port()
    process = subprocess.Popen([script, "--host", "127.0.0.1", "--port", str(port), "--data-dir",
                                str(tmp_path / "data")], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
    assert process.wait(10) == 0
