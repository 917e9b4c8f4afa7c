"""/v1/files in one process: the official SDK, hand-built multipart bodies, the store's recovery."""
import asyncio
import json
import logging
import os
import time

import openai
import pytest
import tornado.httpclient
import tornado.tcpclient

import ozwell
from conftest import API_KEY, AUTH

REGISTRY = ozwell.SchemaRegistry.load()
BOUNDARY = "xYzZy-42"


def schema_errors(name, instance):
    return [error.message for error in REGISTRY.errors(name, instance)]


def multipart(*parts, boundary=BOUNDARY, closing=True):
    """A multipart/form-data body from (name, value) fields and (name, filename, bytes) files."""
    body = b""
    for part in parts:
        if len(part) == 2:
            name, value = part
            head = f'Content-Disposition: form-data; name="{name}"'
            data = value.encode() if isinstance(value, str) else value
        else:
            name, disposition_filename, data = part
            head = (f'Content-Disposition: form-data; name="{name}"; {disposition_filename}\r\n'
                    "Content-Type: application/octet-stream")
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    if closing:
        body += f"--{boundary}--\r\n".encode()
    return body


def form_headers(boundary=BOUNDARY):
    return {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}


async def post_form(http_client, base_url, body, headers=None):
    return await http_client.fetch(f"{base_url}/v1/files", method="POST", body=body,
                                   headers=headers or form_headers(), raise_error=False)


async def fetch(http_client, url, **kwargs):
    return await http_client.fetch(url, headers=AUTH, raise_error=False, **kwargs)


def files_dir(app):
    return app.settings["ozwell"].files.directory


def stored_names(app):
    """What the files folder holds, but the lock file."""
    return sorted(name for name in os.listdir(files_dir(app)) if name != "index.lock")


def index_entries(app):
    path = os.path.join(files_dir(app), "index.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as index:
        return json.load(index)["files"]


def error_of(reply):
    body = json.loads(reply.body)
    assert schema_errors("ErrorResponse", body) == []
    return body["error"]


# --- The official SDK ---------------------------------------------------------------------

@pytest.mark.gen_test
async def test_sdk_upload_retrieve_content_delete_with_a_real_file(client, tmp_path, app):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 1000)
    before = int(time.time())
    with open(path, "rb") as handle:
        created = await client.files.create(file=handle, purpose="fine-tune")
    assert schema_errors("OpenAIFile", created.model_dump()) == []
    assert (created.object, created.filename, created.purpose, created.status) == (
        "file", "train.jsonl", "fine-tune", "processed")
    assert created.bytes == path.stat().st_size and created.expires_at is None
    assert before <= created.created_at <= int(time.time())

    assert (await client.files.retrieve(created.id)) == created
    content = await client.files.content(created.id)
    assert content.content == path.read_bytes()

    deleted = await client.files.delete(created.id)
    assert schema_errors("DeleteFileResponse", deleted.model_dump()) == []
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert stored_names(app) == ["index.json"] and index_entries(app) == []
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(created.id)


