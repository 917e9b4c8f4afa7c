"""Benchmark rows for the built-in model's tool calls and structured output:
`python build/bench_tools.py` prints them.

Starts its own server (`python -m ozwell` on 127.0.0.1, a temporary data dir) and measures,
over one keep-alive connection with bounded loops, a plain chat reply, a reply that calls a
tool, and a json_schema reply with a 20-property schema, in turns so they share the machine's
state; each figure is printed beside the plain one.
"""
from __future__ import annotations

import http.client
import tempfile

from benchmark import ozwell_server, requests_per_second

PATH = "/v1/chat/completions"
SECONDS_PER_PHASE = 1.0
PHASES = 3                      # each kind measured this many times, alternating
QUESTION = "What is the weather in Paris for 3 days, in celsius, and what should I wear?"

PLAIN = {"model": "ozwell-deterministic", "messages": [{"role": "user", "content": QUESTION}]}
TOOL_CALL = {**PLAIN, "tool_choice": "required", "tools": [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather forecast for a city",
    "strict": True, "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
        "properties": {"city": {"type": "string"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}}]}
KINDS = ("string", "integer", "number", "boolean")
TWENTY = {"type": "object", "additionalProperties": False,
          "required": [f"field_{n}" for n in range(20)],
          "properties": {f"field_{n}": {"type": KINDS[n % 4]} for n in range(20)}}
JSON_SCHEMA = {**PLAIN, "response_format": {"type": "json_schema", "json_schema": {
    "name": "twenty", "strict": True, "schema": TWENTY}}}


def rows() -> list[tuple[str, str]]:
    bodies = {"plain": PLAIN, "tool call": TOOL_CALL, "json_schema (20 properties)": JSON_SCHEMA}
    counts = dict.fromkeys(bodies, 0)
    elapsed = dict.fromkeys(bodies, 0.0)
    with tempfile.TemporaryDirectory() as data_dir, \
            ozwell_server(data_dir, inherit_ozwell_env=False) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for kind, body in bodies.items():  # warm up
                requests_per_second(connection, PATH, body, 0.2)
            for _ in range(PHASES):
                for kind, body in bodies.items():
                    count, seconds = requests_per_second(connection, PATH, body, SECONDS_PER_PHASE)
                    counts[kind] += count
                    elapsed[kind] += seconds
        finally:
            connection.close()
    rate = {kind: counts[kind] / elapsed[kind] for kind in bodies}
    return [(f"chat, built-in model: {kind} (one connection)",
             f"{rate[kind]:.0f} requests/s ({100 * rate[kind] / rate['plain']:.0f} % of plain)")
            for kind in bodies]


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what}: {figure}")
