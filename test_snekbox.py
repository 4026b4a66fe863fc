"""Tests for snekbox: unit tests, and integration tests through real HTTP and real nsjail.

Run as root on a host with nsjail (see README.md):

    python3 -m unittest -v test_snekbox

The integration tests start the real server on a free loopback port. Escape tests aim
at canary files in a temporary folder, never at real system files. The servers' jails
get a copy of the config with a 2 s time limit, and classes that ask for the same flags
share one server; a wait is on a condition, with a deadline that names what it waited for.
"""

from __future__ import annotations

import base64
import errno
import gc
import http.client
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
import unittest.mock
from concurrent.futures import ThreadPoolExecutor

import snekbox

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))
from harness import (PeakRss, eval_request, jail_pids_using,  # noqa: E402
                     launch_server, tcp_state, wait_until)
SNEKBOX = os.path.join(HERE, "snekbox.py")
# SNEKBOX_CONFIG names another jail config for the servers and sandboxes the tests
# start (CI runs the suite once per interpreter the Docker image ships).
CONFIG = os.environ.get("SNEKBOX_CONFIG", snekbox.DEFAULT_CONFIG)
JAIL_PYTHON = snekbox.JailConfig.from_file(CONFIG).exec_path
CONFIG_TIME_LIMIT = snekbox.JailConfig.from_file(CONFIG).time_limit
# The jails of the servers the tests start get this time limit (seconds) instead, so that
# the tests of time limits wait 2 s, not the shipped config's 6 s.
TIME_LIMIT = 2
# How long a test's client waits for an answer: far more than any evaluation takes.
CLIENT_TIMEOUT = 20
# Set to a running server (the Docker image, say) to run the HTTP tests against it.
REMOTE_URL = os.environ.get("SNEKBOX_TEST_URL")
# The servers the tests start keep this many warm jails (SNEKBOX_PREWARM=0: none); CI
# runs the suite both ways. Each holds a tmpfs and an nsjail process while it waits.
PREWARM = int(os.environ.get("SNEKBOX_PREWARM", snekbox.Settings.prewarm))
# Interpreter options make an evaluation start cold, whatever the pool holds.
COLD = ["-B"]
local_only = unittest.skipIf(REMOTE_URL, "needs a server started by the tests")


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


# The system's interpreter, which anyone may run (the tests' own may be root's alone).
HOST_PYTHON = os.path.realpath("/usr/bin/python3")


JAIL_PYTHON_HOST = snekbox.JailConfig.from_file(CONFIG).host_path(JAIL_PYTHON) or JAIL_PYTHON


def host_python_version() -> tuple[int, int, int]:
    out = subprocess.run([HOST_PYTHON, "-c", "import sys; print(*sys.version_info[:3])"],
                         capture_output=True, text=True, check=True)
    return tuple(map(int, out.stdout.split()))


def jail_python_version() -> str:
    """X.Y of the host's /usr/bin/python3, which the jail runs."""
    out = subprocess.run([JAIL_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------------------
# A real server in a subprocess
# --------------------------------------------------------------------------------------

class Server:
    """snekbox.py started on a free loopback port, with its log collected."""

    def __init__(self, *flags: str, prefix: tuple[str, ...] | list[str] = ()):
        self.proc, self.port, self.log = launch_server(sys.executable, *flags, prefix=prefix)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.decode("utf-8", "replace"))

    def connection(self, timeout: float = CLIENT_TIMEOUT) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, dict | None]:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            raw = response.read()
            data = json.loads(raw) if raw else None
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def health(self) -> dict:
        status, _, data = self.request("GET", "/health")
        assert status == 200 and data is not None, (status, data)
        return data

    def eval(self, **body) -> dict:
        status, _, data = self.post(body)
        assert status == 200, (status, data)
        return data

    def post(self, body: dict) -> tuple[int, dict, dict | None]:
        return self.request("POST", "/eval", json.dumps(body).encode(),
                            {"Content-Type": "application/json"})

    def raw(self, data: bytes, timeout: float = CLIENT_TIMEOUT) -> bytes:
        """Send raw bytes; return all the server answers until it closes or goes quiet."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except socket.timeout:
                pass
            return b"".join(chunks)

    def logged(self, text: str) -> int:
        """How many lines of the server's log so far contain ``text``."""
        return sum(text in line for line in list(self.log))

    def stop(self, sig: int = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()        # don't leave it behind; the test fails on the code
            return self.proc.wait()
        finally:
            self._reader.join(5)
            if not self._reader.is_alive():
                self.proc.stderr.close()

    def memfs_root(self) -> str:
        return os.path.join(snekbox.DEFAULT_MEMFS_BASE, f"{self.proc.pid}-1")


class RemoteServer(Server):
    """A server that is already running at REMOTE_URL; the tests only talk to it."""

    def __init__(self, url: str):
        self.port = int(url.rstrip("/").rsplit(":", 1)[1])
        self.log = []

    def stop(self, sig: int = 15) -> int:
        return 0

    def memfs_root(self) -> str:
        return "/nonexistent-remote"


def mounts_below(folder: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(folder + "/")]


def config_with_time_limit(source: str, seconds: int, folder: str) -> str:
    """A copy of the jail config ``source`` in ``folder`` with ``time_limit: seconds``."""
    with open(source) as f:
        text, count = re.subn(r"(?m)^time_limit:\s*\d+", f"time_limit: {seconds}", f.read())
    if count != 1:
        raise ValueError(f"{source} has {count} time_limit lines; one expected")
    path = os.path.join(folder, "snekbox-short.cfg")
    with open(path, "w") as f:
        f.write(text)
    return path


_module_folder = tempfile.mkdtemp(prefix="snekbox-tests-")
SHORT_CONFIG = config_with_time_limit(CONFIG, TIME_LIMIT, _module_folder)
_shared_servers: dict[tuple[str, ...], Server] = {}


def default_flags(prewarm: int = PREWARM, config: str = SHORT_CONFIG) -> tuple[str, ...]:
    """The flags of the tests' usual server: two workers, the short time limit."""
    return ("--workers", "2", "--prewarm", str(prewarm), "--config", config)


def shared_server(*flags: str) -> Server:
    """The server started with ``flags``, started on first use and shared by every class
    that asks for the same flags; tearDownModule stops them."""
    if flags not in _shared_servers:
        _shared_servers[flags] = Server(*flags)
    return _shared_servers[flags]


def tearDownModule() -> None:
    """Stop the shared servers (all signalled first: each takes a moment to stop), check
    that each exited 0 and left no tmpfs and no jail behind."""
    servers = list(_shared_servers.values())
    _shared_servers.clear()
    roots = [server.memfs_root() for server in servers]
    for server in servers:
        server.proc.send_signal(15)
    codes = [server.stop() for server in servers]
    shutil.rmtree(_module_folder, ignore_errors=True)
    assert codes == [0] * len(servers), f"servers exited with {codes}"
    left = [m for root in roots for m in mounts_below(root)]
    jails = [pid for root in roots for pid in nsjail_pids_using(root)]
    assert not left and not jails, (left, jails)


class ServerTestCase(unittest.TestCase):
    """Gives a class a server (shared with the classes of the same ``flags``) whose jails
    have the short time limit (``short_time_limit = False``: the config's own); checks
    after each test that no evaluation's tmpfs stays mounted."""

    flags: tuple[str, ...] = ()
    short_time_limit = True
    server: Server

    @classmethod
    def setUpClass(cls) -> None:
        if REMOTE_URL:
            cls.server = RemoteServer(REMOTE_URL)
        else:
            config = SHORT_CONFIG if cls.short_time_limit else CONFIG
            cls.server = shared_server(*default_flags(config=config), *cls.flags)

    @property
    def time_limit(self) -> int:
        """The time limit of the jails of this class's server."""
        return TIME_LIMIT if self.short_time_limit and not REMOTE_URL else CONFIG_TIME_LIMIT

    def tearDown(self) -> None:
        # Every evaluation's tmpfs is gone just after its answer is sent (the jail is
        # taken down then, its worker still held); the warm jails waiting for the next
        # ones have theirs.
        wait_until(lambda: len(mounts_below(self.server.memfs_root())) <= PREWARM, 5,
                   f"at most {PREWARM} tmpfs mounts (the warm jails')")

    def run_code(self, code: str, **extra) -> dict:
        return self.server.eval(input=code, **extra)


# --------------------------------------------------------------------------------------
# Unit tests
# --------------------------------------------------------------------------------------

class TextprotoTests(unittest.TestCase):
    def test_scalars_messages_and_comments(self):
        fields = snekbox.parse_textproto('''
            # comment
            name: "a\\"b\\n" 'c'   # adjacent strings join
            time_limit: 6
            mode: ONCE;
            mount { src: "/x" dst: "/y" is_bind: true }
            mount: < dst: "/z" >
            exec_bin { path: "/usr/bin/python3" arg: "-X" arg: "utf8" }
        ''')
        self.assertEqual(fields["name"], ['a"b\nc'])
        self.assertEqual(fields["time_limit"], ["6"])
        self.assertEqual(fields["mode"], ["ONCE"])
        self.assertEqual(fields["mount"], [{"src": ["/x"], "dst": ["/y"], "is_bind": ["true"]},
                                           {"dst": ["/z"]}])
        self.assertEqual(fields["exec_bin"][0]["arg"], ["-X", "utf8"])

    def test_octal_and_hex_escapes(self):
        self.assertEqual(snekbox.parse_textproto(r'a: "\101\x42"')["a"], ["AB"])

    def test_syntax_errors_name_the_line(self):
        for text in ('a: {', 'a b c: "', '\n\n: 1', 'a { b: 1 ] }'):
            with self.subTest(text=text), self.assertRaises(ValueError):
                snekbox.parse_textproto(text)
        with self.assertRaisesRegex(ValueError, "line 3"):
            snekbox.parse_textproto('a: 1\nb: 2\n: 3')


class JailConfigTests(unittest.TestCase):
    def test_reads_the_shipped_config(self):
        cfg = snekbox.JailConfig.from_file(snekbox.DEFAULT_CONFIG)
        self.assertEqual(cfg.time_limit, 6)
        self.assertEqual(cfg.exec_path, "/usr/bin/python3")
        self.assertEqual(cfg.mem_max, 70 * snekbox.MiB)
        self.assertEqual(cfg.mem_swap_max, 0)
        self.assertEqual(cfg.pids_max, 15)
        self.assertIn("/usr/bin/python3", [m.dst for m in cfg.mounts])

    def test_host_path_follows_bind_mounts(self):
        cfg = self.config('mount { src: "/opt/py" dst: "/snekbin" is_bind: true }\n'
                          'mount { dst: "/home" fstype: "tmpfs" }\n')
        self.assertEqual(cfg.host_path("/snekbin/bin/python"), "/opt/py/bin/python")
        self.assertEqual(cfg.host_path("/snekbin"), "/opt/py")
        self.assertIsNone(cfg.host_path("/snekbinx/python"))
        self.assertIsNone(cfg.host_path("/home/x"))

    def test_missing_exec_bin_or_bad_number(self):
        with self.assertRaisesRegex(ValueError, "exec_bin"):
            self.config("", exec_bin=False)
        with self.assertRaisesRegex(ValueError, "time_limit"):
            self.config("time_limit: soon\n")

    def config(self, text: str, exec_bin: bool = True) -> snekbox.JailConfig:
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write(text + ('exec_bin { path: "/usr/bin/python3" }' if exec_bin else ""))
        self.addCleanup(os.unlink, f.name)
        return snekbox.JailConfig.from_file(f.name)


class FakeCgroupTests(unittest.TestCase):
    """prepare_cgroups on fake cgroup trees (the v2 path can't run for real here)."""

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.swaps = os.path.join(self.root, "swaps")
        self.write(self.swaps, "Filename Type Size Used Priority\n")
        # On v2 this process runs in the top group; the kernel gives every new group
        # its control files, as the jails' group has here.
        self.self_cgroup = os.path.join(self.root, "self-cgroup")
        self.write(self.self_cgroup, "0::/\n")
        self.jails = f"{self.root}/jails"
        self.write(f"{self.jails}/cgroup.subtree_control", "")

    def write(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def config(self, **overrides) -> snekbox.JailConfig:
        cfg = snekbox.JailConfig.from_file(CONFIG)
        return cfg._replace(mem_mount=f"{self.root}/memory", pids_mount=f"{self.root}/pids",
                            cpu_mount=f"{self.root}/cpu", cgroupv2_mount=self.root, **overrides)

    def test_v1_creates_parents_and_limits_each_jail(self):
        for name in ("pids", "cpu", "cpuacct"):
            os.makedirs(f"{self.root}/{name}")
        self.write(f"{self.root}/memory/memory.memsw.limit_in_bytes", "0")
        cgroups = snekbox.prepare_cgroups(self.config(), self.root, self.swaps)
        self.assertEqual(cgroups.version, 1)
        self.assertEqual(sorted(cgroups.parents), ["cpu", "cpuacct", "memory", "pids"])
        for name in ("memory", "pids", "cpu", "cpuacct"):
            self.assertTrue(os.path.isdir(f"{self.root}/{name}/NSJAIL"))
        self.assertTrue(cgroups.swap_limited)
        self.assertEqual(cgroups.swap, 0)
        limits = snekbox.Limits(time=6, memory=50 * MiB, processes=5, output=100)
        group = cgroups.create("snekbox-jail-1", limits)
        jail = f"{self.root}/memory/NSJAIL/snekbox-jail-1"
        memory = str(50 * MiB + snekbox.NSJAIL_MEMORY)
        self.assertEqual(self.read(f"{jail}/memory.limit_in_bytes"), memory)
        self.assertEqual(self.read(f"{jail}/memory.memsw.limit_in_bytes"), memory)
        self.assertEqual(self.read(f"{self.root}/pids/NSJAIL/snekbox-jail-1/pids.max"), "6")
        self.assertEqual(self.read(f"{self.root}/cpu/NSJAIL/snekbox-jail-1/cpu.cfs_quota_us"),
                         "1000000")
        self.assertEqual(len(group.folders), 4)

    def test_v1_without_swap_controller_leaves_swap_alone_and_warns(self):
        for name in ("memory", "pids", "cpu"):
            os.makedirs(f"{self.root}/{name}")
        self.write(self.swaps, "Filename\n/swapfile file 100 0 -2\n")
        with self.assertLogs("snekbox", "WARNING") as logs:
            cgroups = snekbox.prepare_cgroups(self.config(), self.root, self.swaps)
        self.assertFalse(cgroups.swap_limited)
        cgroups.create("snekbox-jail-1", snekbox.Limits(6, MiB, 5, 100))
        self.assertFalse(os.path.exists(
            f"{self.root}/memory/NSJAIL/snekbox-jail-1/memory.memsw.limit_in_bytes"))
        self.assertTrue(any("swap is on" in line for line in logs.output))
        self.assertTrue(any("no swap controller" in line for line in logs.output))

    def test_a_missing_cpu_controller_drops_the_cpu_limit_with_a_warning(self):
        os.makedirs(f"{self.root}/memory")
        os.makedirs(f"{self.root}/pids")
        with self.assertLogs("snekbox", "WARNING") as logs:
            cgroups = snekbox.prepare_cgroups(self.config(), self.root, self.swaps)
        self.assertEqual(cgroups.cpu_ms_per_sec, 0)
        self.assertFalse(os.path.exists(f"{self.root}/cpu"))
        self.assertTrue(any("no cpu cgroup controller" in line for line in logs.output))
        v2 = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, v2)
        self.write(f"{v2}/cgroup.controllers", "memory pids\n")
        self.write(f"{v2}/cgroup.subtree_control", "memory pids\n")
        self.write(f"{v2}/jails/cgroup.subtree_control", "")
        with self.assertLogs("snekbox", "WARNING"):
            cgroups = snekbox.prepare_cgroups(self.config(), v2, self.swaps, self.self_cgroup)
        self.assertEqual(cgroups.cpu_ms_per_sec, 0)

    def test_v1_missing_controller_is_an_error(self):
        os.makedirs(f"{self.root}/pids")
        os.makedirs(f"{self.root}/cpu")
        with self.assertRaisesRegex(snekbox.SetupError, "memory controller is not mounted"):
            snekbox.prepare_cgroups(self.config(), self.root, self.swaps)

    def test_v2_enables_controllers_after_moving_processes(self):
        self.write(f"{self.root}/cgroup.controllers", "cpu memory pids io\n")
        self.write(f"{self.root}/cgroup.procs", "1\n42\n")
        control = f"{self.root}/cgroup.subtree_control"
        self.write(control, "")
        self.write(f"{self.jails}/memory.swap.max", "max")
        busy = {"left": 1}
        real_open = open

        def fake_open(path, mode="r", *args, **kwargs):
            # The kernel refuses controllers while the group has processes (EBUSY).
            if path == control and "w" in mode and busy["left"]:
                busy["left"] -= 1
                raise OSError(16, "Device or resource busy")
            return real_open(path, mode, *args, **kwargs)

        with unittest.mock.patch("builtins.open", fake_open):
            cgroups = snekbox.prepare_cgroups(self.config(), self.root, self.swaps,
                                              self.self_cgroup)
        self.assertEqual(cgroups.version, 2)
        self.assertEqual(cgroups.parents, {"unified": self.jails})
        self.assertTrue(cgroups.swap_limited)
        self.assertEqual(self.read(control), "+memory +pids +cpu")
        self.assertEqual(self.read(f"{self.jails}/cgroup.subtree_control"), "+memory +pids +cpu")
        self.assertEqual(self.read(f"{self.root}/snekbox-init/cgroup.procs"), "42")
        group = cgroups.create("snekbox-jail-1", snekbox.Limits(6, MiB, 5, 100))
        folder = f"{self.jails}/snekbox-jail-1"
        self.assertEqual(group.folders, {"unified": folder})
        self.assertEqual(self.read(f"{folder}/memory.max"), str(MiB + snekbox.NSJAIL_MEMORY))
        self.assertEqual(self.read(f"{folder}/memory.swap.max"), "0")
        self.assertEqual(self.read(f"{folder}/pids.max"), "6")
        self.assertEqual(self.read(f"{folder}/cpu.max"), "1000000 1000000")

    def service_group(self, enabled: str) -> str:
        """A fake systemd service's group, with its jails group, whose subtree_control
        says ``enabled``."""
        service = f"{self.root}/system.slice/snekbox.service"
        for group in (service, f"{service}/jails"):
            self.write(f"{group}/cgroup.controllers", "cpu memory pids\n")
            self.write(f"{group}/cgroup.subtree_control", enabled)
        self.write(f"{self.root}/cgroup.controllers", "cpu memory pids io\n")
        return service

    def test_v2_jails_go_below_the_group_snekbox_runs_in(self):
        service = self.service_group("")
        os.makedirs(f"{service}/snekbox-init")
        for own in ("/system.slice/snekbox.service", "/system.slice/snekbox.service/snekbox-init"):
            with self.subTest(own=own):
                self.write(self.self_cgroup, f"0::{own}\n")
                with self.assertLogs("snekbox", "WARNING"):     # no swap accounting here
                    cgroups = snekbox.prepare_cgroups(self.config(), self.root, self.swaps,
                                                      self.self_cgroup)
                self.assertEqual(cgroups.parents, {"unified": f"{service}/jails"})
                self.assertEqual(self.read(f"{service}/cgroup.subtree_control"),
                                 "+memory +pids +cpu")
                self.assertFalse(os.path.exists(f"{service}/snekbox-init/snekbox-init"))
        self.assertFalse(os.path.exists(f"{self.root}/cgroup.subtree_control"))    # not ours

    def test_v2_a_systemd_unit_without_delegation_is_warned_of(self):
        service = self.service_group("cpu memory pids\n")
        self.write(self.self_cgroup, "0::/system.slice/snekbox.service\n")
        with self.assertLogs("snekbox", "WARNING") as logs:
            snekbox.prepare_cgroups(self.config(), self.root, self.swaps, self.self_cgroup)
        self.assertTrue(any("without Delegate=yes" in line for line in logs.output))
        try:
            os.setxattr(service, "trusted.delegate", b"1")
        except OSError as e:
            self.skipTest(f"no trusted attributes here: {e}")
        with self.assertLogs("snekbox", "WARNING") as logs:    # still no swap accounting
            snekbox.prepare_cgroups(self.config(), self.root, self.swaps, self.self_cgroup)
        self.assertFalse(any("Delegate=yes" in line for line in logs.output))

    def test_v2_read_only_cgroups_say_what_to_add(self):
        self.write(f"{self.root}/cgroup.controllers", "cpu memory pids\n")
        self.write(f"{self.root}/cgroup.subtree_control", "")
        real_open = open

        def read_only(path, mode="r", *args, **kwargs):
            if "w" in mode and path.endswith("cgroup.subtree_control"):
                raise OSError(errno.EROFS, "Read-only file system", path)
            return real_open(path, mode, *args, **kwargs)

        with unittest.mock.patch("builtins.open", read_only), \
                self.assertRaisesRegex(snekbox.SetupError, "--privileged"):
            snekbox.prepare_cgroups(self.config(), self.root, self.swaps, self.self_cgroup)

    def test_v2_without_swap_accounting_warns(self):
        self.write(f"{self.root}/cgroup.controllers", "memory pids cpu\n")
        self.write(f"{self.root}/cgroup.subtree_control", "memory pids cpu\n")
        self.write(f"{self.jails}/cgroup.subtree_control", "memory pids cpu\n")
        with self.assertLogs("snekbox", "WARNING") as logs:
            cgroups = snekbox.prepare_cgroups(self.config(), self.root, self.swaps,
                                              self.self_cgroup)
        self.assertFalse(os.path.exists(f"{self.root}/snekbox-init"))
        self.assertFalse(cgroups.swap_limited)
        self.assertTrue(any("no swap controller" in line for line in logs.output))

    def test_v2_missing_controller_is_an_error(self):
        self.write(f"{self.root}/cgroup.controllers", "cpu io\n")
        with self.assertRaisesRegex(snekbox.SetupError, "memory pids"):
            snekbox.prepare_cgroups(self.config(), self.root, self.swaps, self.self_cgroup)


class RealCgroupTests(unittest.TestCase):
    """The jails' cgroups on this host's own hierarchy, v1 or v2."""

    def test_only_empty_groups_are_stale(self):
        cgroups = snekbox.prepare_cgroups(snekbox.JailConfig.from_file(CONFIG))
        limits = snekbox.Limits(6, 50 * MiB, 5, 100)
        empty = cgroups.create(f"snekbox-jail-test-empty-{os.getpid()}", limits)
        busy = cgroups.create(f"snekbox-jail-test-busy-{os.getpid()}", limits)
        sleeper = subprocess.Popen(snekbox.in_cgroup(busy, ["/bin/sleep", "30"]))
        wait_until(lambda: cmdline(sleeper.pid).startswith(b"/bin/sleep"), 5, "sleep in its group")
        # Empty, but a live server's (pid 1 stands in for one): it may be about to use it.
        starting = cgroups.create("snekbox-jail-1-999999", limits)
        self.addCleanup(starting.remove)
        dead = cgroups.create(f"snekbox-jail-{2 ** 22 + 7}-1", limits)     # above pid_max
        try:
            cgroups.remove_stale()
            self.assertFalse(any(os.path.exists(f) for f in empty.folders.values()))
            self.assertFalse(any(os.path.exists(f) for f in dead.folders.values()))
            self.assertTrue(all(os.path.exists(f) for f in starting.folders.values()))
            self.assertTrue(all(os.path.exists(f) for f in busy.folders.values()))
        finally:
            sleeper.kill()
            sleeper.wait()
            busy.remove()
        self.assertFalse(any(os.path.exists(f) for f in busy.folders.values()))

    def test_a_group_that_cannot_be_joined_runs_nothing(self):
        cgroups = snekbox.prepare_cgroups(snekbox.JailConfig.from_file(CONFIG))
        group = cgroups.create(f"snekbox-jail-test-gone-{os.getpid()}",
                               snekbox.Limits(6, 50 * MiB, 5, 100))
        group.remove()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        canary = os.path.join(folder, "ran")
        run = subprocess.run(snekbox.in_cgroup(group, ["/bin/touch", canary]),
                             capture_output=True)
        self.assertEqual(run.returncode, snekbox.JOIN_FAILED)
        self.assertFalse(os.path.exists(canary))

    def test_a_group_reports_what_it_used(self):
        cgroups = snekbox.prepare_cgroups(snekbox.JailConfig.from_file(CONFIG))
        group = cgroups.create(f"snekbox-jail-test-usage-{os.getpid()}",
                               snekbox.Limits(6, 50 * MiB, 5, 100))
        self.addCleanup(group.remove)
        code = "x = bytearray(20 * 1024 * 1024)\nwhile __import__('time').process_time() < 0.3: pass"
        subprocess.run(snekbox.in_cgroup(group, [sys.executable, "-c", code]), check=True)
        cpu, memory = group.usage()
        self.assertGreaterEqual(cpu, 0.3 * 0.9)     # the cgroup's clock and the process's
        self.assertGreaterEqual(memory, 20 * MiB)
        self.assertEqual(group.oom_kills(), 0)


class NsjailLogTests(unittest.TestCase):
    def test_return_codes_like_a_shell(self):
        started = b"[I][2026-01-01T00:00:00+0000] Executing '/usr/bin/python3' for '[STANDALONE MODE]'\n"
        cases = {
            started + b"[I][2026-01-01T00:00:00+0000] pid=7 ([STANDALONE MODE]) exited with status: 3, "
            b"(PIDs left: 0)": 3,
            started + b"[I][2026-01-01T00:00:00+0000] pid=7 ([STANDALONE MODE]) terminated with "
            b"signal: SIGSEGV (11), (PIDs left: 0)": 139,
            b"[I][2026-01-01T00:00:00+0000] pid=7 ([STANDALONE MODE]) exited with status: 255, "
            b"(PIDs left: 0)": None,
        }
        for line, code in cases.items():
            with self.subTest(code=code):
                self.assertEqual(snekbox.read_nsjail_log(line).child_status, code)
        self.assertEqual(snekbox.shell_status(-9), 137)
        self.assertEqual(snekbox.shell_status(2), 2)

    def test_time_limit_and_errors(self):
        data = (b"[I][t] Executing '/usr/bin/python3' for '[STANDALONE MODE]'\n"
                b"[I][t] pid=7 run time >= time limit (6 >= 6) ([STANDALONE MODE]). Killing it\n"
                b"[I][t] pid=7 ([STANDALONE MODE]) terminated with signal: SIGKILL (9), (PIDs left: 0)\n"
                b"[E][t][1] initParent():452 Couldn't initialize cgroup\n")
        with self.assertLogs("snekbox.nsjail", "DEBUG") as logs:
            report = snekbox.read_nsjail_log(data)
        self.assertTrue(report.timed_out)
        self.assertEqual(report.child_status, 137)
        self.assertEqual(report.errors, ["Couldn't initialize cgroup"])
        self.assertIn("ERROR:snekbox.nsjail:Couldn't initialize cgroup", logs.output)

    def test_missing_optional_mounts_are_quiet(self):
        line = b"[W][t][1] mountSinglePoint():229 mount('/usr/lib/python3.99' -> '/x'): No such file"
        with self.assertLogs("snekbox.nsjail", "DEBUG") as logs:
            snekbox.read_nsjail_log(line, quiet=["/usr/lib/python3.99"])
        self.assertTrue(logs.output[0].startswith("DEBUG:"))


class RequestParsingTests(unittest.TestCase):
    def parse(self, data) -> snekbox.EvalRequest:
        return snekbox.parse_eval_request(json.dumps(data).encode())

    def assertBad(self, body, field: str, status: int = 400):
        with self.assertRaises(snekbox.InvalidRequest) as caught:
            snekbox.parse_eval_request(body if isinstance(body, bytes) else json.dumps(body).encode())
        self.assertEqual(caught.exception.status, status)
        self.assertIn(field, str(caught.exception))

    def test_input_is_appended_to_args(self):
        self.assertEqual(self.parse({"input": "print(1)"}).args, ["-c", "print(1)"])
        self.assertEqual(self.parse({"input": "x", "args": ["-u", "-c"]}).args, ["-u", "-c", "x"])
        self.assertEqual(self.parse({"args": ["-m", "timeit"]}).args, ["-m", "timeit"])
        self.assertEqual(self.parse({"args": []}).args, [])

    def test_stdin_files_executable(self):
        request = self.parse({"input": "", "stdin": "a\0b",
                              "files": [{"path": "./d/../x.py", "content": b64("hi")},
                                        {"path": "empty"}],
                              "executable_path": "/usr/bin/python3"})
        self.assertEqual(request.stdin, b"a\0b")
        self.assertEqual(request.files, [snekbox.File("x.py", b"hi"), snekbox.File("empty", b"")])
        self.assertEqual(request.executable_path, "/usr/bin/python3")

    def test_bad_bodies(self):
        self.assertBad(b"{", "not valid JSON")
        self.assertBad(b"\xff\xfe\x00", "not valid JSON")
        self.assertBad(b"[" * 100000 + b"]" * 100000, "objects and arrays")
        self.assertBad([], "JSON object")
        self.assertBad({}, "input or args")
        self.assertBad({"input": 1}, "input must be a string")
        self.assertBad({"args": "-c"}, "args must be an array")
        self.assertBad({"args": ["-c", None]}, "args[1]")
        self.assertBad(b'{"input": "\\ud800"}', "lone surrogate")
        self.assertBad({"input": "", "stdin": 5}, "stdin")
        self.assertBad({"input": "", "executable_path": ["x"]}, "executable_path")
        self.assertBad({"input": "", "executable_path": "/a\0"}, "executable_path")

    def test_bad_files(self):
        self.assertBad({"input": "", "files": {}}, "files must be an array")
        self.assertBad({"input": "", "files": ["x"]}, "files[0]")
        self.assertBad({"input": "", "files": [{"content": ""}]}, "files[0].path is required")
        for path in ("/etc/passwd", "../x", "a/../../x", "", ".", "a/", "a\0b"):
            with self.subTest(path=path):
                self.assertBad({"input": "", "files": [{"path": path}]}, "files[0].path")
        self.assertBad({"input": "", "files": [{"path": "a", "content": "!!"}]}, "base64")
        self.assertBad({"input": "", "files": [{"path": "a"}, {"path": "./a"}]}, "twice")
        self.assertBad({"input": "", "files": [{"path": str(i)} for i in range(101)]},
                       "at most 100")

    def test_warm_jobs_only_in_the_modes_that_start_alike(self):
        uploaded = {"main.py"}
        self.assertEqual(snekbox.warm_job(["-c", "x", "a"], uploaded), ("c", ["-c", "a"], "x"))
        self.assertEqual(snekbox.warm_job(["-m", "timeit", "1"], uploaded),
                         ("m", ["-m", "1"], "timeit"))
        self.assertEqual(snekbox.warm_job(["main.py", "a"], uploaded),
                         ("s", ["main.py", "a"], "main.py"))
        self.assertIsNone(snekbox.warm_job(["main.py"], uploaded, "c"))
        self.assertIsNone(snekbox.warm_job(["-m", "timeit"], uploaded, "c"))
        self.assertIsNone(snekbox.warm_job(["-u", "-c", "x"], uploaded))
        self.assertIsNone(snekbox.warm_job(["other.py"], uploaded))
        old = host_python_version() < (3, 13)
        self.assertEqual(snekbox.warm_modes(HOST_PYTHON), "cms" if old else "c")
        self.assertEqual(snekbox.warm_modes("/nonexistent/python"), "c")

    def test_code_argument_index(self):
        self.assertEqual(snekbox.code_argument_index(["-c", "x"]), 1)
        self.assertEqual(snekbox.code_argument_index(["-X", "utf8", "-u", "-c", "x", "y"]), 4)
        self.assertIsNone(snekbox.code_argument_index(["-m", "mod", "-c", "x"]))
        self.assertIsNone(snekbox.code_argument_index(["main.py", "-c", "x"]))
        self.assertIsNone(snekbox.code_argument_index(["-c"]))


class SettingsTests(unittest.TestCase):
    def test_flags_and_environment(self):
        with unittest.mock.patch.dict(os.environ, {"SNEKBOX_PORT": "9000",
                                                   "SNEKBOX_WORKERS": "3"}):
            settings = snekbox.settings_from_args(["--workers", "5"])
        self.assertEqual((settings.port, settings.workers, settings.host), (9000, 5, "127.0.0.1"))
        self.assertEqual(settings.queue_limit, 40)

    def test_bad_values_exit_2(self):
        for argv, env in ((["--workers", "0"], {}), ([], {"SNEKBOX_PORT": "http"}),
                          (["--log-level", "LOUD"], {})):
            with self.subTest(argv=argv, env=env), \
                    unittest.mock.patch.dict(os.environ, env), \
                    unittest.mock.patch("sys.stderr"), self.assertRaises(SystemExit) as caught:
                snekbox.settings_from_args(argv)
            self.assertEqual(caught.exception.code, 2)


class ExchangeTests(unittest.TestCase):
    """The Exchange moving bytes with a plain process (no nsjail): cat, sleep, sh."""

    LIMITS = snekbox.Limits(time=10, memory=0, processes=0, output=1000)

    def exchange(self, command_for, stdin=b"", limits=LIMITS, **options) -> snekbox.Outcome:
        jail = snekbox.JailProcess(command_for, stdin=bool(stdin), **options)
        return snekbox.Exchange(jail, stdin=stdin, limits=limits).run()

    def test_stdin_goes_in_and_output_and_log_come_out(self):
        data = os.urandom(300_000).hex().encode()[:500]
        outcome = self.exchange(lambda log: ["sh", "-c", f"echo logged >&{log}; cat"], stdin=data)
        self.assertEqual((outcome.stdout, outcome.log, outcome.status), (data, b"logged\n", 0))
        self.assertFalse(outcome.truncated or outcome.timed_out or outcome.cancelled)

    def test_output_past_the_limit_is_cut_and_stops_the_process(self):
        outcome = self.exchange(lambda log: ["yes"])
        self.assertEqual(outcome.stdout, b"y\n" * 500)
        self.assertTrue(outcome.truncated)
        self.assertEqual(outcome.status, -signal.SIGTERM)

    def test_the_time_limit_stops_the_process(self):
        outcome = self.exchange(lambda log: ["sleep", "30"], limits=self.LIMITS._replace(time=0.2))
        self.assertTrue(outcome.timed_out)
        self.assertEqual(outcome.status, -signal.SIGTERM)

    def test_stderr_apart_keeps_each_stream_in_order(self):
        script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
        outcome = self.exchange(lambda log: ["sh", "-c", script], split_stderr=True)
        self.assertEqual(outcome.stdout, b"out1\nout2\nout3\n")
        self.assertEqual(outcome.stderr, b"err1\nerr2\nerr3\n")
        merged = self.exchange(lambda log: ["sh", "-c", script])
        self.assertEqual(merged.stdout, b"out1\nerr1\nout2\nerr2\nout3\nerr3\n")
        self.assertIsNone(merged.stderr)

    def test_the_output_limit_counts_both_streams(self):
        script = "head -c 700 /dev/zero; head -c 700 /dev/zero >&2"
        outcome = self.exchange(lambda log: ["sh", "-c", script], split_stderr=True)
        self.assertEqual(len(outcome.stdout) + len(outcome.stderr), 1000)
        self.assertTrue(outcome.truncated)

    def test_a_client_hanging_up_cancels_the_run(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        jail = snekbox.JailProcess(lambda log: ["sleep", "30"], stdin=False)
        threading.Timer(0.2, theirs.close).start()
        outcome = snekbox.Exchange(jail, stdin=b"", limits=self.LIMITS, client=ours).run()
        self.assertTrue(outcome.cancelled)
        self.assertFalse(outcome.timed_out)

    def test_a_warm_job_is_written_and_closed(self):
        job_r, job_w = os.pipe()
        jail = snekbox.JailProcess(lambda log: ["cat", f"/dev/fd/{job_r}"], stdin=False,
                                   pass_fds=(job_r,))
        os.close(job_r)
        outcome = snekbox.Exchange(jail, stdin=b"", limits=self.LIMITS,
                                   job=(job_w, b"the job", lambda: os.close(job_w))).run()
        self.assertEqual(outcome.stdout, b"the job")
        self.assertLessEqual(outcome.started, outcome.ended)


class OutputTapTests(unittest.TestCase):
    """The tap and the relay passing an Exchange's output on while it runs."""

    def test_nothing_goes_out_before_the_program_has_started(self):
        # A cold jail has started when nsjail's log says so; a plain process never says
        # so, so its output goes out after the run, whole.
        seen = []
        relay = snekbox.OutputRelay(lambda pieces: seen.extend(pieces))
        jail = snekbox.JailProcess(lambda log: ["sh", "-c", "echo a; sleep 0.5; echo b >&2; echo c"],
                                   stdin=False, split_stderr=True)
        outcome = snekbox.Exchange(jail, stdin=b"", limits=ExchangeTests.LIMITS, tap=relay.tap).run()
        self.assertEqual(seen, [])
        self.assertTrue(relay.finish())
        self.assertEqual(seen, [("stdout", b"a\nc\n"), ("stderr", b"b\n")])
        self.assertEqual((outcome.stdout, outcome.stderr), (b"a\nc\n", b"b\n"))

    def test_a_started_program_streams_before_it_ends(self):
        seen = []
        relay = snekbox.OutputRelay(lambda pieces: seen.extend(d for _, d in pieces))
        job_r, job_w = os.pipe()
        jail = snekbox.JailProcess(lambda log: ["sh", "-c", f"cat <&{job_r}; sleep 1; echo b"],
                                   stdin=False, pass_fds=(job_r,))
        os.close(job_r)
        exchange = snekbox.Exchange(jail, stdin=b"", limits=ExchangeTests.LIMITS, tap=relay.tap,
                                    job=(job_w, b"a\n", lambda: os.close(job_w)))
        thread = threading.Thread(target=exchange.run)
        thread.start()
        wait_until(lambda: seen, 5, "the first line passed on")
        self.assertEqual(seen, [b"a\n"])       # before "b", written a second later
        thread.join()
        relay.finish()
        self.assertEqual(b"".join(seen), b"a\nb\n")

    def test_lines_decode_like_the_final_answer(self):
        alphabet = [b"\xff", b"\x00", b"a", b"\n", "é".encode(), "€".encode(), "😀".encode(),
                    b"\xe2\x82", b"\xf0\x9f", b"\xed\xa0\x80", b'"', b"\\"]
        rng = random.Random(15)
        for _ in range(2000):
            data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 3)))
            pieces = [("stdout", data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)])]
            lines = list(snekbox.ndjson_lines(pieces))
            self.assertTrue(all(line.count(b"\n") == 1 and line.endswith(b"\n") for line in lines))
            joined = "".join(json.loads(line)["stdout"] for line in lines)
            self.assertEqual(joined, data.decode("utf-8", "replace"), (data, cuts))


