#!/usr/bin/env python3
"""Benchmark snekbox against its floor: the bare nsjail run that each evaluation costs.

Starts two servers, one without warm jails (--prewarm 0) and one with them (or targets
one with --url) and, in the same run, spawns the very nsjail command line the server
builds, directly, to measure the floor; all take turns, so a machine whose speed drifts
treats them alike. Reports latency at concurrency 1, throughput at concurrency =
workers and 4 x workers, each server's idle and peak memory and start-up time to its
first successful evaluation, and the ratios to the floor. Standard library only; run
as root from the repo:

    python3 tools/bench_snekbox.py                  # starts snekbox.py with 2 workers
    python3 tools/bench_snekbox.py --workers 4 --json
    python3 tools/bench_snekbox.py --url http://127.0.0.1:8060 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
        self.uid = self.sandbox.users.take()
        self.home = os.path.join(self.sandbox.memfs_root, "floor")
        os.mkdir(self.home)
        snekbox.mount_tmpfs(self.home, self.sandbox.memfs_size, self.uid)

    def run(self, code: str) -> float:
        log_r, log_w = os.pipe()
        command = self.sandbox.command(self.home, self.uid, log_w, ["-c", code])
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


def start_servers(args: argparse.Namespace) -> dict:
    """name -> {host, port, proc}: the server at --url, or one cold and one warm."""
    if args.url:
        host, port = parse_url(args.url)
        return {"server": {"host": host, "port": port, "proc": None}}
    servers = {}
    for name, prewarm in (("cold", 0), ("warm", args.prewarm)):
        proc, port, startup = start_server(args.python, "--workers", str(args.workers),
                                           "--prewarm", str(prewarm))
        servers[name] = {"host": "127.0.0.1", "port": port, "proc": proc, "prewarm": prewarm,
                         "startup_s": startup}
    time.sleep(1.0)
    for server in servers.values():
        server["idle_rss_mib"] = proc_status(server["proc"].pid, "VmRSS")
    return servers


def settle(client: Client, server: dict, timeout: float = 2.0) -> None:
    """Wait until a pooled server has refilled its pool, so that starting its next warm
    jail doesn't take CPU from whatever is measured next."""
    deadline = time.monotonic() + timeout
    while server.get("prewarm") and time.monotonic() < deadline:
        health = client.health()
        if health and health["warm"] >= server["prewarm"]:
            return
        time.sleep(0.002)


