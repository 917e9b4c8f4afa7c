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
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jsonschema
import jsonschema.exceptions
import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.web

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "BaseHandler",
    "EventStream",
    "HashedEmbedder",
    "Settings",
    "SettingsError",
    "SchemaRegistry",
    "OFFLINE_MODEL",
    "build_openapi",
    "count_tokens",
    "deterministic_reply",
    "embedding_words",
    "main",
    "make_app",
    "tokenize",
    "write_atomically",
]

log = logging.getLogger("ozwell")

MiB = 1024 * 1024


# =============================================================================
# Settings
# =============================================================================

def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _setting(default: Any, env: str, help: str, parse=str, flag: bool = True):
    """A setting: its environment variable, its parser, and its line in --help."""
    return dataclasses.field(
        default=default, metadata={"env": env, "help": help, "parse": parse, "flag": flag})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the server is configured with; built once, handed to make_app()."""

    host: str = _setting("0.0.0.0", "HOST", "address to listen on")
    port: int = _setting(3000, "PORT", "port to listen on (0 picks a free one)", int)
    data_dir: str = _setting("./data", "OZWELL_DATA_DIR", "where files and stored responses live")
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
    keepalive_seconds: float = _setting(
        15.0, "OZWELL_KEEPALIVE_SECONDS", "idle seconds before a `: keep-alive` line on a stream",
        float)
    stream_tokens_per_second: float = _setting(
        0.0, "OZWELL_STREAM_TOKENS_PER_SECOND",
        "pace of the built-in model's streams (0: as fast as possible)", float)
    max_upload_bytes: int = _setting(
        512 * MiB, "OZWELL_MAX_UPLOAD_BYTES", "largest file upload, in bytes", int)
    shutdown_grace_seconds: float = _setting(
        30.0, "OZWELL_SHUTDOWN_GRACE", "on SIGTERM, how long in-flight requests may finish", float)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Environment first, then `overrides` (the flags) on top."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(field.metadata["env"])
            if raw is not None and raw != "":
                values[field.name] = _parse_setting(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is out of range: use 0 to 65535")
        if self.max_request_bytes < 1:
            raise SettingsError("OZWELL_MAX_REQUEST_BYTES must be a positive number of bytes")


class SettingsError(Exception):
    """A setting that cannot work; main() prints it in one line and exits non-zero."""


def _parse_setting(field: dataclasses.Field, raw: str) -> Any:
    try:
        return field.metadata["parse"](raw)
    except ValueError:
        raise SettingsError(
            f"{field.metadata['env']}={raw!r} is not valid for {field.name}") from None


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ozwell",
        description="An OpenAI-compatible API server. Flags win over environment variables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_table())
    parser.add_argument("command", nargs="?", choices=("serve", "spec"), default="serve",
                        help="serve (default) or spec: print the OpenAPI document and exit")
    parser.add_argument("--version", action="version", version=f"ozwell {__version__}")
    for field in dataclasses.fields(Settings):
        if field.metadata["flag"]:
            parser.add_argument(
                "--" + field.name.replace("_", "-"), dest=field.name, default=None,
                metavar=field.metadata["env"],
                help=f"{field.metadata['help']} (env {field.metadata['env']}, "
                     f"default {_shown_default(field.default)})")
    return parser


def _shown_default(value: Any) -> str:
    if isinstance(value, tuple):
        value = ",".join(value)
    return repr(value) if value == "" else str(value)


def _settings_table() -> str:
    rows = [f"  {f.metadata['env']:<26} {_shown_default(f.default):<28} {f.metadata['help']}"
            for f in dataclasses.fields(Settings)]
    return "settings (environment variable, default, meaning):\n" + "\n".join(rows)


def settings_from_command_line(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, Settings]:
    args = _argument_parser().parse_args(argv)
    flags = {}
    for field in dataclasses.fields(Settings):
        raw = getattr(args, field.name, None)
        if raw is not None:
            flags[field.name] = _parse_setting(field, raw)
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


# =============================================================================
# Schemas
# =============================================================================

SCHEMA_PACKAGE = "ozwell_schemas"


class SchemaRegistry:
    """Every JSON Schema in `schemas/`, by name; validates requests and feeds /openapi.json.

    A schema refers to another by file name (`{"$ref": "Error.json"}`), which is both how
    jsonschema resolves it here and what build_openapi() rewrites into a component reference.
    """

    def __init__(self, schemas: Mapping[str, dict]) -> None:
        self.schemas = dict(schemas)
        store = {f"{name}.json": schema for name, schema in self.schemas.items()}
        self._validators = {
            name: jsonschema.Draft202012Validator(
                schema, resolver=jsonschema.RefResolver(f"{name}.json", schema, store=store))
            for name, schema in self.schemas.items()}

    @classmethod
    def load(cls) -> SchemaRegistry:
        found = {}
        for entry in importlib.resources.files(SCHEMA_PACKAGE).iterdir():
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                found[entry.name[:-len(".json")]] = json.loads(entry.read_text(encoding="utf-8"))
        return cls(found)

    def errors(self, name: str, instance: Any) -> Iterator[jsonschema.exceptions.ValidationError]:
        return self._validators[name].iter_errors(instance)

    def validate(self, name: str, instance: Any) -> None:
        """Raise a 400 APIError naming the first offending field, as OpenAI does."""
        error = jsonschema.exceptions.best_match(self.errors(name, instance))
        if error is not None:
            raise _api_error_from_validation(error)


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
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        message = (f"Invalid value for {where}: {json.dumps(error.instance)}. "
                   f"Supported values are: {allowed}.")
        return APIError(400, message, param=param, code="invalid_value")
    if error.validator == "const":
        message = (f"Invalid value for {where}: {json.dumps(error.instance)}. "
                   f"It must be {json.dumps(error.validator_value)}.")
        return APIError(400, message, param=param, code="invalid_value")
    if error.validator in ("minItems", "maxItems", "minLength", "maxLength"):
        return _length_error(error, where, param)
    if error.validator == "additionalProperties":
        return APIError(400, f"Invalid parameter in {where}: {error.message}.", param=param,
                        code="unknown_parameter")
    return APIError(400, f"Invalid value for {where}: {error.message}.", param=param,
                    code="invalid_value")


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


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old bytes or the new, never a mix.

    Written to a temporary file beside it, fsynced, then renamed over it; the directory is
    fsynced too (on POSIX) so the rename itself survives a crash.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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


def tokenize(text: str) -> list[str]:
    return TOKEN_PATTERN.findall(text)


def count_tokens(text: str) -> int:
    return sum(1 for _ in TOKEN_PATTERN.finditer(text))


_VOCABULARY = (
    "steady", "signal", "harbor", "lantern", "river", "quiet", "answer", "orbit", "meadow",
    "copper", "window", "thread", "summit", "kettle", "ember", "compass", "garden", "ledger",
    "willow", "beacon", "canvas", "marble", "pepper", "violet", "tunnel", "feather", "island",
    "rocket", "saddle", "timber", "velvet", "anchor", "bridge", "candle", "dragon", "forest",
)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the offline model says: its tokens, why it stopped, and what it read."""

    tokens: tuple[str, ...]
    finish_reason: str          # "stop", or "length" when max_tokens cut it short
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def _seed_words(seed: bytes, count: int) -> Iterator[str]:
    """Words picked by SHA-256 in counter mode: identical on every platform and Python."""
    for counter in range(count):
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        yield _VOCABULARY[int.from_bytes(digest[:4], "big") % len(_VOCABULARY)]