class BodyReaderTests(unittest.TestCase):
    """The request body readers over plain ``read`` callables."""

    def setUp(self):
        self.held = []

    def read_chunked(self, data: bytes, limit: int = 100) -> bytes:
        stream = io.BytesIO(data)
        return bytes(snekbox.read_chunked(stream.read, stream.readline, limit, self.held.append))

    def test_exactly_the_length_each_piece_held_first(self):
        stream = io.BytesIO(b"x" * 100_000 + b"rest")
        body = snekbox.read_exactly(stream.read, 100_000, self.held.append)
        self.assertEqual(bytes(body), b"x" * 100_000)
        self.assertEqual(self.held, [65536, 100_000 - 65536])
        with self.assertRaises(snekbox.InvalidRequest) as caught:
            snekbox.read_exactly(io.BytesIO(b"short").read, 10, self.held.append)
        self.assertEqual(caught.exception.status, 400)

    def test_a_refused_hold_reads_nothing(self):
        def refuse(size):
            raise snekbox.InvalidRequest.http(503, "full")
        stream = io.BytesIO(b"abc")
        with self.assertRaises(snekbox.InvalidRequest):
            snekbox.read_exactly(stream.read, 3, refuse)
        self.assertEqual(stream.tell(), 0)

    def test_chunks_with_extensions_and_trailers(self):
        data = b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\nnext request"
        self.assertEqual(self.read_chunked(data), b"abcde")

    def test_malformed_chunks(self):
        cases = {b"zz\r\nabc\r\n0\r\n\r\n": 400,           # not hex
                 b"3\nabc\r\n0\r\n\r\n": 400,                # a bare LF
                 b"3\r\nabcXY0\r\n\r\n": 400,               # no CRLF after the data
                 b"3\r\nabc\r\n0\r\nX: 1\n\r\n": 400,        # a trailer without CRLF
                 b"65\r\n" + b"a" * 101 + b"\r\n0\r\n\r\n": 413}
        for data, status in cases.items():
            with self.subTest(data=data[:20]), self.assertRaises(snekbox.InvalidRequest) as caught:
                self.read_chunked(data)
            self.assertEqual(caught.exception.status, status)


class CheckLimitsTests(unittest.TestCase):
    CAPS = snekbox.Limits(time=6, memory=70 * 1024 * 1024, processes=15, output=1_000_000)

    def test_lower_limits_replace_the_caps(self):
        limits = snekbox.check_limits({"time": 0.5, "memory": 1000, "processes": 1}, self.CAPS)
        self.assertEqual(limits, snekbox.Limits(0.5, 1000, 1, 1_000_000))
        self.assertEqual(snekbox.check_limits(None, self.CAPS), self.CAPS)
        self.assertEqual(snekbox.check_limits({"time": 6}, self.CAPS), self.CAPS)

    def test_bad_limits_are_named(self):
        cases = {"time": [0, -1, True, "1", None, 7, float("nan")], "memory": [1.5, 10**9],
                 "processes": [16, 0], "output": [2_000_000], "timeout": [1]}
        for name, values in cases.items():
            for value in values:
                with self.subTest(name=name, value=value), \
                        self.assertRaisesRegex(snekbox.InvalidRequest, f"limits.{name}"):
                    snekbox.check_limits({name: value}, self.CAPS)
        with self.assertRaisesRegex(snekbox.InvalidRequest, "limit of 15 processes"):
            snekbox.check_limits({"processes": 16}, self.CAPS)

    def test_numbers_too_large_for_a_float_are_refused_not_a_crash(self):
        """A 400-digit number in a request was a 500 (formatting it overflowed) and,
        with no cap for its limit, reached the cgroup write (a 503)."""
        uncapped = self.CAPS._replace(memory=0, processes=0)
        for name in snekbox.LIMIT_NAMES:
            for caps in (self.CAPS, uncapped):
                with self.subTest(name=name, caps=caps), \
                        self.assertRaisesRegex(snekbox.InvalidRequest, f"limits.{name}"):
                    snekbox.check_limits({name: 10 ** 400}, caps)

