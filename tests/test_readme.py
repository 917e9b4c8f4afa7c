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
    shown = "_empty_" if shown == "" else f"`{shown:g}`" if isinstance(shown, float) else f"`{shown}`"
    assert shown in row
    flag = "--" + field.name.replace("_", "-")
    assert (f"`{flag}`" in row) == field.metadata["flag"]


def _on(server, text: str) -> str:
    return text.replace("http://localhost:3000", server.url).replace("http://127.0.0.1:3000", server.url)


def test_curl_examples_work_as_written(server_process):
    server = server_process()
    for block in code_blocks("bash", "curl "):
        for line in block.strip().splitlines():
            if not line.startswith("curl") or line.endswith("\\"):
                continue
            result = subprocess.run(_on(server, line), shell=True, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, line
            reply = json.loads(result.stdout)
            assert "error" not in reply, (line, reply)


def test_python_examples_work_as_written(server_process):
    server = server_process()
    for block in code_blocks("python", "from openai import OpenAI"):
        result = subprocess.run([sys.executable, "-c", _on(server, block)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_node_examples_work_as_written(server_process, node_sdk):
    server = server_process()
    for block in code_blocks("javascript", 'from "openai"'):
        result = node_sdk(_on(server, block))
        assert result.returncode == 0, result.stderr
