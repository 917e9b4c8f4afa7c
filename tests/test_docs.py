"""/docs renders in a real browser from the package's own assets, with the network cut off,
and its forms work when a person fills them in."""
import asyncio
import json
import re
import shutil
import time

import pytest
import tornado.httpclient
import tornado.websocket

import ozwell
from conftest import API_KEY, require
from test_files import multipart, post_form

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Every host name but loopback fails to resolve: the page must need nothing from outside.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=20000",
]


@pytest.mark.gen_test(timeout=90)
async def test_swagger_ui_renders_every_operation_offline(base_url, http_server, tmp_path):
    chromium = require(shutil.which("chromium") or shutil.which("chromium-browser"), "chromium")
    process = await asyncio.create_subprocess_exec(
        chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
        f"{base_url}/docs", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    dom, _ = await asyncio.wait_for(process.communicate(), timeout=80)
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom.decode()))
    document = ozwell.build_openapi(ozwell.ROUTES, ozwell.SchemaRegistry.load())
    assert rendered == set(document["paths"])


@pytest.mark.gen_test
async def test_docs_page_loads_nothing_from_outside(http_client, base_url):
    page = (await http_client.fetch(f"{base_url}/docs")).body.decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page):
        reply = await http_client.fetch(f"{base_url}{asset}")
        assert reply.code == 200 and reply.body
    assert "validatorUrl: null" in page  # Swagger UI would otherwise call its online validator


class DevTools:
    """A page of headless Chromium, driven over the DevTools protocol (a WebSocket)."""

    def __init__(self, connection):
        self.connection = connection
        self.last_id = 0

    @classmethod
    async def open(cls, chromium, profile):
        process = await asyncio.create_subprocess_exec(
            chromium, *[flag for flag in CHROMIUM_FLAGS if "virtual-time" not in flag],
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "chromium ended before it listened for DevTools"
            if match := re.search(r"DevTools listening on ws://([^/]+)/", line):
                break
        asyncio.ensure_future(process.stderr.read())  # keep its pipe from filling up
        client = tornado.httpclient.AsyncHTTPClient()
        pages = json.loads((await client.fetch(f"http://{match.group(1)}/json/list")).body)
        page = next(page for page in pages if page["type"] == "page")
        connection = await tornado.websocket.websocket_connect(page["webSocketDebuggerUrl"])
        return process, cls(connection)

    async def send(self, method, **params):
        self.last_id += 1
        await self.connection.write_message(json.dumps({"id": self.last_id, "method": method,
                                                        "params": params}))
        while True:
            message = json.loads(await self.connection.read_message())
            if message.get("id") == self.last_id:
                assert "error" not in message, message
                return message["result"]

    async def evaluate(self, expression):
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                awaitPromise=True)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    async def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := await self.evaluate(expression):
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"never true in the page: {expression}")


UPLOAD = "#operations-Files-postFiles"
# Swagger UI's fields are React-controlled: a value is set through the element's own setter,
# then announced with the event React listens to.
SET_FIELD = """(selector, value) => {
    const field = document.querySelector(selector);
    const setter = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(field), "value").set;
    setter.call(field, value);
    field.dispatchEvent(new Event(field.tagName === "SELECT" ? "change" : "input", {bubbles: true}));
    return true;
}"""