def headers(*lines: bytes) -> http.client.HTTPMessage:
    """Request headers as http.server parses them."""
    return http.client.parse_headers(io.BytesIO(b"".join(l + b"\r\n" for l in lines) + b"\r\n"))


class BodyFramingTests(unittest.TestCase):
    """How the body's length is read from the headers: once, and never two ways."""

    def assertRefused(self, status: int, call) -> None:
        with self.assertRaises(snekbox.InvalidRequest) as caught:
            call()
        self.assertEqual(caught.exception.status, status)

    def test_content_length(self):
        self.assertIsNone(snekbox.content_length(headers()))
        self.assertEqual(snekbox.content_length(headers(b"Content-Length: 12")), 12)
        self.assertEqual(snekbox.content_length(headers(b"Content-Length: 7", b"Content-Length: 7")), 7)
        for bad in (b"-1", b"+5", b"1e3", b"0x10", b"\xd9\xa1", b"5, 6", b""):
            with self.subTest(bad=bad):
                self.assertRefused(400, lambda: snekbox.content_length(headers(b"Content-Length: " + bad)))
        self.assertRefused(400, lambda: snekbox.content_length(
            headers(b"Content-Length: 7", b"Content-Length: 8")))

    def test_chunked(self):
        self.assertFalse(snekbox.is_chunked(headers(b"Content-Length: 3")))
        self.assertTrue(snekbox.is_chunked(headers(b"Transfer-Encoding: Chunked")))
        self.assertRefused(400, lambda: snekbox.is_chunked(
            headers(b"Transfer-Encoding: chunked", b"Content-Length: 3")))
        for coding in (b"gzip, chunked", b"chunked, chunked", b"identity"):
            with self.subTest(coding=coding):
                self.assertRefused(501, lambda: snekbox.is_chunked(headers(b"Transfer-Encoding: " + coding)))


class WriteFilesTests(unittest.TestCase):
    """MemFS.write_files on a plain folder: the uploads, for the jail's user, and never
    through a link the folder holds."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="snekbox-home-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.memfs = snekbox.MemFS(os.path.dirname(self.folder), os.path.basename(self.folder),
                                   MiB, uid=12345)

    def test_nested_files_for_the_jails_user(self):
        self.memfs.write_files([snekbox.File("a/b/c.txt", b"deep"), snekbox.File("top", b"")])
        path = os.path.join(self.folder, "a", "b", "c.txt")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"deep")
        for owned in (path, os.path.join(self.folder, "a"), os.path.join(self.folder, "top")):
            self.assertEqual((os.stat(owned).st_uid, os.stat(owned).st_gid), (12345, 12345), owned)

    def test_links_in_the_folder_are_never_followed(self):
        canary = tempfile.mkdtemp(prefix="snekbox-canary-")
        self.addCleanup(shutil.rmtree, canary)
        os.symlink(canary, os.path.join(self.folder, "out"))
        os.symlink(os.path.join(canary, "file"), os.path.join(self.folder, "f"))
        for path in ("out/x", "f"):
            with self.subTest(path=path), self.assertRaises(snekbox.InvalidRequest):
                self.memfs.write_files([snekbox.File(path, b"escaped")])
        self.assertEqual(os.listdir(canary), [])

    def test_a_file_in_a_folders_place_is_named(self):
        with self.assertRaises(snekbox.InvalidRequest) as caught:
            self.memfs.write_files([snekbox.File("a", b"1"), snekbox.File("a/b", b"2")])
        self.assertIn("files[1]", str(caught.exception))


class WorkerSlotsTests(unittest.TestCase):
    def test_queue_limit_and_first_come_first_served(self):
        slots = snekbox.WorkerSlots(workers=1, max_queue=3, max_wait=10)
        slots.acquire()
        order = []

        def waiter(name):
            slots.acquire()
            order.append(name)
            slots.release()

        threads = []
        for name in "abc":
            threads.append(threading.Thread(target=waiter, args=(name,)))
            threads[-1].start()
            wait_until(lambda: slots.waiting == len(threads), 5, f"{name} waiting", every=0.001)
        with self.assertRaises(snekbox.Busy):
            slots.acquire()             # the queue is full
        slots.release()
        for t in threads:
            t.join(5)
        self.assertEqual(order, ["a", "b", "c"])
        self.assertEqual((slots.running, slots.waiting), (0, 0))

    def test_wait_limit_and_close(self):
        slots = snekbox.WorkerSlots(workers=1, max_queue=5, max_wait=0.05)
        slots.acquire()
        with self.assertRaises(snekbox.Busy):
            slots.acquire()
        with self.assertRaises(snekbox.Busy):
            slots.acquire(gone=lambda: True)
        slots.close()
        slots.release()
        with self.assertRaises(snekbox.Busy):
            slots.acquire()
        self.assertTrue(slots.wait_idle(0))


# --------------------------------------------------------------------------------------
# Integration: the jail
# --------------------------------------------------------------------------------------

class EvalTests(ServerTestCase):
    def test_print(self):
        result = self.run_code("print('hello')")
        self.assertEqual((result["stdout"], result["returncode"], result["files"]),
                         ("hello\n", 0, []))
        self.assertFalse(result["timed_out"] or result["truncated"])
        self.assertIsNone(result["error"])

    def test_stdout_and_stderr_in_order(self):
        result = self.run_code("import sys\nprint(1)\nprint(2, file=sys.stderr)\nprint(3)")
        self.assertEqual(result["stdout"], "1\n2\n3\n")

    def test_traceback_and_exit_codes(self):
        result = self.run_code("1/0")
        self.assertEqual(result["returncode"], 1)
        lines = ANSI.sub("", result["stdout"]).splitlines()    # PYTHON_COLORS=1 from 3.13 on
        self.assertEqual(lines[:2], ['Traceback (most recent call last):',
                                     '  File "<string>", line 1, in <module>'])
        self.assertEqual(lines[-1], "ZeroDivisionError: division by zero")
        self.assertEqual(sum(line.startswith("  File") for line in lines), 1)
        self.assertEqual(self.run_code("raise SystemExit(42)")["returncode"], 42)
        segfault = self.run_code("import ctypes; ctypes.string_at(0)")
        self.assertEqual(segfault["returncode"], 139)

    def test_stdin(self):
        result = self.run_code("import sys; print(repr(sys.stdin.read()))", stdin="a\nb\0ü")
        self.assertEqual(result["stdout"], "'a\\nb\\x00ü'\n")
        self.assertEqual(self.run_code("print(repr(input()))", stdin="line\n")["stdout"],
                         "'line'\n")
        empty = self.run_code("import sys; print(repr(sys.stdin.read()))")
        self.assertEqual(empty["stdout"], "''\n")

    def test_large_stdin(self):
        data = "x" * (3 * 1024 * 1024)
        result = self.run_code("import sys; print(len(sys.stdin.read()))", stdin=data)
        self.assertEqual(result["stdout"], f"{len(data)}\n")

    def test_args_mode(self):
        result = self.server.eval(args=["-m", "timeit", "-n", "10", "1+1"])
        self.assertEqual(result["returncode"], 0)
        self.assertIn("10 loops", result["stdout"])
        argv = self.server.eval(args=["-c", "import sys; print(sys.argv)", "a", "b"])
        self.assertEqual(argv["stdout"], "['-c', 'a', 'b']\n")
        from_stdin = self.server.eval(args=[], stdin="print(6 * 7)")
        self.assertEqual(from_stdin["stdout"], "42\n")

    def test_code_larger_than_one_argument(self):
        # The same program, short and padded past Linux's 128 KiB argument limit with a
        # comment at its end, must behave the same: argv, globals, tracebacks.
        program = ("import sys\nprint(sys.argv, sorted(k for k in globals() if k[0] != '_'))\n"
                   "def f():\n    return 1/0\nf()\n")
        padded = program + "#" * (130 * 1024) + "\n"
        short = self.server.eval(args=["-c", program, "extra"])
        large = self.server.eval(args=["-c", padded, "extra"])
        self.assertEqual(large["stdout"], short["stdout"])
        self.assertEqual(large["returncode"], short["returncode"])
        self.assertTrue(short["stdout"].startswith("['-c', 'extra'] ['sys']\nTraceback"))
        self.assertEqual(self.server.eval(input=padded.replace("f()", "1 +"))["stdout"],
                         self.server.eval(input=program.replace("f()", "1 +"))["stdout"])
        exit_code = self.server.eval(input="#" * 200000 + "\nraise SystemExit(3)")
        self.assertEqual(exit_code["returncode"], 3)

    def test_huge_arguments_are_413(self):
        status, _, data = self.server.post({"args": ["-m", "timeit", "x" * 200000]})
        self.assertEqual(status, 413)
        self.assertIn("131071 bytes", data["description"])
        status, _, data = self.server.post({"args": ["-c", "pass"] + ["x" * 1000] * 1100})
        self.assertEqual(status, 413)

    def test_output_that_is_not_utf8(self):
        result = self.run_code("import sys; sys.stdout.buffer.write(b'a\\xff\\xfeb\\n')")
        self.assertEqual(result["stdout"], "a\ufffd\ufffdb\n")

    def test_uid_and_environment(self):
        result = self.run_code("import os, json; print(json.dumps([os.getuid(), os.getgid(), "
                               "os.getcwd(), dict(os.environ)]))")
        uid, gid, cwd, env = json.loads(result["stdout"])
        self.assertEqual((uid, gid, cwd), (65534, 65534, "/home"))
        self.assertEqual(env["HOME"], "/home")
        self.assertNotIn("SNEKBOX", json.dumps(env))
        self.assertEqual(set(env), {"LANG", "PYTHONIOENCODING", "PYTHONUNBUFFERED",
                                    "PYTHONDONTWRITEBYTECODE", "HOME", "PATH", "PYTHONUSERBASE",
                                    "PYTHON_COLORS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                    "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                                    "NUMEXPR_NUM_THREADS"})

    def test_system_paths_are_read_only_and_sparse(self):
        code = """
import os
for path in ("/usr/lib/snekbox-canary", "/etc/snekbox-canary", "/snekbox-canary"):
    try:
        open(path, "w")
        print("wrote", path)
    except OSError as e:
        print("refused", e.errno)
print(sorted(os.listdir("/")))
print([p for p in ("/bin/sh", "/usr/bin/sh", "/bin/bash", "/usr/bin/env", "/proc/1")
       if os.path.exists(p)])
"""
        lines = self.run_code(code)["stdout"].splitlines()
        self.assertEqual(lines[:3], ["refused 30", "refused 30", "refused 30"])
        self.assertLessEqual(set(eval(lines[3])), {"dev", "etc", "home", "lib", "lib64", "snekbin",
                                                   "snekbox", "usr"})
        self.assertEqual(lines[4], "[]")

    def test_no_network(self):
        code = """
import socket
print(socket.if_nameindex())
for host in ("127.0.0.1", "::1"):     # the server itself listens there, outside
    try:
        socket.create_connection((host, %d), timeout=2)
        print("connected")
    except OSError as e:
        print(type(e).__name__, e.errno)
""" % self.server.port
        lines = self.run_code(code)["stdout"].splitlines()
        self.assertEqual(lines[0], "[(1, 'lo')]")
        self.assertEqual(lines[1], "OSError 101")      # network unreachable
        self.assertIn(lines[2], ("OSError 101", "OSError 99"))

    def test_no_new_namespaces(self):
        code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for flag in (0x10000000, 0x20000, 0x40000000):       # user, mount, network
    print(libc.unshare(flag), ctypes.get_errno())
print(libc.syscall(435, 0, 0), ctypes.get_errno())   # clone3: ENOSYS
pid = os.fork()                                      # plain fork still works
if pid == 0:
    os._exit(7)
print(os.waitpid(pid, 0)[1] >> 8)
"""
        self.assertEqual(self.run_code(code)["stdout"].splitlines(),
                         ["-1 1", "-1 1", "-1 1", "-1 38", "7"])

    def test_time_limit(self):
        result = self.run_code("import time\nprint('start', flush=True)\ntime.sleep(30)")
        self.assertEqual(result["returncode"], 137)
        self.assertTrue(result["timed_out"])
        self.assertEqual(result["stdout"], "start\n")
        self.assertLess(result["duration"], self.time_limit + snekbox.KILL_GRACE)

    def test_memory_limit(self):
        result = self.run_code("x = bytearray(200 * 1024 * 1024)\nprint('survived')")
        self.assertEqual(result["returncode"], 137)
        self.assertFalse(result["timed_out"])
        self.assertEqual(result["stdout"], "")
        ok = self.run_code("x = bytearray(30 * 1024 * 1024); print(len(x))")
        self.assertEqual(ok["returncode"], 0)

    def test_fork_bomb_is_contained(self):
        # The bomb forks until the jail's pids cgroup refuses, then holds all its
        # processes for half a second while another evaluation runs beside it. Cold, so that
        # the marker is on the command line of each of its processes.
        marker = f"snekbox-fork-bomb-{random.random()}"
        code = f"""
import errno, os, time
'{marker}'
n, refused = 0, "none"
for _ in range(1000):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
    except OSError as e:
        refused = errno.errorcode[e.errno]
        break
print(n, refused, flush=True)
time.sleep(0.5)
"""
        pids_max = snekbox.JailConfig.from_file(CONFIG).pids_max
        with ThreadPoolExecutor(1) as pool:
            bomb = pool.submit(self.server.eval, args=[*COLD, "-c", code])
            wait_until(lambda: len(process_uids(marker)) == pids_max, 10,
                       f"the bomb's jail at its {pids_max} processes")
            self.assertEqual(self.run_code("print('still here')")["stdout"], "still here\n")
            self.assertEqual(self.server.request("GET", "/health")[0], 200)
            forks, refused = bomb.result()["stdout"].split()
        self.assertEqual(refused, "EAGAIN")
        self.assertEqual(int(forks) + 1, pids_max)    # the bomb and its children: all it may

    def test_output_truncation(self):
        result = self.run_code("while True:\n    print('x' * 1000)")
        self.assertTrue(result["truncated"])
        self.assertFalse(result["timed_out"])
        self.assertEqual(len(result["stdout"].encode()), 1_000_000)
        self.assertEqual(result["returncode"], 143)    # SIGTERM, as python-discord/snekbox

    def test_concurrent_requests_beyond_workers(self):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: self.run_code(f"import time; time.sleep(0.15); print({i})"),
                                    range(4)))
        self.assertEqual([r["stdout"] for r in results], [f"{i}\n" for i in range(4)])

    @local_only
    def test_no_code_in_the_log_at_info(self):
        logged = self.server.logged("status=ok returncode=0")
        self.run_code("print('secret-code-marker')")
        wait_until(lambda: self.server.logged("status=ok returncode=0") > logged, 5,
                   "the evaluation's line in the log")
        self.assertFalse(self.server.logged("secret-code-marker"))


# --------------------------------------------------------------------------------------
# Integration: HTTP
# --------------------------------------------------------------------------------------

