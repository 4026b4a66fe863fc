#!/usr/bin/env python3
"""Stress snekbox with floods, slow and vanishing clients, memory attacks, kill -9 and SIGTERM.

Starts its own server (or targets one on loopback with --url: then the phases that kill
the server are skipped) and runs phases, each bounded in requests and time:

  overload         16 x workers clients, no pause between requests, for 30 s
  slow-clients     200 stalled connections held open while normal traffic runs
  disconnects      clients that send an evaluation and hang up while it waits or runs
  big-answers      10 clients ask for a 40 MiB output file each and never read the
                   answer: the server must cut them off after --client-timeout, holding
                   at most one answer per worker meanwhile
  stalled-bodies   40 connections send the headers of a body just under
                   --max-request-size and part of it, then stall: bodies count against
                   the server's budget as they arrive, past it they get 503, and the
                   stalled ones must be dropped within --client-timeout
  hard-link-flood  evaluations that make ~300k hard links in /home for the output
                   collection to walk: it keeps at most the file limit
  kill-9           kill -9 of the server during evaluations, then a restart
  sigterm          SIGTERM during load: running evaluations finish, queued ones get 503

For each it prints requests sent, answers by status, connection errors, p50/p99 of the
normal traffic (of the attack itself where noted), what leaked afterwards (jail
processes, tmpfs mounts, cgroups, server file descriptors and threads) and the server's
peak RSS during the phase (VmRSS sampled every 50 ms, and VmHWM reset at the start).
Standard library only; run as root from the repo:

    python3 tools/stress_snekbox.py [--workers 2] [--phases big-answers,stalled-bodies] [--json]
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

from harness import (DEBIAN_PYTHON, ROOT, Client, PeakRss, eval_request, jail_cgroups,
                     jail_pids_using, markdown_table, parse_url, proc_status, run_parallel,
                     start_server, summary, tcp_state)

sys.path.insert(0, ROOT)
import snekbox  # noqa: E402  (for the paths where jails, mounts and cgroups live)

NORMAL = "print(1)"
MiB = 1024 * 1024

# An output file of %d MiB, written 1 MiB at a time (the jail has 70 MiB, /home 48 MiB).
BIG_ANSWER = """\
chunk = b"x" * 2**20
with open("/home/out", "wb") as f:
    for _ in range(%d):
        f.write(chunk)
"""

# As many hard links of one file in /home as fit in the time limit (6 s), up to %d.
HARD_LINKS = """\
import os, time
open("/home/target", "w").write("x")
end = time.monotonic() + %g
n = 0
try:
    while n < %d:
        os.link("/home/target", f"/home/l{n}")
        n += 1
        if n %% 1000 == 0 and time.monotonic() > end:
            break
except OSError as e:
    print("stopped:", e.strerror)