def deterministic_reply(model: str, conversation: Sequence[tuple[str, str]],
                        max_tokens: int | None = None, variant: int = 0) -> Generation:
    """The offline model: the same (model, conversation, max_tokens, variant) gives the same text.

    `conversation` is (role, text) pairs, instructions included. The reply quotes the last user
    turn, so different prompts give visibly different answers; `variant` tells apart the n
    choices of one chat request.
    """
    seed = hashlib.sha256(json.dumps([model, list(conversation), variant]).encode()).digest()
    last_user = next((text for role, text in reversed(conversation) if role == "user"), "")
    quoted = " ".join(last_user.split())
    if len(quoted) > 160:
        quoted = quoted[:157].rstrip() + "..."
    length = 12 + seed[0] % 13
    words = list(_seed_words(seed, length))
    sentence = " ".join(words).capitalize()
    text = (f'You said: "{quoted}". ' if quoted else "") + (
        f"Here is a deterministic answer from {model} (turn {len(conversation)}): {sentence}.")
    tokens = tokenize(text)
    finish_reason = "stop"
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish_reason = tokens[:max_tokens], "length"
    prompt_tokens = sum(count_tokens(text) for _, text in conversation)
    return Generation(tuple(tokens), finish_reason, prompt_tokens)


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


# =============================================================================
# SSE helpers
# =============================================================================