class HTTPTests(ServerTestCase):
    def test_health(self):
        # A worker is free once its last answer has gone out, a moment after the client
        # has it all.
        wait_until(lambda: self.server.health()["running"] == 0, 5, "no evaluation running")
        status, headers, data = self.server.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual((data["ready"], data["workers"], data["running"], data["waiting"]),
                         (True, 2, 0, 0))
        self.assertLessEqual(data["warm"], PREWARM)

    def test_keep_alive_reuses_the_connection(self):
        conn = self.server.connection()
        body = json.dumps({"input": "print(1)"}).encode()
        sockets = []
        for _ in range(3):
            conn.request("POST", "/eval", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            self.assertEqual(json.loads(response.read())["stdout"], "1\n")
            sockets.append(conn.sock)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        self.assertIs(sockets[0], sockets[2])
        self.assertIsNotNone(conn.sock)
        conn.close()

    def test_pipelined_requests(self):
        body = b'{"input":"print(5)"}'
        one = (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = self.server.raw(one + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 2, answer)
        self.assertIn(b'"stdout":"5\\n"', answer)

    def assertError(self, status: int, expected: int, data: dict, text: str = "") -> None:
        self.assertEqual(status, expected, data)
        self.assertEqual(set(data), {"title", "description"})
        self.assertIn(text, data["description"])

    def test_bad_requests_get_4xx_and_the_server_keeps_serving(self):
        json_type = {"Content-Type": "application/json"}
        cases = [
            (("POST", "/eval", b'{"input": 1}', json_type), 400, "input must be a string"),
            (("POST", "/eval", b"{}", json_type), 400, "input or args"),
            (("POST", "/eval", b"nope", json_type), 400, "not valid JSON"),
            (("POST", "/eval", b'{"input": "x"}', {"Content-Type": "text/plain"}), 415, "JSON"),
            (("POST", "/eval", b'{"input": "x"}', {"Content-Type": "text/json"}), 415, "JSON"),
            (("POST", "/nope", b"", json_type), 404, "/nope"),
            (("GET", "/eval", None, {}), 405, "POST"),
            (("DELETE", "/health", None, {}), 405, "GET"),
            (("POST", "/eval", b"[" * 50000, json_type), 400, "objects and arrays"),
            (("POST", "/eval", b'{"args": ["-m", "a\\u0000"]}', json_type), 400, "NUL"),
            (("POST", "/eval", b'{"input": "", "files": [{"path": "../x"}]}', json_type), 400,
             "files[0].path"),
            (("POST", "/eval", b'{"input": "", "executable_path": "/nope/python"}', json_type),
             400, "does not exist"),
        ]
        for (method, path, body, headers), expected, text in cases:
            with self.subTest(method=method, path=path, body=body and body[:40]):
                status, response_headers, data = self.server.request(method, path, body, headers)
                self.assertError(status, expected, data, text)
                if expected == 405:
                    self.assertIn("Allow", response_headers)
        self.assertEqual(self.run_code("print('alive')")["stdout"], "alive\n")

    def test_length_problems(self):
        no_length = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\n\r\n")
        self.assertTrue(no_length.startswith(b"HTTP/1.1 411 "), no_length)
        too_big = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                  b"\r\nContent-Length: 999999999\r\n\r\n{")
        self.assertTrue(too_big.startswith(b"HTTP/1.1 413 "), too_big)
        self.assertIn(b'"description"', too_big)
        bad = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                              b"\r\nContent-Length: -5\r\n\r\n")
        self.assertTrue(bad.startswith(b"HTTP/1.1 400 "), bad)

    def test_expect_100_continue(self):
        body = json.dumps({"input": "print('continued')"}).encode()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as s:
            s.sendall(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(s.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(body)
            status, data = read_response(s)
        self.assertEqual((status, data["stdout"]), (200, "continued\n"))
        refused = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                  b"Content-Length: 999999999\r\n\r\n")
        self.assertTrue(refused.startswith(b"HTTP/1.1 413 "), refused)

    def test_chunked_body(self):
        body = b'{"input": "print(\'chunked\')"}'
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:10], body[10:])) + b"0\r\n\r\n"
        answer = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                 b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"chunked\\n", answer)

    def test_garbage_gets_a_json_error(self):
        for raw in (b"\x00\x01\x02 garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                    b"BREW /eval HTTP/1.1\r\n\r\n"):
            with self.subTest(raw=raw[:20]):
                answer = self.server.raw(raw)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertRegex(head, rb"^HTTP/1\.[01] (400|405|414|431) ")
                self.assertIn("title", json.loads(body))
        self.assertEqual(self.run_code("print(1)")["stdout"], "1\n")

    def test_any_method_gets_the_route_tables_answer(self):
        """A method the route table doesn't list, however new, is a 405 naming the ones
        it does (never http.server's 501); a method that isn't a token is a 400."""
        for method in ("BREW", "QUERY", "TRACE", "CONNECT", "get"):
            with self.subTest(method=method):
                answer = self.server.raw(method.encode() + b" /health HTTP/1.1\r\nHost: x\r\n"
                                         b"Connection: close\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 405 "), answer[:60])
                self.assertIn(b"Allow: GET, HEAD\r\n", answer)
        answer = self.server.raw(b"G(T /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:60])


class AnswerTests(ServerTestCase):
    """What the answer says happened: status, usage, stderr apart, per-request limits,
    warnings and request ids. Each limit is tried warm (where the pool has a jail)
    and cold (interpreter options start cold)."""

    def both(self, code: str, **extra) -> list[dict]:
        """The answers of ``code`` run warm (as -c, when warm jails are on) and cold."""
        return [self.server.eval(args=["-c", code], **extra),
                self.server.eval(args=[*COLD, "-c", code], **extra)]

    def test_each_status(self):
        cases = {"ok": "print(1)", "error": "raise SystemExit(3)",
                 "signal": "import ctypes; ctypes.string_at(0)",     # (a pid 1 ignores kill())
                 "output": "print('x' * 2_000_000)",
                 "memory": "x = bytearray(500 * 1024 * 1024)"}
        for status, code in cases.items():
            for result in self.both(code):
                with self.subTest(status=status):
                    self.assertEqual(result["status"], status, result)
        timeout = self.server.eval(input="while True: pass", limits={"time": 0.5})
        self.assertEqual((timeout["status"], timeout["timed_out"]), ("timeout", True))
        failed = self.server.eval(input="print(1)\0")
        self.assertEqual((failed["status"], failed["returncode"]), ("failed", None))

    def test_a_memory_kill_is_not_a_signal_nor_a_timeout(self):
        for result in self.both("x = bytearray(500 * 1024 * 1024)"):
            self.assertEqual(result["returncode"], 137)
            self.assertEqual(result["status"], "memory")
            self.assertFalse(result["timed_out"])
        crash = self.server.eval(input="import ctypes; ctypes.string_at(0)")
        self.assertEqual((crash["returncode"], crash["status"]), (139, "signal"))
        slow = self.server.eval(input="import time; time.sleep(5)", limits={"time": 0.5})
        self.assertEqual((slow["returncode"], slow["status"]), (137, "timeout"))

    def test_usage_figures(self):
        code = ("import time\nx = bytearray(50 * 1000 * 1000)\nx[::4096] = b'y' * len(x[::4096])\n"
                "while time.process_time() < 1.0: pass\ntime.sleep(0.3)")
        for result in self.both(code):
            usage = result["usage"]
            self.assertGreaterEqual(usage["memory"], 50 * 1000 * 1000)
            self.assertGreaterEqual(usage["cpu"], 0.9)     # the cgroup's clock and the process's
            self.assertLess(usage["cpu"], usage["wall"] + 1)
            # (The clock reads nsjail's log lines as they arrive: a few ms late at worst.)
            self.assertGreaterEqual(usage["wall"], 1.25)
            self.assertLessEqual(usage["wall"], result["duration"])

    def test_stderr_apart_on_request(self):
        code = "import sys\nfor i in range(3):\n print('out', i, flush=True)\n print('err', i, file=sys.stderr, flush=True)"
        result = self.server.eval(input=code, stderr=True)
        self.assertEqual(result["stdout"], "out 0\nout 1\nout 2\n")
        self.assertEqual(result["stderr"], "err 0\nerr 1\nerr 2\n")
        merged = self.server.eval(input=code)
        self.assertEqual(merged["stdout"], "out 0\nerr 0\nout 1\nerr 1\nout 2\nerr 2\n")
        self.assertNotIn("stderr", merged)

    def test_lower_limits_per_request(self):
        for result in self.both("x = bytearray(30 * 1024 * 1024)", limits={"memory": 20 * 1024 * 1024}):
            self.assertEqual(result["status"], "memory")
        for result in self.both("x = bytearray(30 * 1024 * 1024)"):
            self.assertEqual(result["status"], "ok")
        fork = "import os\nfor _ in range(5):\n if os.fork() == 0: import time; time.sleep(1); os._exit(0)"
        for result in self.both(fork, limits={"processes": 2}):
            self.assertIn("BlockingIOError", result["stdout"])
        for result in self.both("print('y' * 100)", limits={"output": 10}):
            self.assertEqual((result["stdout"], result["status"]), ("y" * 10, "output"))
        for result in self.both("import time; time.sleep(3)", limits={"time": 0.5}):
            self.assertEqual(result["status"], "timeout")
            self.assertLess(result["usage"]["wall"], 2.5)

    def test_limits_over_the_caps_or_malformed_are_400(self):
        cases = [({"time": 60}, "limits.time: 60 is over the server's limit of "
                                f"{self.time_limit:g} seconds"),
                 ({"memory": -1}, "limits.memory must be a positive whole number"),
                 ({"processes": 1.5}, "limits.processes must be a positive whole number"),
                 ({"cpu": 1}, "limits.cpu: no such limit"),
                 ([], "limits must be an object")]
        for limits, message in cases:
            with self.subTest(limits=limits):
                status, _, data = self.server.post({"input": "print(1)", "limits": limits})
                self.assertEqual(status, 400)
                self.assertIn(message, data["description"])
        status, _, data = self.server.post({"input": "print(1)", "stderr": "yes"})
        self.assertEqual((status, data["description"]), (400, "stderr must be true or false, not a string"))

    def test_unknown_fields_are_ignored_with_a_warning(self):
        result = self.server.eval(input="print(1)", timeout=1, colour=True)
        self.assertEqual(result["stdout"], "1\n")
        self.assertEqual(result["warnings"], ["timeout: no such field; it was ignored",
                                              "colour: no such field; it was ignored"])
        self.assertNotIn("warnings", self.server.eval(input="print(1)"))

    def test_request_ids(self):
        status, headers, _ = self.server.request("POST", "/eval", b'{"input": "print(1)"}',
                                                 {"X-Request-Id": "abc-123"})
        self.assertEqual((status, headers["X-Request-Id"]), (200, "abc-123"))
        _, headers, _ = self.server.request("GET", "/health", None, {"X-Request-Id": "bad id\x7f"})
        self.assertRegex(headers["X-Request-Id"], r"^[0-9a-f]{16}$")
        _, headers, _ = self.server.request("GET", "/nowhere")
        self.assertRegex(headers["X-Request-Id"], r"^[0-9a-f]{16}$")
        if not REMOTE_URL:
            wait_until(lambda: self.server.logged("evaluation id=abc-123 status=ok"), 5,
                       "the evaluation's log line")
            # The request's own line comes once the jail is taken down, after the answer.
            wait_until(lambda: any('"POST /eval" 200' in line and "id=abc-123" in line
                                   for line in list(self.server.log)), 5,
                       "the request's log line")


class LimitsServerTests(ServerTestCase):
    """A server with small limits, for the 413 and 503 paths."""

    flags = ("--max-request-size", "2000", "--max-queue", "1", "--max-wait", "0.2",
             "--max-output-size", "100", "--client-timeout", "0.5")

    def test_body_that_never_arrives(self):
        short = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                b"\r\nContent-Length: 50\r\n\r\n{}")
        self.assertTrue(short.startswith(b"HTTP/1.1 408 "), short)

    def test_body_over_the_limit(self):
        status, _, data = self.server.post({"input": "#" * 5000})
        self.assertEqual(status, 413)
        self.assertIn("2000 bytes", data["description"])

    def test_output_limit_flag(self):
        result = self.run_code("print('y' * 1000)")
        self.assertEqual(result["stdout"], "y" * 100)
        self.assertTrue(result["truncated"])

    def test_busy_gets_503_with_retry_after(self):
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: self.server.post({"input": "import time; time.sleep(0.6)"}),
                                    range(6)))
        statuses = sorted(status for status, _, _ in answers)
        self.assertEqual(statuses, [200, 200, 503, 503, 503, 503])
        busy = next(a for a in answers if a[0] == 503)
        self.assertEqual(busy[1]["Retry-After"], "1")
        self.assertEqual(set(busy[2]), {"title", "description"})


# --------------------------------------------------------------------------------------
# Integration: files, interpreters and packages
# --------------------------------------------------------------------------------------

class FilesTests(ServerTestCase):
    def setUp(self):
        self.canary_dir = tempfile.mkdtemp(prefix="snekbox-canary-")
        self.addCleanup(shutil.rmtree, self.canary_dir)
        self.canary = os.path.join(self.canary_dir, "secret.txt")
        with open(self.canary, "w") as f:
            f.write("CANARY-SECRET")
        os.chmod(self.canary_dir, 0o755)
        os.chmod(self.canary, 0o644)

    def assertNoCanary(self, result: dict) -> None:
        text = json.dumps(result)
        self.assertNotIn("CANARY-SECRET", text)
        self.assertNotIn(b64("CANARY-SECRET")[:12], text)

    def test_text_and_binary_round_trip(self):
        binary = bytes(range(256)) * 10
        result = self.server.eval(
            input="import os\nfor p in ('t.txt', 'b.bin'):\n"
                  "    data = open(p, 'rb').read()\n    open(p + '.out', 'wb').write(data)",
            files=[{"path": "t.txt", "content": b64("héllo\n")},
                   {"path": "b.bin", "content": b64(binary)}])
        files = {f["path"]: f for f in result["files"]}
        self.assertEqual(sorted(files), ["b.bin.out", "t.txt.out"])
        self.assertEqual(base64.b64decode(files["b.bin.out"]["content"]), binary)
        self.assertEqual(files["b.bin.out"]["size"], len(binary))
        self.assertEqual(base64.b64decode(files["t.txt.out"]["content"]), "héllo\n".encode())

    def test_multi_file_program_in_nested_folders(self):
        files = [{"path": "main.py", "content": b64("from pkg.util import f\nprint(f())")},
                 {"path": "pkg/__init__.py"},
                 {"path": "pkg/util.py", "content": b64("def f():\n    return 'nested ok'")}]
        result = self.server.eval(args=["main.py"], files=files)
        self.assertEqual(result["stdout"], "nested ok\n")
        self.assertEqual(result["files"], [])

    def test_uploads_are_writable_and_only_changes_come_back(self):
        result = self.server.eval(
            input="open('changed.txt', 'a').write('!')\nimport os\nos.makedirs('new/deep')\n"
                  "open('new/deep/x.txt', 'w').write('x')\nopen('.hidden', 'w').write('h')\n"
                  "os.mkdir('.dir'); open('.dir/y', 'w').write('y')\n"
                  "print(open('same.txt').read())",
            files=[{"path": "changed.txt", "content": b64("a")},
                   {"path": "same.txt", "content": b64("unchanged")}])
        self.assertEqual(result["stdout"], "unchanged\n")
        self.assertEqual([(f["path"], base64.b64decode(f["content"])) for f in result["files"]],
                         [("changed.txt", b"a!"), ("new/deep/x.txt", b"x")])

    def test_files_are_private_to_each_evaluation(self):
        self.server.eval(input="open('mine.txt', 'w').write('1')")
        result = self.run_code("import os; print(os.listdir('.'))")
        self.assertEqual(result["stdout"], "[]\n")

    def test_upload_conflicts_and_sizes(self):
        status, _, data = self.server.post({"input": "", "files": [{"path": "a"}, {"path": "a/b"}]})
        self.assertEqual(status, 400)
        self.assertIn("'a/b'", data["description"])
        status, _, data = self.server.post({"input": "", "files": [{"path": "x" * 300}]})
        self.assertEqual(status, 400)
        self.assertIn("too long", data["description"])

    def test_symlinks_never_leak_host_files(self):
        code = f"""
import os
os.symlink({self.canary!r}, "file-link")
os.symlink({self.canary_dir!r}, "dir-link")
os.symlink('/proc/self/environ', "environ")
os.symlink({os.path.abspath(__file__)!r}, "server-file")
os.symlink('/etc/ld.so.cache', "inside-jail")
os.mkdir('sub')
os.symlink('../file-link', "sub/again")
"""
        result = self.server.eval(input=code)
        self.assertEqual(result["returncode"], 0)
        self.assertEqual(result["files"], [])
        self.assertNoCanary(result)

    def test_special_files_are_skipped(self):
        code = """
import os, socket
os.mkfifo('fifo')
s = socket.socket(socket.AF_UNIX)
s.bind('sock')
try:
    os.mknod('dev', 0o600 | 0o020000, os.makedev(1, 3))
except OSError as e:
    print('mknod', e.errno)
open('regular', 'w').write('r')
"""
        started = time.monotonic()
        result = self.server.eval(input=code)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(result["stdout"], "mknod 1\n")
        self.assertEqual([f["path"] for f in result["files"]], ["regular"])

    def test_hard_links_and_sparse_files_stay_within_the_size(self):
        code = """
import os
with open('big', 'wb') as f:
    f.write(os.urandom(1024 * 1024) * 20)
for i in range(50):
    os.link('big', f'link{i:02}')
with open('sparse', 'wb') as f:
    f.truncate(100 * 1024 ** 3)
"""
        before = bytes_read(self.server)
        result = self.server.eval(input=code)
        if before is not None:
            # The server read what fits in the answer, not the 1 GiB the links add up
            # to nor the 100 GiB sparse file.
            self.assertLess(bytes_read(self.server) - before, 2 * 48 * 1024 * 1024)
        total = sum(f["size"] for f in result["files"])
        self.assertLessEqual(total, 48 * 1024 * 1024)
        self.assertEqual([f["path"] for f in result["files"]], ["big", "link00"])
        self.assertIn("exceed 48 MiB", result["error"])

    def test_many_files_and_deep_trees(self):
        code = """
import os
for i in range(3000):
    open(f'f{i:05}', 'w').close()
path = '.'
for i in range(40):
    path += '/d'
os.makedirs(path)
open(path + '/deep.txt', 'w').write('deep')
"""
        result = self.server.eval(input=code)
        self.assertEqual(result["status"], "ok", result["stdout"])     # all of it was made
        # The walk stays bounded (100 files held, 32 folders deep) and ends on its own,
        # not by the files timeout.
        self.assertNotIn("took over", result["error"])
        self.assertEqual(len(result["files"]), 100)
        self.assertEqual(result["files"][0]["path"], "f00000")
        self.assertIn("only the first 100", result["error"])
        self.assertIn("deeper than 32", result["error"])

    def test_file_name_that_is_not_utf8(self):
        result = self.server.eval(input="open(b'bad\\xff'.decode('utf-8', 'surrogateescape'), 'w')"
                                        ".write('x')\nopen('good', 'w').write('g')")
        self.assertEqual([f["path"] for f in result["files"]], ["good"])
        self.assertIn("not valid UTF-8", result["error"])

    def test_home_is_limited_in_size(self):
        result = self.run_code("with open('fill', 'wb') as f:\n"
                               "    for _ in range(60):\n        f.write(b'x' * 1024 * 1024)")
        self.assertNotEqual(result["returncode"], 0)
        self.assertIn("No space left on device", result["stdout"])

    def test_executable_path(self):
        ok = self.server.eval(input="import sys; print(sys.executable, '%d.%d' % sys.version_info[:2])",
                              executable_path="/usr/bin/python3")
        executable, version = ok["stdout"].split()
        self.assertEqual(executable, "/usr/bin/python3")
        for path, text in (("/usr/bin/python9", "does not exist"),
                           (f"/usr/lib/python{version}", "not a regular file"),
                           (f"/usr/lib/python{version}/os.py", "not executable"),
                           ("python3", "absolute"),
                           (self.canary, "does not exist")):
            with self.subTest(path=path):
                status, _, data = self.server.post({"input": "", "executable_path": path})
                self.assertEqual(status, 400, data)
                self.assertIn(text, data["description"])
                self.assertIn("executable_path", data["description"])


class PackagesTests(ServerTestCase):
    """Third-party packages from a user base mounted read-only with --user-base."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.user_base = tempfile.mkdtemp(prefix="snekbox-userbase-")
        site = os.path.join(cls.user_base, "lib", f"python{jail_python_version()}", "site-packages")
        os.makedirs(os.path.join(site, "snekpkg"))
        with open(os.path.join(site, "snekpkg", "__init__.py"), "w") as f:
            f.write("GREETING = 'hello from a package'\n")
        os.makedirs(os.path.join(site, "snekpkg-1.2.3.dist-info"))
        with open(os.path.join(site, "snekpkg-1.2.3.dist-info", "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: snekpkg\nVersion: 1.2.3\n\nA package.\n")
        for folder, _, _ in os.walk(cls.user_base):
            os.chmod(folder, 0o755)
        # Writable by anyone: only the read-only mount may stop the jail writing to it.
        os.chmod(os.path.join(site, "snekpkg", "__init__.py"), 0o666)
        cls.flags = ("--user-base", cls.user_base)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        shutil.rmtree(cls.user_base)

    @local_only
    def test_info_lists_the_packages(self):
        status, _, info = self.server.request("GET", "/info")
        self.assertEqual(status, 200)
        self.assertEqual(info["packages"], [{"name": "snekpkg", "version": "1.2.3",
                                             "python": jail_python_version()}])

    def test_package_imports_and_is_read_only(self):
        result = self.run_code("import snekpkg, site\nprint(snekpkg.GREETING)\n"
                               "open(snekpkg.__file__, 'a')")
        self.assertEqual(result["stdout"].splitlines()[0], "hello from a package")
        self.assertIn("Read-only file system", result["stdout"])


@unittest.skipUnless(REMOTE_URL, "the Docker image's interpreters (run by .ci/docker-test)")
class ContainerTests(ServerTestCase):
    def test_python_discord_interpreter_paths(self):
        version = self.run_code("import sys; print('%d.%d' % sys.version_info[:2])")["stdout"].strip()
        for path in (f"/snekbin/python/{version}/bin/python",):
            with self.subTest(path=path):
                result = self.server.eval(
                    args=["main.py"], executable_path=path,
                    files=[{"path": "main.py", "content": b64("import sys; print(sys.version_info[:2])")}])
                self.assertEqual(result["stdout"], f"({version.replace('.', ', ')})\n")

    def test_info_lists_the_images_interpreters(self):
        status, _, info = self.server.request("GET", "/info")
        self.assertEqual(status, 200)
        versions = {i["path"]: i["version"] for i in info["interpreters"]}
        for version in ("3.13", "3.14"):
            with self.subTest(version=version):
                self.assertTrue(versions[f"/snekbin/python/{version}/bin/python"].startswith(version + "."))
        self.assertEqual([i["path"] for i in info["interpreters"] if i["default"]],
                         ["/snekbin/python/default/bin/python"])

    # The interpreters python-discord's bot asks for, with the X.Y each must be and its
    # build (t: free-threaded, j: JIT); those two are optional (docker build --build-arg
    # EXTRA_PYTHONS).
    BOT_INTERPRETERS = {"3.13": ("3.13", ""), "3.14": ("3.14", ""), "default": ("3.14", ""),
                        "3.14t": ("3.14", "t"), "3.14j": ("3.14", "j")}
    OPTIONAL_INTERPRETERS = {"3.14t", "3.14j"}
    BOT_SCRIPT = """\
import sys, json, decimal, sqlite3, ctypes, ssl, zlib, lzma, bz2, hashlib
print(sys.version)
print("gil", getattr(sys, "_is_gil_enabled", lambda: True)())
print("jit", sys._jit.is_enabled() if hasattr(sys, "_jit") else None)
print(decimal.Decimal(1) / 7, json.dumps(sqlite3.connect(":memory:").execute("select 6 * 7").fetchone()))
with open("out.txt", "w") as f:
    f.write("made by " + sys.executable)
"""

    def test_python_discord_bot_requests(self):
        """The bot's own request shapes for each interpreter: !eval sends main.py and runs
        it, !timeit runs the timeit module with a setup; it reads stdout, returncode and
        files."""
        for name, (version, build) in self.BOT_INTERPRETERS.items():
            with self.subTest(interpreter=name):
                executable = f"/snekbin/python/{name}/bin/python"
                status, _, result = self.server.post({
                    "args": ["main.py"], "executable_path": executable,
                    "files": [{"path": "main.py", "content": b64(self.BOT_SCRIPT)}]})
                if (status == 400 and name in self.OPTIONAL_INTERPRETERS
                        and "does not exist" in result["description"]):
                    self.skipTest(f"{executable} is not in this image")
                self.assertEqual(status, 200, result)
                self.assertEqual(result["returncode"], 0, result["stdout"])
                lines = result["stdout"].splitlines()
                self.assertTrue(lines[0].startswith(version + "."), lines[0])
                self.assertEqual(lines[1], "gil False" if build == "t" else "gil True")
                if build == "j":
                    self.assertEqual(lines[2], "jit True")
                self.assertEqual(lines[3], "0.1428571428571428571428571429 [42]")
                self.assertEqual(result["files"], [{
                    "path": "out.txt", "size": len("made by " + executable),
                    "content": b64("made by " + executable)}])

                result = self.server.eval(args=["-m", "timeit", "-s", "x = 1", "x + 1"],
                                          executable_path=executable)
                self.assertEqual(result["returncode"], 0, result["stdout"])
                self.assertRegex(result["stdout"],
                                 r"^\d+ loops?, best of \d+: [\d.]+ [nuµm]?sec per loop\n$")
                self.assertEqual(result["files"], [])


# What a program can see of how it was started; a warm jail must show the same.
PROBE = """\
import json, sys, __main__
def kind(value):
    return type(value).__name__ if value is not None else None
print(json.dumps({
    "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0],
    "main": {k: kind(v) for k, v in sorted(vars(__main__).items())},
    "file": getattr(__main__, "__file__", None), "name": __name__,
    "modules": sorted(m for m in sys.modules if m != "json" and not m.startswith("json.")),
    "stdin": sys.stdin.read(), "flags": str(sys.flags),
}))
def fail():
    raise ValueError("from the probe")