print(n)
"""


class Target:
    """The server under test, and what it has left behind."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.proc = None
        self.pids: set[int] = set()     # of every server started, for what they left
        if args.url:
            self.host, self.port = parse_url(args.url)
        else:
            self.host = "127.0.0.1"
            self.start()

    def start(self, port: int | None = None) -> None:
        a = self.args
        self.proc, self.port, _ = start_server(
            a.python, "--workers", str(a.workers), "--prewarm", str(a.prewarm),
            "--client-timeout", str(a.client_timeout), "--max-request-size",
            str(a.max_request_size), "--max-body-memory", str(a.max_body_memory), port=port)
        self.pids.add(self.proc.pid)
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

    def ours(self, pid: str) -> bool:
        """Whether the cgroup of a jail of the server ``pid`` counts as this script's
        servers' (so that other snekbox servers on the host don't count): that process
        descends from one of them, or is gone (the cgroup was left behind)."""
        if not self.local:
            return True
        for _ in range(16):
            if not pid.isdigit() or int(pid) <= 1:
                return False
            if int(pid) in self.pids:
                return True
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = f.read().rpartition(")")[2].split()[1]
            except (OSError, IndexError):
                return True     # gone: left behind
        return False

    def memfs_folders(self) -> list[str]:
        root = snekbox.DEFAULT_MEMFS_BASE
        return [os.path.join(root, d) for d in os.listdir(root)
                if not self.local or d.partition("-")[0] in map(str, self.pids)] \
            if os.path.isdir(root) else []

    def resources(self) -> dict:
        """Jails, mounts and cgroups on the host (this script's servers' when it started
        them); fds and threads of the server."""
        folders = tuple(f + "/" for f in self.memfs_folders())
        jails = len(jail_pids_using(folders)) if folders else 0
        with open("/proc/mounts") as f:
            mounts = sum(line.split()[1].startswith(folders) for line in f) if folders else 0
        # A jail's group, once per jail (on cgroup v1 it is in each controller's tree).
        cgroups = sum(self.ours(name.split("-")[2]) for name in set(jail_cgroups()))
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
        # An idle server holds its warm jails (a tmpfs and a cgroup each) and nothing
        # else on the host; its fds and threads are compared with its own at start.
        idle = {"jails": self.args.prewarm, "mounts": self.args.prewarm,
                "cgroups": self.args.prewarm} if self.local and self.proc.poll() is None \
            else {}
        return {k: max(0, v - (self.baseline.get(k, 0) if k in ("fds", "threads") else idle.get(k, 0)))
                for k, v in now.items()}

    def pid(self) -> int | None:
        """The server's pid while it runs (None when it is remote or gone)."""
        return self.proc.pid if self.local and self.proc.poll() is None else None

    def rss(self) -> float:
        pid = self.pid()
        return proc_status(pid, "VmRSS") if pid else float("nan")

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


def peek_status(s: socket.socket) -> int:
    """The status of an answer waiting on ``s``, without taking it (0: none yet)."""
    try:
        head = s.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return 0
    return int(head[9:12]) if len(head) == 12 and head.startswith(b"HTTP/1.") else 0


def unread_answer(target: Target, request: bytes, deadline: float) -> dict:
    """Send ``request`` on a connection with a small receive buffer and never read the
    answer; watch (peeking, never taking data) until the server closes it or ``deadline``.

    outcome: "reset" or "closed" by the server, "answered" (not 200), "unread" (a 200
    still open at the deadline), "queued" (no answer yet) or "connection error"."""
    out = {"status": 0, "outcome": "queued", "started": None, "cut_after": None}
    began = time.monotonic()
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect((target.host, target.port))
        s.sendall(request)
    except OSError:
        s.close()
        out["outcome"] = "connection error"
        return out
    answered = None
    try:
        while time.monotonic() < deadline:
            state = tcp_state(s)
            if not out["status"]:
                out["status"] = peek_status(s)
                if out["status"]:
                    answered = time.monotonic()
                    out["started"] = answered - began
                    if out["status"] != 200:
                        out["outcome"] = "answered"
                        return out
                    out["outcome"] = "unread"
            if state in ("closed", "close-wait"):
                out["outcome"] = "reset" if state == "closed" else "closed"
                if answered is not None:
                    out["cut_after"] = time.monotonic() - answered
                return out
            time.sleep(0.05)
        if answered is not None:
            out["open_for"] = deadline - answered
        return out
    finally:
        s.close()


