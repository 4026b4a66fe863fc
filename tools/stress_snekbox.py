#!/usr/bin/env python3
"""Stress snekbox with floods, slow and vanishing clients, kill -9 and SIGTERM.

Starts its own server (or targets one on loopback with --url: then the phases that kill
the server are skipped) and runs phases, each bounded in requests and time:

  overload      16 x workers clients, no pause between requests, for 30 s
  slow-clients  200 stalled connections held open while normal traffic runs
  disconnects   clients that send an evaluation and hang up while it waits or runs
  kill-9        kill -9 of the server during evaluations, then a restart
  sigterm       SIGTERM during load: running evaluations finish, queued ones get 503

For each it prints requests sent, answers by status, connection errors, p50/p99 of the
normal traffic, what leaked afterwards (jail processes, tmpfs mounts, cgroups, server
file descriptors and threads) and the server's peak RSS. Standard library only; run as
root from the repo:

    python3 tools/stress_snekbox.py [--workers 2] [--overload-seconds 30] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import sys
import threading
import time

from harness import (DEBIAN_PYTHON, ROOT, Client, parse_url, proc_status, run_parallel,
                     start_server, summary)

sys.path.insert(0, ROOT)
import snekbox  # noqa: E402  (for the paths where jails, mounts and cgroups live)

NORMAL = "print(1)"


class Target:
    """The server under test, and what it has left behind."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.proc = None
        if args.url:
            self.host, self.port = parse_url(args.url)
        else:
            self.host = "127.0.0.1"
            self.start()

    def start(self, port: int | None = None) -> None:
        self.proc, self.port, _ = start_server(self.args.python, "--workers",
                                               str(self.args.workers), "--prewarm",
                                               str(self.args.prewarm), port=port)
        self.wait_idle()
        self.baseline = self.resources()

    def wait_idle(self, timeout: float = 15) -> None:
        """Until nothing runs or waits and the warm pool is full again."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = client.health()
            if health and health["running"] == 0 and health["waiting"] == 0 \
                    and health.get("warm", 0) >= self.args.prewarm:
                break
            time.sleep(0.05)
        client.close()

    @property
    def local(self) -> bool:
        return self.proc is not None

    def client(self) -> Client:
        return Client(self.host, self.port)

    def memfs_folders(self) -> list[str]:
        root = snekbox.DEFAULT_MEMFS_ROOT
        return [os.path.join(root, d) for d in os.listdir(root)] if os.path.isdir(root) else []

    def resources(self) -> dict:
        """Jails, mounts and cgroups on the host; fds and threads of the server."""
        folders = tuple(f + "/" for f in self.memfs_folders())
        jails = 0
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    jails += any(a.startswith(folders) for a in f.read().decode(errors="replace").split("\0"))
            except OSError:
                pass
        with open("/proc/mounts") as f:
            mounts = sum(line.split()[1].startswith(snekbox.DEFAULT_MEMFS_ROOT + "/") for line in f)
        cfg = snekbox.JailConfig.from_file(snekbox.DEFAULT_CONFIG)
        cgroups = 0
        for parent in (os.path.join(cfg.mem_mount, cfg.mem_parent),
                       os.path.join(cfg.pids_mount, cfg.pids_parent)):
            if os.path.isdir(parent):
                cgroups += sum(d.startswith("NSJAIL.") for d in os.listdir(parent))
        result = {"jails": jails, "mounts": mounts, "cgroups": cgroups}
        if self.local and self.proc.poll() is None:
            result["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
            result["threads"] = int(proc_status(self.proc.pid, "Threads"))
        return result

    def leaks(self) -> dict:
        """What is left once the server has gone idle, beyond what an idle one holds."""
        self.wait_idle()
        time.sleep(self.args.settle)      # let connections close and threads end
        now = self.resources()
        # An idle server holds its warm jails (a tmpfs and two cgroups each) and nothing
        # else on the host; its fds and threads are compared with its own at start.
        idle = {"jails": self.args.prewarm, "mounts": self.args.prewarm,
                "cgroups": 2 * self.args.prewarm} if self.local and self.proc.poll() is None \
            else {}
        return {k: max(0, v - (self.baseline.get(k, 0) if k in ("fds", "threads") else idle.get(k, 0)))
                for k, v in now.items()}

    def peak_rss(self) -> float:
        if self.local and self.proc.poll() is None:
            return proc_status(self.proc.pid, "VmHWM")
        return float("nan")

    def stop(self) -> int | None:
        if self.local and self.proc.poll() is None:
            self.proc.terminate()
            return self.proc.wait(30)
        return None


def tally(results: list[tuple[int, float]]) -> dict:
    statuses = collections.Counter(status for status, _ in results)
    normal = [elapsed for status, elapsed in results if status == 200]
    return {"sent": len(results), "by_status": {str(k): v for k, v in sorted(statuses.items()) if k},
            "connection_errors": statuses.get(0, 0), "latency": summary(normal)}


def traffic(target: Target, concurrency: int, seconds: float, code: str = NORMAL) -> dict:
    clients = [target.client() for _ in range(concurrency)]
    results, _ = run_parallel(lambda i: clients[i].post(code)[:2], concurrency, seconds,
                              max_each=100_000)
    for c in clients:
        c.close()
    return tally(results)


def phase_overload(target: Target) -> dict:
    out = traffic(target, 16 * target.args.workers, target.args.overload_seconds)
    out["leaked"] = target.leaks()
    return out


def phase_slow_clients(target: Target) -> dict:
    idle = traffic(target, 1, target.args.phase_seconds)
    stop = threading.Event()
    held = collections.Counter()

    def stall() -> None:
        # Hold a connection with half a request; reopen it when the server drops it.
        while not stop.is_set():
            try:
                with socket.create_connection((target.host, target.port), timeout=5) as s:
                    s.sendall(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
                    held["opened"] += 1
                    while not stop.is_set():
                        s.settimeout(0.5)
                        try:
                            if s.recv(1024) == b"":
                                break
                        except socket.timeout:
                            continue
            except OSError:
                held["refused"] += 1
                time.sleep(0.1)

    stallers = [threading.Thread(target=stall, daemon=True) for _ in range(200)]
    for t in stallers:
        t.start()
    time.sleep(0.5)
    out = traffic(target, 1, target.args.phase_seconds)
    stop.set()
    for t in stallers:
        t.join(5)
    out["idle_latency"] = idle["latency"]
    out["stalled_connections_opened"] = held["opened"]
    out["p99_vs_idle"] = out["latency"]["p99"] / idle["latency"]["p99"]
    out["leaked"] = target.leaks()
    return out


def phase_disconnects(target: Target) -> dict:
    body = json.dumps({"input": "import time; time.sleep(3)"}).encode()
    request = (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def hang_up(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        try:
            with socket.create_connection((target.host, target.port), timeout=5) as s:
                s.sendall(request)
                time.sleep(0.2)        # long enough to be running or queued
            return -1, time.perf_counter() - started    # -1: hung up on purpose
        except OSError:
            return 0, time.perf_counter() - started

    results, _ = run_parallel(hang_up, 4 * target.args.workers, target.args.phase_seconds,
                              max_each=1000)
    out = tally([(s if s >= 0 else 1, e) for s, e in results])
    out["by_status"] = {"hung up": out["by_status"].pop("1", 0), **out["by_status"]}
    normal = traffic(target, 1, 2)
    out["latency"] = normal["latency"]
    out["by_status"].update({f"after: {k}": v for k, v in normal["by_status"].items()})
    out["leaked"] = target.leaks()
    return out


def phase_kill_9(target: Target) -> dict:
    clients = [target.client() for _ in range(2 * target.args.workers)]
    results: list = []

    def load(i: int) -> None:
        for _ in range(50):
            status, elapsed, _ = clients[i].post("import time; time.sleep(1)")
            results.append((status, elapsed))
            if status == 0:
                return

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    time.sleep(1.5)
    peak = target.peak_rss()
    os.kill(target.proc.pid, signal.SIGKILL)
    target.proc.wait()
    for t in threads:
        t.join(10)
    orphans = target.resources()["jails"]
    target.start(port=target.port)          # the restart cleans up after the crash
    out = tally(results)
    out["orphan_jails_before_restart"] = orphans
    out["leaked"] = target.leaks()
    out["peak_rss_mib"] = peak
    return out


def phase_sigterm(target: Target) -> dict:
    clients = [target.client() for _ in range(4 * target.args.workers)]
    results: list = []
    lock = threading.Lock()

    def one(i: int) -> None:
        status, elapsed, _ = clients[i].post("import time; time.sleep(1); print('done')")
        with lock:
            results.append((status, elapsed))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    peak = target.peak_rss()
    target.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    code = target.proc.wait(30)
    out = tally(results)
    out["exit_code"] = code
    time.sleep(target.args.settle)
    out["leaked"] = target.resources()     # the server is gone: jails, mounts, cgroups
    out["peak_rss_mib"] = peak
    return out


def verdict(name: str, r: dict) -> bool:
    bad_status = any(k.isdigit() and int(k) >= 500 and k != "503" for k in r["by_status"])
    leaked = any(r["leaked"].values())
    ok = not bad_status and not leaked
    if name == "slow-clients":
        ok = ok and r["p99_vs_idle"] <= 2.0
    if name == "sigterm":
        ok = ok and r["exit_code"] == 0 and r["by_status"].get("200", 0) >= 1
    return ok


def table(results: dict) -> str:
    header = ("phase", "sent", "answers by status", "conn errors", "p50 / p99 ms", "leaked",
              "peak RSS", "pass")
    rows = []
    for name, r in results.items():
        lat = r["latency"]
        leaked = ", ".join(f"{k} {v}" for k, v in r["leaked"].items() if v) or "nothing"
        rows.append((name, str(r["sent"]), " ".join(f"{k}: {v}" for k, v in r["by_status"].items()),
                     str(r["connection_errors"]), f"{lat['p50']:.0f} / {lat['p99']:.0f}",
                     leaked, f"{r.get('peak_rss_mib', float('nan')):.1f} MiB",
                     "yes" if r["pass"] else "NO"))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    notes = []
    if "slow-clients" in results:
        r = results["slow-clients"]
        notes.append(f"slow-clients: {r['stalled_connections_opened']} stalled connections opened; "
                     f"normal p99 {r['latency']['p99']:.0f} ms vs {r['idle_latency']['p99']:.0f} ms "
                     f"idle ({r['p99_vs_idle']:.2f}x)")
    if "kill-9" in results:
        notes.append(f"kill-9: {results['kill-9']['orphan_jails_before_restart']} jails orphaned "
                     "by the kill, none left after the restart")
    if "sigterm" in results:
        notes.append(f"sigterm: the server exited with {results['sigterm']['exit_code']}")
    return "\n".join(lines + [""] + notes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="stress a running server on loopback instead of starting one")
    p.add_argument("--workers", type=int, default=2, help="server workers (default: 2)")
    p.add_argument("--python", default=DEBIAN_PYTHON, help="interpreter for the server")
    p.add_argument("--prewarm", type=int, default=snekbox.Settings.prewarm,
                   help="the server's warm jails (default: snekbox's default)")
    p.add_argument("--overload-seconds", type=float, default=30)
    p.add_argument("--phase-seconds", type=float, default=8, help="length of the other phases")
    p.add_argument("--settle", type=float, default=1.0, help="seconds to wait before counting leaks")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    target = Target(args)
    phases = [("overload", phase_overload), ("slow-clients", phase_slow_clients),
              ("disconnects", phase_disconnects)]
    if target.local:
        phases += [("kill-9", phase_kill_9), ("sigterm", phase_sigterm)]
    results = {}
    try:
        for name, run in phases:
            print(f"phase {name}...", file=sys.stderr)
            r = run(target)
            r.setdefault("peak_rss_mib", target.peak_rss())
            r["pass"] = verdict(name, r)
            results[name] = r
    finally:
        target.stop()
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
