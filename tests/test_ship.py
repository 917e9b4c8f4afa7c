"""What ships besides the code: the Dockerfile and the GitHub workflows.

There is no Docker engine on our machines, so the image is checked as far as it can be without
one: the Dockerfile's instructions, its build stage re-enacted in an empty folder holding only
what it copies, and its HEALTHCHECK run against the pyz that stage makes, configured the way
the image configures it.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, free_port, wait_for_health


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, argument in dockerfile_instructions():
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, argument))
    return result


def test_dockerfile_uses_slim_official_python_and_a_non_root_user():
    known = {"FROM", "RUN", "COPY", "WORKDIR", "USER", "ENV", "VOLUME", "EXPOSE", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "ARG", "LABEL"}
    assert {keyword for keyword, _ in dockerfile_instructions()} <= known
    for stage in stages():
        assert re.fullmatch(r"python:3\.1[1-3]-slim( AS \w+)?", stage[0][1]), stage[0][1]
    final = dict(stages()[-1])
    assert final["USER"] not in ("root", "0")
    assert json.loads(final["VOLUME"]) == ["/data"]
    assert "OZWELL_DATA_DIR=/data" in final["ENV"] and "PORT=3000" in final["ENV"]
    assert not re.search(r"\b(curl|wget)\b", final["HEALTHCHECK"])
    assert json.loads(final["ENTRYPOINT"])[-1].endswith("ozwell.pyz")


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for keyword, argument in dockerfile_instructions():
        if keyword == "COPY" and not argument.startswith("--from"):
            for source in shlex.split(argument)[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored


def test_build_stage_works_from_only_what_it_copies_and_the_healthcheck_passes(tmp_path):
    context = tmp_path / "src"
    context.mkdir()
    build_stage = stages()[0]
    for keyword, argument in build_stage:
        if keyword == "COPY":
            *sources, target = shlex.split(argument)
            for source in sources:
                destination = context / target / Path(source).name if target.endswith("/") else context / target
                destination.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-r", str(ROOT / source), str(destination)], check=True)
    assert ("RUN", "python build/pyz.py") in build_stage
    subprocess.run([sys.executable, "build/pyz.py"], cwd=context, check=True, capture_output=True)

    final = dict(stages()[-1])
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "OZWELL_DATA_DIR": str(tmp_path / "data"),
           "SHIV_ROOT": str(tmp_path / "shiv")}
    server = subprocess.Popen([sys.executable, str(context / "build" / "ozwell.pyz")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", server, timeout=60)
        healthcheck = json.loads(final["HEALTHCHECK"].split("CMD", 1)[1])
        assert healthcheck[0] == "python"
        assert subprocess.run([sys.executable, *healthcheck[1:]], env=env, timeout=30).returncode == 0
    finally:
        server.terminate()
        server.wait(10)
    assert (tmp_path / "data").is_dir()


def load_workflow(name: str) -> dict:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    # YAML 1.1 reads the key `on` as true.
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    for job in workflow["jobs"].values():
        assert "runs-on" in job and job["steps"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
    return workflow


def test_ci_workflow_tests_every_python_on_every_os_and_smoke_tests_the_pyz():
    workflow = load_workflow("ci.yml")
    assert set(workflow["on"]) == {"push", "pull_request"}
    matrix = workflow["jobs"]["test"]["strategy"]["matrix"]
    assert set(matrix["os"]) == {"ubuntu-latest", "macos-latest", "windows-latest"}
    assert matrix["python"] == ["3.11", "3.12", "3.13"]
    runs = " ".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    assert "build/pyz.py" in runs and "build/smoke.py" in runs and "bash .ci/run" in runs


def test_release_workflow_attaches_the_pyz_with_a_checksum_and_pushes_two_architectures():
    workflow = load_workflow("release.yml")
    assert workflow["on"] == {"push": {"tags": ["v*"]}}
    runs = " ".join(step.get("run", "") for step in workflow["jobs"]["pyz"]["steps"])
    assert "sha256sum ozwell.pyz" in runs and "gh release upload" in runs and "ozwell.pyz.sha256" in runs
    push = next(step for step in workflow["jobs"]["image"]["steps"]
                if step["uses"].startswith("docker/build-push-action"))
    assert push["with"]["platforms"] == "linux/amd64,linux/arm64" and push["with"]["push"] is True
