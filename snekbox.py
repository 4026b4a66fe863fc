#!/usr/bin/env python3
"""snekbox: run untrusted Python code in an nsjail sandbox, over HTTP.

A client POSTs code; snekbox runs it with the system's Python inside an nsjail jail
(no network, read-only system files, a small private writable /home, limits on time,
memory and processes) and answers with the output and the return code. One module,
standard library only; the jail policy is the nsjail config ``snekbox.cfg``.

Run the server (as root, with nsjail installed; see README.md)::

    python3 snekbox.py [--host 127.0.0.1] [--port 8060] [--workers N] ...
    python3 snekbox.py --help

The HTTP API, compatible with python-discord/snekbox:

``POST /eval`` with a JSON object:

    input            code; runs as ``python3 -c <input>`` (appended to ``args``)
    args             interpreter arguments, e.g. ["-m", "timeit", "1+1"] (default ["-c"]
                     when ``input`` is given); at least one of input and args is required
    stdin            text fed to the process's standard input (default: empty)
    files            [{"path": "relative/path", "content": "<base64>"}] written to /home
    executable_path  another interpreter inside the jail instead of the config's

and answers 200 with::

    {"stdout": "<stdout and stderr>", "returncode": 0, "files": [{"path", "size",
     "content"}], "timed_out": false, "truncated": false, "duration": 0.02,
     "error": null}

``returncode`` is the exit status, 128+N after signal N (137: time or memory limit,
139: segfault), or null when the jail could not start the process (``error`` says
why). ``files`` holds the files the code created or changed in /home. Errors are
``{"title": ..., "description": ...}`` with 400, 404, 405, 408, 411, 413, 415 or 503.

``GET /health`` answers 200 with the service's state while it takes requests.

Each evaluation gets a fresh jail. ``--prewarm N`` keeps N of them started ahead of time,
their interpreter waiting, so that a request starts in milliseconds; it runs exactly as
in a jail started for it.

As a library, without a server::

    from snekbox import Sandbox
    result = Sandbox().run(["-c", "print(1 + 1)"])
    print(result.returncode, result.stdout)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import collections
import ctypes
import errno
import gc
import io
import itertools
import marshal
import json
import logging
import os
import posixpath
import re
import resource
import select
import selectors
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys

if __name__ == "__main__":
    # The server speaks plain HTTP, but http.client (which http.server imports) would
    # load ssl: libssl and libcrypto, some 4 MiB of resident memory for nothing.
    sys.modules.setdefault("ssl", None)

import threading
import time
import weakref
import http.client
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "Sandbox", "EvalResult", "File", "JailConfig", "InvalidRequest", "SandboxUnavailable",
    "parse_eval_request", "EvalRequest", "main",
]

log = logging.getLogger("snekbox")
nsjail_log = logging.getLogger("snekbox.nsjail")

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

MiB = 1024 * 1024
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snekbox.cfg")
DEFAULT_MEMFS_ROOT = "/run/snekbox"
NSJAIL_PLACES = ("/usr/sbin/nsjail", "/usr/local/sbin/nsjail", "/usr/bin/nsjail",
                 "/usr/local/bin/nsjail", "/sbin/nsjail", "/bin/nsjail")

JAIL_UID = 65534             # the jailed process's user and group inside its namespace
# Outside, each live jail is a host user of its own (see JailUsers), taken from a block of
# JAIL_UID_BLOCK uids: a random one in this range unless --jail-uid-base names one. The
# range lies above sssd's default ids and systemd's container ranges, below 2**31.
JAIL_UIDS_FROM, JAIL_UIDS_TO = 2_001_000_000, 2_147_000_000
JAIL_UID_BLOCK = 1024
JAIL_HOME = "/home"          # where each evaluation's tmpfs appears in the jail
JAIL_USER_BASE = "/snekbox/user_base"   # where --user-base appears (PYTHONUSERBASE)
MAX_ARG_BYTES = 128 * 1024 - 1          # Linux's limit on one argument (MAX_ARG_STRLEN)
MAX_ARGS_TOTAL = 1 * MiB                # what snekbox accepts for all arguments together
MAX_ARGS_COUNT = 10_000
MAX_FILE_DEPTH = 32                     # folders below /home that are looked into
MAX_NAME_BYTES = 255                    # one part of a path (Linux's NAME_MAX)
MAX_PATH_BYTES = 4095                   # a whole path (PATH_MAX less the NUL)
MAX_OUTPUT_FOLDERS = 1000               # folders looked into for output files
MAX_HEAD_BYTES = 64 * 1024              # a request line and its headers together
MAX_JSON_CONTAINERS = 1000              # objects and arrays in a request body
MAX_NSJAIL_LOG = 1 * MiB                # nsjail log kept per evaluation
SIGPENDING_LIMIT = 64                   # real-time signals a jail may have queued
MIN_UPLOAD_RATE = 64 * 1024   # bytes/s a body may take beyond --client-timeout
KILL_GRACE = 3.0             # seconds past the jail's time limit before nsjail is killed
CGROUP_ROOT = "/sys/fs/cgroup"


# The records below are named tuples and small classes rather than dataclasses: the
# dataclasses module imports inspect and typing, which cost the server 2 MiB and 6 ms.

class Settings:
    """Everything the server is started with; see ``build_arg_parser`` for each.

    The class attributes are the defaults; ``Settings(workers=4)`` overrides one.
    """

    host: str = "127.0.0.1"
    port: int = 8060
    workers: int = len(os.sched_getaffinity(0))
    max_queue: int = 0            # 0: 8 per worker
    max_wait: float = 0.0         # 0: as long as the client stays
    config: str = DEFAULT_CONFIG
    nsjail: str | None = None
    max_output_size: int = 1_000_000
    max_request_size: int = 16 * MiB
    memfs_size: int = 48 * MiB
    files_limit: int = 100
    files_timeout: float = 5.0
    user_base: str | None = None
    client_timeout: float = 10.0
    keepalive_timeout: float = 75.0     # longer than common clients' pools keep them
    max_connections: int = 256
    prewarm: int = 2
    max_body_memory: int = 0      # 0: 4 times max_request_size
    jail_uid_base: int = 0        # 0: a random block
    log_level: str = "INFO"

    def __init__(self, **values):
        for name, value in values.items():
            if name not in Settings.__annotations__:
                raise TypeError(f"no setting named {name!r}")
            setattr(self, name, value)

    @property
    def queue_limit(self) -> int:
        return self.max_queue or 8 * self.workers

    @property
    def body_budget(self) -> int:
        return self.max_body_memory or 4 * self.max_request_size


# The titles python-discord/snekbox gives these errors; its clients may show them.
DATA_INVALID = "Request data failed validation"
FILE_INVALID = "Request file is invalid"


class InvalidRequest(ValueError):
    """The evaluation can't run as asked (the client's fault); ``status`` is 400 or 413,
    ``title`` a short name of the problem (the message says it in full)."""

    def __init__(self, status: int, message: str, title: str = DATA_INVALID):
        super().__init__(message)
        self.status = status
        self.title = title


class SandboxUnavailable(RuntimeError):
    """The jail can't be started right now (the host's fault, not the request's)."""


# --------------------------------------------------------------------------------------
# Reading snekbox.cfg
# --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<word>[\w.+-]+)
  | (?P<symbol>[{}<>\[\]:;,])
""", re.VERBOSE)
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unescape(literal: str) -> str:
    def replace(match: re.Match) -> str:
        code = match[1]
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code[0].isdigit():
            return chr(int(code, 8))
        return _ESCAPES.get(code, code)
    return _ESCAPE.sub(replace, literal[1:-1])


def parse_textproto(text: str) -> dict[str, list]:
    """Parse protobuf text format into ``{field: [values]}``, nested messages as dicts.

    Scalars stay strings (quoted strings unescaped, other words as written); the caller
    knows each field's type. Enough for nsjail configs; raises ValueError on bad syntax.
    """
    tokens: list[tuple[str, str, int]] = []
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"line {line}: unexpected {text[pos]!r}")
        kind = match.lastgroup
        if kind != "space":
            tokens.append((kind, match[0], line))
        line += match[0].count("\n")
        pos = match.end()
    tokens.append(("end", "", line))

    def message(i: int, closing: str) -> tuple[dict[str, list], int]:
        fields: dict[str, list] = {}
        while True:
            kind, value, where = tokens[i]
            if (kind == "symbol" and value == closing) or (kind == "end" and not closing):
                return fields, i + 1
            if kind != "word":
                raise ValueError(f"line {where}: expected a field name, found {value!r}")
            name, i = value, i + 1
            if tokens[i][1] == ":":
                i += 1
            kind, value, where = tokens[i]
            if value in ("{", "<"):
                item, i = message(i + 1, "}" if value == "{" else ">")
            elif kind == "string":
                item = ""
                while tokens[i][0] == "string":      # adjacent literals concatenate
                    item += _unescape(tokens[i][1])
                    i += 1
            elif kind == "word":
                item, i = value, i + 1
            else:
                raise ValueError(f"line {where}: expected a value for {name!r}")
            fields.setdefault(name, []).append(item)
            if tokens[i][1] in (";", ","):
                i += 1

    fields, _ = message(0, "")
    return fields


class Mount(collections.namedtuple("Mount", "src dst is_bind mandatory")):
    """One ``mount`` entry of the config (only what snekbox needs to know)."""

    __slots__ = ()


class JailConfig(collections.namedtuple("JailConfig", [
        "path", "time_limit", "exec_path", "exec_args", "mounts",
        "mem_max", "mem_swap_max", "mem_memsw_max", "mem_mount", "mem_parent",
        "pids_max", "pids_mount", "pids_parent", "cpu_ms_per_sec", "cpu_mount",
        "cpu_parent", "cgroupv2_mount"])):
    """The values of an nsjail config that snekbox itself uses (cgroup limits in bytes
    and counts, as nsjail takes them; ``mounts`` a tuple of Mount)."""

    __slots__ = ()

    @classmethod
    def from_file(cls, path: str) -> JailConfig:
        """Read the config at ``path``; OSError if unreadable, ValueError if invalid."""
        with open(path, encoding="utf-8") as f:
            fields = parse_textproto(f.read())

        def scalar(name: str, default: str) -> str:
            values = fields.get(name, [default])
            if isinstance(values[-1], dict):
                raise ValueError(f"{name} must be a value, not a message")
            return values[-1]

        def number(name: str, default: int) -> int:
            try:
                return int(scalar(name, str(default)), 0)
            except ValueError:
                raise ValueError(f"{name} must be a number") from None

        def flag(entry: dict, name: str, default: bool) -> bool:
            return entry.get(name, ["true" if default else "false"])[-1] == "true"

        if "uidmap" in fields or "gidmap" in fields:
            raise ValueError("remove uidmap and gidmap: snekbox maps the jail's user "
                             f"({JAIL_UID} inside) to a host user of its own for each jail")
        exec_bin = fields.get("exec_bin", [{}])[-1]
        if not isinstance(exec_bin, dict) or not exec_bin.get("path"):
            raise ValueError("exec_bin { path: ... } is required: the interpreter to run")
        mounts = tuple(
            Mount(src=m.get("src", [""])[-1], dst=m.get("dst", [""])[-1],
                  is_bind=flag(m, "is_bind", False), mandatory=flag(m, "mandatory", True))
            for m in fields.get("mount", []) if isinstance(m, dict)
        )
        return cls(
            path=os.path.abspath(path),
            time_limit=number("time_limit", 600),
            exec_path=exec_bin["path"][-1],
            exec_args=tuple(exec_bin.get("arg", [])),
            mounts=mounts,
            mem_max=number("cgroup_mem_max", 0),
            mem_swap_max=number("cgroup_mem_swap_max", -1),
            mem_memsw_max=number("cgroup_mem_memsw_max", 0),
            mem_mount=scalar("cgroup_mem_mount", "/sys/fs/cgroup/memory"),
            mem_parent=scalar("cgroup_mem_parent", "NSJAIL"),
            pids_max=number("cgroup_pids_max", 0),
            pids_mount=scalar("cgroup_pids_mount", "/sys/fs/cgroup/pids"),
            pids_parent=scalar("cgroup_pids_parent", "NSJAIL"),
            cpu_ms_per_sec=number("cgroup_cpu_ms_per_sec", 0),
            cpu_mount=scalar("cgroup_cpu_mount", "/sys/fs/cgroup/cpu"),
            cpu_parent=scalar("cgroup_cpu_parent", "NSJAIL"),
            cgroupv2_mount=scalar("cgroupv2_mount", CGROUP_ROOT),
        )

    def host_path(self, jail_path: str) -> str | None:
        """The host path behind ``jail_path`` through the config's bind mounts, if any."""
        jail_path = posixpath.normpath(jail_path)
        for mount in reversed(self.mounts):      # a later mount hides an earlier one
            if not mount.is_bind:
                continue
            dst = posixpath.normpath(mount.dst)
            if jail_path == dst or jail_path.startswith(dst.rstrip("/") + "/"):
                return mount.src + jail_path[len(dst):]
        return None

    def missing_optional_mounts(self) -> list[str]:
        """Sources of optional bind mounts that this host doesn't have."""
        return [m.src for m in self.mounts
                if m.is_bind and not m.mandatory and not os.path.exists(m.src)]

    def check_mandatory_mounts(self) -> None:
        """ValueError naming the first mandatory bind mount whose source is missing."""
        for m in self.mounts:
            if m.is_bind and m.mandatory and not os.path.exists(m.src):
                raise ValueError(f"the mount of {m.src} on {m.dst} is mandatory, and this host "
                                 "has no such path: install it, or add `mandatory: false`")


