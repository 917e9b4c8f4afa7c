"""Auth, OpenAI-shaped errors, models, health, CORS and request ids on the real socket."""
import json
import logging
import socket

import openai
import pytest

import ozwell
from conftest import AUTH


async def fetch(http_client, url, **kwargs):
    """The reply whatever its status (Tornado raises on 4xx/5xx by default)."""
    return await http_client.fetch(url, raise_error=False, **kwargs)


def error_of(reply):
    body = json.loads(reply.body)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert reply.headers["Content-Type"].startswith("application/json")
    return body["error"]


# --- auth ---------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_missing_key_is_401_telling_how_to_pass_one(http_client, base_url):
    reply = await fetch(http_client, f"{base_url}/v1/models")
    assert reply.code == 401
    error = error_of(reply)
    assert "Authorization: Bearer" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] is None


@pytest.mark.gen_test
@pytest.mark.parametrize("header", ["Bearer", "Bearer   ", "Basic abc", "abc"])
async def test_malformed_authorization_is_401(http_client, base_url, header):
    reply = await fetch(http_client, f"{base_url}/v1/models", headers={"Authorization": header})
    assert reply.code == 401


@pytest.mark.gen_test
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_any_nonempty_token_by_default_with_any_case_scheme(http_client, base_url, scheme):
    reply = await fetch(http_client, f"{base_url}/v1/models",
                        headers={"Authorization": f"{scheme} anything"})
    assert reply.code == 200


@pytest.mark.gen_test
async def test_public_routes_need_no_key(http_client, base_url):
    for path in ("/health", "/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        reply = await fetch(http_client, f"{base_url}{path}")
        assert reply.code == 200, path


class TestRestrictedKeys:
    @pytest.fixture
    def settings(self, tmp_path):
        return ozwell.Settings(data_dir=str(tmp_path), api_keys=("sk-good-1", "sk-good-2"))

    @pytest.mark.gen_test
    async def test_listed_keys_pass_and_others_get_invalid_api_key(self, http_client, base_url):
        ok = await fetch(http_client, f"{base_url}/v1/models",
                         headers={"Authorization": "Bearer sk-good-2"})
        assert ok.code == 200
        bad = await fetch(http_client, f"{base_url}/v1/models",
                          headers={"Authorization": "Bearer sk-wrong-key-123"})
        assert bad.code == 401
        error = error_of(bad)
        assert error["code"] == "invalid_api_key"
        assert "sk-wrong-key-123" not in error["message"]  # a key is never echoed whole

    @pytest.mark.gen_test
    async def test_sdk_raises_authentication_error(self, base_url, http_server):
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
        assert caught.value.code == "invalid_api_key"


def test_api_keys_come_from_the_environment():
    settings = ozwell.Settings.from_environment({"OZWELL_API_KEYS": "a, b ,,c"})
    assert settings.api_keys == ("a", "b", "c")


# --- errors -------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_unknown_route_is_openai_404_not_html(http_client, base_url):
    reply = await fetch(http_client, f"{base_url}/v1/nope", headers=AUTH)
    assert reply.code == 404
    assert error_of(reply)["message"] == "Invalid URL (GET /v1/nope)."


@pytest.mark.gen_test
async def test_wrong_method_is_405_with_allow(http_client, base_url):
    reply = await fetch(http_client, f"{base_url}/v1/models", method="DELETE", headers=AUTH)
    assert reply.code == 405
    assert reply.headers["Allow"] == "GET, OPTIONS"
    assert "use GET" in error_of(reply)["message"]


class _EchoHandler(ozwell.BaseHandler):
    """Validates its body against ListModelsResponse: enough to see the whole body path."""

    api = {"post": ozwell.Operation("echo", "Test", request="ListModelsResponse")}

    def post(self):
        self.write_json(self.payload)


class _BrokenHandler(ozwell.BaseHandler):
    def get(self):
        raise RuntimeError("secret internals")


@pytest.fixture
def app(settings):
    application = ozwell.make_app(settings)
    context = application.settings["ozwell"]
    application.wildcard_router.add_rules([
        (r"/v1/echo", _EchoHandler, {"context": context}),
        (r"/v1/broken", _BrokenHandler, {"context": context}),
    ])
    return application


@pytest.mark.gen_test
async def test_bad_json_is_400(http_client, base_url):
    reply = await fetch(http_client, f"{base_url}/v1/echo", method="POST", headers=AUTH,
                        body=b'{"object": "list",')
    assert reply.code == 400
    assert "could not parse the JSON body" in error_of(reply)["message"]


@pytest.mark.gen_test
async def test_body_must_be_an_object(http_client, base_url):
    reply = await fetch(http_client, f"{base_url}/v1/echo", method="POST", headers=AUTH, body=b"[1]")
    assert reply.code == 400
    assert "must be a JSON object" in error_of(reply)["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("body, param, code", [
    ({"object": "list"}, "data", "missing_required_parameter"),
    ({"object": "list", "data": [{"id": 5, "object": "model", "created": 1, "owned_by": "x"}]},
     "data[0].id", "invalid_type"),
    ({"object": "list", "data": [{"id": "m", "object": "thing", "created": 1, "owned_by": "x"}]},
     "data[0].object", "invalid_value"),
    ({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]},
     "data[0].created", "missing_required_parameter"),
])
async def test_schema_violation_names_the_field(http_client, base_url, body, param, code):
    reply = await fetch(http_client, f"{base_url}/v1/echo", method="POST", headers=AUTH,
                        body=json.dumps(body))
    assert reply.code == 400
    error = error_of(reply)
    assert (error["param"], error["code"]) == (param, code)
    assert param in error["message"]


