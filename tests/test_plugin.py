"""The pytest plugin (ozwell_pytest): the tests of this module use the `ozwell` fixture
themselves, and a small downstream project (the README's example among its tests) runs against
the installed plugin in a subprocess, one test at a time and under pytest-xdist."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree
from pathlib import Path

import pytest

import ozwell_pytest
from conftest import served_in_a_thread
from fake_backend import FakeBackend
from test_readme import code_blocks

MODEL = "ozwell-deterministic"
CLOCK = 1767225600  # 2026-01-01T00:00:00Z


def say(client, text, model=MODEL):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content


# --- the fixture, used by this suite ---------------------------------------------------------

def test_a_tests_fixture_answers_its_client_and_the_journal_shows_the_call(ozwell):
    listed = ozwell.add_fixture({"name": "refund", "match": {"user": {"contains": "refund"}},
                                 "reply": {"text": "Refund sent."}})
    assert (listed["source"], listed["used"]) == ("session", 0)
    # A fixture answers before the upstream is called, so a proxied model needs no backend.
    raw = ozwell.client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Where is my refund?"}])
    assert raw.headers["x-ozwell-generator"] == "fixture"
    assert raw.parse().choices[0].message.content == "Refund sent."
    [call] = ozwell.requests(endpoint="chat")
    assert (call["session"], call["fixture"], call["model"], call["status"]) == (
        ozwell.session, "refund", "gpt-4o", 200)
    assert ozwell.requests(endpoint="responses") == []
    assert [(item["name"], item["used"]) for item in ozwell.fixtures()] == [("refund", 1)]


def test_what_a_test_adds_is_its_alone(ozwell, request):
    assert ozwell.session == request.node.nodeid
    ozwell.add_fixture({"match": {"user": {"exact": "ping"}}, "reply": {"text": "pong"}})
    ozwell.add_fault({"type": "error", "calls": 2, "status": 500})
    someone_else = ozwell_pytest.Ozwell(ozwell.server, "another test")
    try:
        assert someone_else.fixtures() == someone_else.faults() == []
        assert say(someone_else.client, "ping") != "pong"
        assert say(ozwell.client, "ping") == "pong"
        assert say(someone_else.client, "ping") != "pong"  # its 2nd call: no fault fires
        assert [call["session"] for call in someone_else.requests()] == ["another test"] * 2
        assert [call["session"] for call in ozwell.requests()] == [ozwell.session]
    finally:
        someone_else.reset()
        someone_else.close()


@pytest.fixture
def left_over(ozwell_server, request):
    """What an earlier run of this very test left in its session."""
    earlier = ozwell_pytest.Ozwell(ozwell_server, request.node.nodeid)
    earlier.add_fixture({"match": {"user": {"exact": "ping"}}, "reply": {"text": "pong"}})
    say(earlier.client, "ping")
    earlier.close()


def test_each_test_starts_its_session_afresh(left_over, ozwell):
    assert [item["source"] for item in ozwell.fixtures()] == []
    assert ozwell.requests() == []
    assert say(ozwell.client, "ping") != "pong"


def test_a_fault_plan_drives_the_sdks_own_retries(ozwell):
    ozwell.add_fault({"type": "error", "calls": "1-2", "status": 429,
                      "headers": {"retry-after-ms": "10", "x-should-retry": "true"}})
    assert say(ozwell.client, "Hello").startswith("You said")  # the SDK retries twice by default
    assert [call["status"] for call in ozwell.requests(endpoint="chat")] == [429, 429, 200]
    [fault] = ozwell.faults()
    assert [fired["call"] for fired in fault["fired"]] == [1, 2]


def test_what_the_server_refuses_raises_value_error_with_its_reason(ozwell):
    with pytest.raises(ValueError, match="ozwell refused POST /_ozwell/fixtures: .*'txt'"):
        ozwell.add_fixture({"match": {"user": {"exact": "hi"}}, "reply": {"txt": "typo"}})
    with pytest.raises(ValueError, match="ozwell refused POST /_ozwell/faults"):
        ozwell.add_fault({"type": "explode"})


@pytest.mark.ozwell(seed="plugin", clock=CLOCK, llama_models=["llama3", "qwen3"])
def test_a_marker_serves_its_test_from_a_server_with_those_settings(ozwell, ozwell_server):
    assert ozwell.server is not ozwell_server
    assert (ozwell.server.settings.seed, ozwell_server.settings.seed) == ("plugin", "")
    assert [model.id for model in ozwell.client.models.list()][-2:] == ["llama3", "qwen3"]
    first = [ozwell.client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Hi"}]) for _ in range(2)]
    assert [reply.created for reply in first] == [CLOCK, CLOCK]
    ozwell.reset()
    again = [ozwell.client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Hi"}]) for _ in range(2)]
    assert [reply.id for reply in again] == [reply.id for reply in first]
    assert first[0].id != first[1].id


@pytest.mark.gen_test
async def test_the_async_client_works_on_the_tests_own_event_loop(ozwell):
    ozwell.add_fixture({"match": {"user": {"exact": "stream"}}, "reply": {"text": "one two three"}})
    stream = await ozwell.async_client.chat.completions.create(
        model=MODEL, stream=True, messages=[{"role": "user", "content": "stream"}])
    assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                    if chunk.choices]) == "one two three"
    assert [call["body"]["stream"] for call in ozwell.requests()] == [True]


def test_importing_the_server_or_the_plugin_costs_nothing_of_the_other():
    probe = ("import sys, {0}; print(sorted(m for m in ('ozwell', 'ozwell_pytest', 'pytest', "
             "'tornado', 'openai') if m in sys.modules))")
    imported = {module: subprocess.run([sys.executable, "-c", probe.format(module)],
                                       capture_output=True, text=True, check=True).stdout.strip()
                for module in ("ozwell", "ozwell_pytest")}
    assert imported == {"ozwell": "['ozwell', 'tornado']",
                        "ozwell_pytest": "['ozwell_pytest', 'pytest']"}


# --- a downstream project, against the installed plugin --------------------------------------

PYTEST_INI = """\
[pytest]
ozwell_data_dir = data
ozwell_seed = downstream
ozwell_fixtures = rigs/greetings.json
"""

GREETINGS = {"fixtures": [{"name": "greeting", "match": {"user": {"exact": "Hello"}},
                           "reply": {"text": "Hello from the ini's fixtures file."}}]}
FAREWELLS = {"fixtures": [{"name": "farewell", "match": {"user": {"exact": "Bye"}},
                           "reply": {"text": "Goodbye from the marker's fixtures file."}}]}

CONFTEST = """\
import json
import os