def measure(args: argparse.Namespace) -> dict:
    """Every series, the servers and the floor taking turns so a drifting machine treats
    all alike. Latencies in ms, rates in requests per second."""
    servers = start_servers(args)
    results: dict = {"workers": args.workers, "servers": {}, "floor": {}}
    shuffle = random.Random(2026).shuffle
    floor = Floor()
    try:
        clients = {name: Client(s["host"], s["port"]) for name, s in servers.items()}
        for _ in range(args.warmup):
            for client in clients.values():
                client.eval(PRINT)
            floor.run(PRINT)
        for label, code, count in (("print", PRINT, args.requests),
                                   ("heavy", HEAVY, max(10, args.requests // 5))):
            served = {name: [] for name in servers}
            bare = []
            order = [*clients, None]
            for _ in range(count):
                shuffle(order)      # no one always runs right after the same other
                for name in order:
                    if name is None:
                        bare.append(floor.run(code))
                    else:
                        served[name].append(clients[name].eval(code))
                        settle(clients[name], servers[name])
            for name in servers:
                results["servers"].setdefault(name, {})[f"{label}_c1"] = summary(served[name])
            results["floor"][f"{label}_c1"] = summary(bare)
        for client in clients.values():
            client.close()

        w = args.workers
        series = [(name, f"c{n}", n) for name in servers for n in (w, 4 * w)] + [(None, f"c{w}", w)]
        pools = {(name, key): [Client(servers[name]["host"], servers[name]["port"]) for _ in range(n)]
                 for name, key, n in series if name}
        done = {(name, key): [] for name, key, _ in series}
        elapsed = dict.fromkeys(done, 0.0)
        for _ in range(max(1, round(args.seconds))):
            for name, key, n in series:
                task = ((lambda i, c=pools[name, key]: c[i].eval(PRINT)) if name
                        else (lambda i: floor.run(PRINT)))
                started = time.perf_counter()
                latencies, _ = run_parallel(task, n, 1.0, args.requests * 10)
                elapsed[name, key] += time.perf_counter() - started
                done[name, key] += latencies
        for (name, key), latencies in done.items():
            target = results["servers"][name] if name else results["floor"]
            target[key] = {**summary(latencies), "rps": len(latencies) / elapsed[name, key]}
        for group in pools.values():
            for c in group:
                c.close()
    finally:
        floor.close()
        for name, server in servers.items():
            entry = results["servers"].setdefault(name, {})
            if server["proc"]:
                entry.update(prewarm=server["prewarm"], startup_s=server["startup_s"],
                             idle_rss_mib=server["idle_rss_mib"],
                             peak_rss_mib=proc_status(server["proc"].pid, "VmHWM"))
                server["proc"].terminate()
                server["proc"].wait(30)
    return results


def report(r: dict) -> str:
    w, f, servers = r["workers"], r["floor"], r["servers"]
    names = list(servers)
    label = {"cold": "snekbox, no pool", "warm": "snekbox, warm pool", "server": "snekbox"}
    header = ("what", *(label[n] + (f" ({servers[n]['prewarm']})" if "prewarm" in servers[n]
                                    else "") for n in names), "floor (bare nsjail)",
              *(f"{label[n].split(', ')[-1]} / floor" for n in names))

    def row(what, key, fmt, ratio=True):
        cells = [fmt(servers[n][key]) for n in names]
        floor_cell = fmt(f[key]) if key in f else ""
        ratios = [(f"{value(servers[n][key]) / value(f[key]):.2f}x" if ratio and key in f else "")
                  for n in names]
        return (what, *cells, floor_cell, *ratios)

    def value(entry):
        return entry["rps"] if "rps" in entry else entry["p50"]

    ms = lambda e: f"{e['p50']:.1f} ms"
    spread = lambda e: f"{e['min']:.1f} / {e['p90']:.1f} / {e['p99']:.1f} ms"
    rate = lambda e: f"{e['rps']:.1f} req/s (p50 {e['p50']:.0f} ms)"
    rows = [row("print(1), concurrency 1, p50", "print_c1", ms),
            row("  min / p90 / p99", "print_c1", spread, ratio=False),
            row("heavy snippet, concurrency 1, p50", "heavy_c1", ms),
            row(f"throughput, concurrency {w} (= workers)", f"c{w}", rate),
            row(f"throughput, concurrency {4 * w} (4x workers)", f"c{4 * w}", rate, ratio=False)]
    if all("idle_rss_mib" in servers[n] for n in names):
        blank = [""] * (1 + len(names))
        rows += [("server memory, idle / peak (RSS)",
                  *(f"{servers[n]['idle_rss_mib']:.1f} / {servers[n]['peak_rss_mib']:.1f} MiB"
                    for n in names), *blank),
                 ("start-up to first successful eval",
                  *(f"{servers[n]['startup_s'] * 1000:.0f} ms" for n in names), *blank)]
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(h).ljust(wd) for h, wd in zip(header, widths)) + " |",
             "|" + "|".join("-" * (wd + 2) for wd in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(wd) for c, wd in zip(x, widths)) + " |" for x in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running server on loopback instead of starting one")
    p.add_argument("--workers", type=int, default=2, help="server workers (default: 2)")
    p.add_argument("--prewarm", type=int, default=snekbox.Settings.prewarm,
                   help="warm jails of the pooled server (default: snekbox's default)")
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
