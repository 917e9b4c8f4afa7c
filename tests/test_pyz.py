"""build/ozwell.pyz: built reproducibly, pure Python, and run from an empty folder on 3.11 to 3.13."""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, free_port, require, wait_for_health

sys.path.insert(0, str(ROOT / "build"))
import pyz  # noqa: E402  (build/pyz.py, the one build command)

SUPPORTED = ("3.11", "3.12", "3.13")


def find_python(version: str) -> str | None:
    """An interpreter that really is Python `version`: pyenv's newest, or python3.X on PATH."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"),
                        key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).parts[-3])], reverse=True)
    candidates.append(shutil.which(f"python{version}"))
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)  # pyenv's shims may refuse
        if check.returncode == 0 and check.stdout.strip() == version:
            return candidate
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return pyz.build(tmp_path_factory.mktemp("pyz") / "ozwell.pyz")


def test_build_is_pure_python_and_reproducible(built, tmp_path):
    with zipfile.ZipFile(built) as archive:
        names = archive.namelist()
    assert "site-packages/ozwell.py" in names
    assert any(n.startswith("site-packages/ozwell_schemas/") and n.endswith(".json") for n in names)
    assert any(n.startswith("site-packages/swagger_ui_bundle/") and n.endswith("swagger-ui-bundle.js")
               for n in names)
    assert not [n for n in names if n.endswith(pyz.COMPILED_SUFFIXES)]
    again = pyz.build(tmp_path / "again.pyz")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(built.read_bytes()).digest()


def _get(url: str):
    with urllib.request.urlopen(urllib.request.Request(
            url, headers={"Authorization": "Bearer k"}), timeout=10) as reply:
        return reply.status, reply.read()


def test_runs_from_an_empty_folder_on_every_supported_python(built, tmp_path):
    found = {version: find_python(version) for version in SUPPORTED}
    missing = [version for version, path in found.items() if not path]
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"CI must test the pyz on every supported Python; missing: {missing}")
    require([v for v in found.values() if v], "a Python 3.11 to 3.13")
    tried = []
    for version, python in found.items():
        if not python:
            continue
        folder = tmp_path / version
        folder.mkdir()
        shutil.copy(built, folder / "ozwell.pyz")
        port = free_port()
        env = {**os.environ, "SHIV_ROOT": str(tmp_path / "shiv"), "PORT": str(port), "HOST": "127.0.0.1"}
        process = subprocess.Popen([python, "ozwell.pyz"], cwd=folder, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_health(url, process, timeout=60)
            assert json.loads(_get(f"{url}/health")[1])["status"] == "ok"
            assert "ozwell-deterministic" in {m["id"] for m in json.loads(_get(f"{url}/v1/models")[1])["data"]}
            assert json.loads(_get(f"{url}/openapi.json")[1])["openapi"] == "3.1.0"
            assert b"swagger-ui" in _get(f"{url}/docs")[1]
            assert _get(f"{url}/docs/assets/swagger-ui-bundle.js")[0] == 200
            assert (folder / "data").is_dir()  # the default ./data, beside where it runs
        finally:
            process.terminate()
            assert process.wait(10) == 0, process.stderr.read()
        tried.append(version)
    print(f"pyz ran on Python {', '.join(tried)}; missing here: {', '.join(missing) or 'none'}")


def test_spec_command_from_the_pyz(built, tmp_path):
    python = require(find_python("3.11") or find_python("3.12") or find_python("3.13"), "Python 3.11+")
    result = subprocess.run([python, str(built), "spec"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SHIV_ROOT": str(tmp_path / "shiv")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "/v1/models" in json.loads(result.stdout)["paths"]


def test_an_older_python_gets_one_line(built, tmp_path):
    old = require(find_python("3.10") or find_python("3.9"), "a Python older than 3.11")
    result = subprocess.run([old, str(built), "--version"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SHIV_ROOT": str(tmp_path / "shiv")})
    assert result.returncode != 0
    assert result.stderr.strip().startswith("ozwell needs Python 3.11 or newer")
    assert len(result.stderr.strip().splitlines()) == 1