fail()
"""


@local_only
class WarmJailTests(unittest.TestCase):
    """The warm pool against cold starts: the same programs must see the same things."""

    @classmethod
    def setUpClass(cls) -> None:
        # One of the two is the server the other classes share (SNEKBOX_PREWARM 0 or 2).
        cls.cold = shared_server(*default_flags(prewarm=0))
        cls.warm = shared_server(*default_flags(prewarm=2))

    def both(self, **body) -> tuple[dict, dict]:
        wait_until(lambda: self.warm.health()["warm"] == 2, 15, "the warm pool full (2)")
        return self.cold.eval(**body), self.warm.eval(**body)

    def assertSame(self, **body) -> dict:
        cold, warm = self.both(**body)
        for key in ("stdout", "returncode", "files", "timed_out", "truncated", "error"):
            self.assertEqual(warm[key], cold[key], key)
        return cold

    def test_c_mode(self):
        result = self.assertSame(args=["-c", PROBE, "one", "two"], stdin="in")
        self.assertIn('"argv": ["-c", "one", "two"]', result["stdout"])
        self.assertIn('ValueError: from the probe', ANSI.sub("", result["stdout"]))
        self.assertSame(input="1 +")
        self.assertSame(input="import sys; sys.exit('bye')")
        self.assertSame(input="raise SystemExit(7)")
        self.assertSame(input="print('x' * 300)")

    def test_script_mode(self):
        files = [{"path": "main.py", "content": b64(PROBE)},
                 {"path": "lib/helper.py", "content": b64("X = 1")}]
        result = self.assertSame(args=["main.py", "arg"], files=files, stdin="in")
        self.assertIn('"file": "/home/main.py"', result["stdout"])
        self.assertSame(args=["lib/helper.py"], files=files)

    def test_module_mode(self):
        files = [{"path": "probe.py", "content": b64(PROBE)}]
        result = self.assertSame(args=["-m", "probe", "x"], files=files)
        self.assertIn('"argv": ["/home/probe.py", "x"]', result["stdout"])
        self.assertIn("<frozen runpy>", result["stdout"])
        self.assertSame(args=["-m", "json.tool", "--sort-keys"], stdin='{"b": 1, "a": [2]}')
        self.assertSame(args=["-m", "no_such_module"])

    def test_files_limits_and_codes(self):
        self.assertSame(input="open('out.txt', 'w').write('made warm or cold')",
                        files=[{"path": "in.txt", "content": b64("unchanged")}])
        self.assertSame(input="import ctypes; ctypes.string_at(0)")
        memory = self.assertSame(input="x = bytearray(200 * 1024 * 1024)")
        self.assertEqual(memory["returncode"], 137)
        bomb = "import os\nn = 0\ntry:\n    while True:\n        os.fork() or __import__('time').sleep(5)\n        n += 1\nexcept OSError:\n    print(n < 15)"
        self.assertSame(input=bomb)

    def test_time_limit_counts_from_the_hand_over(self):
        # Both warm jails get their jobs after waiting 0.8 s: the one that takes all but
        # 0.7 s of the time limit must finish; the other is still stopped at the limit.
        root = self.warm.memfs_root()
        wait_until(lambda: self.warm.health()["warm"] == 2, 15, "the warm pool full (2)")
        waiting = set(nsjail_pids_using(root))
        time.sleep(0.8)     # the point of the test: jails that have waited
        with ThreadPoolExecutor(2) as pool:
            ok = pool.submit(self.warm.eval, input="import time; time.sleep(%g); print('in time')"
                             % (TIME_LIMIT - 0.7))
            late = pool.submit(self.warm.eval,
                               input="import time; print('start', flush=True); time.sleep(30)")
            ok, late = ok.result(), late.result()
        self.assertEqual(ok["stdout"], "in time\n")
        self.assertEqual((late["returncode"], late["timed_out"], late["stdout"]), (137, True, "start\n"))
        self.assertFalse(waiting & set(nsjail_pids_using(root)), "the warm jails ran them")

    def test_output_truncation(self):
        cold, warm = self.both(input="while True: print('x' * 1000)")
        self.assertEqual((warm["returncode"], warm["truncated"]), (cold["returncode"], cold["truncated"]))
        self.assertEqual(len(warm["stdout"]), len(cold["stdout"]))

    def test_pool_never_holds_more_and_replaces_dead_jails(self):
        root = self.warm.memfs_root()
        wait_until(lambda: len(nsjail_pids_using(root)) == 2, 15, "2 warm jails")
        for pid in nsjail_pids_using(root):
            os.kill(pid, 9)         # a warm jail dies while waiting
        self.assertEqual(self.warm.eval(input="print('after')")["stdout"], "after\n")
        wait_until(lambda: len(nsjail_pids_using(root)) == 2, 15, "2 warm jails again after they died")
        with ThreadPoolExecutor(5) as pool:      # more at once than the pool holds: cold
            results = list(pool.map(lambda i: self.warm.eval(input=f"print({i})"), range(5)))
        self.assertEqual([r["stdout"] for r in results], [f"{i}\n" for i in range(5)])
        wait_until(lambda: len(nsjail_pids_using(root)) == 2, 15, "2 warm jails after the burst")
        time.sleep(0.3)     # and no more come: a moment in which nothing may happen
        self.assertEqual(len(nsjail_pids_using(root)), 2)



ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ReferenceBehaviourTests(ServerTestCase):
    """What python-discord/snekbox's own tests check, over HTTP: its clients must see the
    same. Where snekbox is deliberately better, the test's name says so."""

    def test_eval_output_and_return_codes(self):
        self.assertEqual(self.run_code("print('hi')")["stdout"], "hi\n")
        self.assertEqual(self.run_code("import sys; print('a'); print('b', file=sys.stderr)")["stdout"],
                         "a\nb\n")
        self.assertEqual(self.run_code("raise SystemExit(3)")["returncode"], 3)
        self.assertEqual(self.run_code("import ctypes; ctypes.string_at(0)")["returncode"], 139)
        self.assertEqual(self.run_code("input()")["returncode"], 1)     # EOF: no stdin

    def test_output_limit_is_a_sigterm(self):
        result = self.run_code("print('x' * 2_000_000)")
        self.assertEqual((result["returncode"], len(result["stdout"])), (143, 1_000_000))

    def test_strict_output_encoding(self):
        result = self.run_code("print('\\ud800')")
        self.assertEqual(result["returncode"], 1)
        self.assertIn("UnicodeEncodeError", ANSI.sub("", result["stdout"]))

    def test_nul_in_code_is_pythons_own_error(self):
        status, _, data = self.server.post({"input": "print(1)\0"})
        self.assertEqual(status, 200)
        self.assertEqual((data["stdout"], data["returncode"], data["files"]),
                         ("ValueError: embedded null byte", None, []))
        status, _, data = self.server.post({"args": ["-m", "timeit", "\0"]})
        self.assertEqual(status, 400)
        status, _, data = self.server.post({"input": "", "files": [{"path": "a\0b"}]})
        self.assertEqual((status, data["title"]), (400, "Request file is invalid"))

    def test_leading_empty_args_are_dropped(self):
        result = self.server.eval(args=["", "", "-c", "import sys; print(sys.argv)", "", "x"])
        self.assertEqual(result["stdout"], "['-c', '', 'x']\n")

    def test_files_come_back_but_private_and_hidden_ones(self):
        code = ("import os\nfor p in ('ok.txt', '_private.txt', '.hidden', 'd/_x.txt', 'd/y.txt',"
                " '_d/z.txt'):\n    os.makedirs(os.path.dirname(p) or '.', exist_ok=True)\n"
                "    open(p, 'w').write(p)")
        result = self.server.eval(input=code)
        self.assertEqual([f["path"] for f in result["files"]], ["d/y.txt", "ok.txt"])

    def test_wrapped_base64_is_accepted_garbage_is_not(self):
        content = base64.encodebytes(os.urandom(200)).decode()
        self.assertIn("\n", content)
        result = self.server.eval(input="print(len(open('a.bin', 'rb').read()))",
                                  files=[{"path": "a.bin", "content": content}])
        self.assertEqual(result["stdout"], "200\n")
        status, _, data = self.server.post({"input": "", "files": [{"path": "a", "content": "!!"}]})
        self.assertEqual((status, data["title"]), (400, "Request file is invalid"))

    def test_full_home_is_no_space_left(self):
        result = self.run_code("import errno\ntry:\n    with open('f', 'wb') as f:\n"
                               "        for _ in range(60):\n            f.write(b'x' * 2**20)\n"
                               "except OSError as e:\n    print(errno.errorcode[e.errno])")
        self.assertEqual(result["stdout"], "ENOSPC\n")

    def test_environment_of_the_reference(self):
        result = self.run_code("import os, json; st = os.statvfs('/dev/shm'); print(json.dumps("
                               "[dict(os.environ), st.f_blocks * st.f_frsize]))")
        env, shm = json.loads(result["stdout"])
        self.assertEqual((env["PYTHONUSERBASE"], env["PYTHON_COLORS"]), ("/snekbox/user_base", "1"))
        self.assertEqual(env["PYTHONIOENCODING"], "utf-8:strict")
        self.assertEqual(shm, 40 * 1024 * 1024)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            self.assertLess(int(env[name]), 15)     # the process limit

    def test_without_content_type_is_json(self):
        status, _, data = self.server.request("POST", "/eval", b'{"input": "print(2)"}')
        self.assertEqual((status, data["stdout"]), (200, "2\n"))
        status, _, data = self.server.request("POST", "/eval", b"{}",
                                              {"Content-Type": "application/xml"})
        self.assertEqual((status, data["title"]), (415, "415 Unsupported Media Type"))

    def test_options_allows_post(self):
        status, headers, data = self.server.request("OPTIONS", "/eval")
        self.assertEqual((status, headers["Allow"], headers["Content-Length"], data),
                         (200, "POST", "0", None))

    def test_validation_errors_have_the_references_titles(self):
        for body in ({}, {"input": 1}, {"args": 400}, {"input": "", "files": [215]}):
            with self.subTest(body=body):
                status, _, data = self.server.post(body)
                self.assertEqual((status, data["title"]), (400, "Request data failed validation"))
        for path in ("/abs", "../x", "a/../../b"):
            status, _, data = self.server.post({"input": "", "files": [{"path": path}]})
            self.assertEqual((status, data["title"]), (400, "Request file is invalid"))

    def test_symlinks_are_never_followed_better_than_the_reference(self):
        result = self.server.eval(input="import os; os.symlink('/etc/ld.so.cache', 'l')")
        self.assertEqual(result["files"], [])

    def test_a_burst_beyond_the_workers_is_served(self):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: self.server.post(
                {"input": f"import time; time.sleep(0.1); print({i})"}), range(8)))
        self.assertEqual([a[0] for a in answers], [200] * 8)
        self.assertEqual([a[2]["stdout"] for a in answers], [f"{i}\n" for i in range(8)])


@local_only
class OperatorMistakesTests(unittest.TestCase):
    """The first hour of a new operator: each mistake gets a message that says what to do."""

    def start(self, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, SNEKBOX, "--port", "0", *flags],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(env or {})})

    def config(self, text: str) -> str:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "snekbox.cfg")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_a_typo_in_the_config_shows_nsjails_own_error(self):
        with open(CONFIG) as f:
            path = self.config(f.read().replace("time_limit: 6", "time_limt: 6"))
        proc = self.start("--config", path, "--prewarm", "0")
        self.assertEqual(proc.returncode, 1)
        self.assertIn('has no field named "time_limt"', proc.stderr)
        self.assertIn(path, proc.stderr)

    def test_a_missing_mandatory_mount_is_named(self):
        with open(CONFIG) as f:
            path = self.config(f.read() + 'mount {\n  src: "/nonexistent-snekbox"\n'
                                          '  dst: "/x"\n  is_bind: true\n}\n')
        proc = self.start("--config", path)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("/nonexistent-snekbox", proc.stderr)
        self.assertIn("mandatory", proc.stderr)

    def test_bad_flags_and_variables_are_named_before_anything_is_set_up(self):
        before = set(os.listdir(snekbox.DEFAULT_MEMFS_BASE))
        for flags, env, text in ((["--port", "99999"], {}, "--port"),
                                 ([], {"SNEKBOX_WORKERS": "abc"}, "SNEKBOX_WORKERS"),
                                 ([], {"SNEKBOX_PORT": "-1"}, "SNEKBOX_PORT")):
            with self.subTest(flags=flags, env=env):
                proc = self.start(*flags, env=env)
                self.assertEqual(proc.returncode, 2)
                self.assertIn(text, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(set(os.listdir(snekbox.DEFAULT_MEMFS_BASE)), before)
        help_text = subprocess.run([sys.executable, SNEKBOX, "--help"], capture_output=True,
                                   text=True).stdout
        self.assertIn("snekbox.cfg", help_text)

    def test_not_root_says_so(self):
        code = ("import os, sys; sys.path.insert(0, %r); os.setgid(65534); os.setuid(65534)\n"
                "import snekbox\ntry:\n    snekbox.Sandbox()\nexcept snekbox.SetupError as e:\n"
                "    print(e)" % HERE)
        out = subprocess.run([JAIL_PYTHON, "-c", code], capture_output=True, text=True,
                             timeout=30)
        self.assertIn("snekbox must run as root", out.stdout, out.stderr)

    def test_sandbox_as_a_context_manager(self):
        with snekbox.Sandbox(CONFIG, prewarm=1) as sandbox:
            root = sandbox.memfs_root
            self.assertEqual(sandbox.run(["-c", "print(1)"]).stdout, "1\n")
        self.assertEqual(mounts_below(root), [])
        self.assertEqual(nsjail_pids_using(root), [])
        self.assertFalse(os.path.exists(root))

    def test_a_dropped_sandbox_leaves_nothing_behind(self):
        sandbox = snekbox.Sandbox(CONFIG, prewarm=1)
        root = sandbox.memfs_root
        wait_until(lambda warm=sandbox: warm.warm_jails == 1, 5, "one warm jail")
        del sandbox
        gc.collect()
        wait_until(lambda: not mounts_below(root) and not nsjail_pids_using(root), 5,
                   "no tmpfs and no jail left")
        code = ("import sys; sys.path.insert(0, %r); import snekbox\n"
                "sandbox = snekbox.Sandbox(%r, prewarm=1)\nprint(sandbox.memfs_root, flush=True)\n"
                "sandbox.run(['-c', 'pass'])" % (HERE, CONFIG))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60)
        root = out.stdout.strip()
        self.assertTrue(root, out.stderr)
        self.assertEqual(mounts_below(root), [])
        self.assertFalse(os.path.exists(root))


@local_only
class CommandLineTests(unittest.TestCase):
    """``snekbox.py run`` and ``eval``: one evaluation in the sandbox, no server."""

    def snekbox(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, SNEKBOX, "--config", SHORT_CONFIG, *args],
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=60)

    def test_output_and_exit_status(self):
        proc = self.snekbox("eval", "import sys\nprint('hi', sys.argv[1:])\nraise SystemExit(3)",
                            "a")
        self.assertEqual((proc.stdout, proc.stderr, proc.returncode), (b"hi ['a']\n", b"", 3))

    def test_stderr_apart_and_stdin_passed_through(self):
        code = "import sys\nprint(sys.stdin.read()[::-1])\nprint('err', file=sys.stderr)"
        proc = self.snekbox("eval", code, stdin=b"\xc3\xa9data")
        self.assertEqual((proc.stdout, proc.stderr, proc.returncode), ("atadé\n".encode(), b"err\n", 0))

    def test_run_a_file_with_arguments(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "prog.py")
        write_file(path, "import sys\nprint(sys.argv)\n1 / 0\n")
        proc = self.snekbox("run", path, "a", "--b")
        self.assertEqual(proc.stdout, b"['prog.py', 'a', '--b']\n")
        # PYTHON_COLORS=1 colours tracebacks from 3.13 on
        self.assertIn('prog.py", line 3', ANSI.sub("", proc.stderr.decode()))
        self.assertIn(b"ZeroDivisionError", proc.stderr)
        self.assertEqual(proc.returncode, 1)

    def test_a_limit_says_so_and_gives_the_status(self):
        proc = self.snekbox("eval", "import time\nprint('begun', flush=True)\ntime.sleep(10)")
        self.assertEqual(proc.stdout, b"begun\n")
        self.assertEqual(proc.returncode, 137)
        self.assertRegex(proc.stderr.decode(), rf"^snekbox.py: timeout: .*time limit of {TIME_LIMIT} s"
                                               r".*137\)\n$")

    def test_bad_usage_exits_2(self):
        for args, text in ((["run", "/nonexistent-snekbox.py"], b"cannot read"),
                           (["run"], b"FILE.py"), (["eval", "1", "--x"], None)):
            with self.subTest(args=args):
                proc = self.snekbox(*args)
                if text is None:        # arguments after the code are the program's
                    self.assertEqual(proc.returncode, 0, proc.stderr)
                    continue
                self.assertEqual(proc.returncode, 2)
                self.assertIn(text, proc.stderr)
                self.assertNotIn(b"Traceback", proc.stderr)

    def test_a_jail_that_cannot_start_and_no_root_are_125(self):
        proc = self.snekbox("--nsjail", "/bin/false", "eval", "print(1)")
        self.assertEqual((proc.stdout, proc.returncode), (b"", 125), proc.stderr)
        self.assertIn(b"snekbox.py: ", proc.stderr)
        proc = subprocess.run([JAIL_PYTHON, SNEKBOX, "eval", "print(1)"], user=65534, group=65534,
                              extra_groups=[], capture_output=True, timeout=60)
        self.assertEqual(proc.returncode, 125)
        self.assertIn(b"must run as root", proc.stderr)


# --------------------------------------------------------------------------------------
# Attacks: on the host, its kernel quotas, the server's memory and the library API
# --------------------------------------------------------------------------------------

MiB = 1024 * 1024


def process_uids(marker: str) -> list[int]:
    """Host uids of the interpreters whose command line holds ``marker`` (not nsjail,
    nor the root shell that puts it in its cgroup, which hold the marker too)."""
    uids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{name}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            if status["Name"].strip().startswith("python"):
                uids.append(int(status["Uid"].split()[0]))
        except (OSError, ValueError):
            pass
    return uids


def peak_rss(pid: int) -> int:
    """The highest resident memory of a process so far, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@local_only
class LibraryInputTests(unittest.TestCase):
    """The library checks what it is given, so every caller gets the checks."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.sandbox = snekbox.Sandbox(CONFIG)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.sandbox.close()

    def test_uploads_cannot_leave_home(self):
        canary_dir = tempfile.mkdtemp(prefix="snekbox-canary-")
        self.addCleanup(shutil.rmtree, canary_dir)
        target = os.path.join(canary_dir, "written")
        for path in ("../" * 12 + target.lstrip("/"), target, "a/../../x", "", ".", "a/",
                     "a\0b", "d/" * 40 + "f"):
            with self.subTest(path=path[:50]):
                with self.assertRaises(snekbox.InvalidRequest) as caught:
                    self.sandbox.run(["-c", "pass"], files=[snekbox.File(path, b"x")])
                self.assertEqual(caught.exception.status, 400)
                self.assertIn("files[0].path", str(caught.exception))
        self.assertEqual(os.listdir(canary_dir), [])

    def test_wrong_types_are_clear_errors(self):
        calls = {"a string for args": lambda: self.sandbox.run("print(1)"),
                 "str stdin": lambda: self.sandbox.run(["-c", "pass"], stdin="text"),
                 "str content": lambda: self.sandbox.run(
                     ["-c", "pass"], files=[snekbox.File("a", "text")]),
                 "a number in args": lambda: self.sandbox.run(["-c", 1]),
                 "a path for a File": lambda: self.sandbox.run(["-c", "pass"], files=["a"])}
        for name, call in calls.items():
            with self.subTest(name), self.assertRaises(TypeError):
                call()