@pytest.mark.gen_test
async def test_sdk_sends_expires_after_and_gets_expires_at(client):
    created = await client.files.create(file=("batch.jsonl", b"{}\n"), purpose="batch",
                                        expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600


@pytest.mark.gen_test
async def test_sdk_auto_pagination_walks_every_page_and_ends(client, http_client, base_url):
    uploaded = [(await client.files.create(file=(f"f{i}.txt", b"x" * i), purpose="assistants")).id
                for i in range(7)]
    vision = await client.files.create(file=("eye.png", b"\x89PNG"), purpose="vision")

    newest_first = [f.id async for f in client.files.list(limit=3)]
    assert newest_first == [vision.id] + uploaded[::-1]
    oldest_first = [f.id async for f in client.files.list(limit=2, order="asc",
                                                          purpose="assistants")]
    assert oldest_first == uploaded

    page = await client.files.list(limit=3, order="asc")
    assert len(page.data) == 3 and page.has_more
    raw = json.loads((await fetch(http_client, f"{base_url}/v1/files?limit=3&order=asc"
                                               f"&after={uploaded[5]}")).body)
    assert schema_errors("ListFilesResponse", raw) == []
    assert [f["id"] for f in raw["data"]] == [uploaded[6], vision.id]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (uploaded[6], vision.id, False)


@pytest.mark.gen_test
async def test_empty_list_is_a_valid_page(http_client, base_url):
    body = json.loads((await fetch(http_client, f"{base_url}/v1/files")).body)
    assert body == {"object": "list", "data": [], "first_id": None, "last_id": None,
                    "has_more": False}
    assert schema_errors("ListFilesResponse", body) == []


@pytest.mark.gen_test
async def test_fifty_parallel_uploads_leave_fifty_entries_and_blobs(client, app):
    created = await asyncio.gather(*(
        client.files.create(file=(f"n{i}.txt", str(i).encode() * 100), purpose="user_data")
        for i in range(50)))
    ids = {f.id for f in created}
    assert len(ids) == 50
    assert {entry["id"] for entry in index_entries(app)} == ids
    assert stored_names(app) == sorted(ids | {"index.json"})
    listed = [f async for f in client.files.list(limit=7)]
    assert {f.id for f in listed} == ids
    for file in created:
        number = file.filename[1:-len(".txt")]
        assert (await client.files.content(file.id)).content == number.encode() * 100


# --- List query ---------------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("query, param", [
    ("limit=0", "limit"), ("limit=10001", "limit"), ("limit=ten", "limit"), ("limit=1.5", "limit"),
    ("order=newest", "order"), ("purpose=fine_tune", "purpose"),
    ("after=file-00000000000000000000000000000000", "after"),
])
async def test_bad_list_query_is_400_naming_the_parameter(http_client, base_url, query, param):
    reply = await fetch(http_client, f"{base_url}/v1/files?{query}")
    assert reply.code == 400
    error = error_of(reply)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]


@pytest.mark.gen_test
async def test_list_limit_bounds_are_accepted(http_client, base_url):
    for limit in (1, 10000):
        assert (await fetch(http_client, f"{base_url}/v1/files?limit={limit}")).code == 200


# --- Hand-built multipart bodies ------------------------------------------------------------

@pytest.mark.gen_test
async def test_field_order_does_not_matter_and_preamble_epilogue_are_ignored(
        http_client, base_url, client):
    content = b"line one\r\n--not-the-boundary\r\n--xYzZy-4\r\nend\r"
    body = (b"This is the preamble.\r\n"
            + multipart(("file", 'filename="first.bin"', content), ("purpose", "assistants"))
            + b"This is the epilogue.\r\n")
    reply = await post_form(http_client, base_url, body)
    assert reply.code == 200, reply.body
    created = json.loads(reply.body)
    assert schema_errors("OpenAIFile", created) == []
    assert created["bytes"] == len(content)
    assert (await client.files.content(created["id"])).content == content


@pytest.mark.gen_test
async def test_body_sent_in_tiny_chunks_split_inside_boundaries(http_client, base_url, client):
    content = bytes(range(256)) * 50
    body = multipart(("purpose", "batch"), ("file", 'filename="tiny.bin"', content))

    async def produce(write):
        for start in range(0, len(body), 7):
            await write(body[start:start + 7])

    reply = await http_client.fetch(f"{base_url}/v1/files", method="POST", headers=form_headers(),
                                    body_producer=produce, raise_error=False)
    assert reply.code == 200, reply.body
    assert (await client.files.content(json.loads(reply.body)["id"])).content == content


@pytest.mark.gen_test
@pytest.mark.parametrize("disposition, stored", [
    ('filename="say \\"hi\\".txt"', 'say "hi".txt'),          # quoted-string escapes
    ('filename="say %22hi%22.txt"', 'say "hi".txt'),          # how browsers and the SDK write "
    ('filename="back\\\\slash.txt"', "back\\slash.txt"),
    ('filename="fallback.txt"; filename*=UTF-8\'\'%E2%82%AC%20rates.txt', "€ rates.txt"),
    ("filename*=utf-8'en'na%C3%AFve.csv", "naïve.csv"),
    ("filename*=iso-8859-1''caf%E9.txt", "café.txt"),
    ('filename=plain.txt', "plain.txt"),
    ('filename="../../etc/passwd"', "../../etc/passwd"),
])
async def test_filenames_are_decoded_as_sent(http_client, base_url, app, disposition, stored):
    reply = await post_form(http_client, base_url, multipart(
        ("purpose", "assistants"), ("file", disposition, b"data")))
    assert reply.code == 200, reply.body
    assert json.loads(reply.body)["filename"] == stored
    assert len(stored_names(app)) == 2  # the blob is named by its id, whatever the filename