import pytest


@pytest.fixture
def record(request, ozwell):
    \"\"\"Note where the test ran and what it saw, for the run to be compared with another.\"\"\"
    def write(**facts):
        name = request.node.name.replace("/", "_")
        with open(os.path.join(os.environ["DOWNSTREAM_RECORDS"], f"{name}.json"), "w") as out:
            json.dump({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                       "base_url": ozwell.base_url,
                       "data_dir": ozwell.server.settings.data_dir, **facts}, out)
    return write
"""

SHOP_TESTS = """\
import openai
import pytest


def say(client, text, model="ozwell-deterministic"):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content


def test_the_ini_options_apply(ozwell, record):
    reply = ozwell.client.chat.completions.create(
        model="ozwell-deterministic", messages=[{"role": "user", "content": "Hello"}])
    assert reply.choices[0].message.content == "Hello from the ini's fixtures file."
    record(id=reply.id)


@pytest.mark.parametrize("number", range(6))
def test_each_test_counts_its_own_calls(ozwell, record, number):
    ozwell.add_fault({"type": "error", "calls": 1, "status": 503})
    ozwell.add_fixture({"match": {"user": {"exact": "next"}},
                        "reply": {"sequence": [{"text": f"first {number}"}, {"text": "then"}]}})
    with pytest.raises(openai.InternalServerError):
        say(ozwell.client.with_options(max_retries=0), "next")
    assert [say(ozwell.client, "next") for _ in range(2)] == [f"first {number}", "then"]
    assert [call["status"] for call in ozwell.requests(endpoint="chat")] == [503, 200, 200]
    record()


@pytest.mark.ozwell(fixtures="farewells.json", fixtures_strict=True)
def test_a_marker_gives_the_test_a_server_with_its_settings(ozwell, ozwell_server):
    assert ozwell.server is not ozwell_server
    assert say(ozwell.client, "Bye") == "Goodbye from the marker's fixtures file."
    with pytest.raises(openai.BadRequestError, match="No fixture matches"):
        say(ozwell.client, "Hello")


def test_the_upstream_option_reaches_the_backend(ozwell):
    raw = ozwell.client.chat.completions.with_raw_response.create(
        model="llama3", messages=[{"role": "user", "content": "Hi upstream"}])
    assert raw.headers["x-ozwell-generator"] == "upstream"
    assert raw.parse().choices[0].message.content == "echo: Hi upstream"


@pytest.mark.ozwell(record="recorded.jsonl")
def test_a_marker_records_the_backends_answers_beside_the_test(ozwell):
    assert say(ozwell.client, "Hi recorder", model="llama3") == "echo: Hi recorder"


def test_a_wrong_expectation_fails(ozwell):
    assert say(ozwell.client, "Hello") == "Goodbye"


@pytest.mark.ozwell(fixtures="missing.json")
def test_a_fixtures_file_that_is_not_there(ozwell):
    pass
