"""README.md says what is true: its settings table and its examples, run as written."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest

import ozwell
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def code_blocks(language: str, containing: str) -> list[str]:
    return [block for block in re.findall(rf"```{language}\n(.*?)```", README, re.S) if containing in block]


def test_fresh_machine_commands_are_the_ones_ci_runs():
    run_command, test_command = code_blocks("bash", "python3 -m venv")[:2]
    assert ".venv/bin/ozwell" in run_command
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("field", dataclasses.fields(ozwell.Settings), ids=lambda f: f.name)
def test_settings_table_lists_every_setting_with_its_default(field):
    row = next((line for line in README.splitlines() if line.startswith(f"| `{field.metadata['env']}`")), None)
    assert row, f"README's configuration table lacks {field.metadata['env']}"
    default = field.default
    shown = ",".join(default) if isinstance(default, tuple) else default
    shown = str(shown).lower() if isinstance(shown, bool) else shown
    shown = "_empty_" if shown == "" else f"`{shown:g}`" if isinstance(shown, float) else f"`{shown}`"
    assert shown in row
    flag = "--" + field.name.replace("_", "-")
    assert (f"`{flag}`" in row) == field.metadata["flag"]


def _on(server, text: str) -> str:
    return text.replace("http://localhost:3000", server.url).replace("http://127.0.0.1:3000", server.url)


# Lines of the README's shell blocks that set up or start things rather than call the API.
NOT_AN_API_CALL = ("python3 ", "export ", "docker ", "apt-get ", ".venv/", "ozwell", "ollama ", "npm ")


def shell_commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.strip().splitlines()
            if line and not line.startswith("#") and not line.startswith(NOT_AN_API_CALL)]


def test_shell_and_python_examples_work_as_written_in_order(server_process, tmp_path):
    """Every curl and Python example, in README order, in one folder (later ones may use files
    earlier ones wrote)."""
    server = server_process()
    for language, block in re.findall(r"```(bash|python)\n(.*?)```", README, re.S):
        if language == "python" and "from openai import OpenAI" in block:
            result = subprocess.run([sys.executable, "-c", _on(server, block)], capture_output=True,
                                    text=True, timeout=60, cwd=tmp_path)
            assert result.returncode == 0, (block, result.stderr)
        elif language == "bash" and "curl " in block:
            for command in shell_commands(block):
                result = subprocess.run(_on(server, command), shell=True, capture_output=True,
                                        text=True, timeout=30, cwd=tmp_path)
                assert result.returncode == 0, command
                if command.startswith("curl"):
                    _assert_api_answer(command, result.stdout)


def _assert_api_answer(command: str, output: str) -> None:
    if output.startswith(("data:", "event:")):  # a stream
        assert '"error"' not in output, (command, output[:300])
        return
    if command.split()[2].endswith("/metrics"):  # Prometheus' text
        assert output.startswith("# HELP ozwell_"), (command, output[:300])
        return
    reply = json.loads(output)
    assert reply.get("error") is None, (command, reply)


def test_node_examples_work_as_written(server_process, node_sdk):
    server = server_process()
    for block in code_blocks("javascript", 'from "openai"'):
        result = node_sdk(_on(server, block))
        assert result.returncode == 0, result.stderr


def test_no_tracked_file_holds_a_merge_conflict_marker():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    marked = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.startswith((b"<<<<<<< ", b">>>>>>> ")) or line == b"=======":
                marked.append(f"{name}:{number}")
    assert not marked, f"merge-conflict markers at {', '.join(marked)}"