class AttackTests(ServerTestCase):
    """Untrusted code against the host, its kernel and the other evaluations."""

    short_time_limit = False    # test_one_cpu_at_most keeps four processes busy for 2.5 s

    def test_only_the_socket_families_of_a_machine_without_network(self):
        code = """
import socket
# 40: AF_VSOCK, 16: AF_NETLINK (0: its routing protocol, 15: the host's device events)
for family, protocol in ((1, 0), (2, 0), (10, 0), (16, 0), (40, 0), (16, 15), (16, 9), (17, 0),
                         (38, 0), (30, 0), (21, 0), (15, 0), (29, 0), (44, 0), (42, 0), (31, 0)):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            socket.socket(family, kind, protocol).close()
            print(family, protocol, "ok")
            break
        except OSError as e:
            if kind == socket.SOCK_RAW:
                print(family, protocol, e.errno)
for family in (1, 40):
    try:
        print("pair", family, len(socket.socketpair(family)))
    except OSError as e:
        print("pair", family, e.errno)
"""
        lines = self.run_code(code)["stdout"].splitlines()
        self.assertEqual(lines[:4], ["1 0 ok", "2 0 ok", "10 0 ok", "16 0 ok"])
        self.assertEqual(lines[4:-2], [f"{f} {p} 97" for f, p in (
            (40, 0), (16, 15), (16, 9), (17, 0), (38, 0), (30, 0), (21, 0), (15, 0), (29, 0),
            (44, 0), (42, 0), (31, 0))])
        self.assertEqual(lines[-2:], ["pair 1 2", "pair 40 97"])

    def test_one_cpu_at_most(self):
        code = """
import os, resource, time
for _ in range(4):
    if os.fork() == 0:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            pass
        os._exit(0)
for _ in range(4):
    os.wait()
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_utime + usage.ru_stime)
"""
        # Four busy processes for 2.5 s: 5 s of CPU time on two CPUs; one CPU a second
        # (nsjail's period is a second, so the first may be a whole one) gives 3 s at most.
        self.assertLess(float(self.run_code(code)["stdout"]), 3.6,
                        "no CPU limit: on cgroup v2 snekbox's group needs the cpu controller "
                        "(README, Cgroups)")

    @unittest.skipUnless(os.uname().machine == "x86_64", "32-bit system calls of x86")
    def test_32_bit_system_calls_cannot_go_around_the_policy(self):
        code = """
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes.fromhex("53B867010000BB28000000B90100000031D2CD805BC3"))  # int 0x80 socket(AF_VSOCK)
print("fd", ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))())
"""
        result = self.run_code(code)
        self.assertEqual((result["stdout"], result["returncode"]), ("", 159))   # SIGSYS

    def test_host_wide_kernel_counters_are_out_of_reach(self):
        # Each of these is counted against root on the host, whose user namespace the
        # jail's is: one try each (never a loop that could use root's quota up).
        code = """
import ctypes, os, resource, signal, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    result = getattr(libc, name)(*args)
    return result if result >= 0 else -ctypes.get_errno()
print("inotify", call("inotify_init1", 0))
print("fanotify", call("fanotify_init", 0, 0))
print("mqueue", call("mq_open", b"/snekbox", os.O_CREAT | os.O_RDWR, 0o600, None))
print("memfd_secret", call("syscall", 447, 0))
io_setup = {"x86_64": 206, "aarch64": 0}[os.uname().machine]
print("io_setup", call("syscall", io_setup, 1, ctypes.byref(ctypes.c_ulong())))
print("msgqueue", resource.getrlimit(resource.RLIMIT_MSGQUEUE))
print("memlock", resource.getrlimit(resource.RLIMIT_MEMLOCK))
soft, hard = resource.getrlimit(resource.RLIMIT_SIGPENDING)
print("sigpending", soft <= 256 and hard <= 256)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
queued = 0
try:
    for _ in range(300):
        signal.pthread_kill(threading.get_ident(), signal.SIGRTMIN)
        queued += 1
except OSError as e:
    print("queued", queued <= 256, e.errno)
"""
        lines = self.run_code(code)["stdout"].splitlines()
        self.assertEqual(lines, ["inotify -1", "fanotify -1", "mqueue -1", "memfd_secret -1",
                                 "io_setup -1", "msgqueue (0, 0)", "memlock (0, 0)",
                                 "sigpending True", "queued True 11"])

    @local_only
    def test_each_jail_is_a_host_user_of_its_own(self):
        markers = [f"snekbox-uid-probe-{i}-{random.random()}" for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(self.server.eval, args=[*COLD, "-c", f"import os, time; '{m}'; "
                                                        "time.sleep(1); print(os.getuid(), os.getgid())"])
                    for m in markers]
            wait_until(lambda: all(process_uids(m) for m in markers), 5, "both jails running")
            uids = [process_uids(m)[0] for m in markers]
            self.assertEqual([r.result()["stdout"] for r in runs], ["65534 65534\n"] * 2)
        self.assertNotEqual(uids[0], uids[1])
        self.assertFalse({0, 65534} & set(uids), uids)


@local_only
class CollectFilesMemoryTests(unittest.TestCase):
    def test_memory_is_bounded_by_the_limits_not_by_what_the_jail_made(self):
        # 30000 names of one file in /home: what the run returns is the first 100, and
        # collecting them never holds a list of all the names.
        # (A files timeout for slow machines: this is about memory, not time.)
        sandbox = snekbox.Sandbox(CONFIG, files_limit=100, files_timeout=60)
        self.addCleanup(sandbox.close)
        code = ("import os\nopen('f', 'w').write('x')\n"
                "for i in range(30000):\n    os.link('f', f'link{i:05}')")
        tracemalloc.start()
        try:
            result = sandbox.run(["-c", code])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertEqual([f.path for f in result.files[:2]], ["f", "link00000"])
        self.assertEqual(len(result.files), 100)
        self.assertIn("only the first 100", result.error)
        self.assertLess(peak, 2 * MiB)