class EventStream:
    """Server-sent events on one response.

    Each event is written and flushed at once; awaiting the flush is the backpressure, so a
    slow client slows whoever produces the events. While nothing is sent for
    `keepalive_seconds`, a `: keep-alive` comment goes out: an empty `data:` line would crash
    the SDKs' parsers. Once open, the status is sent and cannot change: later errors go
    inside the stream (`send_error`).
    """

    def __init__(self, handler: tornado.web.RequestHandler, keepalive_seconds: float) -> None:
        self.handler = handler
        self.keepalive_seconds = keepalive_seconds
        self.is_open = False
        self._last_write = time.monotonic()
        self._keepalive: asyncio.Task | None = None

    async def open(self) -> None:
        self.handler.set_status(200)
        self.handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.handler.set_header("Cache-Control", "no-cache")
        self.handler.set_header("X-Accel-Buffering", "no")
        self.is_open = True
        await self._write("")
        if self.keepalive_seconds > 0:
            self._keepalive = asyncio.create_task(self._keep_alive())

    async def send(self, data: Any, event: str | None = None) -> None:
        """One event: `data` is JSON-encoded unless it is already a string (`[DONE]`)."""
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                             ensure_ascii=False)
        await self._write((f"event: {event}\n" if event else "") + f"data: {text}\n\n")

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
        await self.handler.flush()

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

    def close(self) -> None:
        """Stop the keep-alives and finish the response (if the client is still there)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if not self.handler._finished:
            try:
                self.handler.finish()
            except tornado.iostream.StreamClosedError:
                pass  # the client left; there is nobody to finish for


# =============================================================================
# Upstream client
# =============================================================================


# =============================================================================
# Base handler
# =============================================================================

@dataclasses.dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Operation:
    """What one verb of one handler does, as /openapi.json tells it.

    `request` and `response` name schemas in `schemas/`; `stream` names the schema of one
    server-sent event when the operation can answer with `text/event-stream` instead.
    """

    summary: str
    tag: str
    response: str | None = None
    request: str | None = None
    stream: str | None = None
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
        self.in_flight = 0
        self.openapi: dict[str, Any] = {}
        self.embedders = {
            model: HashedEmbedder(model, size, resizable=model not in FIXED_SIZE_EMBEDDING_MODELS)
            for model, size in EMBEDDING_MODELS.items()}

    def models(self) -> list[dict[str, Any]]:
        owners = dict(LOCAL_MODELS)
        for model_id in self.settings.llama_models:
            owners.setdefault(model_id, "llama")
        return [{"id": model_id, "object": "model", "created": MODELS_CREATED_AT,
                 "owned_by": owner} for model_id, owner in owners.items()]


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

    def initialize(self, context: Context) -> None:
        self.context = context
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._counted = False

    def set_default_headers(self) -> None:
        # Called by the constructor, before initialize(), and again when an error clears
        # the response: the id is made once and kept.
        if not hasattr(self, "request_id"):
            self.request_id = "req_" + uuid.uuid4().hex
        self.set_header("x-request-id", self.request_id)
        self.set_header("Content-Type", "application/json")
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Access-Control-Expose-Headers", "x-request-id")

    def prepare(self) -> None:
        self.context.in_flight += 1
        self._counted = True
        if self.request.method == "OPTIONS":
            return
        self._limit_body()
        if self.requires_auth:
            self._authenticate()

    def on_finish(self) -> None:
        if self._counted:
            self.context.in_flight -= 1
            self._counted = False

    def on_connection_close(self) -> None:
        self.on_finish()

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
        allowed = self.context.settings.api_keys
        if allowed and token not in allowed:
            shown = token[:3] + "*" * 4 + token[-4:] if len(token) > 8 else "*" * len(token)
            raise APIError(401, f"Incorrect API key provided: {shown}. The server accepts only "
                                "the keys listed in OZWELL_API_KEYS.", code="invalid_api_key")

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._body_size += len(chunk)
        if self._body_size <= self.body_limit():
            self._body_parts.append(chunk)

    @functools.cached_property
    def payload(self) -> dict[str, Any]:
        """The request body as JSON, validated against the operation's request schema."""
        limit = self.body_limit()
        if self._body_size > limit:
            raise APIError(413, f"The request body is over the limit of {limit} bytes.",
                           code="request_too_large")
        raw = b"".join(self._body_parts)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
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
            return APIError(status_code, SERVER_ERROR_MESSAGE.format(self.request_id),
                            type="server_error")
        reason = getattr(exc, "log_message", None) or tornado.httputil.responses.get(status_code, "")
        return APIError(status_code, f"{reason}.")


class NotFoundHandler(BaseHandler):
    """Every path the route table does not know."""

    requires_auth = False

    def prepare(self) -> None:
        super().prepare()
        if self.request.method != "OPTIONS":
            raise APIError(404, f"Invalid URL ({self.request.method} {self.request.path}).")


# =============================================================================
# Endpoint handlers
# =============================================================================