@pytest.mark.gen_test
async def test_valid_body_reaches_the_verb(http_client, base_url):
    body = {"object": "list", "data": [], "extra": True}
    reply = await fetch(http_client, f"{base_url}/v1/echo", method="POST", headers=AUTH,
                        body=json.dumps(body))
    assert reply.code == 200 and json.loads(reply.body) == body


@pytest.mark.gen_test
async def test_unexpected_error_is_500_logged_with_traceback_and_leaks_nothing(
        http_client, base_url, caplog):
    with caplog.at_level(logging.ERROR):
        reply = await fetch(http_client, f"{base_url}/v1/broken", headers=AUTH)
    assert reply.code == 500
    error = error_of(reply)
    assert error["type"] == "server_error"
    assert "secret internals" not in reply.body.decode()
    assert reply.headers["x-request-id"] in error["message"]
    assert any(record.exc_info and "secret internals" in str(record.exc_info[1])
               for record in caplog.records)


class TestBodyLimit:
    @pytest.fixture
    def settings(self, tmp_path):
        return ozwell.Settings(data_dir=str(tmp_path), max_request_bytes=1000)

    @pytest.mark.gen_test
    async def test_declared_body_over_the_limit_is_413(self, http_client, base_url):
        reply = await fetch(http_client, f"{base_url}/v1/echo", method="POST", headers=AUTH,
                            body=b"x" * 5000)
        assert reply.code == 413
        assert "limit is 1000 bytes" in error_of(reply)["message"]

    @pytest.mark.gen_test
    async def test_chunked_body_over_the_limit_is_413(self, http_client, base_url):
        async def producer(write):
            for _ in range(10):
                await write(b"y" * 500)
        reply = await fetch(http_client, f"{base_url}/v1/echo", method="POST", headers=AUTH,
                            body_producer=producer)
        assert reply.code == 413

    def test_413_arrives_before_a_huge_body_is_sent(self, base_url, http_server, io_loop):
        """Only the headers go out: the answer must not wait for 10 GB that never come."""
        host, port = base_url.removeprefix("http://").split(":")

        def ask() -> bytes:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer k\r\nContent-Length: 10000000000\r\n\r\n")
                return sock.recv(65536)

        head = io_loop.run_sync(lambda: io_loop.run_in_executor(None, ask), timeout=10)
        assert head.startswith(b"HTTP/1.1 413")