@local_only
class ServerMemoryTests(ServerTestCase):
    flags = ("--client-timeout", "1", "--max-request-size", str(MiB),
             "--max-body-memory", str(3 * MiB))

    def test_big_answers_to_clients_that_do_not_read(self):
        code = ("with open('out', 'wb') as f:\n    for _ in range(30):\n"
                "        f.write(bytes(range(256)) * 4096)")
        sockets = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", self.server.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(eval_request(code))
            sockets.append(s)
        # Each is cut off with a reset once it has not read for --client-timeout.
        wait_until(lambda: all(tcp_state(s) == "closed" for s in sockets), 30,
                   "all four connections reset by the server")
        for s in sockets:
            s.settimeout(CLIENT_TIMEOUT)
            received = b""
            try:
                while chunk := s.recv(1 << 20):
                    received += chunk
            except ConnectionResetError:
                pass
            s.close()
            self.assertLessEqual(received.count(b"HTTP/1.1 "), 1, received[:200])
            self.assertTrue(received.startswith(b"HTTP/1.1 200 ") or not received, received[:200])
            self.assertLess(len(received), 30 * MiB)
        self.assertLess(peak_rss(self.server.proc.pid), 200 * MiB)
        self.assertEqual(self.run_code("print('alive')")["stdout"], "alive\n")
        # A client that reads gets the whole answer.
        result = self.server.eval(input=code)
        self.assertEqual(result["files"][0]["size"], 30 * MiB)

    def test_a_stream_not_taken_in_time_is_cut_off_and_its_run_cancelled(self):
        s, rid = stream_never_read(self.server)
        with s:
            wait_until(lambda: tcp_state(s) == "closed", 10, "the connection reset")
            # Cancelled: the client's rule ended the run, before its time limit could.
            wait_until(lambda: self.server.logged(f"id={rid} status=cancelled"), 5,
                       "the run cancelled")
            wait_until(lambda: self.server.logged("the stream was cut off"), 5,
                       "the cut-off in the log")

    def test_stalled_bodies_share_one_budget(self):
        stalled = []
        head = (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n{" % (MiB - 1))
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
            s.sendall(head + b" " * (MiB - 200))    # all but the end of the body
            stalled.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        answer = self.server.raw(head, timeout=5)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:200])
        self.assertIn(b"Retry-After", answer)
        self.assertLess(time.monotonic() - started, 1.5)
        for s in stalled:
            s.close()
        wait_until(lambda: self.server.post({"input": "print(3)"})[0] == 200, 5,
                   "the budget given back: an evaluation answered")

    def test_a_claimed_length_holds_nothing_until_it_arrives(self):
        # Without the body it claims, a request is dropped after --client-timeout (1 s),
        # not after the time its length would take to send at the slowest rate.
        head = (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n{" % (MiB - 1))
        claims = [socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
                  for _ in range(8)]
        for s in claims:
            s.sendall(head)
        self.assertEqual(self.server.post({"input": "print(4)"})[0], 200)
        started = time.monotonic()
        answer = claims[0].recv(200)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertLess(time.monotonic() - started, 4)
        for s in claims:
            s.close()

    def test_uploads_are_bounded_in_depth(self):
        files = [{"path": "d/" * 2000 + f"f{i}"} for i in range(100)]
        status, _, data = self.server.post({"input": "", "files": files})
        self.assertEqual(status, 413 if len(json.dumps(files)) > MiB else 400, data)
        status, _, data = self.server.post({"input": "", "files": [{"path": "d/" * 40 + "f"}]})
        self.assertEqual(status, 400)
        self.assertIn("folders deep", data["description"])


NDJSON = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


def stream_never_read(server: Server) -> tuple[socket.socket, str]:
    """A streamed evaluation, on a socket that is never read, of a program that writes
    900,000 NULs (over 5 MB of JSON, far more than the socket's buffers hold) and then
    sleeps; the socket and the request's id."""
    rid = f"never-reads-{os.getpid()}-{random.randrange(10**9)}"
    body = json.dumps({"input": "import sys, time\nsys.stdout.write('\\0' * 900_000)\n"
                                "sys.stdout.flush()\ntime.sleep(30)"}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    s.sendall(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Accept: application/x-ndjson\r\nX-Request-Id: %s\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (rid.encode(), len(body), body))
    return s, rid


class StreamTests(ServerTestCase):
    """Accept: application/x-ndjson: the output as the jail produces it, one JSON line a
    piece, and the plain answer as the last line."""

    def stream(self, body: dict, conn: http.client.HTTPConnection | None = None,
               headers: dict | None = None) -> http.client.HTTPResponse:
        if conn is None:
            conn = self.server.connection()
            self.addCleanup(conn.close)
        conn.request("POST", "/eval", json.dumps(body).encode(), {**NDJSON, **(headers or {})})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Type"), "application/x-ndjson")
        return response

    def lines(self, body: dict, **options) -> tuple[dict[str, str], dict]:
        """Each stream's lines joined, and the last line (the answer)."""
        lines = [json.loads(line) for line in self.stream(body, **options).read().splitlines()]
        *chunks, answer = lines
        joined = {"stdout": "", "stderr": ""}
        for chunk in chunks:
            (name, text), = chunk.items()
            joined[name] += text
        return joined, answer

    def read_until(self, response: http.client.HTTPResponse, text: str) -> str:
        """The stdout lines of a stream joined, read until they hold ``text``."""
        seen = ""
        while text not in seen:
            seen += json.loads(response.readline())["stdout"]
        return seen

    def test_code_with_a_nul_streams_what_the_answer_says(self):
        joined, answer = self.lines({"input": "print(1)\0"})
        self.assertEqual(answer["status"], "failed")
        self.assertEqual(joined["stdout"], answer["stdout"])

    def test_output_arrives_while_the_program_runs(self):
        code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')"
        conn = self.server.connection()
        self.addCleanup(conn.close)
        for args in (["-c", code], [*COLD, "-c", code]):
            with self.subTest(args=args):
                response = self.stream({"args": args}, conn)
                self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
                seen = self.read_until(response, "first\n")
                self.assertNotIn("second", seen)     # written a second later
                *_, last = response.read().splitlines()
                answer = json.loads(last)
                self.assertEqual((answer["stdout"], answer["status"]), ("first\nsecond\n", "ok"))
        # The connection is kept for the next request.
        self.assertEqual(self.lines({"input": "print(2)"}, conn=conn)[1]["stdout"], "2\n")

    def test_joined_lines_are_the_final_stdout(self):
        code = ("import sys, time\nout = sys.stdout.buffer\n"
                "data = 'é€😀\\0'.encode() * 40 + b'\\xff\\xfe \\xed\\xa0\\x80' + '😀'.encode()[:3]\n"
                "for i in range(0, len(data), 3):\n    out.write(data[i:i + 3])\n    out.flush()\n"
                "    time.sleep(0.001)")
        joined, answer = self.lines({"input": code, "files": [{"path": "f", "content": b64("x")}]})
        self.assertEqual(joined["stdout"], answer["stdout"])
        self.assertIn("\0", answer["stdout"])
        self.assertTrue(answer["stdout"].endswith("\ufffd"))
        self.assertEqual(answer["returncode"], 0)
        self.assertEqual(answer["warnings"] if "warnings" in answer else [], [])
        plain = self.run_code(code)
        self.assertEqual(plain["stdout"], answer["stdout"])

    def test_stderr_apart_streams_per_stream(self):
        code = ("import sys\nfor i in range(3):\n print('out', i, flush=True)\n"
                " print('err', i, file=sys.stderr, flush=True)")
        joined, answer = self.lines({"input": code, "stderr": True, "typo": 1})
        self.assertEqual(joined, {"stdout": "out 0\nout 1\nout 2\n", "stderr": "err 0\nerr 1\nerr 2\n"})
        self.assertEqual((answer["stdout"], answer["stderr"]), (joined["stdout"], joined["stderr"]))
        self.assertEqual(answer["warnings"], ["typo: no such field; it was ignored"])

    def test_nothing_past_the_output_limit_is_streamed(self):
        # One huge line, cut in the middle of a character.
        joined, answer = self.lines({"input": "print('é' * 500_000)", "limits": {"output": 200_001}})
        self.assertEqual(joined["stdout"], answer["stdout"])
        self.assertEqual(answer["stdout"], "é" * 100_000 + "\ufffd")
        self.assertEqual((answer["truncated"], answer["status"]), (True, "output"))

    def test_a_client_that_never_reads_holds_no_more_than_the_output(self):
        peak = PeakRss(lambda: self.server.proc.pid).start()
        s, rid = stream_never_read(self.server)
        with s:
            # The time limit ends the run, however stuck its stream is.
            wait_until(lambda: self.server.logged(f"id={rid} status=timeout"), 15,
                       "the run ended by its time limit")
            self.assertEqual(self.run_code("print('alive')")["stdout"], "alive\n")
        self.assertLess(peak.stop() - peak.samples[0], 30)     # MiB

    def test_a_client_hanging_up_cancels_the_run(self):
        root = self.server.memfs_root()
        logged = self.server.logged("client went away")
        conn = self.server.connection()
        response = self.stream({"input": "import time\nprint('started', flush=True)\ntime.sleep(30)"},
                               conn)
        self.read_until(response, "started\n")
        jails = set(nsjail_pids_using(root))     # the running one, and any warm ones
        conn.close()
        wait_until(lambda: jails - set(nsjail_pids_using(root)), 1.5, "the jail stopped")
        wait_until(lambda: self.server.logged("client went away") > logged, 5,
                   "'client went away' in the log")

    def test_http_1_0_ends_the_body_with_the_connection(self):
        body = json.dumps({"input": "print('old')"}).encode()
        answer = self.server.raw(b"POST /eval HTTP/1.0\r\nContent-Type: application/json\r\n"
                                 b"Accept: application/x-ndjson\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
        head, _, rest = answer.partition(b"\r\n\r\n")
        self.assertIn(b"Connection: close", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertNotIn(b"Content-Length", head)
        *chunks, answer = [json.loads(line) for line in rest.splitlines()]
        self.assertEqual("".join(chunk["stdout"] for chunk in chunks), "old\n")
        self.assertEqual((answer["stdout"], answer["status"]), ("old\n", "ok"))

    def test_errors_before_the_run_are_plain_json(self):
        for body in ({"input": 5}, {"input": "1", "executable_path": "/nonexistent"}):
            with self.subTest(body=body):
                status, headers, data = self.server.request(
                    "POST", "/eval", json.dumps(body).encode(), NDJSON)
                self.assertEqual(status, 400)
                self.assertEqual(headers["Content-Type"], "application/json")
                self.assertEqual(set(data), {"title", "description"})

    def test_other_accepts_get_the_plain_answer(self):
        for accept in (None, "*/*", "application/json", "application/x-ndjson;q=0",
                       "text/x-ndjson"):
            with self.subTest(accept=accept):
                headers = {"Content-Type": "application/json", **({"Accept": accept} if accept else {})}
                status, got, data = self.server.request(
                    "POST", "/eval", json.dumps({"input": "print(1)"}).encode(), headers)
                self.assertEqual((status, got["Content-Type"]), (200, "application/json"))
                self.assertIn("Content-Length", got)
                self.assertEqual(data["stdout"], "1\n")


class HTTPFramingTests(ServerTestCase):
    """Requests that a proxy in front could read differently must be refused."""

    def head(self, *headers: bytes) -> bytes:
        return (b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"".join(h + b"\r\n" for h in headers) + b"\r\n")

    def test_content_length_is_ascii_digits_only(self):
        for value in ("\u00b2".encode(), "\u00b9".encode(), "1\u00b2".encode(), b"9" * 5000,
                      b"+5", b"0x10", b"1_0", b"2\x0b", b"2\x85"):
            for expect in ((), (b"Expect: 100-continue",)):
                with self.subTest(value=value[:10], expect=expect):
                    answer = self.server.raw(self.head(b"Content-Length: " + value, *expect) + b"{}")
                    self.assertRegex(answer, rb"^HTTP/1\.1 (400|413) ")
                    self.assertIn(b'"description"', answer)

    def test_chunk_sizes_are_hex_digits_only(self):
        body = b'{"input": "print(1)"}'
        for size in (b"0x15", b"1_5", b"+15", b"-0"):
            with self.subTest(size=size):
                answer = self.server.raw(self.head(b"Transfer-Encoding: chunked")
                                         + size + b"\r\n" + body + b"\r\n0\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
        ok = self.server.raw(self.head(b"Transfer-Encoding: chunked", b"Connection: close")
                             + b"15;ext=1\r\n" + body + b"\r\n0\r\n\r\n")
        self.assertTrue(ok.startswith(b"HTTP/1.1 200 "), ok[:100])

    def test_only_chunked_transfer_coding(self):
        body = b'{"input": "print(1)"}'
        for coding in (b"xchunked", b"gzip", b"gzip, chunked", b"chunked, chunked", b"identity",
                       b"chunked\x85", b"\x0bchunked"):
            with self.subTest(coding=coding):
                answer = self.server.raw(self.head(b"Transfer-Encoding: " + coding,
                                                   b"Content-Length: %d" % len(body)) + body)
                self.assertRegex(answer, rb"^HTTP/1\.1 (400|501) ")
                answer = self.server.raw(self.head(b"Transfer-Encoding: " + coding)
                                         + b"15\r\n" + body + b"\r\n0\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 501 "), answer[:100])
        self.assertEqual(self.run_code("print('alive')")["stdout"], "alive\n")

    def test_a_body_left_unread_ends_the_connection(self):
        smuggled = eval_request("print('smuggled')")
        answer = self.server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(smuggled), smuggled))
        self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)
        self.assertNotIn(b"smuggled", answer)

    def test_chunk_lines_end_in_crlf(self):
        body = b'{"input": "print(1)"}'
        for chunks in (b"15;" + b"e" * 1100 + b"\r\n" + body + b"\r\n0\r\n\r\n",
                       b"15\n" + body + b"\r\n0\r\n\r\n",
                       b"15\r\n" + body + b"\r\n0\r\nX: y\n\r\n"):
            with self.subTest(chunks=chunks[:20]):
                answer = self.server.raw(self.head(b"Transfer-Encoding: chunked") + chunks)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)

    def test_browsers_cross_site_requests_are_refused(self):
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            with self.subTest(headers=headers):
                status, _, data = self.server.request("POST", "/eval", b'{"input": "print(1)"}',
                                                      headers)
                self.assertEqual(status, 403, data)

    def test_json_made_of_containers_is_refused_before_parsing(self):
        status, _, data = self.server.request("POST", "/eval", b'{"input": "", "x": [' +
                                              b"{}," * 100000 + b"{}]}")
        self.assertEqual(status, 400)
        self.assertIn("objects and arrays", data["description"])
        code = "print(" + "[{}]" * 3000 + ")"       # brackets in a string are fine
        status, _, data = self.server.post({"input": "x = '%s'" % code})
        self.assertEqual(status, 200, data)

    @local_only
    def test_no_control_characters_from_clients_in_the_log(self):
        self.server.raw(b"GET /log-probe\x1b[31mred\rfake HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wait_until(lambda: self.server.logged("/log-probe"), 5, "the log line of the request")
        line = next(line for line in list(self.server.log) if "/log-probe" in line)
        self.assertNotIn("\x1b", line)
        self.assertIn("\\x1b[31mred\\x0dfake", line)

    def test_headers_are_bounded_in_all(self):
        headers = [b"X-Filler-%d: %s" % (i, b"y" * 8000) for i in range(60)]
        answer = self.server.raw(self.head(*headers, b"Content-Length: 2") + b"{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:100])
        fits = [b"X-Filler-%d: %s" % (i, b"y" * 900) for i in range(60)]       # 55 KiB
        answer = self.server.raw(self.head(*fits, b"Content-Length: 2", b"Connection: close") + b"{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])     # {}: no input
        over = [b"X-Filler-%d: %s" % (i, b"y" * 900) for i in range(75)]       # 67 KiB
        answer = self.server.raw(self.head(*over, b"Content-Length: 2") + b"{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:100])


# --------------------------------------------------------------------------------------
# Integration: load, faults and hostile clients
# --------------------------------------------------------------------------------------

def nsjail_pids_using(folder: str) -> list[int]:
    """nsjail processes whose /home is a tmpfs under ``folder``."""
    return jail_pids_using((folder + "/",))


def cgroups_left() -> list[str]:
    """Jails' cgroups left behind, in the hierarchy this host has (v1 or v2): no process
    in them, and no live server of this pid namespace that may be about to start one
    there. (A pid in a name says nothing across pid namespaces: in a container, the
    live jails of the host's servers have processes, and so don't count.)"""
    return [path for path in jail_groups()
            if not _has_processes(path)
            and not os.path.exists(f"/proc/{os.path.basename(path).split('-')[2]}")]


def _has_processes(group: str) -> bool:
    try:
        with open(os.path.join(group, "cgroup.procs")) as f:
            return bool(f.read().strip())
    except OSError:
        return False    # removed meanwhile


def cmdline(pid: int) -> bytes:
    """The command line of process ``pid`` (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def jail_groups(top: str = snekbox.CGROUP_ROOT) -> list[str]:
    """The jails' cgroups (``snekbox-jail-...``) anywhere below ``top``."""
    found = []
    for folder, subfolders, _ in os.walk(top):
        found += [os.path.join(folder, d) for d in subfolders if d.startswith("snekbox-jail-")]
    return found


# --------------------------------------------------------------------------------------
# Operating it: discovery, tokens, metrics, logs and the API's description
# --------------------------------------------------------------------------------------

_PROM_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)'
                          r'(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})?'
                          r' (\S+)')
_PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_PROM_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """A Prometheus text exposition (format 0.0.4), checked by its rules: HELP and TYPE
    at most once a family and before its samples, a family's samples together, valid
    names, labels and values, no sample twice, histogram buckets cumulative up to
    +Inf = _count. Returns the families' types and the samples."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[tuple[str, frozenset], float] = {}
    finished: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# "):
            keyword, name, rest = (line[2:].split(" ", 2) + [""])[:3]
            assert keyword in ("HELP", "TYPE"), line
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), line
            assert name not in finished and not any(k[0] == name for k in samples), \
                f"{keyword} after samples of {name}"
            if keyword == "TYPE":
                assert name not in types and rest in _PROM_TYPES, line
                types[name] = rest
            else:
                assert name not in helped, line
                helped.add(name)
            continue
        match = _PROM_SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        family = name if name in types else re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in types, f"no TYPE before {name}"
        if family != current:
            assert family not in finished, f"the samples of {family} are not together"
            if current:
                finished.add(current)
            current = family
        key = (name, frozenset(_PROM_LABEL.findall(labels or "")))
        assert key not in samples, f"a sample twice: {line}"
        samples[key] = float(value)
    for family, kind in types.items():
        if kind == "histogram":
            buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
                             if n == family + "_bucket")
            counts = [v for _, v in buckets]
            assert buckets and buckets[-1][0] == float("inf"), f"{family}: no +Inf bucket"
            assert counts == sorted(counts), f"{family}: buckets not cumulative"
            assert counts[-1] == samples[(family + "_count", frozenset())], family
    return types, samples


def schema_errors(value, schema: dict, root: dict, where: str = "$") -> list[str]:
    """Where ``value`` breaks the JSON Schema ``schema`` (the keywords the OpenAPI
    document uses; $ref into ``root``)."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return schema_errors(value, node, root, where)
    kinds = {"string": str, "boolean": bool, "object": dict, "array": list,
             "null": type(None), "number": (int, float), "integer": int}
    errors = []
    if "type" in schema:
        wanted = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(isinstance(value, kinds[t]) and not (isinstance(value, bool) and t in ("number", "integer"))
                   for t in wanted):
            return [f"{where}: {value!r} is not {wanted}"]
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    for key, test in (("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b),
                      ("exclusiveMinimum", lambda v, b: v > b)):
        if key in schema and isinstance(value, (int, float)) and not test(value, schema[key]):
            errors.append(f"{where}: {value!r} breaks {key} {schema[key]}")
    if isinstance(value, dict):
        errors += [f"{where}: {name} is required" for name in schema.get("required", ())
                   if name not in value]
        for name, item in value.items():
            if name in schema.get("properties", {}):
                errors += schema_errors(item, schema["properties"][name], root, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: {name} is not allowed")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: over {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), root, f"{where}[{i}]")
    if "anyOf" in schema and all(schema_errors(value, s, root, where) for s in schema["anyOf"]):
        errors.append(f"{where}: matches none of anyOf")
    if "oneOf" in schema and sum(not schema_errors(value, s, root, where)
                                 for s in schema["oneOf"]) != 1:
        errors.append(f"{where}: does not match exactly one of oneOf")
    return errors


@local_only
class OperationsTests(ServerTestCase):
    """/info, /metrics, /openapi.json and the version, on the tests' usual server."""

    def get(self, path: str) -> tuple[int, dict, str]:
        conn = self.server.connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        status, headers, text = self.get("/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        return parse_exposition(text)[1]

    def test_version_is_the_same_everywhere(self):
        out = subprocess.run([sys.executable, SNEKBOX, "--version"], capture_output=True,
                             text=True, check=True).stdout
        self.assertEqual(out, f"snekbox {snekbox.__version__}\n")
        self.assertRegex(snekbox.__version__, r"^\d+\.\d+\.\d+$")
        self.assertEqual(self.server.health()["version"], snekbox.__version__)
        info = json.loads(self.get("/info")[2])
        self.assertEqual(info["version"], snekbox.__version__)
        self.assertEqual(self.metrics()[("snekbox_build_info",
                                         frozenset({("version", snekbox.__version__)}))], 1)

    def test_info_names_the_interpreters_and_limits(self):
        status, _, text = self.get("/info")
        self.assertEqual(status, 200)
        info = json.loads(text)
        default = info["interpreters"][0]
        self.assertEqual((default["path"], default["default"]), (JAIL_PYTHON, True))
        self.assertEqual(default["version"], self.run_code(
            "import platform; print(platform.python_version())")["stdout"].strip())
        for interpreter in info["interpreters"]:    # each one really runs
            with self.subTest(path=interpreter["path"]):
                result = self.server.eval(input="import platform; print(platform.python_version())",
                                          executable_path=interpreter["path"])
                self.assertEqual(result["stdout"].strip(), interpreter["version"])
        self.assertEqual(info["limits"]["time"], self.time_limit)
        self.assertEqual(info["limits"]["files"], snekbox.DEFAULT_FILES_LIMIT)
        self.assertEqual((info["workers"], info["warm_jails"]), (2, PREWARM))

    def test_metrics_count_requests_evaluations_and_waits(self):
        # A server of its own: a request is counted just after its answer has gone, so
        # the last requests of other tests could still land in the shared one's counts.
        self.server = Server(*default_flags())
        self.addCleanup(self.server.stop)
        before = self.metrics()
        self.run_code("print(1)")
        self.run_code("import time; time.sleep(60)")
        self.server.post({"input": 1})
        for i in range(20):     # unknown paths count as one, whatever they are
            self.get(f"/nothing-{i}")
        after = {}

        def grew(name, **labels):
            key = (name, frozenset((k, str(v)) for k, v in labels.items()))
            return after.get(key, 0) - before.get(key, 0)

        def counted() -> bool:
            after.update(self.metrics())
            return grew("snekbox_http_requests_total", path="other", status=404) >= 20 and \
                grew("snekbox_http_requests_total", path="/eval", status=400) >= 1
        wait_until(counted, 5, "the last requests counted")
        jail = "warm" if PREWARM else "cold"
        self.assertEqual(grew("snekbox_evaluations_total", status="ok", jail=jail), 1)
        self.assertEqual(grew("snekbox_evaluations_total", status="timeout", jail=jail), 1)
        self.assertEqual(grew("snekbox_http_requests_total", path="/eval", status=200), 2)
        self.assertEqual(grew("snekbox_http_requests_total", path="/eval", status=400), 1)
        self.assertEqual(grew("snekbox_http_requests_total", path="other", status=404), 20)
        self.assertFalse([k for k in after if "/nothing" in str(k)])
        self.assertEqual(grew("snekbox_evaluation_duration_seconds_count"), 2)
        self.assertGreaterEqual(grew("snekbox_evaluation_duration_seconds_sum"), self.time_limit)
        self.assertEqual(grew("snekbox_queue_wait_seconds_count"), 2)
        self.assertGreater(grew("snekbox_http_request_body_bytes_total"), 40)
        self.assertGreater(after[("process_resident_memory_bytes", frozenset())], 10 * snekbox.MiB)
        self.assertEqual(after[("snekbox_workers", frozenset())], 2)

    def test_health_and_metrics_are_not_logged_at_info(self):
        for _ in range(3):
            self.server.health()
            self.get("/metrics")
        self.get("/nothing")
        wait_until(lambda: self.server.logged('"GET /nothing" 404'), 5, "the 404's log line")
        self.assertFalse(self.server.logged('"GET /health"') or self.server.logged('"GET /metrics"'))
        self.assertTrue(self.server.logged('reason="no such endpoint: /nothing'))

    def test_client_text_cannot_forge_log_lines(self):
        """What a client sends reaches the log escaped: no line separator (U+2028 is
        one to splitlines), no quote that would end the request or reason field."""
        self.server.post({"input": "1", "limits": {"x\u2028forged 1": 1}})
        self.get('/forged"2')
        wait_until(lambda: self.server.logged("forged") >= 2, 5, "both requests' log lines")
        text = "".join(self.server.log)
        self.assertEqual(len(text.splitlines()), len(self.server.log))
        self.assertIn('"GET /forged\\x222" 404', text)

    def test_openapi_document_describes_what_the_server_answers(self):
        status, _, text = self.get("/openapi.json")
        self.assertEqual(status, 200)
        doc = json.loads(text)
        self.assertEqual((doc["openapi"], doc["info"]["version"]), ("3.1.0", snekbox.__version__))
        self.assertEqual(set(doc["paths"]), set(snekbox.SnekboxHandler.ROUTES))
        schemas = doc["components"]["schemas"]
        ref = {"$ref": "#/components/schemas/EvalResult"}
        for body in ({"input": "print(1)"}, {"input": "1/0", "stderr": True},
                     {"input": "open('x', 'w').write('y')"}, {"input": "print(1)", "nope": 1},
                     {"input": "import time; time.sleep(60)", "limits": {"time": 1}}):
            with self.subTest(body=body):
                _, _, data = self.server.post(body)
                self.assertEqual(schema_errors(data, ref, doc), [])
        self.assertEqual(schema_errors(self.server.health(), schemas["Health"], doc), [])
        self.assertEqual(schema_errors(json.loads(self.get("/info")[2]), schemas["Info"], doc), [])
        status, _, data = self.server.post({"args": "-c"})
        self.assertIn(str(status), doc["paths"]["/eval"]["post"]["responses"])
        self.assertEqual(schema_errors(data, schemas["Error"], doc), [])

    def test_request_schema_and_parser_agree(self):
        """The body schema is made from the table the parser checks with: a body
        passes the schema exactly when the parser takes it (for what a schema can say)."""
        doc = json.loads(self.get("/openapi.json")[2])
        schema = doc["components"]["schemas"]["EvalRequest"]
        caps = snekbox.Limits(self.time_limit, 0, 0, snekbox.DEFAULT_OUTPUT_SIZE)
        bodies = [{"input": "1"}, {"args": ["-c", "1"]}, {}, {"stdin": "x"}, {"input": 1},
                  {"args": "-c"}, {"args": [1]}, {"input": "", "stdin": 5},
                  {"input": "", "files": {}}, {"input": "", "files": [{"content": ""}]},
                  {"input": "", "files": [{"path": "a", "content": ""}]},
                  {"input": "", "files": [{"path": "a", "content": "YW\nJj ZA=\n="}]},
                  {"input": "", "files": [{"path": "a", "content": "YWJjZA="}]},
                  {"input": "", "files": [{"path": "a", "content": "!!!!"}]},
                  {"input": "", "files": [{"path": f"{i}"} for i in range(101)]},
                  {"input": "", "executable_path": None}, {"input": "", "executable_path": 3},
                  {"input": "", "limits": []}, {"input": "", "limits": {"time": 1}},
                  {"input": "", "limits": {"time": 0}}, {"input": "", "limits": {"time": 99}},
                  {"input": "", "limits": {"memory": 1.5}}, {"input": "", "limits": {"wall": 1}},
                  {"input": "", "limits": {"memory": 10 ** 400}},
                  {"input": "", "limits": {"processes": 2 ** 53 + 1}},
                  {"input": "", "stderr": True}, {"input": "", "stderr": "yes"},
                  {"input": "", "other": 1}]
        for body in bodies:
            with self.subTest(body=body):
                try:
                    snekbox.parse_eval_request(json.dumps(body).encode(), caps=caps)
                    parsed = True
                except snekbox.InvalidRequest:
                    parsed = False
                self.assertEqual(not schema_errors(body, schema, doc), parsed)

    def test_readme_examples_match_the_document(self):
        """Every JSON request body and answer the README shows fits the document."""
        doc = json.loads(self.get("/openapi.json")[2])
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'", readme)
                  if '"input"' in b or '"args"' in b]
        answers = []
        for block in re.findall(r"^# (\{\"stdout\".*?)\n(?!#  )", readme, re.M | re.S):
            if '"returncode"' in block:     # not a streamed line of output
                answers.append(json.loads(re.sub(r"\n#\s*", "", block)))
        self.assertGreaterEqual((len(bodies), len(answers)), (3, 2))
        schemas = doc["components"]["schemas"]
        info = re.search(r"^# (\{\"version\".*?)\n(?!#  )", readme, re.M | re.S)[1]
        self.assertEqual(schema_errors(json.loads(re.sub(r"\n#\s*", "", info)),
                                       schemas["Info"], doc), [])
        for body in bodies:
            with self.subTest(body=body):
                self.assertEqual(schema_errors(body, schemas["EvalRequest"], doc), [])
        for answer in answers:
            with self.subTest(answer=answer):
                self.assertEqual(schema_errors(answer, schemas["EvalResult"], doc), [])


class TokenTests(unittest.TestCase):
    """--token-file: /eval and /info need a token, probes don't; SIGHUP reads it again."""

    TOKEN = "first-token-" + "a" * 20

    @classmethod
    def setUpClass(cls) -> None:
        cls.folder = tempfile.mkdtemp(prefix="snekbox-tokens-")
        cls.token_file = os.path.join(cls.folder, "tokens")
        cls.write_tokens(f"# the bot\n{cls.TOKEN}\n\n")
        cls.server = Server(*default_flags(), "--token-file", cls.token_file)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        shutil.rmtree(cls.folder)

    @classmethod
    def write_tokens(cls, text: str) -> None:
        with open(cls.token_file, "w") as f:
            f.write(text)
        os.chmod(cls.token_file, 0o600)

    def call(self, method: str, path: str, token: str | None = None, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.server.request(method, path, json.dumps(body).encode() if body else None,
                                   headers)

    def test_eval_and_info_need_a_token(self):
        for method, path, body in (("POST", "/eval", {"input": "print(1)"}), ("GET", "/info", None)):
            with self.subTest(path=path):
                status, headers, data = self.call(method, path, body=body)
                self.assertEqual(status, 401)
                self.assertEqual(headers["WWW-Authenticate"], 'Bearer realm="snekbox"')
                self.assertIn("Authorization: Bearer", data["description"])
                status, headers, _ = self.call(method, path, "wrong-token-" + "b" * 20, body)
                self.assertEqual(status, 401)
                self.assertIn('error="invalid_token"', headers["WWW-Authenticate"])
                status, _, data = self.call(method, path, self.TOKEN, body)
                self.assertEqual(status, 200, data)
        status, _, data = self.server.request("POST", "/eval", b'{"input": "print(1)"}', {
            "Content-Type": "application/json", "Authorization": f"Basic {self.TOKEN}"})
        self.assertEqual(status, 401)
        answer = self.server.raw(b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Authorization: Bearer %s\r\nAuthorization: Bearer x\r\n\r\n"
                                 % self.TOKEN.encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])

    def test_probes_stay_open(self):
        for path in ("/health", "/metrics", "/openapi.json"):
            with self.subTest(path=path):
                conn = self.server.connection()
                conn.request("GET", path)
                self.assertEqual(conn.getresponse().status, 200)
                conn.close()

    def test_a_refused_body_is_never_read(self):
        """A stranger's body is refused before it is read: it holds no memory, and the
        connection is closed after the 401."""
        answer = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 10000000\r\n\r\n" + b"x" * 1000)
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:100])
        self.assertIn(b"Connection: close", answer)

    def test_a_stranger_is_not_invited_to_send_a_body(self):
        """Expect: 100-continue gets the 401 at once, not a 100 that asks for the body."""
        answer = self.server.raw(b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n", timeout=2)
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:100])
        self.assertIn(b"WWW-Authenticate: Bearer", answer)
        answer = self.server.raw(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                                 b"Expect: 100-continue\r\n\r\n", timeout=2)
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer[:100])

    def test_sighup_reads_the_file_again_and_a_bad_file_changes_nothing(self):
        new = "second-token-" + "c" * 20
        # Cleanups run last first: the old file back, then SIGHUP.
        self.addCleanup(lambda: (os.kill(self.server.proc.pid, signal.SIGHUP),
                                 wait_until(lambda: self.server.logged("read 1 token") >= 2, 5, "reload")))
        self.addCleanup(self.write_tokens, f"{self.TOKEN}\n")
        self.write_tokens(f"{new}\n")
        self.server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.call("GET", "/info", new)[0] == 200, 5, "the new token to work")
        self.assertEqual(self.call("GET", "/info", self.TOKEN)[0], 401)
        self.write_tokens("short\n")
        self.server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.server.logged("line 1: a token must be"), 5, "the bad file's error")
        self.assertEqual(self.call("GET", "/info", new)[0], 200)
        self.assertIsNone(self.server.proc.poll())

    def test_tokens_are_never_logged(self):
        self.call("GET", "/info", self.TOKEN)
        self.call("GET", "/info", "wrong-token-" + "d" * 20)
        wait_until(lambda: self.server.logged('"GET /info" 401'), 5, "the 401's log line")
        self.assertFalse(self.server.logged(self.TOKEN) or self.server.logged("wrong-token-"))

    def test_unusable_token_files_stop_the_start(self):
        empty = os.path.join(self.folder, "empty")
        with open(empty, "w") as f:
            f.write("# nothing yet\n")
        writable = os.path.join(self.folder, "writable")
        with open(writable, "w") as f:
            f.write(self.TOKEN + "\n")
        os.chmod(writable, 0o662)
        for flags, code, said in ((["--token-file", empty], 1, "holds no token"),
                                  (["--token-file", writable], 1, "others may write"),
                                  (["--token-file", "/nonexistent/tokens"], 1, "cannot read"),
                                  (["--protect-metrics"], 2, "needs --token-file")):
            with self.subTest(flags=flags):
                out = subprocess.run([sys.executable, SNEKBOX, "--port", "0", *flags],
                                     capture_output=True, text=True, timeout=60)
                self.assertEqual(out.returncode, code, out.stderr)
                self.assertIn(said, out.stderr)

    def test_protect_metrics(self):
        server = Server(*default_flags(prewarm=0), "--token-file", self.token_file,
                        "--protect-metrics")
        self.addCleanup(server.stop)
        self.assertEqual(server.request("GET", "/metrics")[0], 401)
        conn = server.connection()
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {self.TOKEN}"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        parse_exposition(response.read().decode())
        conn.close()
        self.assertEqual(server.request("GET", "/health")[0], 200)


class LogFormatTests(unittest.TestCase):
    def test_json_lines(self):
        server = Server(*default_flags(prewarm=0), "--log-format", "json")
        self.addCleanup(server.stop)
        server.eval(input="print(1)")
        # A request is logged once the jail is gone, after its answer: wait for it.
        wait_until(lambda: server.logged('"status": 200'), 5, "the 200's log line")
        server.post({"input": 1})
        wait_until(lambda: server.logged('"status": 400'), 5, "the 400's log line")
        entries = [json.loads(line) for line in list(server.log)]    # each line is JSON
        access = [e for e in entries if e.get("request") == "POST /eval"]
        self.assertEqual([e["status"] for e in access], [200, 400])
        self.assertIn("input must be a string", access[1]["reason"])
        evaluation = next(e for e in entries if e["message"].startswith("evaluation "))
        self.assertEqual((evaluation["status"], evaluation["id"]), ("ok", access[0]["id"]))
        self.assertTrue(all({"time", "level", "logger", "message"} <= set(e) for e in entries))


