"""What the benchmark and the stress script share: a server to start, clients, statistics.

Standard library only. Every address used is on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNEKBOX = os.path.join(ROOT, "snekbox.py")
DEBIAN_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict:
    """min/p50/p90/p99 in milliseconds of latencies in seconds."""
    if not latencies:
        return {"n": 0, "min": float("nan"), "p50": float("nan"), "p90": float("nan"),
                "p99": float("nan")}
    ms = [v * 1000 for v in latencies]
    return {"n": len(ms), "min": min(ms), "p50": statistics.median(ms),
            "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def jail_cgroups(root: str = "/sys/fs/cgroup", depth: int = 8) -> list[str]:
    """The names of the jails' cgroups (``snekbox-jail-<server pid>-<n>``) on this host,
    wherever they are in the hierarchy it has: v1 (each controller's tree, so a jail can
    count once per controller) or v2 (under each server's own group)."""
    found = []
    folders = [(root, 0)]
    while folders:
        folder, level = folders.pop()
        try:
            entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("snekbox-jail-"):
                found.append(entry.name)
            elif level < depth:
                folders.append((entry.path, level + 1))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> float:
    """A number from /proc/<pid>/status (VmRSS and VmHWM in MiB, others as they are)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                value = int(line.split()[1])
                return value / 1024 if field.startswith("Vm") else value
    return float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Reset the VmHWM of ``pid`` to its VmRSS now (Linux 4.0+); False if that failed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """The most memory a process holds while this runs: VmRSS sampled every ``every``
    seconds, and VmHWM (reset at the start) when the process is still the same at the
    end, which catches the peaks between samples. ``pid`` is a callable, so that a
    restarted server is followed; ``stop()`` returns MiB (nan if never sampled)."""

    def __init__(self, pid, every: float = 0.05):
        self.pid = pid
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> "PeakRss":
        self.first_pid = self.pid()
        self.hwm_reset = self.first_pid is not None and reset_peak_rss(self.first_pid)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self._read("VmRSS")
            if self._stop.wait(self.every):
                break

    def _read(self, field: str) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            value = proc_status(pid, field)
        except (OSError, ValueError):
            return      # the process is gone or going
        if value == value:      # not nan
            self.samples.append(value)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        if self.hwm_reset and self.pid() == self.first_pid:
            self._read("VmHWM")
        return max(self.samples, default=float("nan"))


TCP_STATES = {1: "established", 7: "closed", 8: "close-wait"}


def tcp_state(sock: socket.socket) -> str:
    """The kernel's state of a TCP socket: after "established", "close-wait" means the
    peer closed (FIN) and "closed" that it reset the connection."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return "closed"
    return TCP_STATES.get(state, str(state))


def parse_url(url: str) -> tuple[str, int]:
    host, port = url.split("//")[-1].rstrip("/").rsplit(":", 1)
    if not host.strip("[]").startswith(("127.", "localhost", "::1")):
        raise SystemExit("the URL must be on loopback")
    return host.strip("[]"), int(port)


class Client:
    """One keep-alive connection to the server; reconnects after an error."""

    def __init__(self, host: str, port: int, timeout: float = 30, headers: dict | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def post(self, code: str) -> tuple[int, float, dict | None]:
        """POST /eval; (status, seconds, JSON); status 0 when the connection failed."""
        body = json.dumps({"input": code}).encode()
        started = time.perf_counter()
        try:
            self.conn.request("POST", "/eval", body, self.headers)
            response = self.conn.getresponse()
            data = json.loads(response.read())
            if response.getheader("Connection", "").lower() == "close":
                self.reconnect()
            return response.status, time.perf_counter() - started, data
        except (OSError, http.client.HTTPException, ValueError):
            self.reconnect()
            return 0, time.perf_counter() - started, None

    def eval(self, code: str) -> float:
        """POST /eval that must succeed; the seconds it took."""
        status, elapsed, data = self.post(code)
        if status != 200 or data["returncode"] != 0:
            raise RuntimeError(f"evaluation failed: {status} {str(data)[:200]}")
        return elapsed

    def health(self) -> dict | None:
        try:
            self.conn.request("GET", "/health")
            return json.loads(self.conn.getresponse().read())
        except (OSError, http.client.HTTPException, ValueError):
            self.reconnect()
            return None

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def close(self) -> None:
        self.conn.close()


def start_server(python: str = DEBIAN_PYTHON, *flags: str, port: int | None = None,
                 headers: dict | None = None) -> tuple[subprocess.Popen, int, float]:
    """Start snekbox.py on loopback; return it, its port and seconds to a first eval
    (sent with ``headers``, such as a token)."""
    port = port or free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([python, SNEKBOX, "--port", str(port), "--log-level", "WARNING",
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    client = Client("127.0.0.1", port, timeout=5, headers=headers)
    while time.monotonic() < deadline:
        if client.post("print(1)")[0] == 200:
            client.close()
            return proc, port, time.perf_counter() - started
        if proc.poll() is not None:
            raise RuntimeError(f"snekbox.py exited with {proc.returncode}")
        time.sleep(0.002)
    proc.kill()
    raise RuntimeError("snekbox.py did not answer within 30 s")


def run_parallel(task, concurrency: int, seconds: float, max_each: int) -> tuple[list, float]:
    """Call ``task(thread_index)`` from ``concurrency`` threads for ``seconds`` (at most
    ``max_each`` times each); return every result and the rate per second."""
    results: list = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        mine = []
        for _ in range(max_each):
            if time.monotonic() > deadline:
                break
            mine.append(task(index))
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, len(results) / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------
# Shared by the test suite and the tools: waiting, raw requests, jails, tables, servers
# --------------------------------------------------------------------------------------

def wait_until(condition, timeout: float, what: str, every: float = 0.02) -> None:
    """Poll ``condition()`` until it is true; AssertionError naming ``what`` after
    ``timeout`` seconds. Stands in for a sleep: it returns as soon as it can."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(every)


def eval_request(code: str) -> bytes:
    """The bytes of a POST /eval of ``code``, for clients that talk raw HTTP."""
    body = json.dumps({"input": code}).encode()
    return (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def jail_pids_using(folders: tuple[str, ...]) -> list[int]:
    """Processes with an argument below one of ``folders`` (each ending in "/"): the
    jails whose /home is a tmpfs there."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if name.isdigit() and any(a.startswith(folders) for a in args):
            pids.append(int(name))
    return pids


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """The lines of a markdown table, columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in [*rows, header]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return lines + ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
                    for row in rows]


LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def launch_server(python: str, *flags: str, timeout: float = 30,
                  prefix: tuple[str, ...] | list[str] = ()) -> tuple[subprocess.Popen, int, list[str]]:
    """Start snekbox.py on a free loopback port with its log on a pipe, after the
    command ``prefix`` if given; return it, its port and the log lines up to
    "listening". Fails (never hangs) when the server exits, or has not said it listens
    within ``timeout`` seconds; the caller goes on reading ``proc.stderr``."""
    proc = subprocess.Popen([*prefix, python, SNEKBOX, "--host", "127.0.0.1", "--port", "0", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)
    log: list[str] = []
    deadline = time.monotonic() + timeout
    # The deadline holds for a server that goes on talking too, not only a silent one.
    while (left := deadline - time.monotonic()) > 0 and select.select([proc.stderr], [], [], left)[0]:
        line = proc.stderr.readline().decode("utf-8", "replace")
        if not line:
            break       # the server exited
        log.append(line)
        match = LISTENING.search(line)
        if match:
            return proc, int(match[1]), log
    proc.kill()
    proc.wait()
    raise RuntimeError("server did not start:\n" + "".join(log))


def post_once(host: str, port: int, code: str, timeout: float = 30,
              headers: dict | None = None) -> tuple[int, dict | None]:
    """POST /eval on a connection of its own, closed afterwards, as a client that comes
    once; (status, JSON), status 0 when the connection failed."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/eval", json.dumps({"input": code}).encode(),
                     {"Content-Type": "application/json", "Connection": "close",
                      **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return 0, None
    finally:
        conn.close()


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listener_pids(port: int) -> list[int]:
    """The processes that hold the socket listening on ``port`` (a pre-forking server's
    master and its workers), found through /proc; empty if none is visible."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                pids.append(int(pid))
        except OSError:
            continue        # gone, or a file descriptor closed meanwhile
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes have used themselves (their waited-for
    children, such as nsjail, not counted), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])      # utime, stime
    return total / ticks


def rss_mib(pids: list[int]) -> float:
    """The resident memory of the processes together, in MiB."""
    total = 0.0
    for pid in pids:
        try:
            total += proc_status(pid, "VmRSS")
        except OSError:
            continue
    return total