@pytest.mark.gen_test
async def test_raw_utf8_filename_as_browsers_send_it(http_client, base_url):
    body = multipart(("purpose", "vision"), ("file", 'filename="żółw.png"', b"png"))
    reply = await post_form(http_client, base_url, body)
    assert json.loads(reply.body)["filename"] == "żółw.png"


@pytest.mark.gen_test
@pytest.mark.parametrize("body, param, says", [
    (multipart(("purpose", "assistants")), "file", "Missing required parameter: 'file'"),
    (multipart(("file", 'filename="a.txt"', b"x")), "purpose", "Missing required parameter: 'purpose'"),
    (multipart(("purpose", "fine_tune"), ("file", 'filename="a.txt"', b"x")), "purpose", "Supported values"),
    (multipart(("purpose", "batch"), ("file", "x")), "file", "filename"),
    (multipart(("purpose", "batch"), ("file", 'filename=""', b"x")), "file", "filename"),
    (multipart(("purpose", "batch"), ("file", 'filename="a"', b"1"), ("file", 'filename="b"', b"2")),
     "file", "more than one"),
    (multipart(("purpose", "batch"), ("purpose", "batch"), ("file", 'filename="a"', b"1")),
     "purpose", "more than once"),
    (multipart(("purpose", "batch"), ("model", "x"), ("file", 'filename="a"', b"1")),
     "model", "Unknown parameter: 'model'"),
    (multipart(("purpose", "batch"), ("expires_after[seconds]", "soon"),
               ("expires_after[anchor]", "created_at"), ("file", 'filename="a"', b"1")),
     "expires_after.seconds", "expected integer"),
    (multipart(("purpose", "batch"), ("expires_after[seconds]", "60"),
               ("expires_after[anchor]", "created_at"), ("file", 'filename="a"', b"1")),
     "expires_after.seconds", "3600"),
    (multipart(("purpose", "batch"), ("expires_after[seconds]", "3600"), ("file", 'filename="a"', b"1")),
     "expires_after.anchor", "Missing required parameter"),
    (multipart(("purpose", "batch"), ("file", 'filename="a.txt"', b"cut short"), closing=False),
     "file", "closing boundary"),
    (multipart(("purpose", "batch")) + b"junk", "file", None),
    (b"--xYzZy-42\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
     b"no blank line before the content", "file", "closing boundary"),
    (b"--xYzZy-42\r\nnot a header\r\n\r\nx\r\n--xYzZy-42--\r\n", "file", "Name: value"),
    (b"--xYzZy-42\r\nContent-Type: text/plain\r\n\r\nx\r\n--xYzZy-42--\r\n", "file", "Content-Disposition"),
    (b"--xYzZy-42garbage\r\n\r\n", "file", "boundary"),
    (b"", "file", "closing boundary"),
    (multipart(("purpose", b"\xff\xfe"), ("file", 'filename="a"', b"1")), "purpose", "UTF-8"),
])
async def test_bad_forms_are_400_naming_the_field_and_leave_nothing(
        http_client, base_url, app, body, param, says):
    reply = await post_form(http_client, base_url, body)
    assert reply.code == 400, reply.body
    error = error_of(reply)
    assert error["param"] == param
    if says:
        assert says in error["message"]
    assert stored_names(app) == [] and index_entries(app) == []


@pytest.mark.gen_test
@pytest.mark.parametrize("content_type", [
    "application/json", "multipart/form-data", "multipart/mixed; boundary=xYzZy-42",
    "multipart/form-data; boundary=" + "b" * 71, None,
])
async def test_a_body_that_is_not_multipart_form_data_is_400(http_client, base_url, app, content_type):
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    reply = await post_form(http_client, base_url, b'{"purpose": "batch"}', headers=headers)
    assert reply.code == 400
    error = error_of(reply)
    assert error["param"] == "file" and "multipart/form-data" in error["message"]
    assert stored_names(app) == []


@pytest.mark.gen_test
async def test_upload_needs_an_api_key_and_stores_nothing_without_one(http_client, base_url, app):
    reply = await http_client.fetch(
        f"{base_url}/v1/files", method="POST", raise_error=False,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        body=multipart(("purpose", "batch"), ("file", 'filename="a"', b"1")))
    assert reply.code == 401
    assert stored_names(app) == []