class HealthHandler(BaseHandler):
    requires_auth = False
    api = {"get": Operation("Health check", "System", response="HealthResponse", errors=(500,))}

    def get(self) -> None:
        self.write_json({"status": "ok", "version": __version__,
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


class ModelsHandler(BaseHandler):
    api = {"get": Operation("List models", "Models", response="ListModelsResponse")}

    def get(self) -> None:
        self.write_json({"object": "list", "data": self.context.models()})


class ModelHandler(BaseHandler):
    api = {"get": Operation("Retrieve a model", "Models", response="Model")}

    def get(self, model: str) -> None:
        for entry in self.context.models():
            if entry["id"] == model:
                return self.write_json(entry)
        raise APIError(404, f"The model '{model}' does not exist. GET /v1/models lists the "
                            "models this server answers for.", param="model", code="model_not_found")


class EmbeddingsHandler(BaseHandler):
    api = {"post": Operation("Create embeddings", "Embeddings", request="CreateEmbeddingRequest",
                             response="CreateEmbeddingResponse")}

    def post(self) -> None:
        body = self.payload
        embedder = self.context.embedders.get(body["model"])
        if embedder is None:
            raise APIError(404, f"The model '{body['model']}' does not exist or cannot make "
                                f"embeddings. Use one of: {', '.join(EMBEDDING_MODELS)}.",
                           param="model", code="model_not_found")
        dimensions = _embedding_dimensions(embedder, body.get("dimensions"))
        inputs, tokens = _embedding_inputs(body["input"], embedder.model)
        encode = _base64_json if body.get("encoding_format") == "base64" else _floats_json
        items = ",".join(
            f'{{"object":"embedding","index":{index},"embedding":'
            f'{encode(*embedder.embed(words, dimensions))}}}'
            for index, words in enumerate(inputs))
        # Written by hand, not with json.dumps: formatting thousands of floats per vector
        # that way is most of the cost of a large request.
        self.finish(f'{{"object":"list","data":[{items}],"model":{json.dumps(embedder.model)},'
                    f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}')


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


def _embedding_inputs(value: str | list, model: str) -> tuple[list[list[str]], int]:
    """The words of each input (a token id counts as a word), and the tokens of them all."""
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
    words = [embedding_words(text) if isinstance(text, str) else [str(int(token)) for token in text]
             for text in texts]
    return words, total


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
    if sys.byteorder == "big":
        vector.byteswap()
    return '"' + base64.b64encode(vector.tobytes()).decode("ascii") + '"'


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
    Route("/openapi.json", OpenAPIHandler, in_openapi=False),
    Route("/docs", DocsHandler, in_openapi=False),
    Route("/v1/models", ModelsHandler),
    Route("/v1/models/{model:path}", ModelHandler),
    Route("/v1/embeddings", EmbeddingsHandler),
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
        content[operation.response_media] = {"schema": {"type": "string", "format": "binary"}}
    else:
        content["application/json"] = {"schema": {"type": "object"}}
    if operation.stream:
        content["text/event-stream"] = {"schema": _ref(operation.stream),
                                        "description": "Sent when the request has `stream: true`."}
    ok["content"] = content
    responses = {"200": ok}
    for status in operation.errors:
        responses[str(status)] = {"description": tornado.httputil.responses.get(status, "Error"),
                                  "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    spec["responses"] = responses
    if route.handler.requires_auth:
        spec["security"] = [{"ApiKeyAuth": []}]
    return spec


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


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
        log_function=_access_log,
        ozwell=context,
    )


def _access_log(handler: tornado.web.RequestHandler) -> None:
    status = handler.get_status()
    logger = logging.getLogger("tornado.access")
    level = logging.INFO if status < 500 else logging.ERROR
    logger.log(level, "%d %s %s %.1fms %s", status, handler.request.method, handler.request.uri,
               1000.0 * handler.request.request_time(), getattr(handler, "request_id", "-"))


# =============================================================================
# Main
# =============================================================================

def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `ozwell [serve]` runs the server, `ozwell spec` prints the document."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, settings = settings_from_command_line(argv, os.environ)
        if command == "spec":
            print(json.dumps(build_openapi(ROUTES, SchemaRegistry.load()), indent=2))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ensure_data_dir(settings.data_dir)
        return asyncio.run(serve(settings))
    except SettingsError as exc:
        print(f"ozwell: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


async def serve(settings: Settings) -> int:
    app = make_app(settings)
    context: Context = app.settings["ozwell"]
    server = tornado.httpserver.HTTPServer(app, max_body_size=settings.max_request_bytes)
    try:
        server.listen(settings.port, settings.host)
    except OSError as exc:
        raise SettingsError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}. "
                            "Pick another --port or stop the program using it.") from None
    port = next(iter(server._sockets.values())).getsockname()[1]
    shown_host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    log.info("ozwell %s listening on http://%s:%d (docs at http://%s:%d/docs)",
             __version__, settings.host, port, shown_host, port)

    stopping = asyncio.Event()
    _on_stop_signals(stopping.set)
    await stopping.wait()

    log.info("stopping: no new connections; waiting for %d in-flight request(s)", context.in_flight)
    server.stop()
    deadline = time.monotonic() + settings.shutdown_grace_seconds
    while context.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.close_all_connections()
    log.info("stopped")
    return 0


def _on_stop_signals(callback) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(callback))


if __name__ == "__main__":
    sys.exit(main())
