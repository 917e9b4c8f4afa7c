"""Benchmark rows for /metrics and replay: what counting costs a request, what a scrape costs,
and a replayed chat completion beside the same one proxied.

    python build/bench_metrics.py                   # prints the rows
    python build/bench_metrics.py --baseline REF    # the per-request baseline: ozwell.py at REF

`GET /v1/models` is loaded with wrk on this ozwell.py and on ozwell.py at BASELINE_REF (before
metrics) in the same run, and the cost of one count is timed in this process. Replay is measured
on one keep-alive connection against a cassette recorded from tests/rogue_llama.py in the same
run. Everything runs on 127.0.0.1 and stops at the end; on a shared machine the figures are
indicative only.
"""
import argparse
import http.client
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

from bench_chat import baseline_server
from benchmark import ROOT, ozwell_server, requests_per_second, wrk

sys.path.insert(0, str(ROOT))
import ozwell  # noqa: E402

BASELINE_REF = "main"
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "Hello there"}]}


def rows(baseline_ref: str = BASELINE_REF) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        return _counting(scratch, baseline_ref) + _scrape(scratch) + _replay(scratch)


def _counting(scratch: str, baseline_ref: str) -> list[tuple[str, str]]:
    metrics = ozwell.Metrics(ozwell.ROUTES)
    calls = 200_000
    count = timeit.timeit(lambda: metrics.count(ozwell.ModelsHandler, "GET", 200, 0.0004),
                          number=calls) / calls
    with ozwell_server(str(Path(scratch) / "now")) as now, \
            baseline_server(scratch, baseline_ref, {}) as baseline:
        servers = {"now": now, "baseline": baseline}
        for server in servers.values():
            wrk(server.url + "/v1/models", seconds=1)  # warm up
        # Taken in turns, the best of three each: the machine's other load comes and goes.
        rps = {name: 0.0 for name in servers}
        for _ in range(3):
            for name, server in servers.items():
                rps[name] = max(rps[name], wrk(server.url + "/v1/models", seconds=3))
    return [("metrics: one count (in process)", f"{count * 1e6:.2f} µs"),
            ("  as a share of one GET /v1/models", f"{100 * count * rps['now']:.2f} %"),
            ("GET /v1/models, c16 (wrk)",
             f"{rps['now']:,.0f} req/s (ozwell.py at {baseline_ref}: {rps['baseline']:,.0f}, "
             f"{rps['now'] / rps['baseline']:.2f}x)")]


def _scrape(scratch: str) -> list[tuple[str, str]]:
    with ozwell_server(str(Path(scratch) / "scrape")) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port)
        for route in ozwell.ROUTES:  # a series for every route
            path = route.template.replace("{", "x").replace("}", "x")
            connection.request("GET", path, headers={"Authorization": "Bearer bench"})
            connection.getresponse().read()
        scrapes = 200
        started = timeit.default_timer()
        for _ in range(scrapes):
            connection.request("GET", "/metrics", headers={"Authorization": "Bearer bench"})
            text = connection.getresponse().read()
        took = (timeit.default_timer() - started) / scrapes
    return [(f"GET /metrics, {len(ozwell.ROUTES)} routes seen ({len(text.splitlines())} lines)",
             f"{took * 1000:.2f} ms")]


def _replay(scratch: str) -> list[tuple[str, str]]:
    backend = subprocess.Popen([sys.executable, str(ROOT / "tests" / "rogue_llama.py")],
                               stdout=subprocess.PIPE, text=True)
    try:
        llama = {"LLAMA_BASE_URL": f"http://127.0.0.1:{int(backend.stdout.readline())}/v1"}
        cassette = str(Path(scratch) / "chat.jsonl")
        with ozwell_server(str(Path(scratch) / "record"), "--record", cassette, env=llama) as proxy:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port)
            proxied = requests_per_second(connection, "/v1/chat/completions", CHAT, 3.0, 2000)
    finally:
        backend.kill()
        backend.wait()
    with open(cassette) as recorded:
        size = sum(1 for _ in recorded)
    with ozwell_server(str(Path(scratch) / "replay"), "--replay", cassette) as replaying:
        connection = http.client.HTTPConnection("127.0.0.1", replaying.port)
        replayed = requests_per_second(connection, "/v1/chat/completions", CHAT, 3.0, 2000)
    proxied_rps, replayed_rps = (made / seconds for made, seconds in (proxied, replayed))
    return [("chat completion proxied and recorded, one connection",
             f"{proxied_rps:,.0f} req/s ({size:,} exchanges recorded)"),
            ("the same, replayed from that cassette",
             f"{replayed_rps:,.0f} req/s ({replayed_rps / proxied_rps:.2f}x)")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE_REF)
    table = rows(parser.parse_args().baseline)
    width = max(len(what) for what, _ in table)
    for what, figure in table:
        print(f"{what:<{width}}  {figure}")
