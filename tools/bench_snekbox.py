#!/usr/bin/env python3
"""Benchmark snekbox against its floor, the bare nsjail run each evaluation costs, and
optionally against another service on loopback (such as the reference snekbox).

Starts two servers, one without warm jails (--prewarm 0) and one with them (or targets
one with --url), spawns the very nsjail command line the server builds, directly, as
the floor, and measures a service at --compare in the same run with the same phases:

- closed loop at concurrency 1: requests back to back, in rounds, p50 of each round;
- open loop: Poisson arrivals at fixed rates (seeded), a new connection per request,
  as independent chat users; the latency counts from the moment the request was due;
- throughput at concurrency = workers and 4 x workers, with the servers' own CPU time
  per request (their processes' utime + stime, not the jails');
- idle memory (RSS of every process holding the listening socket) and start-up time.

The targets take turns, so a machine whose speed drifts treats them alike. Prints a
markdown table and the issue's goals as ratios to the floor, each met or missed.
Standard library only; run as root from the repo:

    python3 tools/bench_snekbox.py                  # starts snekbox.py with 2 workers
    python3 tools/bench_snekbox.py --compare http://127.0.0.1:8070   # and the reference
    python3 tools/bench_snekbox.py --url http://127.0.0.1:8060 --workers 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Callable

from harness import (DEBIAN_PYTHON, ROOT, Client, cpu_seconds, listener_pids, parse_url,
                     post_once, proc_status, rss_mib, run_parallel, start_server, summary)

sys.path.insert(0, ROOT)
import snekbox  # noqa: E402  (the repo's module, for the floor's command line)

PRINT = "print(1)"
HEAVY = ("import json, re\n"
         "data = [{'n': i, 's': str(i) * 5} for i in range(20000)]\n"
         "text = json.dumps(data)\n"
         "print(len(re.findall(r'\"n\": (\\d+)', text)), len(json.loads(text)))")
SEED = 2026
FLOOR = "floor"
LABELS = {FLOOR: "floor (bare nsjail)", "cold": "snekbox cold", "warm": "snekbox warm",
          "server": "snekbox", "compare": "compared"}


class Floor:
    """The server's nsjail command line for one evaluation, spawned directly, with nsjail
    making the jail's cgroups from the config itself, as it does when run bare (snekbox
    makes them and starts nsjail inside instead)."""

    def __init__(self):
        self.sandbox = snekbox.Sandbox()
        cgroups = self.sandbox.cgroups
        own_groups = ("--use_cgroupv2", "--cgroupv2_mount", cgroups.parents["unified"]) \
            if cgroups.version == 2 else ()
        self.commands = self.sandbox.commands._replace(host_args=own_groups)
        self.uid = self.sandbox.users.take()
        self.home = os.path.join(self.sandbox.memfs_root, "floor")
        os.mkdir(self.home)
        snekbox.mount_tmpfs(self.home, self.sandbox.memfs_size, self.uid)

    def run(self, code: str) -> float:
        """Seconds from spawning nsjail to its exit with the output read."""
        log_r, log_w = os.pipe()
        command = self.commands.line(self.home, self.uid, log_w, ["-c", code])
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


class Target:
    """A service on loopback: its address, the processes that serve it and, when this
    script started it, its process, pool size and start-up time."""

    def __init__(self, name: str, host: str, port: int, proc: subprocess.Popen | None = None,
                 prewarm: int | None = None, startup_s: float | None = None):
        self.name, self.host, self.port = name, host, port
        self.proc, self.prewarm, self.startup_s = proc, prewarm, startup_s
        self.client = Client(host, port)

    def pids(self) -> list[int]:
        """The server's own processes (not its jails)."""
        if self.proc:
            return [self.proc.pid]
        return listener_pids(self.port)

    def eval(self, code: str) -> float:
        return self.client.eval(code)

    def fresh(self, code: str) -> bool:
        """One evaluation on a new connection; True if it succeeded."""
        status, data = post_once(self.host, self.port, code)
        return status == 200 and data is not None and data.get("returncode") == 0

    def settle(self, timeout: float = 3.0) -> None:
        """Wait until a pooled server has refilled its pool, so that starting its next
        warm jail doesn't take CPU from whatever is measured next."""
        deadline = time.monotonic() + timeout
        while self.prewarm and time.monotonic() < deadline:
            health = self.client.health()
            if health and health.get("warm", 0) >= self.prewarm:
                return
            time.sleep(0.005)

    def stop(self) -> None:
        self.client.close()
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)