# --------------------------------------------------------------------------------------
# Cgroups
# --------------------------------------------------------------------------------------

class SetupError(Exception):
    """The host can't run jails as configured; the message says what to do."""


class CgroupSetup(collections.namedtuple("CgroupSetup",
                                          "version swap_limited nsjail_args parents")):
    """What ``prepare_cgroups`` found: the cgroup version, whether the jail's swap is
    limited, the nsjail flags that follow, and the groups nsjail creates its own in."""

    __slots__ = ()


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    """2 when ``root`` is a unified (v2) hierarchy, else 1."""
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1


def swap_enabled(swaps: str = "/proc/swaps") -> bool:
    """Whether the host has any swap space on."""
    try:
        with open(swaps) as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return False


def _read_words(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def prepare_cgroups(cfg: JailConfig, root: str = CGROUP_ROOT, swaps: str = "/proc/swaps",
                    self_cgroup: str = "/proc/self/cgroup") -> CgroupSetup:
    """Make the cgroups that nsjail needs for ``cfg`` and say how to call nsjail.

    cgroup v1: create the parent groups of the controllers the config uses.
    cgroup v2: the jails' groups go into a ``jails`` group below the one snekbox runs
    in (``self_cgroup`` says which), so that limits on snekbox's group (a systemd
    service's ``MemoryMax=``, a container's) bound its jails too; snekbox moves the
    processes of its group into a ``snekbox-init`` child first (a group with
    processes can't hand controllers down) and enables the controllers in both.
    Without a swap controller, nsjail must not be asked for a swap limit, or every run
    would fail; without a cpu controller (some containers don't delegate it), the CPU
    limit is dropped with a warning, likewise.
    """
    wants_swap_limit = cfg.mem_max > 0 and (cfg.mem_swap_max >= 0 or cfg.mem_memsw_max > 0)
    group = snekbox_cgroup(cfg.cgroupv2_mount, self_cgroup) if cgroup_version(root) == 2 else ""
    cfg, args = _without_missing_cpu_controller(cfg, root, group)
    if cgroup_version(root) == 1:
        version = 1
        used = [(cfg.mem_max, cfg.mem_mount, cfg.mem_parent, "memory"),
                (cfg.pids_max, cfg.pids_mount, cfg.pids_parent, "pids"),
                (cfg.cpu_ms_per_sec, cfg.cpu_mount, cfg.cpu_parent, "cpu")]
        parents = []
        for limit, mount, parent, name in used:
            if not limit:
                continue
            if not os.path.isdir(mount):
                raise SetupError(f"the cgroup v1 {name} controller is not mounted at {mount}")
            parents.append(os.path.join(mount, parent))
            _make_cgroup(parents[-1])
        has_swap = os.path.exists(os.path.join(cfg.mem_mount, "memory.memsw.limit_in_bytes"))
    else:
        jails = v2_jail_parent(group)
        version, args = 2, args + ["--use_cgroupv2", "--cgroupv2_mount", jails]
        parents = [jails]
        needed = [name for limit, name in ((cfg.mem_max, "memory"), (cfg.pids_max, "pids"),
                                           (cfg.cpu_ms_per_sec, "cpu")) if limit]
        missing = [c for c in needed if c not in _read_words(os.path.join(group, "cgroup.controllers"))]
        if missing:
            raise SetupError(f"cgroup v2 controllers not available in {group}: {' '.join(missing)} "
                             "(under systemd, give the service Delegate=yes: see README)")
        _warn_if_not_delegated(group)
        _enable_v2_controllers(group, needed)
        _make_cgroup(jails)
        _enable_v2_controllers(jails, needed)
        has_swap = _v2_has_swap_files(jails)

    if wants_swap_limit and not has_swap:
        # Override the config's swap limit: memsw 0 and swap -1 both mean "none".
        args += ["--cgroup_mem_memsw_max", "0", "--cgroup_mem_swap_max", "-1"]
        log.warning("this kernel has no swap controller for cgroups: the jail's memory "
                    "limit cannot cover swap")
    swap_limited = wants_swap_limit and has_swap
    if not swap_limited and swap_enabled(swaps):
        log.warning("swap is on and the jail's memory limit does not cover it: jailed code "
                    "may use swap beyond the limit (turn swap off, or enable swap accounting)")
    return CgroupSetup(version, swap_limited, tuple(args), tuple(parents))


def _without_missing_cpu_controller(cfg: JailConfig, root: str,
                                    group: str) -> tuple[JailConfig, list[str]]:
    """``cfg`` and no nsjail flags, or, where the host has no cpu controller for the
    jails (in v2 ``group``), ``cfg`` without its CPU limit and the flag that drops it."""
    if not cfg.cpu_ms_per_sec:
        return cfg, []
    if cgroup_version(root) == 1:
        present = os.path.isdir(cfg.cpu_mount)
    else:
        present = "cpu" in _read_words(os.path.join(group, "cgroup.controllers"))
    if present:
        return cfg, []
    where = f" in {group} (under systemd: Delegate=yes, see README)" if group else ""
    log.warning("this host has no cpu cgroup controller for the jails%s: their CPU use is "
                "not limited (cgroup_cpu_ms_per_sec)", where)
    return cfg._replace(cpu_ms_per_sec=0), ["--cgroup_cpu_ms_per_sec", "0"]


INIT_CGROUP = "snekbox-init"
JAILS_CGROUP = "jails"


def own_cgroup(mount: str = CGROUP_ROOT, self_cgroup: str = "/proc/self/cgroup") -> str:
    """The folder below the v2 hierarchy at ``mount`` of the group this process is in."""
    with open(self_cgroup) as f:
        paths = [line.rstrip("\n")[3:] for line in f if line.startswith("0::")]
    if not paths:
        raise SetupError(f"{self_cgroup} names no cgroup v2 group for this process")
    folder = os.path.normpath(os.path.join(mount, paths[0].lstrip("/")))
    if not os.path.isdir(folder):
        raise SetupError(f"this process's cgroup {paths[0]} is not below {mount}: mount the "
                         "cgroup v2 hierarchy of this cgroup namespace there")
    return folder


def snekbox_cgroup(mount: str = CGROUP_ROOT, self_cgroup: str = "/proc/self/cgroup") -> str:
    """The v2 group snekbox manages: the one it runs in, or that group's parent once
    snekbox (or the process that started it) moved into its ``snekbox-init`` child."""
    group = own_cgroup(mount, self_cgroup)
    if os.path.basename(group) == INIT_CGROUP:
        return os.path.dirname(group)
    return group


def v2_jail_parent(group: str) -> str:
    """The v2 group in which nsjail makes the jails' groups, below snekbox's ``group``."""
    return os.path.join(group, JAILS_CGROUP)


def _warn_if_not_delegated(group: str) -> None:
    """Warn when ``group`` is a systemd unit's that systemd didn't delegate (it marks
    those it did with the trusted.delegate attribute)."""
    if not group.endswith((".service", ".scope")):
        return
    try:
        delegated = os.getxattr(group, "trusted.delegate") == b"1"
    except OSError:
        delegated = False
    if not delegated:
        log.warning("snekbox runs in %s, a systemd unit without Delegate=yes: systemd may stop "
                    "the unit when a jail is killed at its memory limit (see README, As a "
                    "systemd service)", group)


def _no_cgroup_rights(path: str, e: OSError) -> SetupError:
    """The SetupError for a cgroup file or folder that snekbox may not write."""
    if e.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
        return SetupError(f"snekbox may not write the cgroup {path} ({e.strerror}): it makes a "
                          "cgroup for every jail; in a container, run it with --privileged (or "
                          "the capabilities and the writable /sys/fs/cgroup that the README "
                          "lists under Docker)")
    return SetupError(f"cannot write the cgroup {path}: {e}")


def _make_cgroup(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):    # one made earlier, now on a read-only mount
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    except OSError as e:
        raise _no_cgroup_rights(path, e) from e


def _enable_v2_controllers(group: str, needed: list[str]) -> None:
    control = os.path.join(group, "cgroup.subtree_control")
    if all(c in _read_words(control) for c in needed):
        return
    request = " ".join("+" + c for c in needed)
    try:
        with open(control, "w") as f:
            f.write(request)
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise _no_cgroup_rights(control, e) from e
    # Processes in this group: move them into a child, then try again.
    init = os.path.join(group, INIT_CGROUP)
    _make_cgroup(init)
    for pid in _read_words(os.path.join(group, "cgroup.procs")):
        try:
            with open(os.path.join(init, "cgroup.procs"), "w") as f:
                f.write(pid)
        except OSError:
            pass    # kernel threads and exited processes can't move; that's fine
    try:
        with open(control, "w") as f:
            f.write(request)
    except OSError as e:
        raise _no_cgroup_rights(control, e) from e


def _v2_has_swap_files(mount: str) -> bool:
    children = [e.path for e in os.scandir(mount) if e.is_dir(follow_symlinks=False)]
    probe = None
    if not children:
        probe = os.path.join(mount, f"snekbox-probe-{os.getpid()}")
        os.mkdir(probe)
        children = [probe]
    try:
        return any(os.path.exists(os.path.join(c, "memory.swap.max")) for c in children)
    finally:
        if probe:
            os.rmdir(probe)


def remove_stale_cgroups(parents: Iterable[str]) -> int:
    """Remove empty NSJAIL.<pid> groups whose nsjail is gone; return how many."""
    removed = 0
    for parent in parents:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            pid = entry.name.rpartition(".")[2]
            if entry.name.startswith("NSJAIL.") and pid.isdigit() and not _pid_alive(int(pid)):
                try:
                    os.rmdir(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


# --------------------------------------------------------------------------------------
# Per-evaluation tmpfs ("memfs") and the files in it
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


def mount_tmpfs(target: str, size: int, uid: int) -> None:
    """Mount a tmpfs of ``size`` bytes at ``target``, owned by host user (and group) ``uid``."""
    options = f"size={size},mode=0700,uid={uid},gid={uid}".encode()
    if _libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount tmpfs at {target}: {os.strerror(code)}")


def unmount(target: str) -> None:
    """Detach the mount at ``target`` (lazily, so a busy one can't fail)."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unmount {target}: {os.strerror(code)}")


def mounts_under(folder: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``folder``, deepest first."""
    folder = folder.rstrip("/")
    found = []
    with open(mountinfo) as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")   # \040 etc.
            if point == folder or point.startswith(folder + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


class File(collections.namedtuple("File", "path content", defaults=(b"",))):
    """A file going into the jail's /home or coming out of it: a path relative to /home
    and the content."""

    __slots__ = ()

    def to_json(self) -> dict:
        return {"path": self.path, "size": len(self.content),
                "content": base64.b64encode(self.content).decode("ascii")}


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _keep_first(kept: list, item: tuple, limit: int) -> None:
    """Add ``item`` to the sorted list ``kept`` if it is among the first ``limit``."""
    if len(kept) < limit or item[0] < kept[-1][0]:
        bisect.insort(kept, item, key=lambda kept_item: kept_item[0])
        del kept[limit:]


def upload_path(path: str, name: str) -> str:
    """``path`` made normal, if it names a file that may be written under /home; else
    InvalidRequest(400) saying why, the field called ``name``."""
    if not path:
        raise InvalidRequest(400, f"{name} must not be empty", FILE_INVALID)
    if "\0" in path:
        raise InvalidRequest(400, f"{name} must not contain a NUL character", FILE_INVALID)
    if not _is_utf8(path):
        raise InvalidRequest(400, f"{name} contains a lone surrogate (invalid Unicode)",
                             FILE_INVALID)
    if path.startswith("/"):
        raise InvalidRequest(400, f"{name} {path[:100]!r} must be relative to /home", FILE_INVALID)
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise InvalidRequest(400, f"{name} {path[:100]!r} leads outside /home", FILE_INVALID)
    if normal == "." or path.endswith("/"):
        raise InvalidRequest(400, f"{name} {path[:100]!r} must name a file", FILE_INVALID)
    parts = normal.split("/")
    if len(parts) > MAX_FILE_DEPTH:
        raise InvalidRequest(400, f"{name} {path[:100]!r} is over {MAX_FILE_DEPTH} "
                                  "folders deep", FILE_INVALID)
    if len(path.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise InvalidRequest(400, f"{name} {path[:100]!r} is too long: at most "
                                  f"{MAX_NAME_BYTES} bytes a name, {MAX_PATH_BYTES} in all",
                             FILE_INVALID)
    return normal


def check_files(files: Iterable[File], limit: int) -> list[File]:
    """The uploads with their paths made normal; InvalidRequest naming the first one
    that can't be written under /home, TypeError for what isn't a File of bytes."""
    if isinstance(files, (str, bytes)):
        raise TypeError(f"files must be a list of File, not {type(files).__name__}")
    checked: list[File] = []
    seen = set()
    for i, upload in enumerate(files):
        if not isinstance(upload, File):
            raise TypeError(f"files[{i}] must be a File, not {type(upload).__name__}")
        if not isinstance(upload.path, str):
            raise TypeError(f"files[{i}].path must be a str, not {type(upload.path).__name__}")
        if not isinstance(upload.content, (bytes, bytearray, memoryview)):
            raise TypeError(f"files[{i}].content must be bytes, not "
                            f"{type(upload.content).__name__}")
        if i >= limit:
            raise InvalidRequest(400, f"files: at most {limit} files", FILE_INVALID)
        path = upload_path(upload.path, f"files[{i}].path")
        if path in seen:
            raise InvalidRequest(400, f"files[{i}].path {path[:100]!r} is given twice",
                                 FILE_INVALID)
        seen.add(path)
        checked.append(File(path, upload.content))
    return checked


class MemFS:
    """A tmpfs of its own for one evaluation, owned by the jail's host user ``uid``:
    ``mount`` it, ``write_files`` into it, ``collect_files`` after the run, ``remove`` it."""

    def __init__(self, root: str, name: str, size: int, uid: int = JAIL_UID):
        self.path = os.path.join(root, name)
        self.size = size
        self.uid = uid

    def mount(self) -> None:
        os.mkdir(self.path, 0o700)
        try:
            mount_tmpfs(self.path, self.size, self.uid)
        except OSError:
            os.rmdir(self.path)
            raise

    def remove(self) -> None:
        try:
            unmount(self.path)
            os.rmdir(self.path)
        except OSError:
            log.exception("could not remove the evaluation's tmpfs at %s", self.path)

    def write_files(self, files: Sequence[File], limit: int = 100,
                    timeout: float = 5.0) -> dict[str, tuple[int, int]]:
        """Write the uploads (checked with ``check_files`` first) for the jail's user;
        return ``{path: (inode, ctime)}``.

        Raises InvalidRequest naming the file when one can't be written, or when writing
        takes over ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        written = {}
        for i, upload in enumerate(check_files(files, limit)):
            if time.monotonic() > deadline:
                raise InvalidRequest(413, f"files: writing the uploads took over {timeout:g} s",
                                     FILE_INVALID)
            try:
                st = self._write(upload)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise InvalidRequest(
                        413, f"files[{i}]: {upload.path[:100]!r} does not fit: the files may take "
                             f"{self.size // MiB} MiB in all", FILE_INVALID) from None
                if e.errno in (errno.EEXIST, errno.ENOTDIR):
                    reason = "is a folder of another file, or a file in one's place"
                else:
                    reason = f"cannot be written: {e.strerror}"
                raise InvalidRequest(400, f"files[{i}].path {upload.path[:100]!r} {reason}",
                                     FILE_INVALID) from None
            written[upload.path] = (st.st_ino, st.st_ctime_ns)
        return written

    def _write(self, upload: File) -> os.stat_result:
        # Folder by folder through descriptors that never follow a symlink.
        *folders, name = upload.path.split("/")
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        dir_fd = os.open(self.path, flags)
        try:
            for part in folders:
                try:
                    os.mkdir(part, 0o755, dir_fd=dir_fd)
                    os.chown(part, self.uid, self.uid, dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                parent, dir_fd = dir_fd, os.open(part, flags, dir_fd=dir_fd)
                os.close(parent)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                         dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            os.fchown(fd, self.uid, self.uid)
            view = memoryview(upload.content)
            while view:
                view = view[os.write(fd, view):]
            return os.fstat(fd)
        finally:
            os.close(fd)

    def collect_files(self, unchanged: dict[str, tuple[int, int]], limit: int,
                      timeout: float) -> tuple[list[File], str | None]:
        """The regular files that the run created or changed, sorted by path.

        Hidden and private paths (a part starting with "." or "_") and anything but
        regular files are skipped; symlinks are never followed. Bounded: ``limit``
        files, the tmpfs size in bytes (sparse files and hard links count their full
        size), ``timeout`` seconds, MAX_FILE_DEPTH folders deep and MAX_OUTPUT_FOLDERS
        folders. The walk holds no more than that, whatever the jail made. Returns the
        files and, when something could not be returned, why.
        """
        problems: list[str] = []
        written = self._first_written(unchanged, limit, time.monotonic() + timeout, problems)
        if written is None:
            return [], f"listing the output files took over {timeout:g} s"
        return self._read_files(written, problems), "; ".join(dict.fromkeys(problems)) or None

    def _first_written(self, unchanged: dict[str, tuple[int, int]], limit: int,
                       deadline: float,
                       problems: list[str]) -> list[tuple[str, os.stat_result]] | None:
        """The first ``limit`` paths, sorted, of the regular files the run wrote, with
        their stat; None past ``deadline``. What is skipped goes to ``problems``."""
        kept: list[tuple[str, os.stat_result]] = []
        written = looked_into = 0
        folders = [("", self.path, 0)]
        while folders:
            relative, folder, depth = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if time.monotonic() > deadline:
                            return None
                        path = f"{relative}/{entry.name}" if relative else entry.name
                        if entry.name.startswith((".", "_")):
                            continue    # hidden, or private as in python-discord/snekbox
                        if not _is_utf8(path):
                            problems.append("a file name is not valid UTF-8 and was skipped")
                        elif entry.is_dir(follow_symlinks=False):
                            if depth + 1 >= MAX_FILE_DEPTH:
                                problems.append(f"folders deeper than {MAX_FILE_DEPTH} "
                                                "were skipped")
                            elif looked_into >= MAX_OUTPUT_FOLDERS:
                                problems.append(f"only {MAX_OUTPUT_FOLDERS} folders "
                                                "were looked into")
                            else:
                                looked_into += 1
                                folders.append((path, entry.path, depth + 1))
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            if unchanged.get(path) != (st.st_ino, st.st_ctime_ns):
                                written += 1
                                _keep_first(kept, (path, st), limit)
            except OSError as e:
                problems.append(f"cannot list {relative or '.'}: {e.strerror}")
        if written > limit:
            problems.append(f"{written} files were written; only the first {limit} "
                            "are returned")
        return kept

    def _read_files(self, written: list[tuple[str, os.stat_result]],
                    problems: list[str]) -> list[File]:
        """The contents of ``written``, up to the tmpfs size in all."""
        files, budget = [], self.size
        for path, st in written:
            if st.st_size > budget:
                problems.append(f"the files exceed {self.size // MiB} MiB in all; "
                                f"{path[:100]!r} and the files after it were skipped")
                break
            content = self._read_regular(path, st, budget)
            if content is not None:
                files.append(File(path, content))
                budget -= len(content)
        return files

    def _read_regular(self, path: str, st: os.stat_result, budget: int) -> bytes | None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(os.path.join(self.path, path), flags)
        except OSError:
            return None
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or now.st_ino != st.st_ino:
                return None
            size = min(now.st_size, budget)
            content = os.read(fd, size)     # one piece of memory: no copy to join them
            while len(content) < size:
                more = os.read(fd, size - len(content))
                if not more:
                    break
                content += more
            return content
        finally:
            os.close(fd)


_live_memfs_folders: set[str] = set()     # this process's, in use


def stale_memfs_folders(root: str) -> list[str]:
    """The folders under ``root`` that dead snekbox processes left behind.

    Each Sandbox keeps its tmpfs instances in ``root/<pid>-<n>``; a folder whose process
    is gone (or whose pid is now ours, after a restart) is left over from a crash.
    """
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    stale = []
    for entry in entries:
        pid = entry.name.partition("-")[0]
        if not pid.isdigit() or entry.path in _live_memfs_folders:
            continue
        if int(pid) == os.getpid() or not _pid_alive(int(pid)):
            stale.append(entry.path)
    return stale


def kill_jails_using(folders: Sequence[str], wait: float = 2.0) -> int:
    """Stop the nsjail processes whose /home lies in ``folders``; return how many.

    A server killed with SIGKILL leaves its running jails behind: they would go on until
    their time limit. SIGTERM lets nsjail remove its cgroups; SIGKILL follows if needed.
    """
    prefixes = tuple(folder.rstrip("/") + "/" for folder in folders)
    pids = []
    for name in os.listdir("/proc") if prefixes else ():
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if "--bindmount" in args and any(a.startswith(prefixes) for a in args):
            pids.append(int(name))
    found = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.01)
        pids = [p for p in pids if _pid_alive(p)]
    return found


def remove_memfs_folders(folders: Sequence[str]) -> int:
    """Unmount every tmpfs in ``folders`` and remove them; return how many were mounted."""
    unmounted = 0
    for folder in folders:
        for point in mounts_under(folder):
            try:
                unmount(point)
                unmounted += 1
            except OSError as e:
                log.warning("could not unmount a tmpfs: %s", e)
        # Only empty mount points are left; rmdir (unlike rmtree) never reaches into a
        # tmpfs that failed to unmount.
        for path in [entry.path for entry in os.scandir(folder)] + [folder]:
            try:
                os.rmdir(path)
            except OSError as e:
                log.warning("could not remove %s: %s", path, e.strerror)
    return unmounted


class JailUsers:
    """The host uids of jails: each live jail holds one of its own, so that the kernel's
    per-user budgets (pipe buffers, descriptors in flight, epoll watches, ...) are never
    shared by two evaluations. A uid comes back after its jail has ended, to the end of
    the line: the longest unused goes out next."""

    def __init__(self, first: int, count: int = JAIL_UID_BLOCK):
        self.first, self.count = first, count
        self._free = collections.deque(range(first, first + count))
        self._lock = threading.Lock()

    @classmethod
    def random_block(cls) -> JailUsers:
        """A block of JAIL_UID_BLOCK uids somewhere in JAIL_UIDS_FROM..JAIL_UIDS_TO, so
        that servers started without --jail-uid-base are unlikely to share one."""
        blocks = (JAIL_UIDS_TO - JAIL_UIDS_FROM) // JAIL_UID_BLOCK
        return cls(JAIL_UIDS_FROM + int.from_bytes(os.urandom(4), "big") % blocks * JAIL_UID_BLOCK)

    def take(self) -> int:
        with self._lock:
            if not self._free:
                raise SandboxUnavailable(f"all {self.count} host users for jails are in use")
            return self._free.popleft()

    def give_back(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


def limit_pending_signals(limit: int = SIGPENDING_LIMIT) -> None:
    """Lower this process's RLIMIT_SIGPENDING, which nsjail and its jails inherit.

    Signals queued in a jail count against root's budget on the host too (root made the
    jail's user namespace), and nsjail sets no limit on them: without this one jail
    could queue enough real-time signals that every root process's sigqueue fails.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_SIGPENDING)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_SIGPENDING, (min(soft, limit), limit))


PR_SET_PDEATHSIG = 1


def _end_with_parent_thread(parent: int) -> None:
    # Runs in the child between fork and exec: SIGTERM when the thread that started it
    # ends, the server's death included. A parent gone already: stop here.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


# --------------------------------------------------------------------------------------
# The jail runner
# --------------------------------------------------------------------------------------

class EvalResult:
    """The outcome of one evaluation; ``to_json`` gives the HTTP answer's fields."""

    def __init__(self, stdout: str, returncode: int | None, files: list[File] | None = None,
                 timed_out: bool = False, truncated: bool = False, duration: float = 0.0,
                 error: str | None = None):
        self.stdout = stdout
        self.returncode = returncode
        self.files = files or []
        self.timed_out = timed_out
        self.truncated = truncated
        self.duration = duration
        self.error = error

    def __repr__(self) -> str:
        return (f"EvalResult(returncode={self.returncode!r}, stdout={self.stdout[:80]!r}, "
                f"files={[f.path for f in self.files]!r}, timed_out={self.timed_out}, "
                f"truncated={self.truncated}, error={self.error!r})")

    def to_json(self, files: bool = True) -> dict:
        """The HTTP answer's fields (without ``files``: the others only)."""
        data = {"stdout": self.stdout, "returncode": self.returncode}
        if files:
            data["files"] = [f.to_json() for f in self.files]
        data.update(timed_out=self.timed_out, truncated=self.truncated,
                    duration=round(self.duration, 4), error=self.error)
        return data


# Runs `-c` code too large for one argument: the code comes on an inherited descriptor
# and runs in __main__ as `-c` would: the same sys.argv and globals, no frame of its own
# in tracebacks, and (where Python shows -c source in tracebacks) the same source lines.
_LARGE_CODE_BOOTSTRAP = """\
try:
    _snekbox_source = open({fd}, encoding="utf-8").read()
    _snekbox_code = compile(_snekbox_source, "<string>", "exec")
    if hasattr(__import__("linecache"), "_register_code"):
        __import__("linecache")._register_code(_snekbox_code, _snekbox_source, "<string>")
    del _snekbox_source
    exec(_snekbox_code, globals().__delitem__("_snekbox_code") or globals())
except BaseException as e:
    if isinstance(e, SystemExit):
        raise
    e.with_traceback(e.__traceback__.tb_next)
    __import__("sys").excepthook(type(e), e, e.__traceback__)
    raise SystemExit(1)
"""

_NSJAIL_LINE = re.compile(rb"^\[([DIWEF])\]\[[^\]]*\](?:\[\d+\] \S+ )?\s*(.*)$")
_EXITED = re.compile(rb"pid=\d+ \(.*\) exited with status: (\d+)")
_SIGNALED = re.compile(rb"pid=\d+ \(.*\) terminated with signal: \S+ \((\d+)\)")
_TIME_LIMIT = re.compile(rb"pid=\d+ run time >= time limit")
_LEVELS = {b"D": logging.DEBUG, b"I": logging.INFO, b"W": logging.WARNING,
           b"E": logging.ERROR, b"F": logging.ERROR}


def find_nsjail(explicit: str | None = None) -> str | None:
    """``explicit`` if given, else nsjail on PATH or in the usual sbin/bin places."""
    if explicit:
        return explicit
    on_path = tuple(os.path.join(folder, "nsjail") for folder in os.get_exec_path())
    return next((p for p in on_path + NSJAIL_PLACES
                 if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def code_argument_index(args: Sequence[str]) -> int | None:
    """Index of the code after the interpreter's own ``-c``, if the args have one."""
    i = 0
    while i < len(args) - 1:
        arg = args[i]
        if arg == "-c":
            return i + 1
        if not arg.startswith("-") or arg in ("-", "--") or arg.startswith("-m"):
            return None
        i += 2 if arg in ("-W", "-X") else 1
    return None


_sandbox_numbers = itertools.count(1)
_sandbox_lock = threading.Lock()


class Sandbox:
    """Runs code in nsjail with the policy of a config file; thread-safe.

    Creating one prepares the host (cgroups, the folder for per-evaluation tmpfs
    mounts, leftovers of a crashed server); ``run`` does one evaluation. With
    ``prewarm`` > 0 it keeps that many warm jails (see WarmPool); ``close`` ends them.
    """

    def __init__(self, config: str = DEFAULT_CONFIG, nsjail: str | None = None, *,
                 max_output_size: int = 1_000_000, memfs_size: int = 48 * MiB,
                 files_limit: int = 100, files_timeout: float = 5.0,
                 user_base: str | None = None, memfs_root: str = DEFAULT_MEMFS_ROOT,
                 prewarm: int = 0, jail_uid_base: int = 0):
        if os.geteuid() != 0:
            raise SetupError("snekbox must run as root: nsjail needs it for namespaces, "
                             "cgroups and mounts")
        nsjail_path = find_nsjail(nsjail)
        if not nsjail_path:
            raise SetupError("nsjail not found on PATH or in /usr/sbin, /usr/local/sbin, "
                             "/usr/bin, /usr/local/bin: install it (see README) or pass --nsjail")
        if not os.path.isfile(nsjail_path) or not os.access(nsjail_path, os.X_OK):
            raise SetupError(f"nsjail at {nsjail_path} is not an executable file")
        try:
            self.config = JailConfig.from_file(config)
            self.config.check_mandatory_mounts()
        except (OSError, ValueError) as e:
            raise SetupError(f"cannot use the jail config {config}: {e}") from e
        if user_base and (":" in user_base or not os.path.isdir(user_base)):
            raise SetupError(f"--user-base {user_base} is not a folder (or has a ':')")
        self.nsjail = os.path.abspath(nsjail_path)
        self.max_output_size = max_output_size
        self.memfs_size = memfs_size
        self.files_limit = files_limit
        self.files_timeout = files_timeout
        self.user_base = user_base
        self._prepare_host(memfs_root)
        self.users = JailUsers(jail_uid_base) if jail_uid_base else JailUsers.random_block()
        limit_pending_signals()
        self._quiet_mounts = self.config.missing_optional_mounts()
        if self._quiet_mounts:
            # Expected wherever the config lists several Pythons' folders (the image).
            log.debug("optional mounts this host doesn't have: %s", " ".join(self._quiet_mounts))
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self.pool = WarmPool(self._warm_jail_maker(), prewarm) if prewarm > 0 else None
        self._warm_modes = warm_modes(self.config.host_path(self.config.exec_path)
                                      or self.config.exec_path) if self.pool else ""
        # Left without close(), garbage or at exit: no tmpfs stays behind to be taken
        # for an earlier crash at the next start.
        self._finalizer = weakref.finalize(self, Sandbox._release, self.pool, self.memfs_root)

    def _prepare_host(self, memfs_root: str) -> None:
        """Cgroups, what a crashed server left, and this sandbox's folder for tmpfs
        mounts; SetupError saying what to add when the privileges for them are missing."""
        try:
            self.cgroups = prepare_cgroups(self.config)
            self._clean_up_after_crash(memfs_root)
            with _sandbox_lock:
                self.memfs_root = os.path.join(memfs_root,
                                               f"{os.getpid()}-{next(_sandbox_numbers)}")
            os.makedirs(self.memfs_root, mode=0o711, exist_ok=True)
            probe = MemFS(self.memfs_root, "probe", MiB)
            probe.mount()           # the first tmpfs fails here rather than in the self-test
            probe.remove()
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
                raise SetupError(f"{e}: snekbox lacks the privileges to create cgroups and "
                                 "mounts; in a container, run it with --privileged (or the "
                                 "capabilities the README lists under Docker)") from e
            raise
        _live_memfs_folders.add(self.memfs_root)

    def _clean_up_after_crash(self, memfs_root: str) -> None:
        stale = stale_memfs_folders(memfs_root)
        jails = kill_jails_using(stale)
        mounts = remove_memfs_folders(stale)
        groups = remove_stale_cgroups(self.cgroups.parents)
        if jails or mounts or groups:
            log.warning("cleaned up after an earlier crash: stopped %d jails, removed %d "
                        "tmpfs mounts and %d cgroups", jails, mounts, groups)

    @property
    def time_limit(self) -> int:
        return self.config.time_limit

    @property
    def warm_jails(self) -> int:
        """Warm jails ready for an evaluation now."""
        return self.pool.ready if self.pool else 0

    def close(self) -> None:
        """Stop the warm jails and remove this sandbox's tmpfs mounts (after the last
        ``run``); ``with Sandbox() as sandbox:`` does it at the end of the block."""
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _warm_jail_maker(self) -> Callable[[], WarmJail]:
        # The pool's thread holds this, not the sandbox: a sandbox dropped without
        # close() can still be collected, and its finalizer ends the pool.
        ref = weakref.ref(self)

        def start() -> WarmJail:
            sandbox = ref()
            if sandbox is None:
                raise SandboxUnavailable("the sandbox was closed")
            return WarmJail(sandbox)
        return start

    @staticmethod
    def _release(pool: WarmPool | None, memfs_root: str) -> None:
        if pool:
            pool.close()
        remove_memfs_folders([memfs_root])
        _live_memfs_folders.discard(memfs_root)

    def run(self, args: Sequence[str], *, stdin: bytes = b"", files: Sequence[File] = (),
            executable_path: str | None = None,
            client: socket.socket | None = None) -> EvalResult:
        """Run the interpreter with ``args`` in a fresh jail and return what happened.

        ``files`` are written to /home first; the files the run creates or changes come
        back in ``result.files``. ``client``, if given, is a connected socket whose
        hang-up cancels the run. Raises InvalidRequest for arguments, files or an
        executable that can't be used, and SandboxUnavailable when nsjail or the tmpfs
        can't be started.
        """
        started = time.monotonic()
        args = self._check_types(args, stdin, executable_path)
        while args and args[0] == "":
            del args[0]     # as python-discord/snekbox: leading empty arguments are dropped
        files = check_files(files, self.files_limit)
        self._check_args(args)
        index = code_argument_index(args)
        if index is not None and "\0" in args[index]:
            # What Python says of such -c code; clients of python-discord/snekbox show it.
            return EvalResult("ValueError: embedded null byte", None,
                              error="the code contains a NUL character",
                              duration=time.monotonic() - started)
        executable = self._check_executable(executable_path) if executable_path else None
        job = None if executable or not self.pool else \
            warm_job(args, {f.path for f in files}, self._warm_modes)
        jail = self.pool.take() if job else None
        result = None
        if jail:
            try:
                result = self._run_warm(jail, job, args, stdin, files, client)
            except _WarmJailFailed:
                log.warning("a warm jail was gone when handed its job; running cold instead")
            finally:
                self.pool.refill()
        if result is None:
            result = self._run_cold(args, stdin, files, executable, client)
        result.duration = time.monotonic() - started
        return result

    def _run_cold(self, args: list[str], stdin: bytes, files: Sequence[File],
                  executable: str | None, client: socket.socket | None) -> EvalResult:
        uid = self.users.take()
        try:
            memfs = self._new_memfs(uid)
            try:
                unchanged = self._write_files(memfs, files)
                result = self._run_in(memfs.path, uid, args, stdin, executable, client)
                self._collect(memfs, unchanged, result)
            finally:
                memfs.remove()
        finally:
            self.users.give_back(uid)       # its nsjail has exited
        return result

    def _write_files(self, memfs: MemFS, files: Sequence[File]) -> dict[str, tuple[int, int]]:
        return memfs.write_files(files, self.files_limit, self.files_timeout)

    def _new_memfs(self, uid: int) -> MemFS:
        with self._lock:
            memfs = MemFS(self.memfs_root, str(next(self._numbers)), self.memfs_size, uid)
        try:
            memfs.mount()
        except OSError as e:
            raise SandboxUnavailable(f"cannot create the evaluation's tmpfs: {e}") from e
        return memfs

    def _collect(self, memfs: MemFS, unchanged: dict, result: EvalResult) -> None:
        if result.returncode is not None:
            result.files, files_error = memfs.collect_files(
                unchanged, self.files_limit, self.files_timeout)
            result.error = result.error or files_error

    @staticmethod
    def _check_types(args: Sequence[str], stdin: bytes, executable_path: str | None) -> list[str]:
        """``args`` as a new list; TypeError for values of the wrong type (a str for
        ``args`` would run each of its characters as an argument)."""
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise TypeError(f"args must be a list of str, not {type(args).__name__}")
        for i, arg in enumerate(args):
            if not isinstance(arg, str):
                raise TypeError(f"args[{i}] must be a str, not {type(arg).__name__}")
        if not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin must be bytes, not {type(stdin).__name__}")
        if isinstance(stdin, memoryview) and stdin.itemsize != 1:
            raise TypeError("stdin must be bytes, not a memoryview of wider items")
        if executable_path is not None and not isinstance(executable_path, str):
            raise TypeError(f"executable_path must be a str, not {type(executable_path).__name__}")
        return list(args)

    def _check_args(self, args: list[str]) -> None:
        """Refuse arguments that can't be passed: NUL characters (but in -c code, which
        Python refuses itself), or too large (the code after -c may be any size: it can
        reach Python another way)."""
        index = code_argument_index(args)
        if any("\0" in a for i, a in enumerate(args) if i != index):
            raise InvalidRequest(400, "args: an argument contains a NUL character")
        if not all(_is_utf8(a) for a in args):
            raise InvalidRequest(400, "args: an argument contains a lone surrogate "
                                      "(invalid Unicode)")
        sizes = [len(a.encode("utf-8", "surrogatepass")) for i, a in enumerate(args) if i != index]
        if len(args) > MAX_ARGS_COUNT:
            raise InvalidRequest(413, f"args: at most {MAX_ARGS_COUNT} arguments")
        if any(size > MAX_ARG_BYTES for size in sizes):
            raise InvalidRequest(413, f"args: an argument is over {MAX_ARG_BYTES} bytes, "
                                      "Linux's limit (only code after -c may be longer)")
        if sum(sizes) > MAX_ARGS_TOTAL:
            raise InvalidRequest(413, f"args: over {MAX_ARGS_TOTAL // MiB} MiB in all")

    def _check_executable(self, path: str) -> str:
        if not path.startswith("/"):
            raise InvalidRequest(400, f"executable_path: {path!r} must be an absolute path")
        host = self.config.host_path(path)
        if host is None or not os.path.exists(host):
            raise InvalidRequest(400, f"executable_path: {path!r} does not exist in the jail")
        st = os.stat(host)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(400, f"executable_path: {path!r} is not a regular file")
        if not st.st_mode & 0o001:
            raise InvalidRequest(400, f"executable_path: {path!r} is not executable")
        return path

    def command(self, home: str, uid: int, log_fd: int, args: Sequence[str], *,
                executable: str | None = None, pass_fds: Sequence[int] = (),
                time_limit: int | None = None) -> list[str]:
        """The nsjail command line of one evaluation (the benchmark spawns it bare).

        ``home`` is the host folder that becomes /home; ``uid`` the host user (and
        group) the jail's user is; ``log_fd`` the descriptor nsjail logs to;
        ``pass_fds`` those it passes on to the interpreter; ``time_limit`` replaces the
        config's.
        """
        command = [self.nsjail, "--config", self.config.path, *self.cgroups.nsjail_args,
                   "--user", f"{JAIL_UID}:{uid}:1", "--group", f"{JAIL_UID}:{uid}:1",
                   "--log_fd", str(log_fd), "--bindmount", f"{home}:{JAIL_HOME}"]
        if time_limit is not None:
            command += ["--time_limit", str(time_limit)]
        if self.user_base:
            command += ["--bindmount_ro", f"{self.user_base}:{JAIL_USER_BASE}"]
        for fd in pass_fds:
            command += ["--pass_fd", str(fd)]
        if executable:
            # nsjail runs the config's exec_bin whatever argv[0] says, unless told.
            command += ["--exec_file", executable]
        return command + ["--", executable or self.config.exec_path, *self.config.exec_args, *args]

    def _run_in(self, home: str, uid: int, args: list[str], stdin: bytes,
                executable: str | None, client: socket.socket | None) -> EvalResult:
        log_r, log_w = os.pipe()
        code_fds: tuple[int, ...] = ()
        index = code_argument_index(args)
        try:
            if index is not None and len(args[index].encode("utf-8")) > MAX_ARG_BYTES:
                code_fds = (os.memfd_create("snekbox-code", 0),)
                os.write(code_fds[0], args[index].encode("utf-8"))
                os.lseek(code_fds[0], 0, os.SEEK_SET)
                args[index] = _LARGE_CODE_BOOTSTRAP.format(fd=code_fds[0])
            command = self.command(home, uid, log_w, args, executable=executable,
                                   pass_fds=code_fds)
            try:
                proc = subprocess.Popen(
                    command, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={},
                    pass_fds=(log_w, *code_fds))
            except OSError as e:
                raise SandboxUnavailable(f"cannot start nsjail ({self.nsjail}): {e.strerror}") from e
        finally:
            for fd in (log_w, *code_fds):
                os.close(fd)
        try:
            return self._communicate(proc, log_r, stdin, client)
        finally:
            os.close(log_r)
            if proc.returncode is None:
                proc.kill()
                proc.wait()

    def _communicate(self, proc: subprocess.Popen, log_r: int, stdin: bytes,
                     client: socket.socket | None,
                     job: tuple[int, bytes, Callable[[], None]] | None = None,
                     own_time_limit: bool = False) -> EvalResult:
        """Feed stdin (and a warm jail its job), read output (up to the limit) and
        nsjail's log until it exits.

        ``job`` is a descriptor, the bytes to write to it and how to close it once
        written (the jail starts at that end of file). With ``own_time_limit``
        (a warm jail, whose nsjail limit runs from its start) the time limit counts from
        now and is enforced here.
        """
        output = bytearray()
        log_data = bytearray()
        truncated = cancelled = killed = timed_out = False
        now = time.monotonic()
        limit_at = now + self.time_limit if own_time_limit else None
        deadline = now + self.time_limit + KILL_GRACE
        writers: dict[int, tuple[memoryview, Callable[[], None]]] = {}
        if proc.stdin:
            writers[proc.stdin.fileno()] = (memoryview(stdin), proc.stdin.close)
        if job:
            writers[job[0]] = (memoryview(job[1]), job[2])
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(log_r, selectors.EVENT_READ, "log")
            for fd, (data, close) in list(writers.items()):
                if data:
                    os.set_blocking(fd, False)
                    sel.register(fd, selectors.EVENT_WRITE, "write")
                else:
                    close()
                    del writers[fd]
            if client is not None:
                sel.register(client, selectors.EVENT_READ, "client")
            while len(sel.get_map()) > (client is not None and client in sel.get_map()):
                now = time.monotonic()
                if limit_at is not None and now >= limit_at:
                    timed_out, limit_at = True, None
                    self._stop(proc)
                timeout = min(deadline, limit_at or deadline) - now
                if timeout <= 0:
                    log.warning("nsjail did not exit %gs after the time limit; killed", KILL_GRACE)
                    proc.kill()
                    killed = True
                    break
                for key, _ in sel.select(timeout):
                    if key.data == "stdout":
                        chunk = os.read(key.fd, 65536)
                        if not chunk:
                            sel.unregister(key.fileobj)
                            continue
                        if truncated:
                            continue    # drained, not closed: the jail must not see EPIPE
                        output += chunk
                        if len(output) > self.max_output_size:
                            del output[self.max_output_size:]
                            truncated = True
                            self._stop(proc)
                    elif key.data == "log":
                        chunk = os.read(key.fd, 65536)
                        if chunk:
                            log_data += chunk[:MAX_NSJAIL_LOG - len(log_data)]
                        else:
                            sel.unregister(key.fd)
                    elif key.data == "write":
                        data, close = writers[key.fd]
                        try:
                            data = data[os.write(key.fd, data[:65536]):]
                        except BrokenPipeError:
                            data = data[:0]     # the reader is gone; its exit says the rest
                        writers[key.fd] = (data, close)
                        if not data:
                            sel.unregister(key.fd)
                            close()
                            del writers[key.fd]
                    elif key.data == "client" and _peer_gone(client):
                        cancelled = True
                        sel.unregister(client)
                        self._stop(proc)
                    elif key.data == "client":
                        sel.unregister(client)   # a pipelined request: not ours to read
        for _, close in writers.values():
            close()
        if not proc.stdout.closed:
            proc.stdout.close()
        try:
            status = proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        return self._result(output, bytes(log_data), status, truncated, cancelled,
                            killed, timed_out)

    def _run_warm(self, jail: WarmJail, job: tuple[str, list[str], str], args: list[str],
                  stdin: bytes, files: Sequence[File],
                  client: socket.socket | None) -> EvalResult:
        """Hand ``job`` to a warm jail, after writing ``files`` into its /home."""
        try:
            unchanged = self._write_files(jail.memfs, files)
            orig_argv = [self.config.exec_path, *self.config.exec_args, *args]
            payload = marshal.dumps((*job, orig_argv))
            result = self._communicate(jail.proc, jail.log_r, stdin, client,
                                       job=(jail.job_w, payload, jail.close_job),
                                       own_time_limit=True)
            if result.returncode is None:
                raise _WarmJailFailed    # its interpreter never ran the job: died waiting
            self._collect(jail.memfs, unchanged, result)
            return result
        finally:
            jail.discard()

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        # SIGTERM lets nsjail kill the jail and remove its cgroups itself.
        try:
            proc.terminate()
        except ProcessLookupError:
            pass

    def _result(self, output: bytearray, log_data: bytes, status: int, truncated: bool,
                cancelled: bool, killed: bool, timed_out: bool) -> EvalResult:
        report = read_nsjail_log(log_data, quiet=self._quiet_mounts)
        if truncated:
            returncode: int | None = 128 + signal.SIGTERM     # as python-discord/snekbox
        elif report.child_status is not None:
            returncode = report.child_status
        elif truncated or cancelled or killed or timed_out:
            returncode = shell_status(status)
        else:
            returncode = None    # nsjail never started the process
        error = None
        if returncode is None:
            # nsjail reports a config it can't read on its stderr, which is the output
            # (the protobuf parser's own words as a warning).
            errors = report.errors or [m[2].decode("utf-8", "replace")
                                       for m in map(_NSJAIL_LINE.match, output.splitlines())
                                       if m and (m[1] in b"EF" or b"Error parsing" in m[2])]
            error = "the jail could not start the process: " + (
                "; ".join(errors) if errors else f"nsjail exited with status {status}")
        elif cancelled:
            error = "cancelled: the client went away"
        return EvalResult(stdout=output.decode("utf-8", "replace"), returncode=returncode,
                          timed_out=report.timed_out or killed or timed_out, truncated=truncated,
                          error=error)


def shell_status(status: int) -> int:
    """A Popen return code the way a shell shows it: 128+N after signal N."""
    return 128 - status if status < 0 else status


class NsjailReport(collections.namedtuple("NsjailReport", "child_status timed_out errors")):
    """What nsjail's log says about a run: the jailed process's shell-style status (None
    if it never ran), whether the time limit killed it, and nsjail's error messages."""

    __slots__ = ()


def read_nsjail_log(data: bytes, quiet: Sequence[str] = ()) -> NsjailReport:
    """Forward nsjail's log lines to the ``snekbox.nsjail`` logger and read the outcome.

    Levels match nsjail's, except warnings about the optional mounts in ``quiet``
    (sources this host lacks, reported once at start-up), which go to DEBUG.
    """
    child_status, timed_out, errors = None, False, []
    chatter = not nsjail_log.isEnabledFor(logging.INFO)
    for line in data.splitlines():
        if chatter and line.startswith(b"[I]") and b"pid=" not in line:
            continue    # mounts and parameters, a dozen lines a run; no one is listening
        match = _NSJAIL_LINE.match(line)
        level, message = (_LEVELS[match[1]], match[2]) if match else (logging.WARNING, line)
        exited, signaled = _EXITED.search(message), _SIGNALED.search(message)
        if exited:
            child_status = int(exited[1])
        elif signaled:
            child_status = 128 + int(signaled[1])
        elif _TIME_LIMIT.search(message):
            timed_out = True
        text = message.decode("utf-8", "replace")
        if level == logging.WARNING and any(f"'{p}'" in text for p in quiet):
            level = logging.DEBUG
        elif level >= logging.ERROR:
            errors.append(text)
        nsjail_log.log(level, "%s", text)
    return NsjailReport(child_status, timed_out, errors)


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the peer of a connected socket has closed it or reset it (never waits)."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        # Readable: either data (a pipelined request) or the end of the stream.
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError, TimeoutError, socket.timeout):
        return False
    except OSError:
        return True


# --------------------------------------------------------------------------------------
# Warm jails
# --------------------------------------------------------------------------------------

# The interpreter of a warm jail starts on this, with the jail's job descriptor in {fd},
# says it is ready on {ready}, and waits. The job (marshal: mode, sys.argv, the code, script or module, sys.orig_argv)
# makes it what a cold start would have been: `-c` code runs in __main__ compiled as
# "<string>", a script with its own __file__, loader and sys.path[0], a module through
# runpy as -m does; tracebacks lose the bootstrap's frames. It imports nothing a cold
# start wouldn't have loaded (marshal, os and sys are there from the start).
_WARM_BOOTSTRAP = """\
def _snekbox_job():
    import marshal, os, sys
    os.write({ready}, b".")     # booted: waiting for the job
    os.close({ready})
    data = b""
    while True:
        chunk = os.read({fd}, 65536)
        if not chunk:
            break
        data += chunk
    os.close({fd})
    if not data:
        os._exit(0)     # snekbox discarded this jail, or is gone: nothing to run
    mode, sys.argv[:], payload, orig_argv = marshal.loads(data)
    if hasattr(sys, "orig_argv"):
        sys.orig_argv[:] = orig_argv
    if mode == "m":
        sys.path[0] = os.getcwd()
        return __import__("runpy")._run_module_as_main, payload
    if mode == "s":
        main = sys.modules["__main__"]
        main.__file__ = path = os.path.abspath(payload)
        main.__cached__ = None
        main.__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", path)
        sys.path[0] = os.path.dirname(path)
        with open(path, "rb") as f:
            return exec, compile(f.read(), path, "exec")
    code = compile(payload, "<string>", "exec")
    if sys.version_info >= (3, 13):
        __import__("linecache")._register_code(code, payload, "<string>")
    return exec, code

try:
    _snekbox_run, _snekbox_arg = _snekbox_job()
    del _snekbox_job
    if _snekbox_run is exec:
        exec(_snekbox_arg, globals().pop("_snekbox_run") and globals().pop("_snekbox_arg") and globals())
    else:
        globals().pop("_snekbox_run")(globals().pop("_snekbox_arg"))
except BaseException as e:
    if isinstance(e, SystemExit):
        raise
    tb = e.__traceback__.tb_next
    while tb is not None and tb.tb_frame.f_code.co_name == "_snekbox_job":
        tb = tb.tb_next
    e.with_traceback(tb)
    __import__("sys").excepthook(type(e), e, e.__traceback__)
    raise SystemExit(1)
"""
WARM_MAX_IDLE = 300     # seconds a warm jail may wait; older ones are replaced


class _WarmJailFailed(Exception):
    """The warm jail was gone before it could run its job (a cold start will)."""


def warm_job(args: Sequence[str], uploaded: set[str],
             modes: str = "cms") -> tuple[str, list[str], str] | None:
    """(mode, sys.argv, payload) when a warm jail can run ``args`` exactly as a cold
    start would: ``-c code``, ``-m module`` or an uploaded ``.py`` script, each with
    arguments of its own, and the mode ("c", "m" or "s") is in ``modes``. Interpreter
    options or anything else: None (a cold start)."""
    job = None
    if len(args) >= 2 and args[0] in ("-c", "-m"):
        job = args[0][1], [args[0], *args[2:]], args[1]
    elif args and args[0].endswith(".py") and not args[0].startswith("-") \
            and posixpath.normpath(args[0]) in uploaded:
        job = "s", list(args), args[0]
    return job if job and job[0] in modes else None


def warm_modes(python: str) -> str:
    """The modes in which a warm jail of ``python`` (a host path) runs exactly as a cold
    start: from 3.13 on, a -c program (the warm jail's bootstrap) loads linecache and
    what it imports, which a script or -m start does not; those then start cold."""
    try:
        out = subprocess.run([python, "-I", "-S", "-c",
                              "import sys; print(sys.version_info >= (3, 13))"],
                             capture_output=True, text=True, timeout=10, env={})
    except (OSError, subprocess.TimeoutExpired):
        return "c"
    return "cms" if out.stdout.strip() == "False" else "c"


class WarmJail:
    """An nsjail jail with its interpreter started, waiting for one job; single use.

    It has its own tmpfs as /home and nsjail's time limit is pushed past the longest
    wait: the evaluation's own time limit is enforced from the hand-over.
    """

    def __init__(self, sandbox: Sandbox):
        self.users = sandbox.users
        self.uid = self.users.take()
        try:
            self.memfs = sandbox._new_memfs(self.uid)
        except BaseException:
            self.users.give_back(self.uid)
            raise
        log_w = job_r = ready_w = None
        self.booted = False
        try:
            self.log_r, log_w = os.pipe()
            job_r, self.job_w = os.pipe()
            self.ready_r, ready_w = os.pipe()
            bootstrap = _WARM_BOOTSTRAP.format(fd=job_r, ready=ready_w)
            command = sandbox.command(self.memfs.path, self.uid, log_w, ["-c", bootstrap],
                                      pass_fds=(job_r, ready_w),
                                      time_limit=WARM_MAX_IDLE + sandbox.time_limit + 60)
            # nsjail's own time limit is far off: should the server die while the jail
            # runs a job, the parent-death signal ends it (a cold jail's limit is its own).
            parent = os.getpid()
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env={},
                                         pass_fds=(log_w, job_r, ready_w),
                                         preexec_fn=lambda: _end_with_parent_thread(parent))
        except BaseException:
            self.memfs.remove()
            self.users.give_back(self.uid)
            raise
        finally:
            for fd in (log_w, job_r, ready_w):
                if fd is not None:
                    os.close(fd)
        self.started = time.monotonic()

    def is_booted(self) -> bool:
        """Whether its interpreter has started and waits for the job (never blocks)."""
        if not self.booted and self.ready_r is not None and select.select([self.ready_r], [], [], 0)[0]:
            self.booted = os.read(self.ready_r, 1) == b"."
            os.close(self.ready_r)
            self.ready_r = None
        return self.booted

    def close_job(self) -> None:
        """Close the job pipe: the jail reads the job up to this end of file."""
        if self.job_w is not None:
            os.close(self.job_w)
            self.job_w = None

    def usable(self) -> bool:
        return self.proc.poll() is None and time.monotonic() - self.started < WARM_MAX_IDLE

    def discard(self) -> None:
        """End the jail if it still runs, close its pipes and remove its tmpfs."""
        # The end of its job pipe makes a waiting interpreter exit, and nsjail tidy up
        # after it; a signal while nsjail still sets the jail up would leave its cgroup.
        self.close_job()
        try:
            self.proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if not stream.closed:
                stream.close()
        for fd in (self.log_r, self.ready_r):
            if fd is not None:
                os.close(fd)
        self.log_r = self.ready_r = None
        self.memfs.remove()
        self.users.give_back(self.uid)


class WarmPool:
    """Up to ``size`` warm jails made by ``start``, refilled in the background; never
    blocks a request."""

    def __init__(self, start: Callable[[], WarmJail], size: int):
        self.start = start
        self.size = size
        self._ready: collections.deque[WarmJail] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="prewarm", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> int:
        """Warm jails booted and waiting."""
        with self._cond:
            return sum(jail.is_booted() for jail in self._ready)

    def take(self) -> WarmJail | None:
        """The oldest warm jail (booted, or nearly), or None when the pool is empty and
        the caller must start cold.

        Call ``refill`` once the evaluation is over: a new jail booting meanwhile would
        compete with it for the CPU and the kernel's namespace locks.
        """
        stale = []
        with self._cond:
            jail = None
            while self._ready and jail is None:
                jail = self._ready.popleft()
                if not jail.usable():
                    stale.append(jail)
                    jail = None
            if jail is None:
                self._cond.notify_all()     # empty: refill now
        for old in stale:
            old.discard()
        return jail

    def refill(self) -> None:
        """Start replacing the jails taken."""
        with self._cond:
            self._cond.notify_all()

    def _fill(self) -> None:
        while True:
            stale = []
            with self._cond:
                while not self._closed and len(self._ready) >= self.size:
                    stale = [j for j in self._ready if not j.usable()]
                    if stale:
                        for jail in stale:
                            self._ready.remove(jail)
                        break
                    self._cond.wait(WARM_MAX_IDLE / 10)
                if self._closed:
                    return
            for jail in stale:
                jail.discard()
            if len(self._ready) >= self.size:
                continue
            try:
                jail = self.start()
            except (OSError, SandboxUnavailable) as e:
                log.warning("cannot start a warm jail: %s", e)
                time.sleep(1)
                continue
            with self._cond:
                if self._closed:
                    break
                self._ready.append(jail)
        jail.discard()

    def close(self) -> None:
        """Stop refilling and discard every warm jail."""
        with self._cond:
            self._closed = True
            ready, self._ready = list(self._ready), collections.deque()
            self._cond.notify_all()
        # Before the filling thread ends: its end signals the nsjails it started, and a
        # signal to one still setting its jail up would leave a cgroup behind.
        for jail in ready:
            jail.discard()
        if threading.current_thread() is not self._thread:     # closed by a finalizer there
            self._thread.join(10)


# --------------------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------------------

class HTTPError(InvalidRequest):
    """An error answer: ``{"title": ..., "description": ...}`` with ``status``; the
    title is the status's phrase unless given."""

    def __init__(self, status: int, description: str, headers: dict | None = None,
                 title: str | None = None):
        super().__init__(status, description, title or HTTPStatus(status).phrase)
        self.description = description
        self.headers = headers or {}


class EvalRequest(collections.namedtuple("EvalRequest", "args stdin files executable_path")):
    """A validated ``POST /eval`` body: interpreter arguments, stdin bytes, Files to
    upload and the interpreter to use (None: the config's)."""

    __slots__ = ()


_SPACES = re.compile(r"[ \t\r\n]+")
_JSON_STRING_OR_OPENING = re.compile(rb'"(?:[^"\\]+|\\.)*"|[\[{]')


def _count_containers(body: bytes | bytearray) -> int:
    """The objects and arrays opened in a JSON text, outside its strings."""
    return sum(1 for m in _JSON_STRING_OR_OPENING.finditer(body) if m[0] in (b"[", b"{"))


def _string(value: object, name: str, *, nul_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(400, f"{name} must be a string, not {_json_type(value)}")
    if not nul_ok and "\0" in value:
        raise InvalidRequest(400, f"{name} must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(400, f"{name} contains a lone surrogate (invalid Unicode)") from None
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _json_files(raw_files: object, limit: int) -> list[File]:
    """The ``files`` of a request body as Files, their content decoded from base64."""
    if not isinstance(raw_files, list):
        raise InvalidRequest(400, f"files must be an array, not {_json_type(raw_files)}")
    if len(raw_files) > limit:
        raise InvalidRequest(400, f"files: at most {limit} files")
    files = []
    for i, item in enumerate(raw_files):
        if not isinstance(item, dict):
            raise InvalidRequest(400, f"files[{i}] must be an object with path and content")
        if "path" not in item:
            raise InvalidRequest(400, f"files[{i}].path is required")
        path = _string(item["path"], f"files[{i}].path", nul_ok=True)
        content = _string(item.get("content", ""), f"files[{i}].content")
        try:   # line breaks and spaces are fine: base64 tools wrap their output
            files.append(File(path, base64.b64decode(_SPACES.sub("", content), validate=True)))
        except (binascii.Error, ValueError):
            raise InvalidRequest(400, f"files[{i}].content of {path[:100]!r} is not base64",
                                 FILE_INVALID) from None
    return files


def parse_eval_request(body: bytes | bytearray, files_limit: int = 100) -> EvalRequest:
    """Validate a ``POST /eval`` body; raise InvalidRequest naming the bad field.

    The uploads are checked as ``Sandbox.run`` checks them (``check_files``), here
    already so that a bad request is refused before it waits for a worker.
    """
    # Each {} or [] costs the parser some 60 bytes: 16 MiB of them would be 400 MiB.
    if _count_containers(body) > MAX_JSON_CONTAINERS:
        raise InvalidRequest(400, f"the body has over {MAX_JSON_CONTAINERS} JSON objects "
                                  "and arrays")
    try:
        data = json.loads(body)
    except RecursionError:
        raise InvalidRequest(400, "the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(400, f"the body must be a JSON object, not {_json_type(data)}")
    if "input" not in data and "args" not in data:
        raise InvalidRequest(400, "input or args is required")

    args = data.get("args", ["-c"] if "input" in data else None)
    if not isinstance(args, list):
        raise InvalidRequest(400, f"args must be an array of strings, not {_json_type(args)}")
    args = [_string(a, f"args[{i}]", nul_ok=True) for i, a in enumerate(args)]
    if "input" in data:
        args.append(_string(data["input"], "input", nul_ok=True))

    stdin = _string(data.get("stdin", ""), "stdin", nul_ok=True).encode("utf-8")

    executable = data.get("executable_path")
    if executable is not None:
        executable = _string(executable, "executable_path")

    files = check_files(_json_files(data.get("files", []), files_limit), files_limit)
    return EvalRequest(args, stdin, files, executable)



# --------------------------------------------------------------------------------------
# Worker slots
# --------------------------------------------------------------------------------------

class Busy(Exception):
    """No worker slot could be had; the message says which limit was hit."""


class WorkerSlots:
    """At most ``workers`` evaluations at once; the rest wait, first come first served.

    A ``BoundedSemaphore`` counts the slots. Waiters queue in arrival order and only
    the oldest may take a freed slot, so newcomers never overtake. The queue holds at
    most ``max_queue`` requests: a request admitted to it is served, unless its client
    goes away or it waits over ``max_wait`` seconds (0: no such limit).
    """

    def __init__(self, workers: int, max_queue: int, max_wait: float):
        self.workers = workers
        self.max_queue = max_queue
        self.max_wait = max_wait
        self._slots = threading.BoundedSemaphore(workers)
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._running = 0
        self._closed = False

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Take no more work: waiting and later requests get Busy."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no evaluation runs; False if some still do after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0, timeout)

    def acquire(self, gone: Callable[[], bool] = lambda: False) -> None:
        """Take a slot, waiting in line; raise Busy if none comes in time.

        ``gone`` is asked now and then while waiting: True gives up the place.
        """
        ticket = object()
        with self._cond:
            if self._closed:
                raise Busy("the server is stopping")
            if len(self._queue) >= self.max_queue:
                raise Busy(f"all {self.workers} workers are busy and the queue of "
                           f"{self.max_queue} is full; try again")
            self._queue.append(ticket)
            try:
                deadline = time.monotonic() + (self.max_wait or float("inf"))
                while not (self._queue[0] is ticket and self._slots.acquire(blocking=False)):
                    remaining = deadline - time.monotonic()
                    if self._closed:
                        raise Busy("the server is stopping")
                    if remaining <= 0:
                        raise Busy(f"no worker was free within --max-wait {self.max_wait:g} s")
                    if gone():
                        raise Busy("the client went away")
                    self._cond.wait(min(remaining, 0.5))
                self._running += 1
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._slots.release()
            self._cond.notify_all()


class BodyBudget:
    """The bytes of request bodies that all connections together may hold at once: a
    body is counted from its first byte until its request has been answered."""

    def __init__(self, size: int):
        self.size = size
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes, or answer False when they don't fit."""
        with self._lock:
            if self.used + size > self.size:
                return False
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.used -= size


# --------------------------------------------------------------------------------------
# The HTTP layer
# --------------------------------------------------------------------------------------

class SnekboxServer(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, settings: Settings, sandbox: Sandbox):
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        self.settings = settings
        self.sandbox = sandbox
        self.slots = WorkerSlots(settings.workers, settings.queue_limit, settings.max_wait)
        self.bodies = BodyBudget(settings.body_budget)
        self.ready = False          # until the start-up self-test has passed
        self.stopping = False
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        super().__init__((settings.host, settings.port), SnekboxHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host up in DNS, slowing start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        if not self._connections.acquire(blocking=False):
            # Over the cap: answer at once instead of starting another thread.
            try:
                request.setblocking(False)
                request.send(_raw_busy_response("too many open connections"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


def _json_bytes(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _raw_busy_response(description: str) -> bytes:
    body = _json_bytes({"title": "Service Unavailable", "description": description})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that fails with a timeout once ``deadline`` passes, and
    with LineTooLong (a 431) past ``head_left`` bytes while that is set.

    ``pace(timeout)`` asks for MIN_UPLOAD_RATE in every window of ``timeout`` seconds
    instead: a body that stops or slows down is dropped, whatever length it claims and
    however fast it began.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = float("inf")
        self.head_left: int | None = None
        self._paced = False
        self._window, self._window_bytes = 0.0, 0

    def readable(self) -> bool:
        return True

    def pace(self, timeout: float) -> None:
        self._window = timeout
        self.deadline = time.monotonic() + timeout
        self._window_bytes = 0
        self._paced = True

    def set_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        self._paced = False

    def readinto(self, buffer) -> int:
        now = time.monotonic()
        if self._paced and now >= self.deadline:
            if self._window_bytes < MIN_UPLOAD_RATE * self._window:
                raise socket.timeout("the body arrives too slowly")
            self.deadline, self._window_bytes = now + self._window, 0
        remaining = self.deadline - now
        if remaining <= 0:
            raise socket.timeout("the client took too long")
        self.sock.settimeout(remaining)
        if self.head_left is None:
            read = self.sock.recv_into(buffer)
            self._window_bytes += read
            return read
        if self.head_left <= 0:
            raise http.client.LineTooLong(f"the request line and headers (over "
                                          f"{MAX_HEAD_BYTES // 1024} KiB in all)")
        read = self.sock.recv_into(memoryview(buffer)[:self.head_left])
        self.head_left -= read
        return read


_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
ANSWER_PIECE = 48 * 1024        # bytes of a file encoded at a time (64 KiB of base64)
MIN_ANSWER_RATE = 1 * MiB       # bytes/s a client must take an answer at, past client_timeout


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` from a client with its control characters escaped, for a log line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def _has_body(headers) -> bool:
    return headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in headers


def content_length(headers) -> int | None:
    """The request's Content-Length (None without one); HTTPError(400) unless it is
    ASCII digits, the same in every copy of the header."""
    values = {value.strip(" \t") for value in headers.get_all("Content-Length") or ()}
    if not values:
        return None
    value = values.pop()
    if values or not _LENGTH.fullmatch(value):
        raise HTTPError(400, "the Content-Length header is not a valid length")
    return int(value)


def is_chunked(headers) -> bool:
    """Whether the body comes in chunks; HTTPError for framing a proxy in front might read
    differently (RFC 9112, 6.1 and 6.3): another transfer coding, or one with a length."""
    codings = headers.get_all("Transfer-Encoding")
    if not codings:
        return False
    if "Content-Length" in headers:
        raise HTTPError(400, "Content-Length and Transfer-Encoding together are ambiguous")
    coding = ",".join(codings).strip(" \t").lower()
    if coding != "chunked":
        raise HTTPError(501, f"Transfer-Encoding {coding[:50]!r} is not supported; "
                             "only chunked is")
    return True


def answer_pieces(result: EvalResult) -> tuple[int, Iterable[bytes]]:
    """The JSON answer of ``result`` as its length and the pieces to send, so that a
    big answer never stands whole in memory: files are encoded as they go out."""
    fields = result.to_json(files=False)
    head = _json_bytes(fields)[:-1] + b',"files":['
    files = [(_json_bytes({"path": f.path, "size": len(f.content)})[:-1] + b',"content":"', f)
             for f in result.files]
    length = len(head) + sum(len(opening) + 4 * ((len(f.content) + 2) // 3) + 2
                             for opening, f in files) + max(len(files) - 1, 0) + 2

    def pieces() -> Iterable[bytes]:
        yield head
        for i, (opening, f) in enumerate(files):
            yield (b"," if i else b"") + opening
            view = memoryview(f.content)
            for start in range(0, len(view), ANSWER_PIECE):
                yield base64.b64encode(view[start:start + ANSWER_PIECE])
            yield b'"}'
        yield b"]}"
    return length, pieces()


class SnekboxHandler(BaseHTTPRequestHandler):
    """Answers ``POST /eval`` and ``GET /health``; every answer is JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "snekbox"
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024           # headers and a small body leave in one write
    server: SnekboxServer

    ROUTES = {"/eval": ("POST",), "/health": ("GET", "HEAD")}

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.timeout = self.server.settings.client_timeout
        super().setup()
        # Reads share a deadline, so a client trickling bytes can't hold the thread.
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self._served = False

    def handle_one_request(self) -> None:
        if self._served and not self._next_request_begins():
            self.close_connection = True
            return
        self._served = True
        # The request line and headers get client_timeout from their first byte on, and
        # MAX_HEAD_BYTES together (http.server bounds each line, not all of them).
        self._reader.set_deadline(time.monotonic() + self.timeout)
        self._reader.head_left = MAX_HEAD_BYTES
        self._response_started = False
        try:
            super().handle_one_request()
        except http.client.LineTooLong as e:     # in the request line: not parsed yet
            self.requestline, self.command, self.request_version = "", "", "HTTP/1.0"
            self.send_error(431, "Line too long", str(e))
        except OSError:
            self.close_connection = True        # flushing to a client that was cut off
        finally:
            self._reader.head_left = None

    def _next_request_begins(self) -> bool:
        """Wait up to keepalive_timeout for a kept-alive connection's next request:
        clients' pools reuse idle connections for longer than a request may take."""
        self._reader.set_deadline(time.monotonic() + self.server.settings.keepalive_timeout)
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False

    # One method for every verb: the path decides what's allowed.
    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _handle(self) -> None:
        started = time.monotonic()
        self._status, self._size, self._body_read, self._body_held = 0, 0, False, 0
        try:
            self._route()
        except InvalidRequest as e:
            self._send_error(e if isinstance(e, HTTPError)
                             else HTTPError(e.status, str(e), title=e.title))
        except OSError as e:
            self._abort()
            log.info("%s: connection lost: %s", self.client_address[0], e)
        except Exception:
            log.exception("bug while answering %s %s", self.command, self.path)
            self._send_error(HTTPError(500, "an internal error; the server's log has details"))
        finally:
            if not self._body_read and _has_body(self.headers):
                self.close_connection = True    # what is left can't be taken for a request
            self.server.bodies.give_back(self._body_held)
            log.info('%s "%s %s" %d %d %.1fms', self.client_address[0], self.command,
                     _printable(self.path[:200]), self._status, self._size,
                     (time.monotonic() - started) * 1000)

    def _abort(self) -> None:
        """Close with a reset, at once: a client that stopped reading leaves nothing
        queued, and what is still buffered for it is not waited on."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.settimeout(0)   # later flushes fail at once
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass    # the rest of an answer that its client stopped reading

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        methods = self.ROUTES.get(path)
        if methods is None:
            raise HTTPError(404, f"no such endpoint: {path[:100]}; try POST /eval")
        if self.command == "OPTIONS":
            self._send_answer(200, 0, (), {"Allow": ", ".join(methods)})
            return
        if self.command not in methods:
            raise HTTPError(405, f"{path} takes {' or '.join(methods)}",
                            headers={"Allow": ", ".join(methods)})
        if path == "/health":
            self._health()
        else:
            self._eval()

    def _health(self) -> None:
        slots = self.server.slots
        ready = self.server.ready and not self.server.stopping
        status = "ok" if ready else "stopping" if self.server.stopping else "starting"
        self.send_json(200 if ready else 503, {
            "status": status, "ready": ready,
            "workers": slots.workers, "running": slots.running, "waiting": slots.waiting,
            "max_queue": slots.max_queue, "warm": self.server.sandbox.warm_jails})

    def _eval(self) -> None:
        # A web page can POST here from a browser without asking (no Content-Type is
        # JSON): refuse what a browser sends across sites. Other clients send no Origin.
        if "Origin" in self.headers or self.headers.get("Sec-Fetch-Site", "none") not in (
                "none", "same-origin"):
            raise HTTPError(403, "requests from web pages in a browser are refused")
        # No Content-Type is taken for JSON, as python-discord/snekbox does.
        content_type = self.headers.get("Content-Type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            self.close_connection = True
            raise HTTPError(415, "the body must be JSON, sent as Content-Type: application/json",
                            title="415 Unsupported Media Type")
        settings = self.server.settings
        request = parse_eval_request(self._read_body(settings.max_request_size),
                                     settings.files_limit)
        retry = {"Retry-After": "1"}
        try:
            self.server.slots.acquire(gone=lambda: _peer_gone(self.connection))
        except Busy as e:
            raise HTTPError(503, str(e), headers=retry) from None
        # The slot is held until the answer has been sent: the answers held in memory
        # are then at most one per worker, whoever doesn't read them.
        try:
            try:
                result = self.server.sandbox.run(
                    request.args, stdin=request.stdin, files=request.files,
                    executable_path=request.executable_path, client=self.connection)
            except SandboxUnavailable as e:
                log.error("%s", e)
                raise HTTPError(503, str(e), headers=retry) from None
            del request
            log.info("evaluation: returncode=%s duration=%.3fs%s%s%s", result.returncode,
                     result.duration, " time-limit" if result.timed_out else "",
                     " output-truncated" if result.truncated else "",
                     f" error={result.error!r}" if result.error else "")
            if result.error and result.error.startswith("cancelled"):
                self.close_connection = True
                return      # nobody to answer
            length, pieces = answer_pieces(result)
            self._send_answer(200, length, pieces)
        finally:
            self.server.slots.release()

    def _read_body(self, limit: int) -> bytearray:
        if is_chunked(self.headers):
            return self._read_chunked(limit)
        length = content_length(self.headers)
        if length is None:
            raise HTTPError(411, "a Content-Length header is required")
        if length > limit:
            raise HTTPError(413, f"the body is {length} bytes; the limit is {limit} bytes")
        self._reader.pace(self.timeout)
        body = self._read_exactly(length)
        self._body_read = True
        return body

    def _hold_body(self, size: int) -> None:
        """Count ``size`` more bytes of body against the server's budget, or refuse."""
        if not self.server.bodies.take(size):
            raise HTTPError(503, "the server holds as many request bodies as it may; try "
                                 "again", headers={"Retry-After": "1"})
        self._body_held += size

    def _read_exactly(self, length: int) -> bytearray:
        """``length`` bytes of body, each counted against the budget as it arrives (not
        as claimed: a client must send what it holds)."""
        data = bytearray()
        while len(data) < length:
            size = min(length - len(data), 64 * 1024)
            self._hold_body(size)
            piece = self._read_body_part(self.rfile.read, size)
            data += piece
            if len(piece) < size:
                raise HTTPError(400, "the body is shorter than its Content-Length")
        return data

    def _read_chunked(self, limit: int) -> bytearray:
        self._reader.pace(self.timeout)
        body = bytearray()
        while True:
            match = _CHUNK_SIZE.fullmatch(self._read_body_part(self.rfile.readline, 1024))
            if not match:
                raise HTTPError(400, "a chunk of the chunked body has no valid size")
            size = int(match[1], 16)
            if len(body) + size > limit:
                raise HTTPError(413, f"the body is over the limit of {limit} bytes")
            if size == 0:
                while (line := self._read_body_part(self.rfile.readline, 1024)) != b"\r\n":
                    if not line.endswith(b"\r\n"):
                        raise HTTPError(400, "a trailer of the chunked body is malformed")
                self._body_read = True
                return body
            body += self._read_exactly(size)
            if self._read_exactly(2) != b"\r\n":
                raise HTTPError(400, "a chunk of the chunked body is malformed")

    def _read_body_part(self, read: Callable[[int], bytes], size: int) -> bytes:
        try:
            return read(size)
        except (TimeoutError, socket.timeout):
            raise HTTPError(408, "the body did not arrive in time") from None

    def send_json(self, status: int, data: dict, headers: dict | None = None) -> None:
        """Send ``data`` as the whole answer, in one write where it fits."""
        body = _json_bytes(data)
        self._send_answer(status, len(body), (body,), headers)

    def _send_answer(self, status: int, length: int, pieces: Iterable[bytes],
                     headers: dict | None = None) -> None:
        """Send a JSON answer of ``length`` bytes, made of ``pieces``.

        A client must take each piece within client_timeout and the whole at
        MIN_ANSWER_RATE (it holds a worker meanwhile), or the connection is closed: once
        the status line is out, no error can be answered any more.
        """
        deadline = time.monotonic() + self.timeout + length / MIN_ANSWER_RATE
        self.connection.settimeout(self.timeout)    # the read deadline may be spent
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection or self.server.stopping:
            self.close_connection = True
            self.send_header("Connection", "close")
        self._response_started = True
        self.end_headers()
        if self.command != "HEAD":
            for piece in pieces:
                self.connection.settimeout(max(min(self.timeout, deadline - time.monotonic()), 0.001))
                self.wfile.write(piece)
        self.wfile.flush()
        self._status, self._size = status, length

    def _send_error(self, error: HTTPError) -> None:
        if self._response_started:
            self.close_connection = True    # too late for another status line
            return
        if not self._body_read and _has_body(self.headers):
            self.close_connection = True    # what is left of the body can't be a request
        if error.status in (400, 408, 411, 413, 415, 501) and not self._body_read:
            self.close_connection = True
        try:
            self.send_json(error.status, {"title": error.title, "description": error.description},
                           error.headers)
        except OSError:
            self.close_connection = True    # the client is gone; nothing to tell it

    def handle_expect_100(self) -> bool:
        """Refuse a body that is unusable or too large before the client sends it; else
        100 Continue."""
        limit = self.server.settings.max_request_size
        try:
            if not is_chunked(self.headers):
                length = content_length(self.headers)
                if length is not None and length > limit:
                    raise HTTPError(413, f"the body is {length} bytes; the limit is {limit} bytes")
        except HTTPError as e:
            self.send_error(e.status, e.description)
            return False
        super().handle_expect_100()
        self.wfile.flush()      # wfile is buffered: the client waits for this line
        return True

    def parse_request(self) -> bool:
        try:
            ok = super().parse_request()
        finally:
            self._reader.head_left = None   # the body has limits of its own
        if ok and self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return ok

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request, header too long) as JSON."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"   # a status line and headers all the same
        self.close_connection = True
        self._status, self._size, self._body_read = code, 0, True
        description = f"{message}: {explain}" if message and explain else message or explain
        self._send_error(HTTPError(code, description or HTTPStatus(code).description))
        log.info('%s "%s" %d', self.client_address[0],
                 _printable(getattr(self, "requestline", "")[:200]), code)

    def log_request(self, code="-", size="-") -> None:
        pass    # _handle logs each request once it's answered

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.client_address[0], _printable(format % args))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

# The command line: (flag, help, lowest, highest) for each; the Settings attribute of
# the same name holds the default and its type.
FLAGS = (
    ("--host", "address to listen on (default: %(default)s; 0.0.0.0 exposes it to "
               "the network)", None, None),
    ("--port", "port to listen on, 0 for any free one (default: %(default)s)", 0, 65535),
    ("--workers", "evaluations at once (default: the CPUs, %(default)s)", 1, 4096),
    ("--max-queue", "requests that may wait for a worker (default: 8 per worker)", 0, None),
    ("--max-wait", "seconds a request may wait for a worker; 0: as long as its client "
                   "stays (default: %(default)s)", 0, None),
    ("--config", "nsjail config (default: snekbox.cfg beside snekbox.py)", None, None),
    ("--nsjail", "nsjail binary (default: found on PATH or in sbin/bin)", None, None),
    ("--max-output-size", "bytes of output kept; more stops the jail "
                          "(default: %(default)s)", 1, None),
    ("--max-request-size", "largest request body in bytes (default: %(default)s)", 1, None),
    ("--memfs-size", "bytes of each evaluation's /home tmpfs (default: %(default)s)", MiB, None),
    ("--files-limit", "most files sent in or returned (default: %(default)s)", 0, None),
    ("--files-timeout", "seconds for collecting output files (default: %(default)s)",
     0.001, None),
    ("--user-base", "folder of third-party packages (a PYTHONUSERBASE), read-only in "
                    "the jail", None, None),
    ("--client-timeout", "seconds a client may take to send a request "
                         "(default: %(default)s)", 0.001, None),
    ("--keepalive-timeout", "seconds an idle kept-alive connection stays open "
                            "(default: %(default)s)", 0.001, None),
    ("--max-connections", "open connections at most (default: %(default)s)", 1, None),
    ("--prewarm", "jails kept started and waiting for an evaluation; 0: none "
                  "(default: %(default)s)", 0, 256),
    ("--max-body-memory", "bytes of request bodies held at once by all connections "
                          "together; more get 503 (default: 4 times --max-request-size)",
     0, None),
    ("--jail-uid-base", f"first of the {JAIL_UID_BLOCK} host uids that jails run as, one "
                        "per live jail; 0: a random block above 2001000000 (default)",
     0, 2**31 - 1 - JAIL_UID_BLOCK),
    ("--log-level", "DEBUG, INFO, WARNING or ERROR (default: %(default)s)", None, None),
)


def _flag_type(kind: type, low: float | None, high: float | None) -> Callable[[str], object]:
    """An argparse type: ``kind`` of the text, within ``low`` and ``high`` if given."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: {low:g} to {high:g}" if high is not None
                else f"{text} is out of range: at least {low:g}")
        return value
    convert.__name__ = kind.__name__
    return convert


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line; every flag falls back to a SNEKBOX_* environment variable.

    A bad value is reported naming the flag, or the variable it came from, before
    anything is set up (``parser.env_errors`` lists the variables' problems).
    """
    defaults = Settings()
    p = argparse.ArgumentParser(
        prog="snekbox.py", description="Run untrusted Python code in nsjail, over HTTP.",
        epilog="Each flag can also be set by the environment variable in brackets. The "
               "time, memory and process limits of each evaluation are in the jail config "
               "(snekbox.cfg: time_limit, cgroup_mem_max, cgroup_pids_max, "
               "cgroup_cpu_ms_per_sec).")
    p.env_errors = []   # type: ignore[attr-defined]
    for flag, help, low, high in FLAGS:
        name = flag[2:].replace("-", "_")
        default = getattr(defaults, name)
        env = "SNEKBOX_" + name.upper()
        convert = str if default is None or isinstance(default, str) else \
            _flag_type(type(default), low, high)
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except argparse.ArgumentTypeError as e:
                p.env_errors.append(f"{env}: {e}")  # type: ignore[attr-defined]
        p.add_argument(flag, type=convert, default=default, help=f"{help} [{env}]")
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line (and environment) into Settings; exit 2 on bad values."""
    parser = build_arg_parser()
    if parser.env_errors:   # type: ignore[attr-defined]
        parser.error("; ".join(parser.env_errors))   # type: ignore[attr-defined]
    ns = parser.parse_args(argv)
    if ns.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR")
    return Settings(**{**vars(ns), "log_level": ns.log_level.upper()})


def self_test(sandbox: Sandbox) -> None:
    """Run one tiny evaluation; raise SetupError saying what failed."""
    failed = f"the self-test evaluation with {sandbox.config.path} failed"
    try:
        result = sandbox.run(["-c", "print('ok')"])
    except (SandboxUnavailable, InvalidRequest) as e:
        raise SetupError(f"{failed}: {e}") from e
    if result.returncode != 0 or result.stdout != "ok\n":
        raise SetupError(f"{failed}: "
                         f"{result.error or result.stdout.strip() or result.returncode}")


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (compiling this file left megabytes)."""
    gc.collect()
    trim = getattr(_libc, "malloc_trim", None)     # glibc only
    if trim is not None:
        trim(0)


def sandbox_for(settings: Settings) -> Sandbox:
    """The Sandbox that runs the server's evaluations, as ``settings`` say."""
    return Sandbox(settings.config, settings.nsjail,
                   max_output_size=settings.max_output_size,
                   memfs_size=settings.memfs_size, files_limit=settings.files_limit,
                   files_timeout=settings.files_timeout, user_base=settings.user_base,
                   prewarm=settings.prewarm, jail_uid_base=settings.jail_uid_base)


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets, from now on."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def wait_for(stop: threading.Event) -> None:
    """Wait for ``stop``; further stop signals are ignored after it."""
    # A signal that lands on another thread only flags the main one, which acts on it
    # when it next runs: so wake up now and then instead of sleeping on the event.
    while not stop.wait(0.5):
        pass
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)    # already stopping; bounded by the time limit


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server; return the exit status (0 after SIGTERM or SIGINT)."""
    settings = settings_from_args(argv)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level != "DEBUG":
        nsjail_log.setLevel(logging.WARNING)    # nsjail's INFO: a dozen lines per run
    try:
        sandbox = sandbox_for(settings)
    except (SetupError, OSError) as e:
        log.critical("%s", e)
        return 1
    try:
        server = SnekboxServer(settings, sandbox)
    except OSError as e:
        log.critical("cannot listen on %s:%s: %s", settings.host, settings.port, e.strerror)
        sandbox.close()
        return 1

    stop = stop_on_signals()
    # Serve while the self-test runs, so that the first requests need not wait for it;
    # /health answers 503 until it has passed, and a failure stops everything.
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    try:
        self_test(sandbox)
    except SetupError as e:
        log.critical("%s", e)
        stop_server(server, sandbox)
        return 1
    server.ready = True
    release_free_memory()
    host, port = server.server_address[:2]
    log.info("snekbox listening on http://%s:%d with %d worker%s (nsjail %s, cgroup v%d)",
             f"[{host}]" if ":" in host else host, port, settings.workers,
             "" if settings.workers == 1 else "s", sandbox.nsjail, sandbox.cgroups.version)
    wait_for(stop)
    log.info("stopping: finishing running evaluations")
    stop_server(server, sandbox)
    log.info("stopped")
    return 0


def stop_server(server: SnekboxServer, sandbox: Sandbox) -> None:
    """Refuse new work, let running evaluations finish, then close everything."""
    server.stopping = True
    server.slots.close()
    server.shutdown()
    if not server.slots.wait_idle(sandbox.time_limit + 2 * KILL_GRACE):
        log.warning("evaluations still running at exit")
    server.server_close()
    sandbox.close()


if __name__ == "__main__":
    sys.exit(main())
