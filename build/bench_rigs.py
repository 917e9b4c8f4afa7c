"""Benchmark rows for test rigs: what matching 1,000 fixtures costs a request.

    python build/bench_rigs.py          # prints the rows

Starts `python -m ozwell` once per fixtures file (an empty one too) and measures
POST /v1/chat/completions on each, in the same run as its baseline. Figures are printed, never
asserted.
"""
import contextlib
import http.client
import json
import os
import statistics
import tempfile

from benchmark import ozwell_server

FIXTURES = 1000


def chat(text: str) -> dict:
    return {"model": "ozwell-deterministic", "messages": [
        {"role": "system", "content": "You are a support agent for a ticket system."},
        {"role": "user", "content": text}]}


def fixture(match: dict, number: int) -> dict:
    return {"match": {"user": match}, "reply": {"text": f"Ticket {number} is open."}}


# Each file: how its fixtures test the last user message.
FILES = {
    "none": [],
    "one": [fixture({"contains": "ticket 7"}, 7)],
    "contains": [fixture({"contains": f"ticket {n}"}, n) for n in range(FIXTURES)],
    "regex": [fixture({"regex": rf"^ticket {n} (status|state)\b"}, n) for n in range(FIXTURES)],
    # No whole word can be read from these: they are filed under three characters in a row.
    "regex-no-word": [fixture({"regex": rf"^t\w+ {n:03d}(?!\d)"}, n) for n in range(FIXTURES)],
    # Nor three characters in a row: each of these is tried on every request.
    "regex-nothing": [
        fixture({"regex": "^t\\w+ " + "".join(f"(?:{digit}|x)" for digit in f"{n:03d}") + r"\b"}, n)
        for n in range(FIXTURES)],
}

NO_MATCH = "ticket 5000 status please"
LAST = "ticket 999 status please"

# What is measured: (fixtures file, the last user message).
MEASURES = {
    "no fixtures": ("none", NO_MATCH),
    "one fixture": ("one", "ticket 7 status please"),
    "contains, none matches": ("contains", NO_MATCH),
    "regex, none matches": ("regex", NO_MATCH),
    "contains, the first matches": ("contains", "ticket 0 status please"),
    "contains, the last matches": ("contains", LAST),
    "regex, the last matches": ("regex", LAST),
    "regex without a word, the last matches": ("regex-no-word", LAST),
    "regex without a literal, the last matches": ("regex-nothing", LAST),
}

# Each row: a measure and its baseline. A request no fixture matches is answered by the
# built-in model, like the same request with no fixtures; a request a fixture answers is
# compared with a single fixture answering.
ROWS = [
    ("no fixture matches, 1,000 contains fixtures", "contains, none matches", "no fixtures"),
    ("no fixture matches, 1,000 regex fixtures", "regex, none matches", "no fixtures"),
    ("the first of 1,000 contains fixtures matches", "contains, the first matches", "one fixture"),
    ("the last of 1,000 contains fixtures matches", "contains, the last matches", "one fixture"),
    ("the last of 1,000 regex fixtures matches", "regex, the last matches", "one fixture"),
    ("the last of 1,000 regexes with no whole word (filed by 3 characters) matches",
     "regex without a word, the last matches", "one fixture"),
    ("the last of 1,000 regexes with no literal to file them under matches",
     "regex without a literal, the last matches", "one fixture"),
]
ROUNDS = 3
REQUESTS_PER_ROUND = 1500
HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}


def rows() -> list[tuple[str, str]]:
    """Every server runs at once and the rounds visit each measure in turn. The figure is
    requests per CPU second of the server process (its user and system time, from /proc):
    on a machine shared with other work, wall-clock requests/s mostly measures the others."""
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        servers = {}
        for name, fixtures in FILES.items():
            path = os.path.join(scratch, f"{name}.json")
            with open(path, "w") as out_file:
                json.dump({"fixtures": fixtures}, out_file)
            data_dir = os.path.join(scratch, f"data-{name}")
            servers[name] = stack.enter_context(
                ozwell_server(data_dir, "--fixtures", path, inherit_ozwell_env=False))
        figures: dict[str, list[float]] = {measure: [] for measure in MEASURES}
        for round_number in range(ROUNDS + 1):
            for measure, (name, text) in MEASURES.items():
                rate = _requests_per_cpu_second(servers[name], chat(text))
                if round_number:  # the first round warms up
                    figures[measure].append(rate)
    median = {measure: statistics.median(rates) for measure, rates in figures.items()}
    return [(f"rigs: {what}", f"{median[measure]:,.0f} req per CPU s, "
                              f"{median[measure] / median[baseline]:.2f} of {baseline} "
                              f"({median[baseline]:,.0f})")
            for what, measure, baseline in ROWS]


def _requests_per_cpu_second(server, body: dict) -> float:
    payload = json.dumps(body)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        before = _cpu_seconds(server.process.pid)
        for _ in range(REQUESTS_PER_ROUND):
            connection.request("POST", "/v1/chat/completions", payload, HEADERS)
            reply = connection.getresponse()
            reply.read()
            if reply.status != 200:
                raise RuntimeError(f"POST /v1/chat/completions answered {reply.status}")
        return REQUESTS_PER_ROUND / (_cpu_seconds(server.process.pid) - before)
    finally:
        connection.close()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    for what, figure in rows():
        print(f"{what:<80}  {figure}")
