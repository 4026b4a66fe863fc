#!/usr/bin/env python3
"""Benchmark snekbox against its floor: the bare nsjail run that each evaluation costs.

Starts a server (or targets one with --url) and, in the same run, spawns the very
nsjail command line the server builds, directly, to measure the floor. Reports
latency at concurrency 1, throughput at concurrency = workers and 4 x workers, the
server's idle and peak memory, its start-up time to the first successful evaluation,
and the ratio of each to the floor. Standard library only; run as root from the repo:

    python3 tools/bench_snekbox.py                  # starts snekbox.py with 2 workers
    python3 tools/bench_snekbox.py --workers 4 --json
    python3 tools/bench_snekbox.py --url http://127.0.0.1:8060 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from harness import (DEBIAN_PYTHON, ROOT, Client, parse_url, proc_status, run_parallel,
                     start_server, summary)

sys.path.insert(0, ROOT)
import snekbox  # noqa: E402  (the repo's module, for the floor's command line)

PRINT = "print(1)"
HEAVY = ("import json, re\n"
         "data = [{'n': i, 's': str(i) * 5} for i in range(20000)]\n"
         "text = json.dumps(data)\n"
         "print(len(re.findall(r'\"n\": (\\d+)', text)), len(json.loads(text)))")


class Floor:
    """The server's nsjail command line for one evaluation, spawned directly."""

    def __init__(self):
        self.sandbox = snekbox.Sandbox()
        self.home = os.path.join(self.sandbox.memfs_root, "floor")
        os.mkdir(self.home)
        snekbox.mount_tmpfs(self.home, self.sandbox.memfs_size)

    def run(self, code: str) -> float:
        log_r, log_w = os.pipe()
        command = self.sandbox.command(self.home, log_w, ["-c", code])
        started = time.perf_counter()
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, pass_fds=(log_w,), env={})
        elapsed = time.perf_counter() - started
        os.close(log_w)
        while os.read(log_r, 65536):
            pass
        os.close(log_r)
        if proc.returncode != 0:
            raise RuntimeError(f"bare nsjail failed: {proc.stdout[-300:]!r}")
        return elapsed

    def close(self) -> None:
        snekbox.unmount(self.home)
        self.sandbox.close()


def measure(args: argparse.Namespace) -> dict:
    results: dict = {"workers": args.workers}
    proc = None
    if args.url:
        host, port = parse_url(args.url)
    else:
        host = "127.0.0.1"
        proc, port, startup = start_server(args.python, "--workers", str(args.workers))
        results["startup_s"] = startup
        time.sleep(1.0)
        results["idle_rss_mib"] = proc_status(proc.pid, "VmRSS")
    floor = Floor()
    try:
        client = Client(host, port)
        for _ in range(args.warmup):                      # warm both paths
            client.eval(PRINT)
            floor.run(PRINT)
        for name, code in (("print", PRINT), ("heavy", HEAVY)):
            served, bare = [], []
            for _ in range(args.requests if name == "print" else max(10, args.requests // 5)):
                served.append(client.eval(code))          # interleaved: same conditions
                bare.append(floor.run(code))
            results[f"{name}_c1"] = summary(served)
            results[f"{name}_c1_floor"] = summary(bare)
        client.close()

        # Throughput: the server and the floor take turns in one-second slices, so that
        # a machine whose speed drifts (a VM's neighbours) treats both alike.
        w = args.workers
        series = {f"c{w}": (w, None), f"c{4 * w}": (4 * w, None), "floor_parallel": (w, floor)}
        clients = {name: [Client(host, port) for _ in range(n)] for name, (n, f) in series.items()
                   if f is None}
        latencies = {name: [] for name in series}
        elapsed = dict.fromkeys(series, 0.0)
        for _ in range(max(1, round(args.seconds))):
            for name, (n, bare) in series.items():
                task = ((lambda i: bare.run(PRINT)) if bare
                        else (lambda i, c=clients[name]: c[i].eval(PRINT)))
                started = time.perf_counter()
                done, _ = run_parallel(task, n, 1.0, args.requests * 10)
                elapsed[name] += time.perf_counter() - started
                latencies[name] += done
        for name in series:
            results[name] = {**summary(latencies[name]), "rps": len(latencies[name]) / elapsed[name]}
        for group in clients.values():
            for c in group:
                c.close()
    finally:
        floor.close()
        if proc:
            results["peak_rss_mib"] = proc_status(proc.pid, "VmHWM")
            proc.terminate()
            proc.wait(30)
    return results


def report(r: dict) -> str:
    w = r["workers"]
    f1, p1 = r["print_c1_floor"], r["print_c1"]
    rows = [
        ("print(1), concurrency 1, p50", f"{p1['p50']:.1f} ms", f"{f1['p50']:.1f} ms",
         f"{p1['p50'] / f1['p50']:.2f}x"),
        ("  min / p90 / p99", f"{p1['min']:.1f} / {p1['p90']:.1f} / {p1['p99']:.1f} ms",
         f"{f1['min']:.1f} / {f1['p90']:.1f} / {f1['p99']:.1f} ms", ""),
        ("heavy snippet, concurrency 1, p50", f"{r['heavy_c1']['p50']:.1f} ms",
         f"{r['heavy_c1_floor']['p50']:.1f} ms",
         f"{r['heavy_c1']['p50'] / r['heavy_c1_floor']['p50']:.2f}x"),
        (f"throughput, concurrency {w} (= workers)", f"{r[f'c{w}']['rps']:.1f} req/s",
         f"{r['floor_parallel']['rps']:.1f} req/s",
         f"{r[f'c{w}']['rps'] / r['floor_parallel']['rps']:.2f}x"),
        (f"  latency p50 / p99", f"{r[f'c{w}']['p50']:.1f} / {r[f'c{w}']['p99']:.1f} ms",
         f"{r['floor_parallel']['p50']:.1f} / {r['floor_parallel']['p99']:.1f} ms", ""),
        (f"throughput, concurrency {4 * w} (4x workers)", f"{r[f'c{4 * w}']['rps']:.1f} req/s",
         "", f"{r[f'c{4 * w}']['rps'] / r['floor_parallel']['rps']:.2f}x"),
        (f"  latency p50 / p99", f"{r[f'c{4 * w}']['p50']:.1f} / {r[f'c{4 * w}']['p99']:.1f} ms",
         "", ""),
    ]
    if "idle_rss_mib" in r:
        rows += [("server memory, idle / peak (RSS)",
                  f"{r['idle_rss_mib']:.1f} / {r['peak_rss_mib']:.1f} MiB", "", ""),
                 ("start-up to first successful eval", f"{r['startup_s'] * 1000:.0f} ms", "", "")]
    header = ("what", "snekbox", "floor (bare nsjail)", "ratio")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(4)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running server on loopback instead of starting one")
    p.add_argument("--workers", type=int, default=2, help="server workers (default: 2)")
    p.add_argument("--python", default=DEBIAN_PYTHON,
                   help="interpreter for the server (default: Debian's, as on a fresh machine)")
    p.add_argument("--requests", type=int, default=200, help="requests per latency series")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seconds", type=float, default=8.0,
                   help="seconds of each throughput series, in one-second turns")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args()
    results = measure(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
