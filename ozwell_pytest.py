"""Ozwell's pytest plugin: the `ozwell` fixture, an OpenAI-compatible test double per test.

A module of its own because pytest loads it (through the `pytest11` entry point that installing
the package registers) and the server must never import pytest: the pyz runs without it. It
imports the server, Tornado and the OpenAI SDK only when a test first asks for the fixture, so
a pytest run that does not use it pays for nothing but this file.

The server runs in the test process, on its own thread and event loop, one per pytest process
(each pytest-xdist worker has its own) and per distinct settings; each test is a session of
its own (`x-ozwell-session`: the test's node id), so its fixtures, faults, counts, journal and
seeded ids are its alone.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

SESSION_HEADER = "x-ozwell-session"
# The settings the options and the marker may give, by their option names (marker keywords may
# also name any other setting, such as `clock` or `fixtures_strict`).
OPTIONS = {
    "data_dir": ("data_dir", "data dir of the server (default: a new folder per pytest run)"),
    "upstream": ("llama_base_url", "the Llama backend's URL (LLAMA_BASE_URL)"),
    "seed": ("seed", "seed of every id (OZWELL_SEED; empty: random ids)"),
    "clock": ("clock", "fixed created/created_at (OZWELL_CLOCK: Unix seconds, ISO 8601, start)"),
    "fixtures": ("fixtures", "fixtures file loaded by the server (OZWELL_FIXTURES)"),
}
# Settings that name a file or folder: a relative one is read from where it was given.
PATH_SETTINGS = ("data_dir", "fixtures", "record", "replay")
# Where and how the plugin's servers listen: not the test's to choose.
FIXED = {"host": "127.0.0.1", "port": 0, "workers": 1, "ready_file": ""}
DEFAULT_API_KEY = "test"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ozwell", "Ozwell, the OpenAI-compatible test double (the `ozwell` fixture)")
    for option, (_, help) in OPTIONS.items():
        group.addoption(f"--ozwell-{option.replace('_', '-')}", dest=f"ozwell_{option}",
                        metavar=option.upper(), help=help)
        parser.addini(f"ozwell_{option}", help)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ozwell(**settings): serve this test from an Ozwell server with these "
        "settings (data_dir, upstream, seed, clock, fixtures, or any other Settings field)")


class Server:
    """One Ozwell application served on a free port of 127.0.0.1 by a thread of this process
    with its own event loop, until `stop()`."""

    def __init__(self, settings: Any) -> None:
        import tornado.netutil

        self.settings = settings
        self.api_key = settings.api_keys[0] if settings.api_keys else DEFAULT_API_KEY
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sockets,),
                                        name=f"ozwell:{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def _run(self, sockets: list) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(sockets))
        finally:
            unfinished = asyncio.all_tasks(self._loop)  # background responses, for instance
            for task in unfinished:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
            self._loop.close()
            for sock in sockets:
                sock.close()

    async def _serve(self, sockets: list) -> None:
        import ozwell

        try:
            ozwell.ensure_data_dir(self.settings.data_dir)
            app = ozwell.make_app(self.settings)
            server = ozwell.HTTPServer(app, max_body_size=self.settings.max_request_bytes)
            server.add_sockets(sockets)
        except BaseException as exc:
            self._failure = exc
            return
        finally:
            self._stopping = asyncio.Event()
            self._started.set()
        await self._stopping.wait()
        server.stop()
        await server.close_all_connections()
        app.settings["ozwell"].upstream.close()  # a cassette being recorded is synced

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)


class Servers:
    """The servers of this pytest process, started on first use, one per distinct settings,
    stopped when the run ends."""

    def __init__(self, config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._config = config
        self._tmp_path_factory = tmp_path_factory
        self._started: dict[tuple, Server | Exception] = {}

    def get(self, marked: dict[str, tuple[Any, str]]) -> Server:
        """The server for the options' settings with the marker's on top: each a Settings
        field's name and (its value, how it was given: `--ozwell-seed s1`)."""
        wanted = {**self._from_options(), **marked}
        key = tuple(sorted((name, repr(value)) for name, (value, _) in wanted.items()))
        if key not in self._started:
            try:
                self._started[key] = Server(self._settings(wanted))
            except Exception as exc:  # every test asking for it fails the same way
                self._started[key] = exc
        found = self._started[key]
        if isinstance(found, Exception):
            import ozwell

            if isinstance(found, ozwell.SettingsError):
                pytest.fail(f"ozwell could not start: {found}", pytrace=False)
            raise found
        return found

    def _from_options(self) -> dict[str, tuple[Any, str]]:
        """The settings given on the command line, or else in the ini file; a relative path is
        taken from where pytest was started, or from the ini file's folder."""
        given = {}
        config = self._config
        for option, (field, _) in OPTIONS.items():
            value = config.getoption(f"ozwell_{option}")
            named, base = f"--ozwell-{option.replace('_', '-')} {value}", config.invocation_params.dir
            if value is None:
                value = config.getini(f"ozwell_{option}") or None
                named = f"ozwell_{option} = {value}"
                base = config.inipath.parent if config.inipath else config.rootpath
            if value is not None:
                given[field] = (str(base / value) if field in PATH_SETTINGS else value, named)
        return given

    def _settings(self, wanted: dict[str, tuple[Any, str]]) -> Any:
        """Settings from the environment, as the server reads it, then `wanted` on top; a value
        given as text is read as the server reads its flags."""
        import ozwell

        fields = {field.name: field for field in dataclasses.fields(ozwell.Settings)}
        values = {name: _setting_value(fields[name], value, named)
                  for name, (value, named) in wanted.items()}
        if "data_dir" not in values:
            values["data_dir"] = str(self._tmp_path_factory.mktemp("ozwell-data"))
        elif os.environ.get("PYTEST_XDIST_WORKER"):  # workers never share a data dir
            values["data_dir"] = os.path.join(values["data_dir"], os.environ["PYTEST_XDIST_WORKER"])
        return ozwell.Settings.from_environment(os.environ, **values, **FIXED)

    def stop(self) -> None:
        for server in self._started.values():
            if isinstance(server, Server):
                server.stop()