async def submit_upload_form(page, upload_path, expires_after=None):
    """Fill the upload form at /docs as a person would, press Execute, and return the status
    and body Swagger UI shows (then Clear, for the next one)."""
    file_input = await page.send("Runtime.evaluate",
                                 expression=f"document.querySelector('{UPLOAD} input[type=file]')")
    await page.send("DOM.setFileInputFiles", files=[str(upload_path)],
                    objectId=file_input["result"]["objectId"])
    await page.evaluate(f"({SET_FIELD})('{UPLOAD} tr[data-property-name=purpose] select', 'assistants')")
    if expires_after is not None:
        await page.evaluate(f"({SET_FIELD})('{UPLOAD} tr[data-property-name=expires_after] textarea', "
                            f"{json.dumps(expires_after)})")
    await page.evaluate(f"document.querySelector('{UPLOAD} button.execute').click()")
    status = await page.wait_for(
        f"document.querySelector('{UPLOAD} .live-responses-table tr.response .response-col_status')?.innerText")
    body = await page.evaluate(
        f"document.querySelector('{UPLOAD} .live-responses-table tr.response .response-col_description pre')"
        ".innerText")
    await page.evaluate(f"document.querySelector('{UPLOAD} button.btn-clear').click()")
    await page.wait_for(f"!document.querySelector('{UPLOAD} .live-responses-table')")
    return int(status.strip()), body


@pytest.mark.slow
@pytest.mark.gen_test(timeout=150)
async def test_the_upload_form_at_docs_uploads_with_and_without_expiry(base_url, http_server, tmp_path):
    chromium = require(shutil.which("chromium") or shutil.which("chromium-browser"), "chromium")
    upload_path = tmp_path / "notes.txt"
    upload_path.write_text("uploaded from the docs page\n")
    process, page = await DevTools.open(chromium, tmp_path / "profile")
    try:
        await page.send("Page.navigate", url=f"{base_url}/docs#/Files/postFiles")
        await page.wait_for(f"!!document.querySelector('{UPLOAD} .try-out__btn')")
        await page.evaluate(f"window.ui.preauthorizeApiKey('ApiKeyAuth', '{API_KEY}'); "
                            f"document.querySelector('{UPLOAD} .try-out__btn').click()")
        await page.wait_for(f"!!document.querySelector('{UPLOAD} input[type=file]')")
        prefilled = await page.evaluate(
            f"document.querySelector('{UPLOAD} tr[data-property-name=expires_after] textarea').value")

        status, body = await submit_upload_form(page, upload_path)  # as the form comes
        assert status == 200, body
        kept = json.loads(body)
        assert kept["filename"] == "notes.txt" and kept["purpose"] == "assistants"
        assert kept["expires_at"] == kept["created_at"] + json.loads(prefilled)["seconds"]

        status, body = await submit_upload_form(page, upload_path, expires_after="")  # cleared
        assert status == 200, body
        assert json.loads(body)["expires_at"] is None

        status, body = await submit_upload_form(page, upload_path, expires_after="{\"anchor\": ")
        assert status == 400 and json.loads(body)["error"]["param"] == "expires_after"
    finally:
        process.kill()
        await process.wait()


@pytest.mark.gen_test
@pytest.mark.parametrize("fields, status, expires_in", [
    ([("expires_after", '{"anchor": "created_at", "seconds": 7200}')], 200, 7200),
    ([("expires_after", "")], 200, None),
    ([("expires_after", " \r\n")], 200, None),
    ([("expires_after", '{"anchor": "created_at", "seconds": 7200.0}')], 200, 7200),
    ([("expires_after", '{"anchor": "created_at", "seconds": 60}')], 400, "expires_after.seconds"),
    ([("expires_after", "soon")], 400, "expires_after"),
    ([("expires_after", "3600")], 400, "expires_after"),
    ([("expires_after", '{"anchor": "created_at", "seconds": 3600}'),
      ("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "3600")], 400, "expires_after"),
])
async def test_expires_after_as_the_docs_form_sends_it(http_client, base_url, fields, status, expires_in):
    body = multipart(("purpose", "batch"), *fields, ("file", 'filename="a.jsonl"', b"{}"))
    reply = await post_form(http_client, base_url, body)
    answer = json.loads(reply.body)
    assert reply.code == status, answer
    if status == 200:
        expected = None if expires_in is None else answer["created_at"] + expires_in
        assert answer["expires_at"] == expected
    else:
        assert answer["error"]["param"] == expires_in