def start_targets(args: argparse.Namespace) -> list[Target]:
    """The server at --url, or one cold and one warm snekbox; and the one at --compare."""
    targets = []
    if args.url:
        targets.append(Target("server", *parse_url(args.url)))
    else:
        for name, prewarm in (("cold", 0), ("warm", args.prewarm)):
            proc, port, startup = start_server(args.python, "--workers", str(args.workers),
                                               "--prewarm", str(prewarm))
            targets.append(Target(name, "127.0.0.1", port, proc, prewarm, startup))
    if args.compare:
        targets.append(Target("compare", *parse_url(args.compare)))
    return targets


def idle_memory(targets: list[Target]) -> dict:
    """name -> (MiB, processes) after a second of rest."""
    for target in targets:
        target.settle()
    time.sleep(1.0)
    return {t.name: (rss_mib(t.pids()), len(t.pids())) for t in targets}


def closed_loop(targets: list[Target], floor: Floor, code: str, rounds: int, count: int,
                shuffle: Callable[[list], None]) -> dict:
    """name -> per-round latency lists; each target gets ``count`` requests back to back
    per round, the targets in a new order each round."""
    order = [FLOOR, *(t.name for t in targets)]
    by_name = {t.name: t for t in targets}
    out: dict = {name: [] for name in order}
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            run = floor.run if name == FLOOR else by_name[name].eval
            if name != FLOOR:
                by_name[name].settle()
            out[name].append([run(code) for _ in range(count)])
    return out


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Seconds from the start at which requests are due: a Poisson process of ``rate``."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