def _setting_value(field: dataclasses.Field, value: Any, named: str) -> Any:
    """A setting's value given as the field's own type, or else read as the server reads the
    same text from its command line (`clock=1767225600`, `llama_models=["a", "b"]`); `named`
    says how it was given, for the message when it cannot be read."""
    import ozwell

    if isinstance(value, type(field.default)) and not isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return ozwell.parse_setting(field, str(value), named)


@pytest.fixture(scope="session")
def ozwell_servers(pytestconfig: pytest.Config,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Every Ozwell server of this pytest process (one per distinct settings)."""
    servers = Servers(pytestconfig, tmp_path_factory)
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def ozwell_server(ozwell_servers: Servers) -> Server:
    """The Ozwell server with the options' settings, for the whole run: `url`, `base_url`,
    `api_key`, `settings`."""
    return ozwell_servers.get({})


@pytest.fixture
def ozwell(request: pytest.FixtureRequest, ozwell_servers: Servers) -> Iterator[Ozwell]:
    """An Ozwell server's API for this test alone: `base_url`, `client`, `async_client`,
    `add_fixture()`, `add_fault()`, `requests()`, ..."""
    server = ozwell_servers.get(_marker_settings(request.node))
    handle = Ozwell(server, _session_name(request.node.nodeid))
    handle.reset()  # a test run again (or rerun) starts as the first time
    yield handle
    handle.close()


def _marker_settings(node: pytest.Item) -> dict[str, tuple[Any, str]]:
    """The `ozwell` markers' settings, the closest winning; a relative path is taken from the
    test file's folder."""
    import ozwell

    fields = {field.name for field in dataclasses.fields(ozwell.Settings)} - set(FIXED)
    settings: dict[str, tuple[Any, str]] = {}
    for marker in reversed(list(node.iter_markers("ozwell"))):
        if marker.args:
            raise pytest.UsageError("@pytest.mark.ozwell takes keywords only, such as "
                                    "@pytest.mark.ozwell(seed='s1')")
        for name, value in marker.kwargs.items():
            field = OPTIONS[name][0] if name in OPTIONS else name
            if field not in fields:
                raise pytest.UsageError(f"@pytest.mark.ozwell: {name!r} is not a setting; use "
                                        f"{', '.join(OPTIONS)} or a field of ozwell.Settings")
            named = f"@pytest.mark.ozwell({name}={value!r})"
            settings[field] = (str(node.path.parent / value) if field in PATH_SETTINGS else value, named)
    return settings


def _session_name(nodeid: str) -> str:
    """The test's node id as a session name: the same in every run and on every xdist worker
    (seeded ids depend on it), printable ASCII, at most 200 characters."""
    name = "".join(c if c.isprintable() else "?" for c in nodeid.encode("ascii", "backslashreplace").decode())
    if len(name) > 200:
        name = f"{name[:183]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


class Ozwell:
    """What a test gets from the `ozwell` fixture: the server's address and clients that send
    the test's session, and its test rig (fixtures, faults, journal) for this test only."""

    def __init__(self, server: Server, session: str) -> None:
        self.server = server
        self.session = session
        self.base_url = server.base_url
        self.api_key = server.api_key
        self.headers = {SESSION_HEADER: session}

    @functools.cached_property
    def client(self) -> Any:
        """The official SDK's `openai.OpenAI`, in this test's session."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key,
                             default_headers=self.headers)

    @functools.cached_property
    def async_client(self) -> Any:
        """The official SDK's `openai.AsyncOpenAI`, in this test's session. It keeps no
        connection open between requests, so it works on whatever event loop the test runs
        and leaves nothing to close once that loop has gone."""
        import httpx
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, default_headers=self.headers,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_keepalive_connections=0)))

    def add_fixture(self, fixture: dict[str, Any]) -> dict[str, Any]:
        """Add a fixture (tried before the fixtures file's); returns it as listed."""
        return self._control("POST", "fixtures", fixture)

    def add_fault(self, fault: dict[str, Any]) -> dict[str, Any]:
        """Add a fault to the plan (tried before the fixtures file's); returns it as listed."""
        return self._control("POST", "faults", fault)

    def fixtures(self) -> list[dict[str, Any]]:
        """The fixtures this test's requests are tried against, with their use counts."""
        return self._control("GET", "fixtures")["data"]

    def faults(self) -> list[dict[str, Any]]:
        """The fault plan, with the calls each fault fired on."""
        return self._control("GET", "faults")["data"]

    def requests(self, endpoint: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """The journal of this test's requests under /v1, oldest first (`endpoint`: chat,
        responses, embeddings, files, models)."""
        query = urllib.parse.urlencode({key: value for key, value in
                                        (("endpoint", endpoint), ("model", model)) if value})
        return self._control("GET", f"requests?{query}" if query else "requests")["data"]

    def reset(self) -> None:
        """Forget this test's fixtures, faults, counts, journal and id counters."""
        self._control("POST", "reset")

    def close(self) -> None:
        if "client" in self.__dict__:
            self.client.close()

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.server.url}/_ozwell/{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={**self.headers, "Authorization": f"Bearer {self.api_key}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            with exc:
                message = json.load(exc).get("error", {}).get("message", exc.reason)
            raise ValueError(f"ozwell refused {method} /_ozwell/{path}: {message}") from None

