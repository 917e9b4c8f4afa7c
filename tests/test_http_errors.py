"""Every error is OpenAI-shaped, even those Tornado answers itself: requests it cannot read,
request lines and headers over the limit, paths outside the docs' assets.

These speak raw HTTP over a socket to a real server process: no client library would send
such requests.
"""
import json
import socket

import pytest

from conftest import API_KEY


def exchange(server, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send `request` as it is, read the answer until the server closes, and split it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def assert_openai_error(status, headers, body, expected_status):
    assert status == expected_status, body
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import ServerProcess
    process = ServerProcess(tmp_path_factory.mktemp("data"))
    yield process
    process.stop()


def post_head(extra_headers: str) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\n{extra_headers}\r\n").encode()


BODY = b'{"model": "ozwell-deterministic", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize("request_bytes", [
    pytest.param(post_head("Content-Length: twelve\r\n") + BODY, id="content-length-not-a-number"),
    pytest.param(post_head("Content-Length: 5, 6\r\n") + BODY, id="two-content-lengths"),
    pytest.param(post_head(f"Content-Length: {len(BODY)}\r\nTransfer-Encoding: chunked\r\n")
                 + BODY, id="content-length-and-transfer-encoding"),
    pytest.param(post_head("Transfer-Encoding: chunked\r\n") + b"zz\r\n" + BODY + b"\r\n0\r\n\r\n",
                 id="chunk-size-not-hex"),
    pytest.param(post_head("Transfer-Encoding: chunked\r\n") + b"5\r\nhelloXX0\r\n\r\n",
                 id="chunk-not-terminated"),
    pytest.param(post_head("Transfer-Encoding: chunked\r\n") + b"5" + b"0" * 100 + b"\r\n",
                 id="chunk-size-line-too-long"),
    pytest.param(post_head("Transfer-Encoding: gzip\r\n") + BODY, id="unknown-transfer-encoding"),
    pytest.param(b"GET /health\r\n\r\n", id="malformed-request-line"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", id="malformed-header"),
])
def test_a_request_tornado_cannot_read_gets_a_json_400(server, request_bytes):
    status, headers, body = exchange(server, request_bytes)
    error = assert_openai_error(status, headers, body, 400)
    assert headers["connection"] == "close" and headers["x-request-id"].startswith("req_")
    assert "HTTP/1.1" in error["message"] or "chunk" in error["message"]


def test_an_over_long_header_is_a_json_431(server):
    request = f"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: {'a' * 100_000}\r\n\r\n".encode()
    error = assert_openai_error(*exchange(server, request), 431)
    assert "65536 bytes" in error["message"]


def test_an_over_long_url_is_a_json_414(server):
    request = f"GET /v1/models/{'m' * 100_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    error = assert_openai_error(*exchange(server, request), 414)
    assert "URL" in error["message"]


def test_the_server_goes_on_serving_after_such_requests(server):
    exchange(server, b"GET /health\r\n\r\n")
    status, _, body = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("path, expected", [
    ("/docs/assets/../ozwell.py", 403),
    ("/docs/assets/..%2f..%2fetc/passwd", 403),
    ("/docs/assets/no-such-file.js", 404),
])
def test_docs_assets_outside_or_missing_get_json_errors(server, path, expected):
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = exchange(server, request)
    error = assert_openai_error(status, headers, body, expected)
    assert "assets" not in error["message"].replace("/docs/assets/", "")  # no folder shown


def test_a_huge_refused_value_is_cut_in_the_message(server):
    huge = "x" * 1_000_000
    body = json.dumps({"model": "ozwell-deterministic", "input": "hi", "tool_choice": huge}).encode()
    request = (f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n").encode() + body
    status, headers, answer = exchange(server, request)
    error = assert_openai_error(status, headers, answer, 400)
    assert error["param"] == "tool_choice"
    assert len(answer) < 1000 and "characters)" in error["message"]
