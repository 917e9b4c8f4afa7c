"""/docs renders in a real browser from the package's own assets, with the network cut off."""
import asyncio
import re
import shutil

import pytest

import ozwell
from conftest import require

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
