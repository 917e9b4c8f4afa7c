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
import asyncio
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import logging
import mimetypes
import os
import re
import signal
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jsonschema
import jsonschema.exceptions
import tornado.httpserver
import tornado.httputil
import tornado.iostream
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
    "Settings",
    "SettingsError",
    "SchemaRegistry",
    "OFFLINE_MODEL",
    "build_openapi",
    "count_tokens",
    "deterministic_reply",
    "main",
    "make_app",
    "tokenize",
    "write_atomically",
    "FileStore",
    "MultipartParser",
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
    if error.validator == "additionalProperties":
        return APIError(400, f"Invalid parameter in {where}: {error.message}.", param=param,
                        code="unknown_parameter")
    return APIError(400, f"Invalid value for {where}: {error.message}.", param=param,
                    code="invalid_value")


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


@dataclasses.dataclass(frozen=True)
class _IndexSnapshot:
    raw: bytes | None               # the index file's bytes (None: there is no index yet)
    files: list[dict[str, Any]]     # oldest first
    by_id: dict[str, dict[str, Any]]


class FileStore:
    """Uploaded files: `<dir>/index.json` lists them (FileObjects, oldest first), `<dir>/<id>`
    holds each one's bytes.

    The index is only ever replaced whole (write_atomically), and each change re-reads it and
    writes it under an asyncio lock (this process) and an OS lock on `index.lock` (other
    processes sharing the folder). A blob is complete and in place before its entry is written,
    and its entry is gone before the blob is removed, so a listed file can always be served.
    """

    ID_PATTERN = re.compile(r"file-[0-9a-f]{32}")
    INDEX_VERSION = 1
    _UPLOAD_PREFIX = ".upload-"
    _TEMPORARY_SUFFIX = ".tmp"

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.index_path = os.path.join(self.directory, "index.json")
        self._lock_path = os.path.join(self.directory, "index.lock")
        self._lock = asyncio.Lock()
        self._snapshot = _IndexSnapshot(None, [], {})

    @classmethod
    def open(cls, directory: str) -> FileStore:
        """The store in `directory`, tidied after any crash; SettingsError if its index is damaged."""
        store = cls(directory)
        try:
            os.makedirs(store.directory, exist_ok=True)
        except OSError as exc:
            raise SettingsError(f"files folder {store.directory!r} cannot be created: "
                                f"{exc.strerror or exc}.") from None
        store._update_now(store._recover)
        return store

    def blob_path(self, file_id: str) -> str:
        if not self.ID_PATTERN.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return os.path.join(self.directory, file_id)

    async def create_blob(self) -> PendingBlob:
        # Created under the OS lock, which a starting server holds while it removes dead
        # uploads: it never sees a temporary file that is not yet locked by its writer.
        return await self._run_locked(self._create_blob_now)

    def _create_blob_now(self) -> PendingBlob:
        with _locked(self._lock_path):
            name = f"{self._UPLOAD_PREFIX}{uuid.uuid4().hex}{self._TEMPORARY_SUFFIX}"
            return PendingBlob(os.path.join(self.directory, name))

    async def add(self, blob: PendingBlob, filename: str, purpose: str,
                  expires_after_seconds: int | None = None) -> dict[str, Any]:
        """Make the finished upload `blob` a listed file; returns its FileObject."""
        blob.committed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, blob.sync)
        except BaseException:
            blob.committed = False
            blob.discard()
            raise

        def change(files: list[dict]) -> tuple[list[dict], dict]:
            file_id = "file-" + uuid.uuid4().hex
            created_at = int(time.time())
            entry = {"id": file_id, "object": "file", "bytes": blob.size,
                     "created_at": created_at, "filename": filename, "purpose": purpose,
                     "status": "processed",
                     "expires_at": None if expires_after_seconds is None
                     else created_at + expires_after_seconds,
                     "status_details": None}
            blob.close()
            os.replace(blob.path, self.blob_path(file_id))
            return files + [entry], entry

        try:
            return await self._run_locked(self._update_now, change)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(blob.path)
            raise

    async def listed(self) -> list[dict[str, Any]]:
        """Every file that has not expired, oldest first."""
        snapshot = self._current()
        now = time.time()
        if any(_has_expired(entry, now) for entry in snapshot.files):
            await self._run_locked(self._update_now, self._drop_expired)
            snapshot = self._current()
        return [entry for entry in snapshot.files if not _has_expired(entry, now)]

    async def get(self, file_id: str) -> dict[str, Any] | None:
        entry = self._current().by_id.get(file_id)
        if entry is not None and _has_expired(entry, time.time()):
            await self._run_locked(self._update_now, self._drop_expired)
            return None
        return entry

    async def delete(self, file_id: str) -> bool:
        def change(files: list[dict]) -> tuple[list[dict], bool]:
            kept = [entry for entry in files if entry["id"] != file_id]
            return (kept, True) if len(kept) < len(files) else (files, False)
        return await self._run_locked(self._update_now, change)

    def open_content(self, file_id: str):
        """The file's bytes, open for reading (FileNotFoundError if it was deleted meanwhile)."""
        return open(self.blob_path(file_id), "rb")

    async def _run_locked(self, function, *args):
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    def _update_now(self, change):
        """Apply `change(files) -> (new files, result)` to the latest index under the OS lock.

        Blobs whose entries the change dropped are removed once the new index is saved.
        """
        with _locked(self._lock_path):
            before = self._current().files
            after, result = change(before)
            if after is not before:
                self._save(after)
                kept = {entry["id"] for entry in after}
                for entry in before:
                    if entry["id"] not in kept:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(self.blob_path(entry["id"]))
            return result

    def _save(self, files: list[dict[str, Any]]) -> None:
        raw = json.dumps({"version": self.INDEX_VERSION, "files": files},
                         ensure_ascii=False).encode("utf-8")
        write_atomically(self.index_path, raw)
        self._snapshot = _IndexSnapshot(raw, files, {entry["id"]: entry for entry in files})

    def _current(self) -> _IndexSnapshot:
        """The index as it is on disk now: another process may have changed it.

        Parsed again only when its bytes differ from the last read; comparing the bytes, not
        the file's size and times, cannot miss a change.
        """
        try:
            with open(self.index_path, "rb") as index:
                raw = index.read()
        except FileNotFoundError:
            raw = None
        if raw == self._snapshot.raw:
            return self._snapshot
        files = [] if raw is None else self._parse(raw)
        self._snapshot = _IndexSnapshot(raw, files, {entry["id"]: entry for entry in files})
        return self._snapshot

    def _parse(self, raw: bytes) -> list[dict[str, Any]]:
        def damaged(problem: str) -> SettingsError:
            return SettingsError(
                f"the files index {self.index_path} is damaged: {problem}. The server will not "
                "guess what it held: restore it from a backup, or remove the data dir to start "
                "with no files.")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(f"it is not valid JSON ({exc})") from None
        if not isinstance(body, dict) or not isinstance(body.get("files"), list):
            raise damaged('it is not an object with a "files" list')
        if body.get("version") != self.INDEX_VERSION:
            raise damaged(f'its "version" is {body.get("version")!r}, not {self.INDEX_VERSION}')
        seen: set[str] = set()
        for position, entry in enumerate(body["files"]):
            problem = _index_entry_problem(entry, self.ID_PATTERN)
            if problem is None and entry["id"] in seen:
                problem = "repeats an id listed before it"
            if problem is not None:
                raise damaged(f"entry {position} {problem}")
            seen.add(entry["id"])
        return body["files"]

    def _recover(self, files: list[dict]) -> tuple[list[dict], None]:
        """After a crash: remove dead uploads and blobs no entry names, drop entries whose
        blob is missing (they could never be served) and expired files."""
        names = set(os.listdir(self.directory))
        for name in names:
            if name.endswith(self._TEMPORARY_SUFFIX) and name.startswith("."):
                self._remove_if_dead(os.path.join(self.directory, name))
        listed = {entry["id"] for entry in files}
        for name in names:
            if self.ID_PATTERN.fullmatch(name) and name not in listed:
                log.warning("files: removing %s, a blob no index entry names", name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))
        kept = []
        now = time.time()
        for entry in files:
            if entry["id"] not in names:
                log.warning("files: dropping %s (%r) from the index: its blob is missing",
                            entry["id"], entry["filename"])
            elif not _has_expired(entry, now):
                kept.append(entry)
        return (files if len(kept) == len(files) else kept), None

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

    @staticmethod
    def _drop_expired(files: list[dict]) -> tuple[list[dict], None]:
        now = time.time()
        kept = [entry for entry in files if not _has_expired(entry, now)]
        return (files if len(kept) == len(files) else kept), None


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
        self.files = FileStore.open(os.path.join(settings.data_dir, "files"))

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

    FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
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
            log.error("files: cannot store an upload: %s", exc)
            self.fail(APIError(500, f"The server could not store the upload: "
                                    f"{exc.strerror or exc}.", type="server_error"))

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
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(parameter.schema).iter_errors(value))
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
                QueryParam("after", {"type": "string"},
                           "The id of the last file of the page before: the list goes on after it."),
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
        entry = await self.context.files.add(self._form.blob, form["file"], form["purpose"],
                                             expires_after)
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

    api = {"get": Operation("Retrieve file content", "Files",
                            response_media="application/octet-stream")}

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
                    await self.flush()
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
    Route("/v1/files", FilesHandler),
    Route("/v1/files/{file_id}", FileHandler),
    Route("/v1/files/{file_id}/content", FileContentHandler),
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
