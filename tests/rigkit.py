"""What the test-rig tests share: the control API, and raw HTTP on a socket."""
import asyncio
import json
import time


from conftest import AUTH


async def control(http_client, base_url, method, path, body=None, session=None, auth=True):
    """Call a route under /_ozwell/; returns (status, JSON body)."""
    headers = dict(AUTH) if auth else {}
    if session is not None:
        headers["x-ozwell-session"] = session
    reply = await http_client.fetch(
        f"{base_url}/_ozwell/{path}", method=method, headers=headers, raise_error=False,
        body=None if method in ("GET", "DELETE") else json.dumps(body or {}),
        allow_nonstandard_methods=True)
    return reply.code, json.loads(reply.body)


async def post_json(http_client, base_url, path, body, headers=None):
    """POST a JSON body under /v1; returns Tornado's response (never raises on a status)."""
    return await http_client.fetch(f"{base_url}/v1/{path}", method="POST",
                                   headers={**AUTH, **(headers or {})}, body=json.dumps(body),
                                   raise_error=False)


async def raw_post(port, path, body, headers=None, timeout=30.0):
    """POST over a bare socket and read until the server closes it: what was on the wire,
    even when the server cuts it short, and the seconds it took."""
    payload = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             "Content-Type: application/json", f"Content-Length: {len(payload)}",
             *(f"{name}: {value}" for name, value in {**AUTH, **(headers or {})}.items())]
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return received, time.monotonic() - started


def data_events(raw: bytes) -> list[str]:
    """The `data:` payloads of a stream on the wire (chunked framing and all), as text."""
    return [line[len("data: "):] for line in raw.decode("utf-8", "replace").split("\n")
            if line.startswith("data: ")]