class InterpreterDiscoveryTests(unittest.TestCase):
    def test_interpreters_in_mounted_bin_folders(self):
        folder = tempfile.mkdtemp(prefix="snekbox-pythons-")
        self.addCleanup(shutil.rmtree, folder)
        for version in ("3.98", "3.99"):
            os.makedirs(os.path.join(folder, version, "bin"))
            os.symlink(HOST_PYTHON, os.path.join(folder, version, "bin", "python3"))
        os.makedirs(os.path.join(folder, "3.99", "lib"))
        os.symlink(HOST_PYTHON, os.path.join(folder, "3.99", "lib", "python3"))   # not in a bin
        with open(os.path.join(folder, "3.99", "bin", "python3-config"), "w") as f:
            f.write("")
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write(f'mount {{ src: "{folder}" dst: "/opt/py" is_bind: true }}\n'
                    f'mount {{ src: "{HOST_PYTHON}" dst: "/usr/bin/python3" is_bind: true }}\n'
                    'exec_bin { path: "/usr/bin/python3" }')
        self.addCleanup(os.unlink, f.name)
        found = snekbox.find_interpreters(snekbox.JailConfig.from_file(f.name))
        self.assertEqual(found, [("/usr/bin/python3", HOST_PYTHON), ("/opt/py/3.98/bin/python3", HOST_PYTHON),
                                 ("/opt/py/3.99/bin/python3", HOST_PYTHON)])

    def test_versions_are_asked_in_the_jail(self):
        """/info asks each interpreter its version in a jail: one that only works
        outside (a shell script; the jail has no shell) is not listed."""
        folder = tempfile.mkdtemp(prefix="snekbox-pythons-")
        self.addCleanup(shutil.rmtree, folder)
        os.chmod(folder, 0o755)
        for name in ("3.98", "3.99"):
            os.makedirs(os.path.join(folder, name, "bin"))
            os.chmod(os.path.join(folder, name), 0o755)
            os.chmod(os.path.join(folder, name, "bin"), 0o755)
        os.symlink(os.path.realpath(JAIL_PYTHON_HOST), os.path.join(folder, "3.98", "bin", "python3"))
        fake = os.path.join(folder, "3.99", "bin", "python3")
        with open(fake, "w") as f:
            f.write('#!/bin/sh\necho 3 99 0\n')
        os.chmod(fake, 0o755)
        self.assertEqual(snekbox.python_version(fake), (3, 99, 0))     # it runs outside
        config = os.path.join(folder, "snekbox.cfg")
        with open(SHORT_CONFIG) as f, open(config, "w") as out:
            out.write(f.read() + f'mount {{ src: "{folder}" dst: "/opt/py" is_bind: true }}\n')
        with snekbox.Sandbox(config) as sandbox:
            found = {i["path"]: i["version"] for i in snekbox.jailed_interpreters(sandbox)}
        self.assertEqual(found["/opt/py/3.98/bin/python3"], found[JAIL_PYTHON])
        self.assertNotIn("/opt/py/3.99/bin/python3", found)

    def test_interpreters_are_asked_as_the_jails_user_not_root(self):
        folder = tempfile.mkdtemp(prefix="snekbox-pythons-")
        self.addCleanup(shutil.rmtree, folder)
        os.chmod(folder, 0o755)
        fake = os.path.join(folder, "python3")
        with open(fake, "w") as f:
            f.write('#!/bin/sh\necho 3 "$(id -u)" "$(id -G | wc -w)"\n')
        os.chmod(fake, 0o755)
        self.assertEqual(snekbox.python_version(fake), (3, snekbox.JAIL_UID, 1))

    def test_packages_from_their_metadata(self):
        base = tempfile.mkdtemp(prefix="snekbox-userbase-")
        self.addCleanup(shutil.rmtree, base)
        site = os.path.join(base, "lib", "python3.99", "site-packages")
        for name, metadata in (("numpy-2.1.0", "Metadata-Version: 2.1\nName: numpy\nVersion: 2.1.0\n\nbody: x\n"),
                               ("broken-1", "Version: 1\n"), ("other", "Name: nope\n")):
            os.makedirs(os.path.join(site, name + (".dist-info" if name != "other" else "")))
            with open(os.path.join(site, name + (".dist-info" if name != "other" else ""), "METADATA"), "w") as f:
                f.write(metadata)
        self.assertEqual(snekbox.installed_packages(base),
                         [{"name": "numpy", "version": "2.1.0", "python": "3.99"}])
        self.assertEqual(snekbox.installed_packages(None), [])


class OwnCgroup:
    """On cgroup v2, a group of its own below this process's, for one server to run in:
    its jails' groups go below it, and nowhere else."""

    def __init__(self):
        cfg = snekbox.JailConfig.from_file(CONFIG)
        snekbox.prepare_cgroups(cfg)     # this process's group hands the controllers down
        self.path = tempfile.mkdtemp(prefix="test-", dir=snekbox.snekbox_cgroup())
        self.jails = os.path.join(self.path, snekbox.JAILS_CGROUP)

    def wrap(self) -> list[str]:
        """The command prefix that starts a program in this group."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path]

    def remove(self) -> None:
        """Remove the group and those below it, once their processes are gone."""
        for folder, _, _ in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            os.rmdir(folder)


def bytes_read(server) -> int | None:
    """What a server started by the tests has read so far (from files, pipes and
    sockets); None for one elsewhere."""
    proc = getattr(server, "proc", None)
    if proc is None:
        return None
    with open(f"/proc/{proc.pid}/io") as f:
        return int(re.search(r"^rchar: (\d+)", f.read(), re.M)[1])


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_response(sock: socket.socket) -> tuple[int, dict] | None:
    """One HTTP response from ``sock``: (status, JSON body), or None on a clean close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                raise AssertionError(f"connection closed mid-response: {data!r}")
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100 "):       # interim answer to Expect: 100-continue
        while b"\r\n\r\n" not in body:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            body += chunk
        head, _, body = body.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n", head)
    assert match, head
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(match[1]), json.loads(body[:length])


class RobustnessTests(ServerTestCase):
    flags = ("--workers", "1", "--max-queue", "2", "--client-timeout", "0.3",
             "--keepalive-timeout", "1", "--max-connections", "8", "--max-wait", "10")

    def health(self) -> dict:
        return self.server.health()

    def test_slow_client_is_dropped_at_the_deadline(self):
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as s:
            started = time.monotonic()
            closed = None
            for byte in b"POST /eval HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n":
                try:
                    s.send(bytes([byte]))
                except OSError:
                    closed = time.monotonic()
                    break
                if select_readable(s) and s.recv(1) == b"":
                    closed = time.monotonic()
                    break
                time.sleep(0.1)
        self.assertIsNotNone(closed, "the trickling client was never dropped")
        self.assertLess(closed - started, 2.0)

    def test_idle_keep_alive_connection_is_kept_longer_than_a_request_may_take(self):
        deadline = time.monotonic() + 10
        while True:     # earlier tests' idle connections may still fill --max-connections
            conn = self.server.connection()
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status == 200 and not response.will_close:
                break
            conn.close()
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.2)
        sock = conn.sock
        time.sleep(0.6)     # the point: idle past --client-timeout (0.3 s), still open
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        self.assertIs(conn.sock, sock)
        started = time.monotonic()
        sock.settimeout(10)
        self.assertEqual(sock.recv(1), b"")     # closed after --keepalive-timeout (1 s)
        self.assertGreater(time.monotonic() - started, 0.6)
        conn.close()

    def test_connection_cap(self):
        idle = [socket.create_connection(("127.0.0.1", self.server.port)) for _ in range(8)]
        try:
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\n\r\n")
                status, body = read_response(extra)
            self.assertEqual(status, 503)
            self.assertIn("too many open connections", body["description"])
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: self.server.request("GET", "/health")[0] == 200, 5,
                   "the server answering again")

    def test_client_gone_while_running_kills_the_jail(self):
        root = self.server.memfs_root()
        logged = self.server.logged("client went away")
        with socket.create_connection(("127.0.0.1", self.server.port)) as s:
            s.sendall(eval_request("import time; time.sleep(5)"))
            wait_until(lambda: self.health()["running"] == 1, 5, "the evaluation running")
            time.sleep(0.2)
            jails = set(nsjail_pids_using(root))      # the running one, and any warm ones
        # Well within the jail's time limit (2 s), which would stop it anyway.
        wait_until(lambda: jails - set(nsjail_pids_using(root)), 1, "the jail stopped")
        wait_until(lambda: self.health()["running"] == 0, 0.5, "no evaluation running")
        wait_until(lambda: self.server.logged("client went away") > logged, 5,
                   "'client went away' in the log")

    def test_client_gone_while_waiting_frees_its_place(self):
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(self.server.eval, input="import time; time.sleep(1.5); print(1)")
            wait_until(lambda: self.health()["running"] == 1, 5, "the evaluation running")
            with socket.create_connection(("127.0.0.1", self.server.port)) as s:
                s.sendall(eval_request("print('never')"))
                wait_until(lambda: self.health()["waiting"] == 1, 5, "one request waiting")
            # The place is freed while the evaluation before it still runs.
            wait_until(lambda: (self.health()["running"], self.health()["waiting"]) == (1, 0), 1.2,
                       "the waiting request gone while the first still runs")
            self.assertEqual(busy.result()["stdout"], "1\n")

    def test_tmpfs_failure_is_a_json_503_and_passes(self):
        root = self.server.memfs_root()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", root], check=True)
        try:
            status, headers, data = self.server.post({"args": [*COLD, "-c", "print(1)"]})
        finally:
            subprocess.run(["umount", root], check=True)
        self.assertEqual(status, 503)
        self.assertIn("tmpfs", data["description"])
        self.assertEqual(self.run_code("print(2)")["stdout"], "2\n")

    def test_zz_after_all_the_faults_nothing_is_refused_or_left(self):
        # unittest runs a class's tests in the order of their names: this one is last.
        self.assertEqual(unittest.defaultTestLoader.getTestCaseNames(type(self))[-1],
                         self._testMethodName)
        self.assertEqual(self.run_code("print('ok')")["stdout"], "ok\n")
        wait_until(lambda: len(nsjail_pids_using(self.server.memfs_root())) <= PREWARM, 5,
                   "only the warm jails left")

    def test_fuzzed_requests_get_an_answer_or_a_clean_close(self):
        rng = random.Random(20261126)
        valid = [eval_request("print(1)"), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"POST /eval HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: "
                 b"application/json\r\n\r\n10\r\n" + b'{"input": "1"}  ' + b"\r\n0\r\n\r\n"]

        def mutate(data: bytes) -> bytes:
            data = bytearray(data)
            kind = rng.randrange(5)
            if kind == 0:
                for _ in range(rng.randint(1, 5)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 1:
                del data[rng.randrange(len(data)):]
            elif kind == 2:
                at = rng.randrange(len(data))
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 50)))
            elif kind == 3:
                at = data.find(b"\r\n") + 2
                data[at:at] = rng.choice([b"Content-Length: 5\r\n", b"X: " + b"y" * 70000 + b"\r\n",
                                          b"Transfer-Encoding: chunked\r\n", b"\r\n\r\n",
                                          b"Expect: 100-continue\r\n"])
            else:
                data = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            return bytes(data)

        def probe(data: bytes) -> int | None:
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as s:
                try:
                    s.sendall(data)
                    # Nothing more comes: the server sees the end at once, instead of
                    # waiting --client-timeout for a cut request's rest.
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    return None
                try:
                    answer = read_response(s)
                except ConnectionResetError:
                    return None     # the server closed with unread bytes: a clean close
                return answer and answer[0]

        cases = [mutate(rng.choice(valid)) for _ in range(150)]
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(probe, cases))
        self.assertTrue(all(s is None or 200 <= s < 600 for s in statuses), statuses)
        self.assertNotIn(500, statuses)
        self.assertGreater(statuses.count(400), 20)
        self.assertEqual(self.run_code("print('after fuzz')")["stdout"], "after fuzz\n")


def select_readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# --------------------------------------------------------------------------------------
# Integration: the process
# --------------------------------------------------------------------------------------

class ProcessTests(unittest.TestCase):
    def test_sigterm_finishes_running_evaluations_and_exits_0(self):
        server = Server("--workers", "1")
        self.addCleanup(server.stop, 9)     # if the test fails half-way
        root = server.memfs_root()
        self.assertTrue(os.path.isdir(root))
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(server.eval, input="import time; time.sleep(0.5); print('done')")
            wait_until(lambda: server.health()["running"] == 1, 5, "the evaluation running")
            server.proc.send_signal(15)
            self.assertEqual(running.result()["stdout"], "done\n")
        self.assertEqual(server.stop(), 0)
        self.assertFalse(mounts_below(root))
        self.assertFalse(os.path.exists(root))
        self.assertEqual(cgroups_left(), [])

    def test_kill_9_and_restart_leaves_nothing_behind(self):
        # A time limit long enough that the orphans still run at the restart, however
        # slow the machine (an emulated CPU takes seconds to start a server).
        with open(CONFIG) as f:
            text = re.sub(r"(?m)^time_limit: \d+$", "time_limit: 120", f.read())
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        config = os.path.join(folder, "snekbox.cfg")
        write_file(config, text)
        server = Server("--workers", "2", "--config", config)
        self.addCleanup(server.stop, 9)     # if the test fails half-way
        root = server.memfs_root()
        sleeper = "import time; time.sleep(100)"
        with ThreadPoolExecutor(2) as pool:
            for _ in range(2):      # cold: warm jails end with the server by themselves
                pool.submit(server.post, {"args": [*COLD, "-c", sleeper]})
            # Both cold jails started (the warm ones alone may be all there is at first).
            wait_until(lambda: len([p for p in nsjail_pids_using(root)
                                    if sleeper.encode() in cmdline(p)]) == 2, 30,
                       "both cold jails running")
            # One tmpfs a jail, once any that is starting or ending has settled.
            wait_until(lambda: len(mounts_below(root)) == len(nsjail_pids_using(root)), 5,
                       "one tmpfs a jail")
            self.assertGreaterEqual(len(nsjail_pids_using(root)), 2)
            server.stop(9)
        self.assertTrue(nsjail_pids_using(root))        # orphans still running
        restarted = Server("--workers", "1")
        self.addCleanup(restarted.stop, 9)     # if the test fails half-way
        try:
            self.assertEqual(nsjail_pids_using(root), [])
            self.assertEqual(mounts_below(root), [])
            self.assertFalse(os.path.exists(root))
            self.assertEqual(cgroups_left(), [])
            # The cold jails still running are stopped (one may have ended with the
            # server already); warm ones end with the server (see
            # test_a_warm_jail_ends_with_the_server_that_started_it), or are stopped if
            # the restart comes first.
            stopped = [int(m[1]) for line in restarted.log
                       for m in [re.search(r"cleaned up after an earlier crash: stopped (\d+) jails", line)] if m]
            self.assertTrue(stopped and stopped[0] <= 2 + PREWARM, restarted.log)
            self.assertEqual(restarted.eval(input="print(1)")["stdout"], "1\n")
        finally:
            self.assertEqual(restarted.stop(), 0)

    def test_sigterm_under_load(self):
        server = Server("--workers", "1", "--max-queue", "4")
        self.addCleanup(server.stop, 9)     # if the test fails half-way
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(server.eval, input="import time; time.sleep(0.5); print('ran')")
            wait_until(lambda: server.health()["running"] == 1, 5, "the evaluation running")
            queued = [pool.submit(server.post, {"input": "print('queued')"}) for _ in range(3)]
            wait_until(lambda: server.health()["waiting"] == 3, 5, "three requests waiting")
            server.proc.send_signal(15)
            self.assertEqual(first.result()["stdout"], "ran\n")
            self.assertEqual([q.result()[0] for q in queued], [503, 503, 503])
        self.assertEqual(server.stop(), 0)

    def test_nsjail_gone_mid_flight(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        link = os.path.join(folder, "nsjail")
        os.symlink(os.path.realpath(snekbox.find_nsjail()), link)
        server = Server("--nsjail", link)
        self.addCleanup(server.stop, 9)     # if the test fails half-way
        try:
            os.rename(link, link + ".away")
            status, _, data = server.post({"args": [*COLD, "-c", "print(1)"]})
            self.assertEqual(status, 503)
            self.assertIn("cannot start nsjail", data["description"])
            os.rename(link + ".away", link)
            self.assertEqual(server.eval(input="print(1)")["stdout"], "1\n")
        finally:
            self.assertEqual(server.stop(), 0)

    def test_a_server_in_a_folder_that_is_gone_still_answers_cleanly(self):
        # Jails are started from /, whatever the server's working folder has become.
        folder = tempfile.mkdtemp()
        code = ("import os, sys; sys.path.insert(0, %r); import snekbox\n"
                "os.rmdir(%r)\n"
                "with snekbox.Sandbox(%r) as sandbox:\n"
                "    print(repr(sandbox.run(['-c', 'print(1)']).stdout))" % (HERE, folder, CONFIG))
        run = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                             text=True, timeout=60)
        self.assertEqual(run.stdout, "'1\\n'\n", run.stderr)

    def test_jail_that_cannot_start_is_a_clear_error(self):
        # A config of its own with a mandatory mount whose source is taken away after
        # start-up: nsjail then fails to build the jail, on any cgroup hierarchy.
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        os.chmod(folder, 0o755)     # the jail's user must reach the mount's source
        source = os.path.join(folder, "mounted")
        os.mkdir(source, 0o755)
        with open(CONFIG) as f:
            text = f.read() + ('\nmount {\n  src: "%s"\n  dst: "/snekbox-test"\n'
                               '  is_bind: true\n  rw: false\n}\n' % source)
        config = os.path.join(folder, "snekbox.cfg")
        with open(config, "w") as f:
            f.write(text)
        server = Server("--config", config, "--prewarm", "0")
        self.addCleanup(server.stop, 9)     # if the test fails half-way
        try:
            os.rmdir(source)
            try:
                result = server.eval(input="print(1)")
            finally:
                os.mkdir(source, 0o755)
            self.assertIsNone(result["returncode"])
            self.assertEqual(result["status"], "failed")
            self.assertIsNone(result["usage"])
            self.assertIn("the jail could not start the process", result["error"])
            self.assertIn("/snekbox-test", result["error"])
            self.assertEqual(server.eval(input="print(2)")["stdout"], "2\n")
        finally:
            self.assertEqual(server.stop(), 0)

    @unittest.skipUnless(snekbox.cgroup_version() == 2, "cgroup v2: jails below the server's group")
    def test_jails_live_below_the_group_the_server_runs_in(self):
        own = OwnCgroup()
        self.addCleanup(own.remove)
        server = Server("--workers", "1", "--prewarm", "0", prefix=own.wrap())
        self.addCleanup(server.stop, 9)     # if the test fails half-way
        try:
            before = set(jail_groups())
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(server.eval, input="import time; time.sleep(1.5); print('ok')")
                wait_until(lambda: jail_groups(own.jails), 30, "the jail's group")
                self.assertEqual(set(jail_groups()) - before, set(jail_groups(own.jails)))
                self.assertEqual(running.result()["stdout"], "ok\n")
            self.assertEqual(jail_groups(own.jails), [])
        finally:
            self.assertEqual(server.stop(), 0)
        self.assertEqual(cgroups_left(), [])

    def test_read_only_cgroups_at_start_say_what_to_add(self):
        # As in a container without --privileged: the cgroup mounts are read-only (in a
        # mount namespace of the server's own).
        remount = ("for m in $(awk '$5 ~ \"^/sys/fs/cgroup\" {print $5}' /proc/self/mountinfo); "
                   'do mount -o remount,bind,ro "$m" || exit 99; done; exec "$@"')
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               remount, "sh", sys.executable, SNEKBOX, "--host", "127.0.0.1",
                               "--port", "0"], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("--privileged", proc.stderr)
        self.assertIn("/sys/fs/cgroup", proc.stderr)

    def test_startup_checks_fail_with_one_line(self):
        cases = ((["--nsjail", "/nonexistent/nsjail"], "not an executable file"),
                 (["--config", "/nonexistent.cfg"], "cannot use the jail config"))
        for flags, text in cases:
            with self.subTest(flags=flags):
                proc = subprocess.run([sys.executable, SNEKBOX, "--port", "0", *flags],
                                      capture_output=True, text=True, timeout=30)
                self.assertEqual(proc.returncode, 1)
                self.assertIn(text, proc.stderr)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)

    def test_a_warm_jail_ends_with_the_server_that_started_it(self):
        server = Server("--workers", "1", "--prewarm", "1")
        self.addCleanup(server.stop, 9)
        root = server.memfs_root()
        wait_until(lambda: server.health()["warm"] == 1, 5, "the warm jail")
        with ThreadPoolExecutor(1) as pool:
            pool.submit(server.post, {"input": "import time; time.sleep(60)"})
            wait_until(lambda: server.health()["running"] == 1, 5, "the evaluation running")
            time.sleep(0.3)
            server.stop(9)
        # Well within the jails' time limit (6 s), which would end them anyway.
        wait_until(lambda: not nsjail_pids_using(root), CONFIG_TIME_LIMIT / 2,
                   "the jails ended with their server")
        restarted = Server("--workers", "1", "--prewarm", "0")     # removes the tmpfs left
        self.assertEqual(restarted.stop(), 0)
        self.assertEqual(mounts_below(root), [])

    def test_library_use(self):
        sandbox = snekbox.Sandbox(CONFIG)
        self.addCleanup(sandbox.close)
        result = sandbox.run(["-c", "import sys; print(sys.stdin.read().upper())"],
                             stdin=b"lib", files=[snekbox.File("in.txt", b"x")])
        self.assertEqual((result.stdout, result.returncode), ("LIB\n", 0))


if __name__ == "__main__":
    unittest.main()