def test_parser_gives_the_same_parts_wherever_the_body_is_split():
    content = b"--xYzZy-4\r\n\r\n--xYzZy-41\r\n-xYzZy-42\r" + bytes(range(256)) + b"\r\n--xYzZy-4"
    body = b"preamble\r\n" + multipart(
        ("purpose", "evals"), ("file", 'filename="s.bin"', content),
        ("expires_after[anchor]", "created_at")) + b"epilogue"

    def parse(chunks):
        parser = ozwell.MultipartParser(BOUNDARY.encode())
        events = []
        for chunk in chunks:
            for event, value in parser.feed(chunk):
                if event == "data" and events and events[-1][0] == "data":
                    events[-1] = ("data", events[-1][1] + bytes(value))
                else:
                    events.append((event, bytes(value) if event == "data" else value))
        parser.close()
        return events

    whole = parse([body])
    assert [event for event, _ in whole] == ["part", "data", "end"] * 3
    assert whole[4] == ("data", content)
    assert whole[3][1] == {"content-disposition": 'form-data; name="file"; filename="s.bin"',
                           "content-type": "application/octet-stream"}
    for split in range(1, len(body)):
        assert parse([body[:split], body[split:]]) == whole, split
    assert parse([body[i:i + 1] for i in range(len(body))]) == whole


def test_parser_holds_no_more_than_a_chunk_and_a_boundary():
    parser = ozwell.MultipartParser(BOUNDARY.encode())
    list(parser.feed(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                     'filename="big"\r\n\r\n'.encode()))
    chunk = b"z" * 65536
    for _ in range(100):
        data = b"".join(bytes(value) for event, value in parser.feed(chunk) if event == "data")
        assert len(data) >= len(chunk) - len(BOUNDARY) - 4
        assert len(parser._buffer) < len(BOUNDARY) + 4


# --- Content ------------------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("filename, content_type, disposition", [
    ("report.pdf", "application/pdf", "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"),
    ("data.jsonl", "application/jsonl", "attachment; filename=\"data.jsonl\"; filename*=UTF-8''data.jsonl"),
    ("no-extension", "application/octet-stream",
     "attachment; filename=\"no-extension\"; filename*=UTF-8''no-extension"),
    ('naïve "q" \\ x.txt', "text/plain",
     "attachment; filename=\"na_ve \\\"q\\\" \\\\ x.txt\"; "
     "filename*=UTF-8''na%C3%AFve%20%22q%22%20%5C%20x.txt"),
])
async def test_content_has_type_length_and_a_safe_disposition(
        client, http_client, base_url, filename, content_type, disposition):
    created = await client.files.create(file=(filename, b"0123456789"), purpose="user_data")
    reply = await fetch(http_client, f"{base_url}/v1/files/{created.id}/content")
    assert reply.code == 200 and reply.body == b"0123456789"
    assert reply.headers["Content-Type"] == content_type
    assert reply.headers["Content-Length"] == "10"
    assert reply.headers["Content-Disposition"] == disposition


@pytest.mark.gen_test
async def test_a_filename_cannot_inject_a_header(http_client, base_url):
    body = multipart(("purpose", "batch"),
                     ("file", "filename*=UTF-8''a%0D%0AX-Injected%3A%201.txt", b"x"))
    created = json.loads((await post_form(http_client, base_url, body)).body)
    assert created["filename"] == "a\r\nX-Injected: 1.txt"
    reply = await fetch(http_client, f"{base_url}/v1/files/{created['id']}/content")
    assert "X-Injected" not in reply.headers
    assert reply.headers["Content-Disposition"].startswith('attachment; filename="a__X-Injected: 1.txt"')


@pytest.mark.gen_test
async def test_content_streams_in_chunks(client, http_client, base_url):
    content = os.urandom(3 * ozwell.FileContentHandler.CHUNK_BYTES + 5)
    created = await client.files.create(file=("r.bin", content), purpose="assistants")
    chunks = []
    await http_client.fetch(f"{base_url}/v1/files/{created.id}/content", headers=AUTH,
                            streaming_callback=chunks.append)
    assert b"".join(chunks) == content and len(chunks) > 1