"""

EXPECTED = {
    "test_the_summary_comes_from_a_fixture": "passed",
    "test_a_rate_limit_is_retried": "passed",
    "test_ids_and_times_are_the_same_in_every_run": "passed",
    "test_the_ini_options_apply": "passed",
    **{f"test_each_test_counts_its_own_calls[{number}]": "passed" for number in range(6)},
    "test_a_marker_gives_the_test_a_server_with_its_settings": "passed",
    "test_the_upstream_option_reaches_the_backend": "passed",
    "test_a_marker_records_the_backends_answers_beside_the_test": "passed",
    "test_a_wrong_expectation_fails": "failure",
    "test_a_fixtures_file_that_is_not_there": "error",
}


@pytest.fixture(scope="module")
def llama():
    with served_in_a_thread(FakeBackend) as fake:
        yield fake


@pytest.fixture
def downstream(tmp_path):
    """A project of its own in a folder of its own: its ini file, conftest, fixtures files
    and tests (the README's example among them). `downstream(*args)` runs its suite in a
    subprocess (from the project's folder, or `cwd`) and returns (each test's outcome and
    message, what each test recorded, pytest's output)."""
    project = tmp_path / "shop"
    (project / "rigs").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "pytest.ini").write_text(PYTEST_INI)
    (project / "conftest.py").write_text(CONFTEST)
    (project / "rigs" / "greetings.json").write_text(json.dumps(GREETINGS))
    (project / "tests" / "farewells.json").write_text(json.dumps(FAREWELLS))
    (project / "tests" / "test_shop.py").write_text(SHOP_TESTS)
    [readme_example] = code_blocks("python", "(ozwell):")
    (project / "tests" / "test_readme_example.py").write_text(readme_example)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "OZWELL_", "LLAMA_"))}

    def run(*args: str, name: str, cwd: str = ".") -> tuple[dict, dict, str]:
        records = tmp_path / f"records-{name}"
        records.mkdir()
        report = tmp_path / f"{name}.xml"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}",
             f"--basetemp={tmp_path / f'basetemp-{name}'}", *args],
            cwd=project / cwd, env={**env, "DOWNSTREAM_RECORDS": str(records)},
            capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output  # some tests fail, on purpose
        recorded = {path.stem: json.loads(path.read_text()) for path in records.iterdir()}
        return _outcomes(report), recorded, output

    return run


def _outcomes(report) -> dict[str, tuple[str, str]]:
    """Each test's name: its outcome (passed, failure, error, skipped) and its message."""
    outcomes = {}
    for case in xml.etree.ElementTree.parse(report).iter("testcase"):
        found = next(iter(case), None)
        if found is None or found.tag in ("system-out", "system-err"):
            outcomes[case.get("name")] = ("passed", "")
        else:
            outcomes[case.get("name")] = (found.tag, found.get("message", ""))
    return outcomes


def test_a_downstream_project_runs_on_the_installed_plugin_alone_and_in_parallel(downstream, llama):
    outcomes, recorded, output = downstream("--ozwell-upstream", llama.url, name="alone")
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == EXPECTED, output
    project = Path(recorded["test_the_ini_options_apply"]["data_dir"]).parent
    assert {facts["data_dir"] for facts in recorded.values()} == {str(project / "data")}
    # A failing assertion is the downstream test's failure, with pytest's own explanation.
    assert "== 'Goodbye'" in outcomes["test_a_wrong_expectation_fails"][1]
    assert "- Goodbye\n" in output and "+ Hello from the ini's fixtures file.\n" in output
    assert "ozwell could not start: fixtures file" in outcomes["test_a_fixtures_file_that_is_not_there"][1]
    assert "cannot be read" in outcomes["test_a_fixtures_file_that_is_not_there"][1]
    cassette = project / "tests" / "recorded.jsonl"
    assert [json.loads(line)["request"]["body"]["messages"][0]["content"]
            for line in cassette.read_text().splitlines()] == ["Hi recorder"]

    # From another folder: the ini file's paths are still read from the ini file's folder.
    parallel, parallel_recorded, output = downstream("--ozwell-upstream", llama.url, "-n", "2",
                                                     name="parallel", cwd="tests")
    assert {name: outcome for name, (outcome, _) in parallel.items()} == EXPECTED, output
    # Both workers ran tests, each against a server and a data dir of its own; a test's seeded
    # ids do not depend on which process ran it.
    counted = [facts for name, facts in parallel_recorded.items() if name.startswith("test_each")]
    assert {facts["worker"] for facts in counted} == {"gw0", "gw1"}
    assert len({facts["base_url"] for facts in counted}) == 2
    assert {(facts["worker"], facts["data_dir"]) for facts in counted} == {
        (worker, str(project / "data" / worker)) for worker in ("gw0", "gw1")}
    assert (parallel_recorded["test_the_ini_options_apply"]["id"]
            == recorded["test_the_ini_options_apply"]["id"])


def test_the_fixture_comes_from_the_installed_plugin(downstream):
    outcomes, _, output = downstream("tests/test_readme_example.py", "-p", "no:ozwell",
                                     name="without")
    assert {outcome for outcome, _ in outcomes.values()} == {"error"}, output
    assert "fixture 'ozwell' not found" in output