def open_loop(task: Callable[[], bool], rate: float, seconds: float, seed: int,
              max_in_flight: int = 64) -> dict:
    """Start ``task`` in a thread of its own at each Poisson arrival whatever the others
    do; latency from the moment each was due to its end. Arrivals while
    ``max_in_flight`` are still running are dropped (and counted), to stay bounded."""
    latencies: list[float] = []
    failed = dropped = 0
    lock = threading.Lock()
    in_flight = threading.BoundedSemaphore(max_in_flight)

    def one(due: float) -> None:
        nonlocal failed
        try:
            try:
                ok = task()
            except Exception:       # a failed bare nsjail; counted, not fatal
                ok = False
            elapsed = time.perf_counter() - due
            with lock:
                latencies.append(elapsed) if ok else None
                failed += not ok
        finally:
            in_flight.release()

    threads = []
    start = time.perf_counter() + 0.05
    for at in poisson_arrivals(rate, seconds, seed):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if not in_flight.acquire(blocking=False):
            dropped += 1
            continue
        thread = threading.Thread(target=one, args=(start + at,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(60)
    return {**summary(latencies), "rate": rate, "failed": failed, "dropped": dropped}


def open_loops(targets: list[Target], floor: Floor, rates: list[float], seconds: float,
               shuffle: Callable[[list], None]) -> dict:
    """name -> {rate: summary}; the same arrival times for every target."""
    order = [FLOOR, *(t.name for t in targets)]
    by_name = {t.name: t for t in targets}
    out: dict = {name: {} for name in order}
    for rate in rates:
        shuffle(order)
        for name in order:
            if name == FLOOR:
                task = lambda: bool(floor.run(PRINT))
            else:
                by_name[name].settle()
                task = lambda t=by_name[name]: t.fresh(PRINT)
            out[name][f"{rate:g}"] = open_loop(task, rate, seconds, SEED + int(rate))
    return out


def throughput(targets: list[Target], floor: Floor, workers: int, seconds: float) -> dict:
    """name -> {"c<n>": summary with rps and the server's CPU ms per request}, at
    concurrency = workers and 4 x workers, in one-second turns."""
    series = [(t, n) for t in targets for n in (workers, 4 * workers)] + [(None, workers)]
    clients = {(t.name, n): [Client(t.host, t.port) for _ in range(n)] for t, n in series if t}
    done: dict = {(t.name if t else FLOOR, n): [] for t, n in series}
    elapsed = dict.fromkeys(done, 0.0)
    cpu = dict.fromkeys(done, 0.0)
    for _ in range(max(1, round(seconds))):
        for target, n in series:
            key = (target.name if target else FLOOR, n)
            task = ((lambda i, c=clients[key]: c[i].eval(PRINT)) if target
                    else (lambda i: floor.run(PRINT)))
            pids = target.pids() if target else []
            cpu_before, started = cpu_seconds(pids), time.perf_counter()
            latencies, _ = run_parallel(task, n, 1.0, 10_000)
            elapsed[key] += time.perf_counter() - started
            cpu[key] += cpu_seconds(pids) - cpu_before
            done[key] += latencies
    for group in clients.values():
        for client in group:
            client.close()
    out: dict = {}
    for (name, n), latencies in done.items():
        out.setdefault(name, {})[f"c{n}"] = {
            **summary(latencies), "rps": len(latencies) / elapsed[name, n],
            "cpu_ms_per_request": 1000 * cpu[name, n] / max(1, len(latencies))}
    return out


def note(what: str, started: float = time.monotonic()) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.monotonic() - started:6.1f} s] {what}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace) -> dict:
    """Every phase, all targets taking turns. Latencies in ms, rates in requests/s."""
    shuffle = random.Random(SEED).shuffle
    targets = start_targets(args)
    floor = Floor()
    r: dict = {"workers": args.workers, "targets": [FLOOR, *(t.name for t in targets)],
               "info": {t.name: {"prewarm": t.prewarm, "startup_s": t.startup_s}
                        for t in targets}}
    try:
        note("started; idle memory")
        r["idle"] = idle_memory(targets)
        for _ in range(args.warmup):
            floor.run(PRINT)
            for target in targets:
                target.eval(PRINT)
        note("closed loop, c=1")
        cpu_before = {t.name: cpu_seconds(t.pids()) for t in targets}
        rounds = closed_loop(targets, floor, PRINT, args.rounds, args.requests, shuffle)
        r["c1_cpu_ms"] = {t.name: 1000 * (cpu_seconds(t.pids()) - cpu_before[t.name])
                          / (args.rounds * args.requests) for t in targets}
        r["c1_rounds"] = {name: [summary(x) for x in lists] for name, lists in rounds.items()}
        r["c1"] = {name: summary([v for x in lists for v in x]) for name, lists in rounds.items()}
        heavy = closed_loop(targets, floor, HEAVY, 1, max(5, args.requests // 4), shuffle)
        r["heavy_c1"] = {name: summary(lists[0]) for name, lists in heavy.items()}
        note("open loop")
        r["open"] = open_loops(targets, floor, args.rates, args.open_seconds, shuffle)
        note("throughput")
        r["throughput"] = throughput(targets, floor, args.workers, args.seconds)
        for target in targets:
            if target.proc:
                r["info"][target.name]["peak_rss_mib"] = proc_status(target.proc.pid, "VmHWM")
    finally:
        note("done")
        floor.close()
        for target in targets:
            target.stop()
    return r


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}x" if floor == floor and floor else ""


def table(r: dict) -> str:
    """The markdown table: a column a target, a row a measurement."""
    names, w = r["targets"], r["workers"]
    floor_p50 = r["c1"][FLOOR]["p50"]
    rows = [("c=1 back to back, p50 per round",
             *(" / ".join(f"{s['p50']:.1f}" for s in r["c1_rounds"][n]) + " ms" for n in names)),
            ("c=1 back to back, p50 (x floor) / p99",
             *(f"{r['c1'][n]['p50']:.1f} ({ratio(r['c1'][n]['p50'], floor_p50)}) / "
               f"{r['c1'][n]['p99']:.1f} ms" for n in names)),
            ("heavy snippet c=1, p50",
             *(f"{r['heavy_c1'][n]['p50']:.1f} ms" for n in names))]
    for rate in r["open"][FLOOR]:
        rows.append((f"open loop {rate} req/s, p50 / p90 / p99",
                     *(open_cell(r["open"][n][rate]) for n in names)))
    for c in (w, 4 * w):
        rows.append((f"throughput c={c}" + (" (4x workers)" if c != w else " (= workers)"),
                     *(rate_cell(r["throughput"][n].get(f"c{c}")) for n in names)))
    rows.append(("server CPU per request, c=1 / c=" + str(4 * w),
                 *(cpu_cell(r, n, 4 * w) for n in names)))
    rows.append(("idle RSS", *(idle_cell(r, n) for n in names)))
    header = ("`print(1)`", *(LABELS[n] + prewarm_note(r, n) for n in names))
    return markdown([header, *rows])


def prewarm_note(r: dict, name: str) -> str:
    prewarm = r["info"].get(name, {}).get("prewarm")
    return f" (--prewarm {prewarm})" if prewarm is not None else ""


def open_cell(s: dict) -> str:
    text = f"{s['p50']:.1f} / {s['p90']:.1f} / {s['p99']:.1f} ms"
    lost = s["failed"] + s["dropped"]
    return text + (f" ({lost} failed)" if lost else "")


def rate_cell(s: dict | None) -> str:
    return f"{s['rps']:.1f} req/s (p50 {s['p50']:.0f} ms)" if s else ""


def cpu_cell(r: dict, name: str, c: int) -> str:
    if name == FLOOR:
        return ""
    return (f"{r['c1_cpu_ms'][name]:.2f} / "
            f"{r['throughput'][name][f'c{c}']['cpu_ms_per_request']:.2f} ms")


def idle_cell(r: dict, name: str) -> str:
    if name == FLOOR:
        return ""
    mib, count = r["idle"][name]
    return f"{mib:.1f} MiB" + (f" ({count} processes)" if count != 1 else "")


def markdown(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    line = lambda row: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(row, widths)) + " |"
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|",
                      *(line(row) for row in rows[1:])])


