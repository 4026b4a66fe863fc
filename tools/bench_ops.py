#!/usr/bin/env python3
"""What running snekbox in production costs /eval: a plain server against one with
bearer tokens on (--token-file; every request sends its token) whose /metrics is
scraped every second, both with the same warm pool, taking turns in the same run.

Phases, each target in a new order every round: closed loop at concurrency 1 (p50 of
each round), and an open loop of Poisson arrivals (a new connection per request, the
latency counted from when it was due). Prints a markdown table of both targets and the
ratio of the production server's figures to the plain one's. Standard library only;
run as root from the repo:

    python3 tools/bench_ops.py [--rounds 5] [--requests 40] [--rate 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import statistics
import sys
import tempfile
import threading
import time

from bench_snekbox import PRINT, SEED, open_loop
from harness import DEBIAN_PYTHON, Client, markdown_table, post_once, start_server, summary


class Scraper:
    """GET /metrics once a second, as a Prometheus server would, until stopped."""

    def __init__(self, port: int, every: float = 1.0):
        self.port, self.every, self.scrapes, self.failures = port, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                response.read()
                self.scrapes += 1
                self.failures += response.status != 200
            except (OSError, http.client.HTTPException):
                self.failures += 1
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Target:
    """A warm snekbox started for the run, with the headers its requests carry."""

    def __init__(self, name: str, flags: list[str], headers: dict, prewarm: int):
        self.name, self.headers = name, headers
        self.proc, self.port, _ = start_server(DEBIAN_PYTHON, "--workers", "2", "--prewarm",
                                               str(prewarm), *flags, headers=headers)
        self.client = Client("127.0.0.1", self.port, headers=headers)

    def fresh(self) -> bool:
        status, data = post_once("127.0.0.1", self.port, PRINT, headers=self.headers)
        return status == 200 and data is not None and data.get("returncode") == 0

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


def measure(args: argparse.Namespace, folder: str) -> dict:
    token = os.urandom(24).hex()
    tokens = os.path.join(folder, "tokens")
    with open(tokens, "w") as f:
        f.write(token + "\n")
    os.chmod(tokens, 0o600)
    targets = [Target("plain", [], {}, args.prewarm),
               Target("production", ["--token-file", tokens],
                      {"Authorization": f"Bearer {token}"}, args.prewarm)]
    scraper = Scraper(targets[1].port)
    shuffle = random.Random(SEED).shuffle
    out: dict = {t.name: {"c1": [], "open": []} for t in targets}
    try:
        for target in targets:
            for _ in range(5):
                target.client.eval(PRINT)
        for i in range(args.rounds):
            shuffle(targets)
            for target in targets:
                time.sleep(0.3)     # the warm pool refilled
                out[target.name]["c1"].append(summary(
                    [target.client.eval(PRINT) for _ in range(args.requests)])["p50"])
            for target in targets:
                time.sleep(0.3)
                out[target.name]["open"].append(open_loop(target.fresh, args.rate,
                                                          args.seconds, SEED + i))
    finally:
        scraper.stop()
        for target in targets:
            target.stop()
    out["scrapes"] = {"done": scraper.scrapes, "failed": scraper.failures}
    return out


def table(r: dict, rate: float) -> str:
    rows, figures = [], {}
    for name in ("plain", "production"):
        c1 = statistics.median(r[name]["c1"])
        p50 = statistics.median(s["p50"] for s in r[name]["open"])
        p99 = statistics.median(s["p99"] for s in r[name]["open"])
        failed = sum(s["failed"] + s["dropped"] for s in r[name]["open"])
        figures[name] = (c1, p50, p99)
        rows.append((name, f"{c1:.2f}", f"{min(r[name]['c1']):.2f}-{max(r[name]['c1']):.2f}",
                     f"{p50:.2f}", f"{p99:.2f}", str(failed)))
    ratios = [p / q for p, q in zip(figures["production"], figures["plain"])]
    rows.append(("production / plain", *(f"{x:.2f}x" for x in ratios[:1]), "",
                 *(f"{x:.2f}x" for x in ratios[1:]), ""))
    header = ("server", "c=1 p50 ms (median of rounds)", "rounds' p50 range",
              f"open {rate:g}/s p50 ms", f"open {rate:g}/s p99 ms", "failed")
    return "\n".join(markdown_table(header, rows)) + \
        f"\n\n/metrics scraped {r['scrapes']['done']} times, {r['scrapes']['failed']} failed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=40, help="c=1 requests per round")
    p.add_argument("--rate", type=float, default=20.0, help="open-loop arrivals per second")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of each open loop")
    p.add_argument("--prewarm", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(table(measure(args, folder), args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