# --- Ids and paths ------------------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("path", [
    "/v1/files/..%2F..%2Findex.json", "/v1/files/..%2Findex.json/content", "/v1/files/index.json",
    "/v1/files/index.json/content", "/v1/files/index.lock/content", "/v1/files/%2e%2e/content",
    "/v1/files/file-..%2F..%2Fdata/content", "/v1/files/file-0123456789abcdef0123456789abcdeF",
    "/v1/files/..%5C..%5Cindex.json", "/v1/files/file-0123456789abcdef0123456789abcdef%00",
])
async def test_ids_can_never_reach_outside_the_store(client, http_client, base_url, app, path):
    kept = await client.files.create(file=("keep.txt", b"keep"), purpose="batch")
    for method in ("GET",) if path.endswith("/content") else ("GET", "DELETE"):
        reply = await fetch(http_client, f"{base_url}{path}", method=method)
        assert reply.code == 404, (method, reply.body)
        error = error_of(reply)
        assert error["type"] == "invalid_request_error"
    assert [entry["id"] for entry in index_entries(app)] == [kept.id]
    assert (await client.files.content(kept.id)).content == b"keep"


@pytest.mark.gen_test
async def test_unknown_id_is_404_in_openai_shape(http_client, base_url):
    file_id = "file-0123456789abcdef0123456789abcdef"
    reply = await fetch(http_client, f"{base_url}/v1/files/{file_id}")
    assert reply.code == 404
    assert error_of(reply) == {"message": f"No file found with id '{file_id}'.",
                               "type": "invalid_request_error", "param": "id", "code": None}


# --- Expiry -------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_expired_file_is_not_listed_or_served_and_its_blob_is_removed(client, app):
    expiring = await client.files.create(file=("old.jsonl", b"{}"), purpose="batch",
                                         expires_after={"anchor": "created_at", "seconds": 3600})
    staying = await client.files.create(file=("new.jsonl", b"{}"), purpose="batch")
    # The clock cannot be moved, so the index is edited as if the hour had passed.
    index_path = os.path.join(files_dir(app), "index.json")
    with open(index_path, encoding="utf-8") as index:
        body = json.load(index)
    body["files"][0]["expires_at"] = int(time.time()) - 1
    ozwell.write_atomically(index_path, json.dumps(body).encode())

    assert [f.id async for f in client.files.list()] == [staying.id]
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(expiring.id)
    assert stored_names(app) == sorted([staying.id, "index.json"])
    assert [entry["id"] for entry in index_entries(app)] == [staying.id]


# --- Size limit ---------------------------------------------------------------------------