def phase_big_answers(target: Target) -> dict:
    args = target.args
    idle = target.rss()
    request = eval_request(BIG_ANSWER % args.big_answer_mib)
    deadline = time.monotonic() + args.big_answer_seconds
    results: list = []
    lock = threading.Lock()

    def one() -> None:
        r = unread_answer(target, request, deadline)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(args.big_answer_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = collections.Counter(r["outcome"] for r in results)
    statuses = collections.Counter(str(r["status"]) for r in results if r["status"])
    # Answers start in arrival order as workers free up: an answer's worker is free again
    # when the answer `workers` places later starts (not counting the starts that the
    # clients' own hang-up at the end of the phase let through).
    starts = sorted(r["started"] for r in results
                    if r["started"] is not None and r["started"] < args.big_answer_seconds - 0.5)
    held = [b - a for a, b in zip(starts, starts[args.workers:])]
    limit = args.client_timeout + 5
    out = {"sent": len(results),
           "by_status": {**dict(sorted(statuses.items())),
                         **({"queued": outcomes["queued"]} if outcomes["queued"] else {})},
           "connection_errors": outcomes["connection error"],
           "latency": summary(held),    # how long an unread answer held its worker
           "outcomes": dict(outcomes), "idle_rss_mib": idle,
           "reset_after": summary([r["cut_after"] for r in results if r["cut_after"]]),
           # Unread 200s the server left open for longer than the client timeout allows.
           "not_cut_off": sum(r.get("open_for", 0) > limit for r in results),
           "longest_open": max((r.get("open_for", 0) for r in results), default=0),
           "answer_mib": args.big_answer_mib * 4 / 3,
           "clients": sorted(({k: round(v, 2) if isinstance(v, float) else v
                               for k, v in r.items()} for r in results),
                             key=lambda r: r["started"] or 1e9)}
    normal = traffic(target, 1, 2)
    out["sent"] += normal["sent"]
    out["connection_errors"] += normal["connection_errors"]
    out["by_status"].update({f"after: {k}": v for k, v in normal["by_status"].items()})
    # What may be held: one output file per worker, plus what an idle server holds.
    out["rss_bound_mib"] = idle + args.workers * 1.25 * args.big_answer_mib + 16
    out["leaked"] = target.leaks()
    return out


def phase_stalled_bodies(target: Target) -> dict:
    args = target.args
    idle = target.rss()
    length = args.max_request_size - 1024
    budget = args.max_body_memory or 4 * args.max_request_size
    part = min(args.stalled_part_mib * MiB, length // 2)
    head = (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length)
    first = b'{"input": "' + b" " * (64 * 1024 - 11)
    stop = threading.Event()
    results: list = []
    lock = threading.Lock()

    def stall() -> None:
        r = {"status": 0, "outcome": "connection error", "answered_after": None,
             "dropped_after": None}
        started = time.monotonic()
        try:
            with socket.create_connection((target.host, target.port), timeout=5) as s:
                s.sendall(head + first)
                while time.monotonic() < started + 2 and not r["status"] \
                        and tcp_state(s) == "established":
                    r["status"] = peek_status(s)
                    time.sleep(0.02)
                if r["status"] or tcp_state(s) != "established":
                    r["outcome"] = "refused"
                    r["answered_after"] = time.monotonic() - started
                else:
                    r["outcome"] = "held"
                    sent = len(first)
                    try:
                        while sent < part:
                            s.sendall(first[:min(len(first), part - sent)])
                            sent += len(first)
                    except OSError:     # refused part-way: the budget is spent
                        r["status"] = peek_status(s) or 503
                        r["answered_after"] = time.monotonic() - started
                    stalled = time.monotonic()
                    while not stop.is_set():
                        state = tcp_state(s)
                        r["status"] = r["status"] or peek_status(s)
                        if state != "established" or r["status"]:
                            r["outcome"] = "dropped"
                            r["dropped_after"] = time.monotonic() - stalled
                            break
                        stop.wait(0.05)
        except OSError:
            pass
        with lock:
            results.append(r)

    stallers = [threading.Thread(target=stall, daemon=True) for _ in range(args.stalled_bodies)]
    started = time.monotonic()
    for t in stallers:
        t.start()
    time.sleep(3)        # refused at once, or held with part of their bodies sent
    during = traffic(target, 1, 3)
    # The server should drop the held ones once they stall for --client-timeout.
    give_up = time.monotonic() + args.client_timeout + 10
    while time.monotonic() < give_up and sum(t.is_alive() for t in stallers):
        time.sleep(0.1)
    held_at_end = sum(t.is_alive() for t in stallers)
    held_for = time.monotonic() - started
    stop.set()
    for t in stallers:
        t.join(5)
    time.sleep(0.5)
    after = traffic(target, 1, 2)
    # A body is refused (503) once its next part doesn't fit the budget, at its start or
    # after some of it arrived; held, the others, until they are dropped for stalling.
    refused = [r for r in results if r["outcome"] == "refused" or r["status"] == 503]
    held = [r for r in results if r["outcome"] in ("held", "dropped") and r not in refused]
    dropped = [r for r in held if r["outcome"] == "dropped"]
    by_status = collections.Counter(str(r["status"]) for r in refused)
    out = {"sent": len(results) + during["sent"] + after["sent"],
           "by_status": {**dict(sorted(by_status.items())), "held": len(held)},
           "connection_errors": sum(r["outcome"] == "connection error" for r in results)
           + during["connection_errors"] + after["connection_errors"],
           "latency": during["latency"],        # normal traffic while bodies are held
           "held_fit": -(-budget // part), "refused_after": summary(
               [r["answered_after"] for r in refused if r["answered_after"] is not None]),
           "held_dropped_by_server": len(dropped),
           "dropped_after": summary([r["dropped_after"] for r in dropped]),
           "dropped_statuses": dict(collections.Counter(str(r["status"]) for r in dropped)),
           "held_at_end": held_at_end, "held_for": held_for, "body_length": length,
           "part_mib": part / MiB,
           "idle_rss_mib": idle,
           "rss_bound_mib": idle + budget / MiB + 16}
    out["by_status"].update({f"dropped: {k}": v for k, v in out["dropped_statuses"].items()})
    out["by_status"].update({f"during: {k}": v for k, v in during["by_status"].items()})
    out["by_status"].update({f"after: {k}": v for k, v in after["by_status"].items()})
    out["leaked"] = target.leaks()
    return out


def phase_hard_link_flood(target: Target) -> dict:
    args = target.args
    idle = target.rss()
    code = HARD_LINKS % (args.link_seconds, args.links)
    clients = [target.client() for _ in range(args.workers)]
    runs: list = []
    lock = threading.Lock()

    def one(i: int) -> tuple[int, float]:
        status, elapsed, data = clients[i].post(code)
        if status == 200 and data:
            lines = (data.get("stdout") or "").split()
            with lock:
                runs.append({"links": int(lines[-1]) if lines and lines[-1].isdigit() else None,
                             "files": len(data.get("files") or []),
                             "stdout": (data.get("stdout") or "")[-200:],
                             "returncode": data.get("returncode")})
        return status, elapsed

    results, _ = run_parallel(one, args.workers, args.link_flood_seconds,
                              max_each=args.link_runs)
    for c in clients:
        c.close()
    out = tally(results)        # latency: of the flooding evaluations themselves
    links = [r["links"] for r in runs if r["links"] is not None]
    out.update({"links_min_max": (min(links, default=0), max(links, default=0)),
                "files_returned_max": max((r["files"] for r in runs), default=0),
                "files_limit": args.files_limit,
                "runs_without_count": [r["stdout"] for r in runs if r["links"] is None][:3],
                "idle_rss_mib": idle, "rss_bound_mib": idle + 16})
    normal = traffic(target, 1, 2)
    out["sent"] += normal["sent"]
    out["connection_errors"] += normal["connection_errors"]
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
    os.kill(target.proc.pid, signal.SIGKILL)
    target.proc.wait()
    for t in threads:
        t.join(10)
    orphans = target.resources()["jails"]
    target.start(port=target.port)          # the restart cleans up after the crash
    out = tally(results)
    out["orphan_jails_before_restart"] = orphans
    out["leaked"] = target.leaks()
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
    target.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    code = target.proc.wait(30)
    out = tally(results)
    out["exit_code"] = code
    time.sleep(target.args.settle)
    out["leaked"] = target.resources()     # the server is gone: jails, mounts, cgroups
    return out


def verdict(name: str, r: dict, args: argparse.Namespace) -> bool:
    """Whether the phase passed; what failed goes to r["failed"]."""
    failed = r.setdefault("failed", [])
    status = r["by_status"]
    if any(int(k.split()[-1]) >= 500 and k.split()[-1] != "503"
           for k in status if k.split()[-1].isdigit()):
        failed.append("answers of 5xx other than 503")
    if any(r["leaked"].values()):
        failed.append("resources leaked")
    if name == "slow-clients" and not r["p99_vs_idle"] <= 2.0:
        failed.append("normal p99 over twice the idle one")
    if name == "sigterm" and not (r["exit_code"] == 0 and status.get("200", 0) >= 1):
        failed.append("no clean exit with the running evaluations answered")
    peak, bound = r.get("peak_rss_mib", float("nan")), r.get("rss_bound_mib")
    if bound is not None and peak > bound:
        failed.append(f"peak RSS {peak:.1f} MiB over the bound of {bound:.1f} MiB")
    if name in ("big-answers", "stalled-bodies", "hard-link-flood") \
            and not status.get("after: 200", 0) >= 1:
        failed.append("no normal request served after the attack")
    limit = args.client_timeout + 5
    if name == "big-answers":
        if not status.get("200", 0):
            failed.append("no big answer started")
        if r["not_cut_off"] or not r["reset_after"]["p99"] <= limit * 1000:
            failed.append(f"{r['not_cut_off']} unread answers still open {limit:g} s and more "
                          f"after they started (up to {r['longest_open']:.1f} s)")
        if not r["latency"]["p99"] <= limit * 1000:
            failed.append(f"an unread answer held its worker {r['latency']['p99'] / 1000:.1f} s")
    if name == "stalled-bodies":
        if r["by_status"]["held"] > r["held_fit"]:
            failed.append(f"{r['by_status']['held']} bodies held, over the {r['held_fit']} "
                          "that fit the budget")
        if any(k.isdigit() and k != "503" for k in status):
            failed.append("refused bodies answered other than 503")
        if r["held_at_end"] or (r["held_dropped_by_server"]
                                and not r["dropped_after"]["p99"] <= limit * 1000):
            failed.append(f"{r['held_at_end']} stalled bodies still held {r['held_for']:.0f} s "
                          "after they stalled")
        if any(not k.endswith(": 200") for k in status if k.startswith("during")):
            failed.append("normal requests refused while bodies are held")
    if name == "hard-link-flood":
        if not status.get("200", 0):
            failed.append("no flooding evaluation answered")
        if r["files_returned_max"] > r["files_limit"]:
            failed.append(f"{r['files_returned_max']} files returned, over the limit")
    return not failed


def seconds(lat: dict) -> str:
    """p50 / p99 of a summary() in seconds, or "none"."""
    return f"{lat['p50'] / 1000:.1f} / {lat['p99'] / 1000:.1f} s" if lat["n"] else "none"


def rss(r: dict) -> str:
    """The server's idle RSS and the bound a phase held it to."""
    return f"RSS idle {r['idle_rss_mib']:.1f} MiB, bound {r['rss_bound_mib']:.1f} MiB"


def note_slow_clients(r: dict) -> str:
    latency = f"normal p99 {r['latency']['p99']:.0f} ms vs {r['idle_latency']['p99']:.0f} ms idle"
    return (f"slow-clients: {r['stalled_connections_opened']} stalled connections opened; "
            f"{latency} ({r['p99_vs_idle']:.2f}x)")


def note_big_answers(r: dict) -> str:
    held = (f"each held its worker p50/p99 {seconds(r['latency'])} "
            f"(client timeout {r['client_timeout']:g} s)")
    open_after = r["client_timeout"] + 5
    cut = (f"connections reset after p50/p99 {seconds(r['reset_after'])}, {r['not_cut_off']} "
           f"still open over {open_after:g} s after their answer started "
           f"(up to {r['longest_open']:.1f} s)")
    unread = f"{r['by_status'].get('200', 0)} answers of {r['answer_mib']:.1f} MiB left unread"
    return f"big-answers: {unread}; {held}; {cut}; {rss(r)}"


def note_stalled_bodies(r: dict) -> str:
    sent = f"bodies of {r['body_length']} bytes, {r['part_mib']:g} MiB sent"
    held = f"{r['by_status']['held']} held ({r['held_fit']} fit the budget)"
    refused = f"503 after p99 {r['refused_after']['p99']:.0f} ms"
    dropped = (f"{r['held_dropped_by_server']} dropped by the server "
               f"{r['dropped_statuses'] or '(none)'} after p50/p99 {seconds(r['dropped_after'])}")
    left = f"{r['held_at_end']} still held when the phase gave up after {r['held_for']:.0f} s"
    return f"stalled-bodies: {sent}; {held}, {refused}; {dropped}, {left}; {rss(r)}"


def note_hard_link_flood(r: dict) -> str:
    low, high = r["links_min_max"]
    return (f"hard-link-flood: {low}-{high} hard links per evaluation; at most "
            f"{r['files_returned_max']} files returned (limit {r['files_limit']}); {rss(r)}")


NOTES = {"slow-clients": note_slow_clients, "big-answers": note_big_answers,
         "stalled-bodies": note_stalled_bodies, "hard-link-flood": note_hard_link_flood,
         "kill-9": lambda r: (f"kill-9: {r['orphan_jails_before_restart']} jails orphaned by "
                              "the kill, none left after the restart"),
         "sigterm": lambda r: f"sigterm: the server exited with {r['exit_code']}"}


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
    lines = markdown_table(header, rows)
    notes = [NOTES[name](r) for name, r in results.items() if name in NOTES]
    notes += [f"{name} FAILED: {'; '.join(r['failed'])}" for name, r in results.items()
              if r.get("failed")]
    return "\n".join(lines + [""] + notes)


PHASES = {"overload": phase_overload, "slow-clients": phase_slow_clients,
          "disconnects": phase_disconnects, "big-answers": phase_big_answers,
          "stalled-bodies": phase_stalled_bodies, "hard-link-flood": phase_hard_link_flood,
          "kill-9": phase_kill_9, "sigterm": phase_sigterm}


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
    p.add_argument("--phases", help="comma-separated phases to run, in their usual order "
                                    f"(default: all: {','.join(PHASES)})")
    p.add_argument("--client-timeout", type=float, default=snekbox.Settings.client_timeout,
                   help="the server's --client-timeout (give the server's own with --url)")
    p.add_argument("--max-request-size", type=int, default=snekbox.Settings.max_request_size,
                   help="the server's --max-request-size")
    p.add_argument("--max-body-memory", type=int, default=0,
                   help="the server's --max-body-memory (0: 4 x --max-request-size)")
    p.add_argument("--files-limit", type=int, default=snekbox.Settings.files_limit,
                   help="the server's --files-limit (not passed on: for the checks)")
    p.add_argument("--big-answer-clients", type=int, default=10)
    p.add_argument("--big-answer-mib", type=int, default=40, help="output file size")
    p.add_argument("--big-answer-seconds", type=float, default=35,
                   help="how long the big-answers clients watch at most")
    p.add_argument("--stalled-bodies", type=int, default=40, help="stalled connections")
    p.add_argument("--stalled-part-mib", type=float, default=4,
                   help="MiB of each stalled body sent before stalling")
    p.add_argument("--links", type=int, default=300_000, help="hard links per evaluation")
    p.add_argument("--link-seconds", type=float, default=4.5,
                   help="seconds an evaluation makes links (the jail's limit is 6)")
    p.add_argument("--link-runs", type=int, default=3, help="flooding evaluations per worker")
    p.add_argument("--link-flood-seconds", type=float, default=25)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    chosen = args.phases.split(",") if args.phases else list(PHASES)
    unknown = [n for n in chosen if n not in PHASES]
    if unknown:
        p.error(f"unknown phases: {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if args.url and {"kill-9", "sigterm"} & set(chosen):
        print("kill-9 and sigterm are skipped with --url", file=sys.stderr)

    target = Target(args)
    phases = [(name, run) for name, run in PHASES.items() if name in chosen
              and (target.local or name not in ("kill-9", "sigterm"))]
    results = {}
    try:
        for name, run in phases:
            print(f"phase {name}...", file=sys.stderr)
            peak = PeakRss(target.pid).start()
            try:
                r = run(target)
            finally:
                r_peak = peak.stop()
            r["peak_rss_mib"] = r_peak
            r["client_timeout"] = args.client_timeout
            r["pass"] = verdict(name, r, args)
            results[name] = r
    finally:
        target.stop()
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