def goals(r: dict) -> list[tuple[str, float | None, float, str, bool]]:
    """(goal, measured, target, unit, at least) for each goal of the issue; measured
    None when this run lacks what it needs (no warm server, no --compare)."""
    w, floor_p50 = r["workers"], r["c1"][FLOOR]["p50"]
    warm = "warm" if "warm" in r["c1"] else ("server" if "server" in r["c1"] else None)
    open20 = r["open"].get(warm, {}).get("20") if warm else None
    saturated = lambda n: r["throughput"][n][f"c{4 * w}"]["rps"]
    return [
        ("warm, open loop 20 req/s: p50 / floor c=1 p50",
         open20["p50"] / floor_p50 if open20 else None, 0.30, "x", False),
        ("warm, open loop 20 req/s: p99 / floor c=1 p50",
         open20["p99"] / floor_p50 if open20 else None, 1.00, "x", False),
        ("warm, closed loop c=1: p50 / floor p50",
         r["c1"][warm]["p50"] / floor_p50 if warm else None, 0.35, "x", False),
        ("cold, closed loop c=1: p50 / floor p50",
         r["c1"]["cold"]["p50"] / floor_p50 if "cold" in r["c1"] else None, 1.05, "x", False),
        (f"throughput c={4 * w}: warm / compared",
         saturated(warm) / saturated("compare") if warm and "compare" in r["c1"] else None,
         1.6, "x", True),
        ("idle RSS, warm", r["idle"][warm][0] if warm else None, 20.0, " MiB", False),
    ]


def goals_table(r: dict) -> str:
    rows = [("goal", "measured", "target", "", "the floor in the same phase")]
    for (what, value, target, unit, at_least), same in zip(goals(r), same_phase(r)):
        met = None if value is None else (value >= target if at_least else value <= target)
        rows.append((what, "n/a" if value is None else f"{value:.3g}{unit}",
                     f"{'≥' if at_least else '≤'} {target:g}{unit}",
                     {None: "not measured", True: "met", False: "**missed**"}[met], same))
    return markdown(rows)


def same_phase(r: dict) -> list[str]:
    """For the open-loop goals, the ratios to the floor's p50 at 20 req/s too: a
    machine idle between requests starts a jail slower than one kept busy back to back."""
    warm = "warm" if "warm" in r["c1"] else "server"
    floor, served = r["open"][FLOOR].get("20"), r["open"].get(warm, {}).get("20")
    if not (floor and served):
        return [""] * 6
    return [f"{served['p50'] / floor['p50']:.2f}x of {floor['p50']:.1f} ms",
            f"{served['p99'] / floor['p50']:.2f}x of {floor['p50']:.1f} ms", "", "", "", ""]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running snekbox on loopback instead of starting two")
    p.add_argument("--compare", metavar="URL",
                   help="also measure this service on loopback (e.g. the reference snekbox)")
    p.add_argument("--workers", type=int, default=2, help="server workers (default: 2)")
    p.add_argument("--prewarm", type=int, default=snekbox.Settings.prewarm,
                   help="warm jails of the pooled server (default: snekbox's default)")
    p.add_argument("--python", default=DEBIAN_PYTHON,
                   help="interpreter for the server (default: Debian's, as on a fresh machine)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the c=1 closed loop")
    p.add_argument("--requests", type=int, default=40,
                   help="requests per target per c=1 round (default: 40)")
    p.add_argument("--rates", type=float, nargs="+", default=[5.0, 20.0],
                   help="open-loop arrival rates in req/s (default: 5 20)")
    p.add_argument("--open-seconds", type=float, default=10.0,
                   help="seconds of arrivals per open-loop series (default: 10)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0,
                   help="seconds of each throughput series, in one-second turns (default: 6)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--tables", metavar="FILE",
                   help="measure nothing: print the tables of a run saved with --json")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.tables:
        with open(args.tables) as f:
            results = json.load(f)
    else:
        results = measure(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results), "", goals_table(results), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