class TestUploadLimit:
    LIMIT = 64 * 1024

    @pytest.fixture
    def settings(self, tmp_path):
        return ozwell.Settings(data_dir=str(tmp_path / "data"), max_upload_bytes=self.LIMIT)

    @pytest.mark.gen_test
    async def test_declared_body_over_the_limit_is_413_before_anything_is_stored(
            self, http_client, base_url, app):
        body = multipart(("purpose", "batch"), ("file", 'filename="big"', b"b" * self.LIMIT))
        reply = await post_form(http_client, base_url, body)
        assert reply.code == 413
        assert error_of(reply)["code"] == "request_too_large"
        assert stored_names(app) == []

    @pytest.mark.gen_test
    async def test_chunked_body_over_the_limit_is_413_and_leaves_nothing(
            self, http_client, base_url, app):
        body = multipart(("purpose", "batch"), ("file", 'filename="big"', b"b" * 3 * self.LIMIT))

        async def produce(write):
            for start in range(0, len(body), 8192):
                await write(body[start:start + 8192])

        reply = await http_client.fetch(f"{base_url}/v1/files", method="POST", raise_error=False,
                                        headers=form_headers(), body_producer=produce)
        assert reply.code == 413
        assert "limit" in error_of(reply)["message"]
        assert stored_names(app) == [] and index_entries(app) == []

    @pytest.mark.gen_test
    async def test_a_body_under_the_limit_is_stored(self, client):
        created = await client.files.create(file=("ok", b"o" * (self.LIMIT // 2)), purpose="batch")
        assert created.bytes == self.LIMIT // 2


@pytest.mark.gen_test
async def test_client_leaving_mid_upload_leaves_nothing(http_server, http_port, app):
    head = multipart(("purpose", "batch"), closing=False) + (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="gone"\r\n\r\n'
    ).encode()
    stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", http_port)
    await stream.write((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                        f"Content-Length: {len(head) + 10**7}\r\n\r\n").encode() + head + b"p" * 10**5)
    await _until(lambda: any(name.endswith(".tmp") for name in stored_names(app)))
    stream.close()
    await _until(lambda: stored_names(app) == [])
    assert index_entries(app) == []


async def _until(condition, timeout=10.0):
    """Wait for a condition on disk (no event tells when a file appears); bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- The store on disk --------------------------------------------------------------------

def write_store(directory, files, blobs=(), others=()):
    os.makedirs(directory, exist_ok=True)
    ozwell.write_atomically(os.path.join(directory, "index.json"),
                            json.dumps({"version": 1, "files": files}).encode())
    for name in list(blobs) + list(others):
        with open(os.path.join(directory, name), "wb") as blob:
            blob.write(b"blob")


def entry(number, **changes):
    return {"id": f"file-{number:032x}", "object": "file", "bytes": 4, "created_at": 1767225600,
            "filename": f"{number}.txt", "purpose": "assistants", "status": "processed",
            "expires_at": None, "status_details": None, **changes}


def test_start_drops_what_cannot_be_served_and_cleans_up_after_a_crash(tmp_path, caplog):
    directory = tmp_path / "data" / "files"
    whole, blobless, expired, orphan = entry(1), entry(2), entry(3, expires_at=1), entry(4)
    write_store(directory, [whole, blobless, expired],
                blobs=[whole["id"], expired["id"], orphan["id"]],
                others=[".upload-dead.tmp", ".index.json.0a1b.tmp", "notes.txt"])
    # An upload still being written by a live process keeps its temporary file.
    live = ozwell.FileStore(str(directory))
    pending = asyncio.run(live.create_blob())
    with caplog.at_level(logging.WARNING, logger="ozwell"):
        app = ozwell.make_app(ozwell.Settings(data_dir=str(tmp_path / "data")))
    assert [e["id"] for e in index_entries(app)] == [whole["id"]]
    assert stored_names(app) == sorted([whole["id"], "index.json", "notes.txt",
                                        os.path.basename(pending.path)])
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert blobless["id"] in warnings and "blob is missing" in warnings and orphan["id"] in warnings
    pending.discard()


@pytest.mark.parametrize("raw, says", [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[]", '"files" list'),
    (b'{"version": 1, "files": {}}', '"files" list'),
    (b'{"version": 2, "files": []}', '"version"'),
    (json.dumps({"version": 1, "files": [entry(1, id="../../etc/passwd")]}).encode(), "entry 0"),
    (json.dumps({"version": 1, "files": [entry(1), entry(1)]}).encode(), "entry 1 repeats"),
    (json.dumps({"version": 1, "files": [entry(1, bytes="4")]}).encode(), '"bytes"'),
    (json.dumps({"version": 1, "files": [entry(1, expires_at=True)]}).encode(), '"expires_at"'),
    (json.dumps({"version": 1, "files": [{"id": f"file-{1:032x}"}]}).encode(), "has no"),
])
def test_a_damaged_index_stops_the_app_and_is_left_untouched(tmp_path, raw, says):
    directory = tmp_path / "data" / "files"
    directory.mkdir(parents=True)
    (directory / "index.json").write_bytes(raw)
    (directory / f"file-{1:032x}").write_bytes(b"blob")
    with pytest.raises(ozwell.SettingsError) as raised:
        ozwell.make_app(ozwell.Settings(data_dir=str(tmp_path / "data")))
    message = str(raised.value)
    assert says in message and str(directory / "index.json") in message and "\n" not in message
    assert (directory / "index.json").read_bytes() == raw
    assert (directory / f"file-{1:032x}").exists()


# --- The API description ------------------------------------------------------------------

def test_openapi_documents_the_files_operations():
    document = ozwell.build_openapi(ozwell.ROUTES, REGISTRY)
    listing = document["paths"]["/v1/files"]["get"]
    assert [p["name"] for p in listing["parameters"]] == ["after", "limit", "order", "purpose"]
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10000}
    upload = document["paths"]["/v1/files"]["post"]
    assert upload["requestBody"]["content"]["multipart/form-data"]["schema"] == {
        "$ref": "#/components/schemas/CreateFileRequest"}
    assert "413" in upload["responses"]
    content = document["paths"]["/v1/files/{file_id}/content"]["get"]
    assert set(content["responses"]["200"]["content"]) == {"*/*"}  # the type its name suggests
    assert set(document["paths"]["/v1/files/{file_id}"]) == {"get", "delete"}