# --- models, health, headers ----------------------------------------------------------

@pytest.mark.gen_test
async def test_models_list_every_served_model(client):
    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert {"ozwell-deterministic", "llama3", "text-embedding-3-small"} <= set(ids)
    assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by for m in models.data)


class TestConfiguredModels:
    @pytest.fixture
    def settings(self, tmp_path):
        return ozwell.Settings.from_environment(
            {"OZWELL_DATA_DIR": str(tmp_path), "LLAMA_MODELS": "llama3.1, meta-llama/Llama-3.2-1B"})

    @pytest.mark.gen_test
    async def test_ids_with_slash_raw_or_encoded(self, http_client, base_url, client):
        for path in ("meta-llama/Llama-3.2-1B", "meta-llama%2FLlama-3.2-1B"):
            reply = await fetch(http_client, f"{base_url}/v1/models/{path}", headers=AUTH)
            assert reply.code == 200
            assert json.loads(reply.body)["id"] == "meta-llama/Llama-3.2-1B"
        model = await client.models.retrieve("meta-llama/Llama-3.2-1B")
        assert model.id == "meta-llama/Llama-3.2-1B"
        assert "llama3" not in [m.id for m in (await client.models.list()).data]


@pytest.mark.gen_test
async def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-9")
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


@pytest.mark.gen_test
async def test_health_reports_version_and_uptime(http_client, base_url):
    reply = await fetch(http_client, f"{base_url}/health")
    body = json.loads(reply.body)
    assert body["status"] == "ok" and body["version"] == ozwell.__version__
    assert body["uptime_seconds"] >= 0


@pytest.mark.gen_test
async def test_every_response_has_a_request_id_even_errors(http_client, base_url):
    ids = set()
    for path, headers in (("/health", {}), ("/v1/models", {}), ("/v1/models", AUTH), ("/zzz", {})):
        reply = await fetch(http_client, f"{base_url}{path}", headers=headers)
        assert reply.headers["x-request-id"].startswith("req_")
        ids.add(reply.headers["x-request-id"])
    assert len(ids) == 4


@pytest.mark.gen_test
async def test_cors_preflight_allows_the_sdk_headers_without_a_key(http_client, base_url):
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    reply = await fetch(http_client, f"{base_url}/v1/models", method="OPTIONS", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": asked})
    assert reply.code == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    allowed = reply.headers["Access-Control-Allow-Headers"].lower()
    for header in ("authorization", "content-type", "x-stainless-os"):
        assert header in allowed
    assert "GET" in reply.headers["Access-Control-Allow-Methods"]
    plain = await fetch(http_client, f"{base_url}/v1/models", method="OPTIONS")
    assert "x-stainless-retry-count" in plain.headers["Access-Control-Allow-Headers"].lower()
    answered = await fetch(http_client, f"{base_url}/v1/models", headers=AUTH)
    assert answered.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
async def test_one_access_log_line_per_request(http_client, base_url, caplog):
    with caplog.at_level(logging.INFO, logger="tornado.access"):
        reply = await fetch(http_client, f"{base_url}/v1/models", headers=AUTH)
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert len(lines) == 1
    assert lines[0].startswith("200 GET /v1/models") and reply.headers["x-request-id"] in lines[0]


def test_several_apps_in_one_process_do_not_share_state(tmp_path):
    one = ozwell.make_app(ozwell.Settings(data_dir=str(tmp_path / "1"), llama_models=("a",)))
    two = ozwell.make_app(ozwell.Settings(data_dir=str(tmp_path / "2"), llama_models=("b",)))
    ids = lambda app: [m["id"] for m in app.settings["ozwell"].models()]
    assert "a" in ids(one) and "a" not in ids(two) and "b" in ids(two)
