#!/usr/bin/env python3
"""snekbox: run untrusted Python code in an nsjail sandbox, over HTTP.

A client POSTs code; snekbox runs it with the system's Python inside an nsjail jail
(no network, read-only system files, a small private writable /home, limits on time,
memory and processes) and answers with the output and the return code. One module,
standard library only; the jail policy is the nsjail config ``snekbox.cfg``.

Run the server (as root, with nsjail installed; see README.md)::

    python3 snekbox.py [--host 127.0.0.1] [--port 8060] [--workers N] ...
    python3 snekbox.py --help
    python3 snekbox.py --version

The HTTP API, compatible with python-discord/snekbox:

``POST /eval`` with a JSON object:

    input            code; runs as ``python3 -c <input>`` (appended to ``args``)
    args             interpreter arguments, e.g. ["-m", "timeit", "1+1"] (default ["-c"]
                     when ``input`` is given); at least one of input and args is required
    stdin            text fed to the process's standard input (default: empty)
    files            [{"path": "relative/path", "content": "<base64>"}] written to /home
    executable_path  another interpreter inside the jail instead of the config's
    limits           {"time": s, "memory": bytes, "processes": n, "output": bytes}, each
                     optional and at most the server's own
    stderr           true: standard error apart from standard output

and answers 200 with::

    {"stdout": "<stdout and stderr>", "returncode": 0, "timed_out": false,
     "truncated": false, "duration": 0.02, "error": null, "status": "ok",
     "usage": {"wall": 0.01, "cpu": 0.01, "memory": 9437184}, "files": [{"path",
     "size", "content"}]}

``returncode`` is the exit status, 128+N after signal N, or null when the jail could not
start the process (``error`` says why). ``status`` says in one word how the run ended:
ok, error, signal, timeout, memory, output, cancelled or failed. ``usage`` gives the
program's wall and CPU seconds and its peak memory. With ``"stderr": true`` the answer
also has ``stderr``. ``files`` holds the files the code created or changed in /home;
``warnings`` lists request fields that had no effect. Errors are ``{"title": ...,
"description": ...}`` with a 4xx status, or 503 when the server can't take the work.
Every answer carries an ``X-Request-Id`` (the client's, when it sends a sane one).
With ``Accept: application/x-ndjson`` the answer streams: a JSON line per piece of
output as the jail produces it (``{"stdout": ...}``, or ``{"stderr": ...}``), then the
answer above as the last line.

``GET /health`` answers 200 with the service's state while it takes requests;
``GET /info`` tells the version, the interpreters and packages in the jail and the
limits; ``GET /metrics`` gives counters in the Prometheus text format; and
``GET /openapi.json`` describes all of it. With ``--token-file``, ``/eval`` and ``/info``
need ``Authorization: Bearer <token>`` (SIGHUP reads the file again).

Each evaluation gets a fresh jail. ``--prewarm N`` keeps N of them started ahead of time,
their interpreter waiting, so that a request starts in milliseconds; it runs exactly as
in a jail started for it.

One evaluation from the command line, without a server (the program's output and
exit status pass through)::

    python3 snekbox.py [FLAGS] run FILE.py [ARGS...]
    python3 snekbox.py [FLAGS] eval CODE [ARGS...]

As a library, without a server::

    from snekbox import Sandbox
    result = Sandbox().run(["-c", "print(1 + 1)"])
    print(result.returncode, result.stdout)

The chapters of this file, in order:

    Vocabulary      constants, errors and the records everything else passes around
    Jail policy     reading snekbox.cfg
    Host            nsjail, cgroups, tmpfs mounts, host users, clean-up after a crash
    /home           the uploads going in and the files coming out
    The jail        one nsjail process, the exchange of bytes with it while it runs,
                    and the tap that passes its output on meanwhile
    Warm jails      jails started ahead of time, and their pool
    Sandbox         the façade: one evaluation from arguments to result
    HTTP            request parsing, worker slots, metrics, tokens, /info and the
                    OpenAPI document, the server and its handler
    Command line    Settings, the flags that fill them, logging, signals, one evaluation,
                    and main
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import ctypes
import errno
import gc
import io
import itertools
import marshal
import json
import logging
import math
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
    sys.modules.setdefault("ssl", None)     # type: ignore[arg-type]

import threading
import time
import weakref
import http.client
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterable, Iterator, Sequence
import email.parser
from email.message import Message
from typing import Any, NamedTuple

__version__ = "1.0.0"     # the one place it is set: --version, /health, /info, /metrics

__all__ = [
    "__version__", "Sandbox", "EvalResult", "File", "Limits", "Usage", "JailConfig",
    "InvalidRequest", "SandboxUnavailable", "parse_eval_request", "EvalRequest", "main",
    "OutputTap", "OutputRelay",
]

log = logging.getLogger("snekbox")
nsjail_log = logging.getLogger("snekbox.nsjail")

# --------------------------------------------------------------------------------------
# Vocabulary: constants, errors, records
# --------------------------------------------------------------------------------------

MiB = 1024 * 1024
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snekbox.cfg")
DEFAULT_MEMFS_BASE = "/run/snekbox"   # each Sandbox has a folder of its own in it
NSJAIL_PLACES = ("/usr/sbin/nsjail", "/usr/local/sbin/nsjail", "/usr/bin/nsjail",
                 "/usr/local/bin/nsjail", "/sbin/nsjail", "/bin/nsjail")

# The defaults of the limits that the server's flags, Sandbox and request parsing share.
DEFAULT_OUTPUT_SIZE = 1_000_000         # bytes of output kept
DEFAULT_MEMFS_SIZE = 48 * MiB           # bytes of each evaluation's /home
DEFAULT_FILES_LIMIT = 100               # files sent in or returned
DEFAULT_FILES_TIMEOUT = 5.0             # seconds for writing or collecting them

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
# nsjail itself runs in its jail's cgroup (so nothing the jail does escapes it): its own
# memory and the kernel's for the namespaces come on top of the program's limit.
NSJAIL_MEMORY = 8 * MiB

# The titles python-discord/snekbox gives these errors; its clients may show them.
DATA_INVALID = "Request data failed validation"
FILE_INVALID = "Request file is invalid"


class InvalidRequest(ValueError):
    """The evaluation or HTTP request can't be done as asked (the client's fault).

    ``status`` is the HTTP status (4xx), ``title`` a short name of the problem (the
    message says it in full), ``headers`` any the answer must carry.
    """

    def __init__(self, status: int, message: str, title: str = DATA_INVALID,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.title = title
        self.headers = headers or {}

    @classmethod
    def http(cls, status: int, message: str,
             headers: dict[str, str] | None = None) -> InvalidRequest:
        """An error of the HTTP exchange itself, titled with the status's phrase."""
        return cls(status, message, HTTPStatus(status).phrase, headers)


class SandboxUnavailable(RuntimeError):
    """The jail can't be started right now (the host's fault, not the request's)."""


class SetupError(Exception):
    """The host can't run jails as configured; the message says what to do."""


class Busy(Exception):
    """No worker slot could be had; the message says which limit was hit, ``cause`` names
    it in a word (queue_full, max_wait, stopping, client_gone) for the metrics."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


# The records are named tuples rather than dataclasses: the dataclasses module imports
# inspect, which costs the server 2 MiB and 6 ms.

class File(NamedTuple):
    """A file going into the jail's /home or coming out of it: a path relative to /home
    and the content."""

    path: str
    content: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": len(self.content),
                "content": base64.b64encode(self.content).decode("ascii")}


class Limits(NamedTuple):
    """The limits of one evaluation: wall seconds, bytes of memory, processes, bytes of
    output (0 for memory or processes: none)."""

    time: float
    memory: int
    processes: int
    output: int

    def lowered(self, asked: dict[str, float]) -> Limits:
        """These limits with the ones in ``asked`` (checked to be at most these)."""
        return self._replace(**asked)     # type: ignore[arg-type]


class Usage(NamedTuple):
    """What a run used: wall seconds from the hand-over to the program's end, CPU
    seconds and peak bytes of memory of its jail (None where the host can't tell)."""

    wall: float
    cpu: float | None
    memory: int | None

    def to_json(self) -> dict[str, Any]:
        return {"wall": round(self.wall, 4),
                "cpu": None if self.cpu is None else round(self.cpu, 4),
                "memory": self.memory}


class EvalResult(NamedTuple):
    """The outcome of one evaluation; ``to_json`` gives the HTTP answer's fields.

    ``status`` is one of STATUSES; ``stderr`` is None unless it was asked for apart
    from ``stdout``; ``warm`` says whether a warm jail ran it.
    """

    stdout: str
    returncode: int | None
    files: list[File] = []
    timed_out: bool = False
    truncated: bool = False
    duration: float = 0.0
    error: str | None = None
    status: str = "ok"
    usage: Usage | None = None
    stderr: str | None = None
    warm: bool = False

    def to_json(self, files: bool = True) -> dict[str, Any]:
        """The HTTP answer's fields (without ``files``: the others only)."""
        data: dict[str, Any] = {"stdout": self.stdout}
        if self.stderr is not None:
            data["stderr"] = self.stderr
        data.update(returncode=self.returncode, timed_out=self.timed_out,
                    truncated=self.truncated, duration=round(self.duration, 4),
                    error=self.error, status=self.status,
                    usage=self.usage.to_json() if self.usage else None)
        if files:
            data["files"] = [f.to_json() for f in self.files]
        return data


# How a run ended, most telling first: the first that applies is its status.
STATUSES = ("failed", "cancelled", "timeout", "output", "memory", "signal", "error", "ok")


class EvalRequest(NamedTuple):
    """A validated ``POST /eval`` body: interpreter arguments, stdin bytes, Files to
    upload, the interpreter to use (None: the config's), the limits asked for, whether
    stderr comes apart, and the fields that were ignored."""

    args: list[str]
    stdin: bytes
    files: list[File]
    executable_path: str | None
    limits: dict[str, float] = {}
    stderr: bool = False
    ignored: list[str] = []


# --------------------------------------------------------------------------------------
# Jail policy: reading snekbox.cfg
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
    def replace(match: re.Match[str]) -> str:
        code = match[1]
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code[0].isdigit():
            return chr(int(code, 8))
        return _ESCAPES.get(code, code)
    return _ESCAPE.sub(replace, literal[1:-1])


Token = tuple[str, str, int]      # kind, text, line
TextprotoValue = Any                # a str, or a nested dict of field: [values]


def parse_textproto(text: str) -> dict[str, list[TextprotoValue]]:
    """Parse protobuf text format into ``{field: [values]}``, nested messages as dicts.

    Scalars stay strings (quoted strings unescaped, other words as written); the caller
    knows each field's type. Enough for nsjail configs; raises ValueError on bad syntax.
    """
    fields, _ = _message(_tokenize(text), 0, "")
    return fields


def _tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"line {line}: unexpected {text[pos]!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup or "", match[0], line))
        line += match[0].count("\n")
        pos = match.end()
    tokens.append(("end", "", line))
    return tokens


def _message(tokens: list[Token], i: int,
             closing: str) -> tuple[dict[str, list[TextprotoValue]], int]:
    """The fields from ``tokens[i]`` up to ``closing`` (the end: ""), and the index
    after it."""
    fields: dict[str, list[TextprotoValue]] = {}
    while True:
        kind, name, where = tokens[i]
        if (kind == "symbol" and name == closing) or (kind == "end" and not closing):
            return fields, i + 1
        if kind != "word":
            raise ValueError(f"line {where}: expected a field name, found {name!r}")
        i += 2 if tokens[i + 1][1] == ":" else 1
        item, i = _value(tokens, i, name)
        fields.setdefault(name, []).append(item)
        if tokens[i][1] in (";", ","):
            i += 1


def _value(tokens: list[Token], i: int, name: str) -> tuple[TextprotoValue, int]:
    """The value of field ``name`` at ``tokens[i]``, and the index after it."""
    kind, value, where = tokens[i]
    if value in ("{", "<"):
        return _message(tokens, i + 1, "}" if value == "{" else ">")
    if kind == "word":
        return value, i + 1
    if kind != "string":
        raise ValueError(f"line {where}: expected a value for {name!r}")
    item = ""
    while tokens[i][0] == "string":      # adjacent literals concatenate
        item += _unescape(tokens[i][1])
        i += 1
    return item, i


class Mount(NamedTuple):
    """One ``mount`` entry of the config (only what snekbox needs to know)."""

    src: str
    dst: str
    is_bind: bool
    mandatory: bool


class JailConfig(NamedTuple):
    """The values of an nsjail config that snekbox itself uses (cgroup limits in bytes
    and counts, as nsjail takes them)."""

    path: str
    time_limit: int
    exec_path: str
    exec_args: tuple[str, ...]
    mounts: tuple[Mount, ...]
    mem_max: int
    mem_swap_max: int
    mem_memsw_max: int
    mem_mount: str
    mem_parent: str
    pids_max: int
    pids_mount: str
    pids_parent: str
    cpu_ms_per_sec: int
    cpu_mount: str
    cpu_parent: str
    cgroupv2_mount: str

    @classmethod
    def from_file(cls, path: str) -> JailConfig:
        """Read the config at ``path``; OSError if unreadable, ValueError if invalid."""
        with open(path, encoding="utf-8") as f:
            fields = parse_textproto(f.read())

        def scalar(name: str, default: str) -> str:
            values = fields.get(name, [default])
            if isinstance(values[-1], dict):
                raise ValueError(f"{name} must be a value, not a message")
            return str(values[-1])

        def number(name: str, default: int) -> int:
            try:
                return int(scalar(name, str(default)), 0)
            except ValueError:
                raise ValueError(f"{name} must be a number") from None

        def flag(entry: dict[str, list[str]], name: str, default: bool) -> bool:
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
# Host: nsjail, cgroups, tmpfs mounts, host users, clean-up after a crash
# --------------------------------------------------------------------------------------

def find_nsjail(explicit: str | None = None) -> str | None:
    """``explicit`` if given, else nsjail on PATH or in the usual sbin/bin places."""
    if explicit:
        return explicit
    on_path = tuple(os.path.join(folder, "nsjail") for folder in os.get_exec_path())
    return next((p for p in on_path + NSJAIL_PLACES
                 if os.path.isfile(p) and os.access(p, os.X_OK)), None)


_PYTHON_NAME = re.compile(r"python(?:[0-9]+(?:\.[0-9]+)?)?")
MAX_INTERPRETER_SEARCH = 20_000     # folder entries looked at for interpreters, at most


VERSION_ARGS = ("-I", "-S", "-c", "import sys; print(*sys.version_info[:3])")


def parse_version(text: str) -> tuple[int, ...] | None:
    """(X, Y, Z) from what VERSION_ARGS print; None for anything else."""
    parts = text.split()
    return tuple(map(int, parts)) if len(parts) == 3 and all(map(str.isdigit, parts)) \
        else None


def python_version(python: str) -> tuple[int, ...] | None:
    """The version of the config's interpreter at host path ``python`` (the one every
    jail runs), None if it won't say. It runs as the jail's user, never as root, and
    whatever it leaves in its session is killed."""
    try:
        proc = subprocess.Popen([python, *VERSION_ARGS], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                text=True, env={}, cwd="/", user=JAIL_UID, group=JAIL_UID,
                                extra_groups=[], start_new_session=True)
    except OSError:
        return None
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        out = ""
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return parse_version(out)


def _interpreters_in(mount: Mount, budget: list[int]) -> Iterable[str]:
    """The jail paths of the interpreters that ``mount`` brings: the mounted file if it
    is one, else the python* files of ``bin`` folders within three levels of it."""
    src, dst = posixpath.normpath(mount.src), posixpath.normpath(mount.dst)
    if os.path.isfile(src):
        if _PYTHON_NAME.fullmatch(posixpath.basename(dst)):
            yield dst
        return
    for folder, subfolders, files in os.walk(src):
        depth = folder[len(src):].count("/")
        budget[0] -= len(subfolders) + len(files)
        subfolders.sort()   # the same order on every file system
        if depth >= 3 or budget[0] < 0:
            subfolders.clear()
        if posixpath.basename(folder) == "bin":
            jail_folder = posixpath.join(dst, folder[len(src):].lstrip("/"))
            yield from (posixpath.join(jail_folder, name) for name in sorted(files)
                        if _PYTHON_NAME.fullmatch(name))


def find_interpreters(config: JailConfig) -> list[tuple[str, str]]:
    """The interpreters an ``executable_path`` may name (the config's own first): the
    executable python* files that the config's bind mounts bring, each as its jail path
    and the real host file behind it."""
    found = {config.exec_path: None}
    budget = [MAX_INTERPRETER_SEARCH]
    for mount in config.mounts:
        if mount.is_bind and os.path.exists(mount.src):
            found.update(dict.fromkeys(_interpreters_in(mount, budget)))
    interpreters = []
    for path in found:
        host = config.host_path(path)
        if host is not None and os.path.isfile(host) and os.stat(host).st_mode & 0o001:
            interpreters.append((path, os.path.realpath(host)))
    return interpreters


def installed_packages(user_base: str | None) -> list[dict[str, str]]:
    """The distributions in ``user_base`` (name, version and the Python they are for),
    read from their ``*.dist-info/METADATA``."""
    packages = []
    lib = os.path.join(user_base or "", "lib")
    for python in sorted(os.listdir(lib)) if user_base and os.path.isdir(lib) else ():
        site = os.path.join(lib, python, "site-packages")
        for entry in sorted(os.listdir(site)) if os.path.isdir(site) else ():
            if entry.endswith(".dist-info"):
                metadata = _metadata(os.path.join(site, entry, "METADATA"))
                if metadata.get("Name"):
                    packages.append({"name": metadata["Name"],
                                     "version": metadata.get("Version", ""),
                                     "python": python.removeprefix("python")})
    return packages


def _metadata(path: str) -> Message:
    """The headers of a METADATA file (its first 64 KiB; an empty Message if unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024).split(b"\n\n", 1)[0]
    except OSError:
        return Message()
    return email.parser.BytesHeaderParser().parsebytes(head)


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


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read_field(path: str, name: str) -> int | None:
    """The number after ``name`` in a flat-keyed cgroup file, None if it has none."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def _read_number(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


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


class JailCgroup:
    """The cgroup of one jail: a folder per hierarchy (one on v2). nsjail is started in
    it (``enter_fds`` are written to from the child), so the jail, its processes and
    nsjail's own set-up for it are all inside; ``usage`` and ``oom_kills`` read what
    they used after the run, ``remove`` deletes it."""

    def __init__(self, version: int, folders: dict[str, str]):
        self.version = version
        self.folders = folders      # controller (v1) or "unified" (v2) -> folder

    def limit(self, limits: Limits, swap: int | None) -> None:
        """Set (or lower) the memory, process and swap limits; ``swap`` is the swap
        the jail may use on top of its memory (None: not limited)."""
        memory = limits.memory + NSJAIL_MEMORY if limits.memory else 0
        processes = limits.processes + 1 if limits.processes else 0     # nsjail itself
        if self.version == 1:
            if memory:
                self._set("memory", "memory.limit_in_bytes", str(memory))
                if swap is not None:
                    self._set("memory", "memory.memsw.limit_in_bytes", str(memory + swap))
            if processes:
                self._set("pids", "pids.max", str(processes))
        else:
            if memory:
                self._set("unified", "memory.max", str(memory))
                if swap is not None:
                    self._set("unified", "memory.swap.max", str(swap))
            if processes:
                self._set("unified", "pids.max", str(processes))

    def limit_cpu(self, ms_per_sec: int) -> None:
        """Let the jail use ``ms_per_sec`` ms of CPU time each second, over all CPUs."""
        if self.version == 1:
            self._set("cpu", "cpu.cfs_period_us", "1000000")
            self._set("cpu", "cpu.cfs_quota_us", str(ms_per_sec * 1000))
        else:
            self._set("unified", "cpu.max", f"{ms_per_sec * 1000} 1000000")

    def _set(self, controller: str, name: str, value: str) -> None:
        _write(os.path.join(self.folders[controller], name), value)

    def procs_files(self) -> list[str]:
        """The group's process lists, one per hierarchy (one on v2)."""
        return [os.path.join(folder, "cgroup.procs")
                for folder in dict.fromkeys(self.folders.values())]

    def usage(self) -> tuple[float | None, int | None]:
        """CPU seconds and peak bytes of memory used in the group so far."""
        if self.version == 1:
            cpu_ns = _read_number(os.path.join(self.folders.get("cpuacct", ""), "cpuacct.usage"))
            peak = _read_number(os.path.join(self.folders.get("memory", ""),
                                             "memory.max_usage_in_bytes"))
            return (None if cpu_ns is None else cpu_ns / 1e9), peak
        folder = self.folders["unified"]
        cpu_us = _read_field(os.path.join(folder, "cpu.stat"), "usage_usec")
        return (None if cpu_us is None else cpu_us / 1e6), \
            _read_number(os.path.join(folder, "memory.peak"))

    def oom_kills(self) -> int:
        """Processes the group's memory limit has killed."""
        if self.version == 1:
            path = os.path.join(self.folders.get("memory", ""), "memory.oom_control")
        else:
            path = os.path.join(self.folders["unified"], "memory.events")
        return _read_field(path, "oom_kill") or 0

    def remove(self) -> None:
        """Delete the group; its last processes may take a moment to leave it."""
        for folder in dict.fromkeys(self.folders.values()):
            for _ in range(200):
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        log.warning("cannot remove the jail's cgroup %s: %s", folder, e.strerror)
                        break
                    time.sleep(0.005)
            else:
                log.warning("the jail's cgroup %s still has processes; left for the next "
                            "start to remove", folder)


def _another_live_server(group: str) -> bool:
    """Whether ``group`` (snekbox-jail-<server pid>-<n>) is a live server's other than
    this one: it makes the group just before it starts nsjail in it."""
    pid = group.split("-")[2] if group.startswith("snekbox-jail-") else ""
    return pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))


# Starts a command inside cgroups without forking the server (a preexec function makes
# subprocess fork() a process of tens of MiB, holding the GIL, where it could vfork()):
# sh writes itself into each process list given before "--", then becomes the command.
_JOIN_CGROUPS = ('while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; '
                 'shift; exec "$@"')
JOIN_FAILED = 125       # the exit status when sh could not join a group


def in_cgroup(group: JailCgroup, command: list[str]) -> list[str]:
    """``command``, to be started in ``group`` (nothing of it runs outside)."""
    return ["/bin/sh", "-c", _JOIN_CGROUPS, "snekbox-join", *group.procs_files(), "--",
            *command]


class JailCgroups:
    """Where and how each jail gets a cgroup of its own, as ``prepare_cgroups`` found.

    snekbox makes the groups itself and starts nsjail inside (nsjail is told to make
    none): so it can read what a jail used and whether its memory limit killed it, lower
    limits per evaluation, and keep its jails inside its own part of the hierarchy.
    """

    def __init__(self, version: int, parents: dict[str, str], config: JailConfig,
                 swap: int | None):
        self.version = version
        self.parents = parents      # controller (v1) or "unified" (v2) -> parent folder
        self.cpu_ms_per_sec = config.cpu_ms_per_sec
        self.swap = swap
        self.swap_limited = swap is not None
        # nsjail must not make groups of its own: snekbox's hold it.
        self.nsjail_args = ("--cgroup_mem_max", "0", "--cgroup_pids_max", "0",
                            "--cgroup_cpu_ms_per_sec", "0", "--cgroup_mem_memsw_max", "0",
                            "--cgroup_mem_swap_max", "-1")

    def create(self, name: str, limits: Limits) -> JailCgroup:
        """A new group called ``name`` with ``limits``; OSError if it can't be made."""
        group = JailCgroup(self.version, {controller: os.path.join(parent, name)
                                          for controller, parent in self.parents.items()})
        made = []
        try:
            for folder in dict.fromkeys(group.folders.values()):
                os.mkdir(folder)
                made.append(folder)
            group.limit(limits, self.swap)
            if self.cpu_ms_per_sec:
                group.limit_cpu(self.cpu_ms_per_sec)
        except OSError:
            for folder in made:
                os.rmdir(folder)
            raise
        return group

    def remove_stale(self) -> int:
        """Remove the empty groups of jails under the parents (a crashed server's, or an
        older nsjail's); return how many. A group is stale when no process is in it (the
        pid in an NSJAIL.<pid> name is nsjail's in a namespace of its own, maybe) and no
        other live server of this pid namespace may be about to start its jail in it."""
        removed = 0
        for parent in dict.fromkeys(self.parents.values()):
            try:
                entries = [e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for entry in entries:
                if not entry.name.startswith(("snekbox-jail-", "NSJAIL.")) or \
                        _another_live_server(entry.name):
                    continue
                try:
                    if not _read_words(os.path.join(entry.path, "cgroup.procs")):
                        os.rmdir(entry.path)
                        removed += 1
                except OSError:
                    pass
        return removed


def prepare_cgroups(cfg: JailConfig, root: str = CGROUP_ROOT, swaps: str = "/proc/swaps",
                    self_cgroup: str = "/proc/self/cgroup") -> JailCgroups:
    """Make the parent groups of the jails' cgroups for ``cfg``.

    cgroup v1: the config's parent group in each hierarchy it limits (and cpuacct's, to
    read the CPU time). cgroup v2: ``jails`` below the group this process runs in
    (``self_cgroup`` says which; under systemd, the service's, which Delegate=yes hands
    over), so that
    limits on the service bound its jails too; the processes of that group move into a
    child first, as a group with processes can't hand controllers down. Without a swap
    controller the jail's swap is not limited; without a cpu controller (some containers
    don't delegate it) neither is its CPU time: each with a warning.
    """
    wants_swap_limit = cfg.mem_max > 0 and (cfg.mem_swap_max >= 0 or cfg.mem_memsw_max > 0)
    if cgroup_version(root) == 1:
        version = 1
        cfg = _without_missing_cpu_controller(cfg, os.path.isdir(cfg.cpu_mount))
        parents = _v1_parents(cfg)
        has_swap = os.path.exists(os.path.join(cfg.mem_mount, "memory.memsw.limit_in_bytes"))
    else:
        version = 2
        here = snekbox_cgroup(root, self_cgroup)
        cfg = _without_missing_cpu_controller(
            cfg, "cpu" in _read_words(os.path.join(here, "cgroup.controllers")))
        parents = {"unified": _v2_parent(cfg, here)}
        has_swap = os.path.exists(os.path.join(parents["unified"], "memory.swap.max"))
    if wants_swap_limit and not has_swap:
        log.warning("this kernel has no swap controller for cgroups: the jail's memory "
                    "limit cannot cover swap")
    swap = None
    if wants_swap_limit and has_swap:
        swap = max(cfg.mem_memsw_max - cfg.mem_max, 0) if cfg.mem_memsw_max > 0 \
            else cfg.mem_swap_max
    elif swap_enabled(swaps):
        log.warning("swap is on and the jail's memory limit does not cover it: jailed code "
                    "may use swap beyond the limit (turn swap off, or enable swap accounting)")
    return JailCgroups(version, parents, cfg, swap)


def _without_missing_cpu_controller(cfg: JailConfig, present: bool) -> JailConfig:
    """``cfg``, without its CPU limit where the host has no cpu controller for jails."""
    if not cfg.cpu_ms_per_sec or present:
        return cfg
    log.warning("this host has no cpu cgroup controller for the jails: their CPU use is not "
                "limited (cgroup_cpu_ms_per_sec)")
    return cfg._replace(cpu_ms_per_sec=0)


def _v1_parents(cfg: JailConfig) -> dict[str, str]:
    """The parent group of each v1 hierarchy the jails use, made where missing."""
    used = [(cfg.mem_max > 0, cfg.mem_mount, cfg.mem_parent, "memory"),
            (cfg.pids_max > 0, cfg.pids_mount, cfg.pids_parent, "pids"),
            (cfg.cpu_ms_per_sec > 0, cfg.cpu_mount, cfg.cpu_parent, "cpu"),
            (False, os.path.join(os.path.dirname(cfg.cpu_mount), "cpuacct"), cfg.cpu_parent,
             "cpuacct")]
    parents = {}
    for required, mount, parent, name in used:
        if not os.path.isdir(mount):
            if required:
                raise SetupError(f"the cgroup v1 {name} controller is not mounted at {mount}")
            continue    # used only to read what the jails used
        parents[name] = os.path.realpath(os.path.join(mount, parent))
        _make_cgroup(parents[name])
    return parents


def _v2_parent(cfg: JailConfig, here: str) -> str:
    """``jails`` below ``here``, with the controllers the jails need enabled."""
    needed = ["memory", "pids"] + (["cpu"] if cfg.cpu_ms_per_sec else [])
    missing = [c for c in needed if c not in _read_words(os.path.join(here, "cgroup.controllers"))]
    if missing:
        raise SetupError(f"cgroup v2 controllers not available in {here}: {' '.join(missing)}"
                         " (under systemd, give the service Delegate=yes: see README)")
    _warn_if_not_delegated(here)
    _enable_v2_controllers(here, needed)
    parent = os.path.join(here, JAILS_CGROUP)
    _make_cgroup(parent)
    _enable_v2_controllers(parent, needed)
    return parent


def _enable_v2_controllers(group: str, needed: list[str]) -> None:
    control = os.path.join(group, "cgroup.subtree_control")
    if all(c in _read_words(control) for c in needed):
        return
    request = " ".join("+" + c for c in needed)
    try:
        _write(control, request)
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise _no_cgroup_rights(control, e) from e
    # Processes in this group: move them into a child, then try again.
    init = os.path.join(group, INIT_CGROUP)
    _make_cgroup(init)
    for pid in _read_words(os.path.join(group, "cgroup.procs")):
        try:
            _write(os.path.join(init, "cgroup.procs"), pid)
        except OSError:
            pass    # kernel threads and exited processes can't move; that's fine
    try:
        _write(control, request)
    except OSError as e:
        raise _no_cgroup_rights(control, e) from e


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
SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)


def tied_to_thread(command: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """``command`` and a preexec function (None: none is needed) that make it get
    SIGTERM when the thread that starts it ends, the server's death included: util-linux's
    setpriv where there is one, else a prctl in the forked child."""
    if SETPRIV:
        return [SETPRIV, "--pdeathsig", "TERM", "--", *command], None
    parent = os.getpid()
    return command, lambda: _end_with_parent_thread(parent)


def _end_with_parent_thread(parent: int) -> None:
    # Runs in the child between fork and exec: SIGTERM when the thread that started it
    # ends, the server's death included. A parent gone already: stop here.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


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


# --------------------------------------------------------------------------------------
# /home: the uploads going in and the files coming out
# --------------------------------------------------------------------------------------

def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _keep_first(kept: list[tuple[str, os.stat_result]], item: tuple[str, os.stat_result],
                limit: int) -> None:
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


class _Walk:
    """What a walk through /home keeps: the first ``limit`` files (sorted by path) that
    differ from those ``uploaded``, and how many there were; the problems it met."""

    def __init__(self, uploaded: dict[str, tuple[int, int]], limit: int, problems: list[str]):
        self.uploaded, self.limit, self.problems = uploaded, limit, problems
        self.kept: list[tuple[str, os.stat_result]] = []
        self.written = self.looked_into = 0

    def look_at(self, entry: os.DirEntry[str], relative: str,
                depth: int) -> list[tuple[str, str, int]]:
        """Keep ``entry`` if it is a file to return; the folder to look into if it is one."""
        path = f"{relative}/{entry.name}" if relative else entry.name
        if entry.name.startswith((".", "_")):
            return []    # hidden, or private as in python-discord/snekbox
        if not _is_utf8(path):
            self.problems.append("a file name is not valid UTF-8 and was skipped")
        elif entry.is_dir(follow_symlinks=False):
            return self._folder(path, entry.path, depth + 1)
        elif entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            if self.uploaded.get(path) != (st.st_ino, st.st_ctime_ns):
                self.written += 1
                _keep_first(self.kept, (path, st), self.limit)
        return []

    def _folder(self, path: str, folder: str, depth: int) -> list[tuple[str, str, int]]:
        if depth >= MAX_FILE_DEPTH:
            self.problems.append(f"folders deeper than {MAX_FILE_DEPTH} were skipped")
        elif self.looked_into >= MAX_OUTPUT_FOLDERS:
            self.problems.append(f"only {MAX_OUTPUT_FOLDERS} folders were looked into")
        else:
            self.looked_into += 1
            return [(path, folder, depth)]
        return []


class MemFS:
    """A tmpfs of its own for one evaluation, owned by the jail's host user ``uid``:
    ``mount`` it, ``write_files`` into it, ``collect_files`` after the run (those it
    wrote and the run left alone are not collected), ``remove`` it. As a context
    manager, it is mounted for the block."""

    def __init__(self, root: str, name: str, size: int, uid: int = JAIL_UID):
        self.path = os.path.join(root, name)
        self.size = size
        self.uid = uid
        self._written: dict[str, tuple[int, int]] = {}     # path: (inode, ctime)

    def __enter__(self) -> MemFS:
        self.mount()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

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

    def write_files(self, files: Sequence[File], limit: int = DEFAULT_FILES_LIMIT,
                    timeout: float = DEFAULT_FILES_TIMEOUT) -> None:
        """Write the uploads (checked with ``check_files`` first) for the jail's user.

        Raises InvalidRequest naming the file when one can't be written, or when writing
        takes over ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
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
            self._written[upload.path] = (st.st_ino, st.st_ctime_ns)

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

    def collect_files(self, limit: int = DEFAULT_FILES_LIMIT,
                      timeout: float = DEFAULT_FILES_TIMEOUT) -> tuple[list[File], str | None]:
        """The regular files that the run created or changed, sorted by path.

        Hidden and private paths (a part starting with "." or "_") and anything but
        regular files are skipped; symlinks are never followed. Bounded: ``limit``
        files, the tmpfs size in bytes (sparse files and hard links count their full
        size), ``timeout`` seconds, MAX_FILE_DEPTH folders deep and MAX_OUTPUT_FOLDERS
        folders. The walk holds no more than that, whatever the jail made. Returns the
        files and, when something could not be returned, why.
        """
        problems: list[str] = []
        written = self._first_written(limit, time.monotonic() + timeout, problems)
        if written is None:
            return [], f"listing the output files took over {timeout:g} s"
        return self._read_files(written, problems), "; ".join(dict.fromkeys(problems)) or None

    def _first_written(self, limit: int, deadline: float,
                       problems: list[str]) -> list[tuple[str, os.stat_result]] | None:
        """The first ``limit`` paths, sorted, of the regular files the run wrote, with
        their stat; None past ``deadline``. What is skipped goes to ``problems``."""
        walk = _Walk(self._written, limit, problems)
        folders = [("", self.path, 0)]
        while folders:
            relative, folder, depth = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if time.monotonic() > deadline:
                            return None
                        folders += walk.look_at(entry, relative, depth)
            except OSError as e:
                problems.append(f"cannot list {relative or '.'}: {e.strerror}")
        if walk.written > limit:
            problems.append(f"{walk.written} files were written; only the first {limit} "
                            "are returned")
        return walk.kept

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


# --------------------------------------------------------------------------------------
# The jail: one nsjail process, and the exchange of bytes with it while it runs
# --------------------------------------------------------------------------------------
class Host:
    """What the jails of one Sandbox use on this host: the cgroups, the folder of their
    tmpfs mounts (``memfs_root``, one per Sandbox) and the host users."""

    def __init__(self, cgroups: JailCgroups, memfs_root: str, memfs_size: int,
                 users: JailUsers):
        self.cgroups, self.memfs_root, self.memfs_size = cgroups, memfs_root, memfs_size
        self.users = users
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def cell(self, limits: Limits) -> Cell:
        """A new Cell with ``limits``; SandboxUnavailable if the host can't make one."""
        with self._lock:
            name = f"{os.getpid()}-{next(self._numbers)}"
        return Cell(self, name, limits)

    def release(self) -> None:
        """Remove every tmpfs left under ``memfs_root``, and the folder."""
        remove_memfs_folders([self.memfs_root])
        _live_memfs_folders.discard(self.memfs_root)


class Cell:
    """What one jail holds on the host, taken and given back together: a host user of
    its own, a tmpfs owned by it (its /home) and a cgroup with the jail's limits. A
    context manager; ``close`` it once the jail's nsjail has exited."""

    def __init__(self, host: Host, name: str, limits: Limits):
        self.host = host
        self.uid = host.users.take()
        self.memfs = MemFS(host.memfs_root, name, host.memfs_size, self.uid)
        try:
            self.memfs.mount()
        except OSError as e:
            host.users.give_back(self.uid)
            raise SandboxUnavailable(f"cannot create the evaluation's tmpfs: {e}") from e
        try:
            self.cgroup = host.cgroups.create(f"snekbox-jail-{name}", limits)
        except OSError as e:
            self.memfs.remove()
            host.users.give_back(self.uid)
            raise SandboxUnavailable(f"cannot create the jail's cgroup: {e}") from e

    def __enter__(self) -> Cell:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lower_limits(self, limits: Limits) -> bool:
        """Lower the cgroup's limits to ``limits``; False if the jail already uses more."""
        try:
            self.cgroup.limit(limits, self.host.cgroups.swap)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.cgroup.remove()
        self.memfs.remove()
        self.host.users.give_back(self.uid)


def prepare_host(config: JailConfig, memfs_base: str, memfs_size: int,
                 jail_uid_base: int) -> Host:
    """Cgroups, what a crashed server left, and a folder of its own for tmpfs mounts;
    SetupError saying what to add when the privileges for them are missing."""
    try:
        cgroups = prepare_cgroups(config)
        clean_up_after_crash(memfs_base, cgroups)
        with _sandbox_lock:
            folder = os.path.join(memfs_base, f"{os.getpid()}-{next(_sandbox_numbers)}")
        os.makedirs(folder, mode=0o711, exist_ok=True)
        probe = MemFS(folder, "probe", MiB)
        probe.mount()           # the first tmpfs fails here rather than in the self-test
        probe.remove()
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
            raise SetupError(f"{e}: snekbox lacks the privileges to create cgroups and "
                             "mounts; in a container, run it with --privileged (or the "
                             "capabilities the README lists under Docker)") from e
        raise
    _live_memfs_folders.add(folder)
    users = JailUsers(jail_uid_base) if jail_uid_base else JailUsers.random_block()
    limit_pending_signals()
    return Host(cgroups, folder, memfs_size, users)


def clean_up_after_crash(memfs_base: str, cgroups: JailCgroups) -> None:
    """Stop the jails of dead snekbox servers, remove their tmpfs mounts and the
    empty cgroups of jails."""
    stale = stale_memfs_folders(memfs_base)
    jails = kill_jails_using(stale)
    mounts = remove_memfs_folders(stale)
    groups = cgroups.remove_stale()
    if jails or mounts or groups:
        log.warning("cleaned up after an earlier crash: stopped %d jails, removed %d "
                    "tmpfs mounts and %d cgroups", jails, mounts, groups)


_sandbox_numbers = itertools.count(1)
_sandbox_lock = threading.Lock()


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


class NsjailCommand(NamedTuple):
    """How nsjail is called for a sandbox's jails: the binary, the config, the flags
    the host needs (its cgroups) and the read-only user base, if any."""

    nsjail: str
    config: JailConfig
    host_args: tuple[str, ...]
    user_base: str | None

    def line(self, home: str, uid: int, log_fd: int, args: Sequence[str], *,
             executable: str | None = None, pass_fds: Sequence[int] = (),
             time_limit: int | None = None) -> list[str]:
        """The command line of one jail (the benchmark spawns it bare).

        ``home`` is the host folder that becomes /home; ``uid`` the host user (and
        group) the jail's user is; ``log_fd`` the descriptor nsjail logs to;
        ``pass_fds`` those it passes on to the interpreter; ``time_limit`` replaces the
        config's.
        """
        command = [self.nsjail, "--config", self.config.path, *self.host_args,
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
        return command + ["--", executable or self.config.exec_path, *self.config.exec_args,
                          *args]


class JailProcess:
    """One nsjail process (or any command, in tests) with its pipes; single use.

    ``command_for`` makes the command line from the descriptor nsjail logs to. The
    process starts inside ``cgroup`` when given, and with ``tie_to_thread`` ends when the
    thread that started it does. ``stop`` asks nsjail to end the jail (SIGTERM lets it
    tidy up); ``finish`` waits for it, stopping and then killing it when it takes too
    long, and closes the pipes. As a context manager, it is finished at the end.
    """

    def __init__(self, command_for: Callable[[int], list[str]], *, stdin: bool = True,
                 split_stderr: bool = False, pass_fds: Sequence[int] = (),
                 cgroup: JailCgroup | None = None, tie_to_thread: bool = False):
        self.log_r, log_w = os.pipe()
        self._log_closed = False
        command = command_for(log_w)
        if cgroup:
            command = in_cgroup(cgroup, command)
        preexec = None
        if tie_to_thread:
            command, preexec = tied_to_thread(command)
        try:
            self.popen = subprocess.Popen(
                command, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT, env={},
                pass_fds=(log_w, *pass_fds), preexec_fn=preexec,
                # A session of its own: a signal to a process group (nsjail's, the
                # server's, a terminal's Ctrl-C) reaches no other jail. The root as the
                # working folder: sh would complain into the output of one gone.
                start_new_session=True, cwd="/")
        except (OSError, subprocess.SubprocessError) as e:
            os.close(self.log_r)
            raise SandboxUnavailable(f"cannot start nsjail: {e}") from e
        finally:
            os.close(log_w)

    def __enter__(self) -> JailProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish(0)

    def stop(self) -> None:
        """Ask nsjail to kill the jail and tidy up after it."""
        if self.popen.returncode is None:
            try:
                self.popen.terminate()
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """End nsjail now (it no longer answers)."""
        self.popen.kill()

    def finish(self, patience: float) -> int:
        """Wait ``patience`` seconds for the end, then stop, then kill; close the pipes
        and return the status (as Popen gives it)."""
        try:
            self.popen.wait(patience)
        except subprocess.TimeoutExpired:
            self.stop()
            try:
                self.popen.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()
                self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream and not stream.closed:
                stream.close()
        if not self._log_closed:
            os.close(self.log_r)
            self._log_closed = True
        return int(self.popen.returncode)


class Outcome(NamedTuple):
    """What an Exchange saw: the output (stderr apart, or None), nsjail's log, nsjail's
    status, why it was stopped if it was, and when the program got its work and ended
    (where nsjail's log doesn't say: when the exchange began and ended)."""

    stdout: bytes
    stderr: bytes | None
    log: bytes
    status: int
    truncated: bool
    cancelled: bool
    timed_out: bool
    killed: bool
    started: float
    ended: float


_EXECUTING = b"] Executing '"
_ENDED = (b") exited with status: ", b") terminated with signal: ")


TAP_PIECE = 64 * 1024   # bytes of output a tap gives out at a time


class OutputTap:
    """A run's output as the jail produces it, for another thread to pass on meanwhile.

    The Exchange shares its output buffers with the tap (``attach``) and says when they
    may have grown (``grew``); ``pieces`` gives out what is new by offset, so the
    output is never queued a second time, and a reader that falls behind costs no more
    memory than the run's output limit. Nothing goes out before the program has started
    (nsjail's own complaints, when it can't start it, are not the program's output)
    unless the tap is closed: after the run, ``close`` lets ``pieces`` give out the rest
    and end; ``discard`` ends it with nothing more.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._streams: dict[str, bytearray] = {}
        self._offsets: dict[str, int] = {}
        self._live = self._closed = False

    def attach(self, streams: dict[str, bytearray]) -> None:
        """Follow ``streams`` ("stdout", "stderr") from their start, once their program
        has started (a run started anew after a warm jail died waiting attaches its
        own)."""
        with self._cond:
            self._streams, self._offsets = streams, dict.fromkeys(streams, 0)
            self._live = False

    def grew(self, live: bool) -> None:
        """The streams may have grown; ``live``: the program has started."""
        with self._cond:
            self._live = self._live or live
            self._cond.notify_all()

    def close(self) -> None:
        """The run is over: what is left may go out, then ``pieces`` ends."""
        with self._cond:
            self._live = self._closed = True
            self._cond.notify_all()

    def discard(self) -> None:
        """End ``pieces`` now, giving out nothing more."""
        with self._cond:
            self._streams, self._closed = {}, True
            self._cond.notify_all()

    def pieces(self, size: int = TAP_PIECE) -> Iterator[tuple[str, bytes]]:
        """(stream, bytes) of at most ``size`` bytes, each stream in order, as they come;
        ends once the tap is closed and all is given out."""
        while True:
            with self._cond:
                piece = self._next(size)
                while piece is None and not self._closed:
                    self._cond.wait()
                    piece = self._next(size)
            if piece is None:
                return
            yield piece

    def _next(self, size: int) -> tuple[str, bytes] | None:
        if not self._live:
            return None
        for name, data in self._streams.items():
            # The Exchange appends without this lock: a bytearray's length, append and
            # slice are each one step under the GIL.
            offset = self._offsets[name]
            if len(data) > offset:
                piece = bytes(data[offset:offset + size])
                self._offsets[name] = offset + len(piece)
                return name, piece
        return None


class OutputRelay:
    """A thread that passes a run's output on while the run goes on.

    ``consume`` gets the pieces of ``tap`` (an iterator that ends after the run) and
    passes them on; an OSError from it (where they go is gone, or stopped taking them)
    ends the relay and goes to ``failed``. After the run, ``finish`` lets the rest go
    out; ``abandon`` stops it when the run never came to an end of its own.
    """

    def __init__(self, consume: Callable[[Iterator[tuple[str, bytes]]], None],
                 failed: Callable[[OSError], None] = lambda error: None):
        self.tap = OutputTap()
        self.error: OSError | None = None
        self._consume, self._failed = consume, failed
        self._thread = threading.Thread(target=self._relay, name="relay", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        try:
            self._consume(self.tap.pieces())
        except OSError as e:
            self._fail(e)
        except Exception as e:      # a bug: logged, and ended as for a lost reader
            log.exception("passing the output on failed")
            self._fail(OSError(f"passing the output on failed: {e!r}"))

    def _fail(self, error: OSError) -> None:
        self.error = error
        self._failed(error)

    def finish(self) -> bool:
        """Wait until the rest of the output has gone out; whether all of it did."""
        self.tap.close()
        self._thread.join()
        return self.error is None

    def abandon(self) -> None:
        """Stop at once, passing nothing more on (a write already blocked on a reader
        that takes nothing is left to the daemon thread)."""
        self.tap.discard()
        self._thread.join(KILL_GRACE)


class Exchange:
    """Moves bytes between snekbox and a running jail until its streams end.

    It feeds stdin (and a warm jail its job, a descriptor, the bytes and how to close
    it), keeps ``limits.output`` bytes of output (more stops the jail), keeps nsjail's
    log, stops the jail at ``limits.time`` (and kills nsjail KILL_GRACE after) and when
    ``client`` hangs up. ``tap``, if given, shares the output while the run goes on.
    ``run`` returns an Outcome. Each selector key's data is the bound method that
    handles it.
    """

    def __init__(self, jail: JailProcess, *, stdin: bytes, limits: Limits,
                 client: socket.socket | None = None,
                 job: tuple[int, bytes, Callable[[], None]] | None = None,
                 tap: OutputTap | None = None):
        self.jail, self.limits, self.client = jail, limits, client
        popen = jail.popen
        self._outputs = {popen.stdout.fileno(): bytearray()} if popen.stdout else {}
        self._stderr_fd = popen.stderr.fileno() if popen.stderr else None
        if self._stderr_fd is not None:
            self._outputs[self._stderr_fd] = bytearray()
        self._writers: dict[int, tuple[memoryview, Callable[[], None]]] = {}
        if popen.stdin:
            self._writers[popen.stdin.fileno()] = (memoryview(stdin), popen.stdin.close)
        self._job_fd = job[0] if job else None
        if job:
            self._writers[job[0]] = (memoryview(job[1]), job[2])
        self._log = bytearray()
        self.truncated = self.cancelled = self.timed_out = self.killed = False
        self.started: float | None = None
        self.ended: float | None = None
        self._sel = selectors.DefaultSelector()
        self.tap = tap
        if tap is not None:
            tap.attach({"stderr" if fd == self._stderr_fd else "stdout": output
                        for fd, output in self._outputs.items()})

    def run(self) -> Outcome:
        """Exchange bytes until the jail's streams end; wait for nsjail to exit."""
        now = time.monotonic()
        limit_at: float | None = now + self.limits.time
        kill_at = now + self.limits.time + KILL_GRACE
        with self._sel:
            self._register()
            while self._jail_streams_open():
                if limit_at is not None and time.monotonic() >= limit_at:
                    self.timed_out, limit_at = True, None
                    self.jail.stop()
                timeout = min(kill_at, limit_at or kill_at) - time.monotonic()
                if timeout <= 0:
                    log.warning("nsjail did not exit %gs after the time limit; killed", KILL_GRACE)
                    self.killed = True
                    self.jail.kill()
                    break
                for key, _ in self._sel.select(timeout):
                    key.data(key)
                if self.tap is not None:
                    self.tap.grew(live=self.started is not None)
        for _, close in self._writers.values():
            close()
        status = self.jail.finish(KILL_GRACE)
        return self._outcome(status, now)

    def _register(self) -> None:
        for fd in self._outputs:
            self._sel.register(fd, selectors.EVENT_READ, self._on_output)
        self._sel.register(self.jail.log_r, selectors.EVENT_READ, self._on_log)
        for fd, (data, close) in list(self._writers.items()):
            if data:
                os.set_blocking(fd, False)
                self._sel.register(fd, selectors.EVENT_WRITE, self._on_writable)
            else:
                self._written(fd, close)
        if self.client is not None:
            self._sel.register(self.client, selectors.EVENT_READ, self._on_client)

    def _jail_streams_open(self) -> bool:
        watching_client = self.client is not None and self.client in self._sel.get_map()
        return len(self._sel.get_map()) > watching_client

    def _on_output(self, key: selectors.SelectorKey) -> None:
        chunk = os.read(key.fd, 65536)
        if not chunk:
            self._sel.unregister(key.fd)
            return
        if self.truncated:
            return      # drained, not closed: the jail must not see EPIPE
        room = self.limits.output - sum(map(len, self._outputs.values()))
        self._outputs[key.fd] += chunk[:room]
        if len(chunk) > room:
            self.truncated = True
            self.jail.stop()

    def _on_log(self, key: selectors.SelectorKey) -> None:
        chunk = os.read(key.fd, 65536)
        if not chunk:
            self._sel.unregister(key.fd)
            return
        self._log += chunk[:MAX_NSJAIL_LOG - len(self._log)]
        if self.started is None and self._job_fd is None and _EXECUTING in chunk:
            self.started = time.monotonic()
        if self.ended is None and any(end in chunk for end in _ENDED):
            self.ended = time.monotonic()

    def _on_writable(self, key: selectors.SelectorKey) -> None:
        data, close = self._writers[key.fd]
        try:
            data = data[os.write(key.fd, data[:65536]):]
        except BrokenPipeError:
            data = data[:0]     # the reader is gone; its exit says the rest
        self._writers[key.fd] = (data, close)
        if not data:
            self._sel.unregister(key.fd)
            self._written(key.fd, close)

    def _written(self, fd: int, close: Callable[[], None]) -> None:
        del self._writers[fd]
        close()
        if fd == self._job_fd:
            self.started = time.monotonic()     # a warm jail starts at the job's end

    def _on_client(self, key: selectors.SelectorKey) -> None:
        self._sel.unregister(key.fileobj)
        if isinstance(key.fileobj, socket.socket) and _peer_gone(key.fileobj):
            self.cancelled = True
            self.jail.stop()
        # else a pipelined request: not ours to read

    def _outcome(self, status: int, began: float) -> Outcome:
        stderr = self._outputs.pop(self._stderr_fd) if self._stderr_fd is not None else None
        stdout = next(iter(self._outputs.values()), bytearray())
        return Outcome(bytes(stdout), None if stderr is None else bytes(stderr),
                       bytes(self._log), status, self.truncated, self.cancelled,
                       self.timed_out, self.killed, self.started or began,
                       self.ended or time.monotonic())


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


_NSJAIL_LINE = re.compile(rb"^\[([DIWEF])\]\[[^\]]*\](?:\[\d+\] \S+ )?\s*(.*)$")
_EXITED = re.compile(rb"pid=\d+ \(.*\) exited with status: (\d+)")
_SIGNALED = re.compile(rb"pid=\d+ \(.*\) terminated with signal: \S+ \((\d+)\)")
_TIME_LIMIT = re.compile(rb"pid=\d+ run time >= time limit")
_LEVELS = {b"D": logging.DEBUG, b"I": logging.INFO, b"W": logging.WARNING,
           b"E": logging.ERROR, b"F": logging.ERROR}


def shell_status(status: int) -> int:
    """A Popen return code the way a shell shows it: 128+N after signal N."""
    return 128 - status if status < 0 else status


class NsjailReport(NamedTuple):
    """What nsjail's log says about a run: the jailed process's shell-style status (None
    if it never ran), whether a signal ended it, whether the time limit killed it, and
    nsjail's error messages."""

    child_status: int | None
    signaled: bool
    timed_out: bool
    errors: list[str]


def read_nsjail_log(data: bytes, quiet: Sequence[str] = ()) -> NsjailReport:
    """Forward nsjail's log lines to the ``snekbox.nsjail`` logger and read the outcome.

    Levels match nsjail's, except warnings about the optional mounts in ``quiet``
    (sources this host lacks, reported once at start-up), which go to DEBUG.
    """
    child_status, signaled, timed_out, errors = None, False, False, []
    info_off = not nsjail_log.isEnabledFor(logging.INFO)
    executed = _EXECUTING in data
    for line in data.splitlines():
        if info_off and line.startswith(b"[I]") and b"pid=" not in line:
            continue    # mounts and parameters, a dozen lines a run; no one is listening
        match = _NSJAIL_LINE.match(line)
        level, message = (_LEVELS[match[1]], match[2]) if match else (logging.WARNING, line)
        exited, signal_end = _EXITED.search(message), _SIGNALED.search(message)
        if exited:
            child_status = int(exited[1])
        elif signal_end:
            child_status, signaled = 128 + int(signal_end[1]), True
        elif _TIME_LIMIT.search(message):
            timed_out = True
        text = message.decode("utf-8", "replace")
        if level == logging.WARNING and any(f"'{p}'" in text for p in quiet):
            level = logging.DEBUG
        elif level >= logging.ERROR:
            errors.append(text)
        nsjail_log.log(level, "%s", text)
    if not executed:
        child_status = None     # nsjail's own exit status: it never started the program
    return NsjailReport(child_status, signaled, timed_out, errors)


# --------------------------------------------------------------------------------------
# Warm jails: started ahead of time, and their pool
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
    version = python_version(python)
    return "cms" if version and version < (3, 13) else "c"


class WarmJail:
    """A jail with its interpreter started, waiting for one job; single use.

    nsjail's time limit is pushed past the longest wait: the evaluation's own limit is
    kept from the hand-over on (by the Exchange).
    """

    def __init__(self, cell: Cell, process: JailProcess, job_w: int, ready_r: int):
        self.cell, self.process = cell, process
        self.job_w = job_w
        self._job_open = True
        self.ready_r: int | None = ready_r
        self.booted = False
        self.started = time.monotonic()

    def is_booted(self) -> bool:
        """Whether its interpreter has started and waits for the job (never blocks)."""
        if not self.booted and self.ready_r is not None and \
                select.select([self.ready_r], [], [], 0)[0]:
            self.booted = os.read(self.ready_r, 1) == b"."
            os.close(self.ready_r)
            self.ready_r = None
        return self.booted

    def close_job(self) -> None:
        """Close the job pipe: the jail reads the job up to this end of file."""
        if self._job_open:
            os.close(self.job_w)
            self._job_open = False

    def usable(self) -> bool:
        return self.process.popen.poll() is None and \
            time.monotonic() - self.started < WARM_MAX_IDLE

    def discard(self) -> None:
        """End the jail if it still runs, close its pipes and give back its cell."""
        # The end of its job pipe makes a waiting interpreter exit, and nsjail tidy up
        # after it; a signal while nsjail still sets the jail up would leave it half-made.
        self.close_job()
        self.process.finish(KILL_GRACE)
        if self.ready_r is not None:
            os.close(self.ready_r)
            self.ready_r = None
        self.cell.close()


class WarmPool:
    """Up to ``size`` warm jails made by ``start``, refilled by a thread of its own;
    never blocks a request. ``take`` one (None: start cold), ``refill`` after the
    evaluation, ``close`` at the end."""

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
        """The oldest usable warm jail, or None when there is none (start cold).

        Call ``refill`` once the evaluation is over: a new jail booting meanwhile would
        compete with it for the CPU and the kernel's namespace locks.
        """
        stale = []
        jail = None
        with self._cond:
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

    def close(self) -> None:
        """Stop refilling and discard every warm jail."""
        with self._cond:
            self._closed = True
            ready, self._ready = list(self._ready), collections.deque()
            self._cond.notify_all()
        # Before the filling thread ends: its end signals the nsjails it started, and a
        # signal to one still setting its jail up would leave it half-made.
        for jail in ready:
            jail.discard()
        if threading.current_thread() is not self._thread:     # closed by a finalizer there
            self._thread.join(10)

    def _fill(self) -> None:
        """The pool's thread: start a jail whenever one is missing, until closed."""
        while self._wait_until_short():
            try:
                jail = self.start()
            except (OSError, SandboxUnavailable) as e:
                log.warning("cannot start a warm jail: %s", e)
                time.sleep(1)
                continue
            with self._cond:
                added = not self._closed
                if added:
                    self._ready.append(jail)
            if not added:
                jail.discard()

    def _wait_until_short(self) -> bool:
        """Wait until the pool lacks a jail, taking out those too old to use; False
        once the pool is closed."""
        while True:
            with self._cond:
                if self._closed:
                    return False
                stale = [jail for jail in self._ready if not jail.usable()]
                for jail in stale:
                    self._ready.remove(jail)
                short = len(self._ready) < self.size
                if not short:
                    self._cond.wait(WARM_MAX_IDLE / 10)
            for jail in stale:
                jail.discard()
            if short:
                return True


# --------------------------------------------------------------------------------------
# Sandbox: one evaluation from arguments to result
# --------------------------------------------------------------------------------------

def load_config(path: str) -> JailConfig:
    """The jail config at ``path``; SetupError saying what is wrong with it."""
    try:
        config = JailConfig.from_file(path)
        config.check_mandatory_mounts()
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot use the jail config {path}: {e}") from e
    return config


def check_host(nsjail: str | None, user_base: str | None) -> str:
    """The path of nsjail; SetupError unless it, root and ``user_base`` are usable."""
    if os.geteuid() != 0:
        raise SetupError("snekbox must run as root: nsjail needs it for namespaces, "
                         "cgroups and mounts")
    path = find_nsjail(nsjail)
    if not path:
        raise SetupError("nsjail not found on PATH or in /usr/sbin, /usr/local/sbin, "
                         "/usr/bin, /usr/local/bin: install it (see README) or pass --nsjail")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SetupError(f"nsjail at {path} is not an executable file")
    if user_base and (":" in user_base or not os.path.isdir(user_base)):
        raise SetupError(f"--user-base {user_base} is not a folder (or has a ':')")
    return os.path.abspath(path)


def check_types(args: Sequence[str], stdin: bytes, executable_path: str | None) -> list[str]:
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


def check_args(args: list[str]) -> list[str]:
    """``args`` without leading empty ones (as python-discord/snekbox); InvalidRequest for
    those that can't be passed: NUL characters (but in -c code, which Python refuses
    itself), or too large (the code after -c may be any size: it reaches Python
    another way)."""
    while args and args[0] == "":
        args = args[1:]
    index = code_argument_index(args)
    if any("\0" in a for i, a in enumerate(args) if i != index):
        raise InvalidRequest(400, "args: an argument contains a NUL character")
    if not all(_is_utf8(a) for a in args):
        raise InvalidRequest(400, "args: an argument contains a lone surrogate "
                                  "(invalid Unicode)")
    sizes = [len(a.encode("utf-8")) for i, a in enumerate(args) if i != index]
    if len(args) > MAX_ARGS_COUNT:
        raise InvalidRequest(413, f"args: at most {MAX_ARGS_COUNT} arguments")
    if any(size > MAX_ARG_BYTES for size in sizes):
        raise InvalidRequest(413, f"args: an argument is over {MAX_ARG_BYTES} bytes, "
                                  "Linux's limit (only code after -c may be longer)")
    if sum(sizes) > MAX_ARGS_TOTAL:
        raise InvalidRequest(413, f"args: over {MAX_ARGS_TOTAL // MiB} MiB in all")
    return args


def check_executable(config: JailConfig, path: str) -> str:
    """``path``, if it names an executable file in the jail; else InvalidRequest."""
    if not path.startswith("/"):
        raise InvalidRequest(400, f"executable_path: {path!r} must be an absolute path")
    host = config.host_path(path)
    if host is None or not os.path.exists(host):
        raise InvalidRequest(400, f"executable_path: {path!r} does not exist in the jail")
    st = os.stat(host)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequest(400, f"executable_path: {path!r} is not a regular file")
    if not st.st_mode & 0o001:
        raise InvalidRequest(400, f"executable_path: {path!r} is not executable")
    return path


MAX_LIMIT = 2 ** 53      # the largest limit a request may name, whatever the caps
LIMIT_NAMES = {"time": "seconds", "memory": "bytes", "processes": "processes",
               "output": "bytes"}


def check_limits(asked: dict[str, float] | None, caps: Limits) -> Limits:
    """``caps`` lowered to the limits ``asked``; InvalidRequest naming a limit that is
    unknown, not a positive number, or over its cap."""
    for name, value in (asked or {}).items():
        if name not in LIMIT_NAMES:
            raise InvalidRequest(400, f"limits.{name}: no such limit; there are "
                                      f"{', '.join(LIMIT_NAMES)}")
        whole = name != "time"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                or not value > 0 or value == math.inf:
            raise InvalidRequest(400, f"limits.{name} must be a positive "
                                      f"{'whole number' if whole else 'number'}")
        if value > MAX_LIMIT:       # a cgroup can't take it, and :g can't print it
            raise InvalidRequest(400, f"limits.{name} is over {MAX_LIMIT}")
        cap = getattr(caps, name)
        if cap and value > cap:
            raise InvalidRequest(400, f"limits.{name}: {value:g} is over the server's "
                                      f"limit of {cap:g} {LIMIT_NAMES[name]}")
    return caps.lowered(asked or {})


class Call(NamedTuple):
    """One evaluation, checked: what ``Sandbox.run`` was asked to do."""

    args: list[str]
    stdin: bytes
    files: list[File]
    executable: str | None
    client: socket.socket | None
    limits: Limits
    split_stderr: bool
    tap: OutputTap | None = None


class Ran(NamedTuple):
    """A finished run, before it becomes an EvalResult: the Exchange's Outcome, what
    nsjail's log said, the files collected (and why some weren't), the CPU time, peak
    memory and memory-limit kills of the jail's cgroup, and whether it was warm."""

    outcome: Outcome
    report: NsjailReport
    files: list[File]
    files_error: str | None
    cpu: float | None
    memory: int | None
    oom_kills: int
    warm: bool


class Sandbox:
    """Runs code in nsjail with the policy of a config file; thread-safe.

    Creating one prepares the host (cgroups, the folder for per-evaluation tmpfs
    mounts, leftovers of a crashed server); ``run`` does one evaluation. With
    ``prewarm`` > 0 it keeps that many warm jails (see WarmPool); ``close`` ends them,
    as does the end of a ``with`` block.
    """

    def __init__(self, config: str = DEFAULT_CONFIG, nsjail: str | None = None, *,
                 max_output_size: int = DEFAULT_OUTPUT_SIZE,
                 memfs_size: int = DEFAULT_MEMFS_SIZE, files_limit: int = DEFAULT_FILES_LIMIT,
                 files_timeout: float = DEFAULT_FILES_TIMEOUT, user_base: str | None = None,
                 memfs_base: str = DEFAULT_MEMFS_BASE, prewarm: int = 0, jail_uid_base: int = 0):
        self.nsjail = check_host(nsjail, user_base)
        self.config = load_config(config)
        self.caps = Limits(self.config.time_limit, self.config.mem_max, self.config.pids_max,
                           max_output_size)
        self.files_limit, self.files_timeout = files_limit, files_timeout
        self.memfs_size = memfs_size
        self.host = prepare_host(self.config, memfs_base, memfs_size, jail_uid_base)
        self.cgroups, self.users, self.memfs_root = \
            self.host.cgroups, self.host.users, self.host.memfs_root
        self.commands = NsjailCommand(self.nsjail, self.config, self.cgroups.nsjail_args,
                                      user_base)
        self._quiet_mounts = self.config.missing_optional_mounts()
        if self._quiet_mounts:
            # Expected wherever the config lists several Pythons' folders (the image).
            log.debug("optional mounts this host doesn't have: %s", " ".join(self._quiet_mounts))
        self.pool = WarmPool(_warm_jail_maker(self), prewarm) if prewarm > 0 else None
        self._warm_modes = warm_modes(self.config.host_path(self.config.exec_path)
                                      or self.config.exec_path) if self.pool else ""
        # Left without close(), garbage or at exit: no tmpfs stays behind to be taken
        # for an earlier crash at the next start.
        self._finalizer = weakref.finalize(self, _release, self.pool, self.host)

    @property
    def time_limit(self) -> int:
        return self.config.time_limit

    @property
    def warm_jails(self) -> int:
        """Warm jails ready for an evaluation now."""
        return self.pool.ready if self.pool else 0

    def close(self) -> None:
        """Stop the warm jails and remove this sandbox's tmpfs mounts (after the last
        ``run``)."""
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, args: Sequence[str], *, stdin: bytes = b"", files: Sequence[File] = (),
            executable_path: str | None = None, client: socket.socket | None = None,
            limits: dict[str, float] | None = None, split_stderr: bool = False,
            answer: Callable[[EvalResult], None] | None = None,
            tap: OutputTap | None = None) -> EvalResult:
        """Run the interpreter with ``args`` in a fresh jail and return what happened.

        ``files`` are written to /home first; the files the run creates or changes come
        back in ``result.files``. ``client``, if given, is a connected socket whose
        hang-up cancels the run. ``limits`` lowers the config's (see Limits);
        ``split_stderr`` keeps stderr apart. ``answer``, if given, gets the result as soon
        as it is known, before the jail is taken down (the server sends it then).
        ``tap``, if given, shares the output as the jail produces it. Raises
        InvalidRequest for arguments,
        files, limits or an executable that can't be used, and SandboxUnavailable when
        nsjail or the tmpfs can't be started.
        """
        started = time.monotonic()
        args = check_args(check_types(args, stdin, executable_path))
        call = Call(args, bytes(stdin), check_files(files, self.files_limit),
                    check_executable(self.config, executable_path) if executable_path else None,
                    client, check_limits(limits, self.caps), split_stderr, tap)
        index = code_argument_index(args)
        if index is not None and "\0" in args[index]:
            return _answered(answer, _null_code_result(tap, started))

        def finish(ran: Ran) -> EvalResult:
            return _answered(answer, build_result(ran, started))
        return self._run_warm(call, finish) or self._run_cold(call, finish)

    def _run_cold(self, call: Call, finish: Callable[[Ran], EvalResult]) -> EvalResult:
        with self.host.cell(call.limits) as cell:
            cell.memfs.write_files(call.files, self.files_limit, self.files_timeout)
            with _CodeOnDescriptor(call.args) as (args, code_fds):
                jail = JailProcess(
                    lambda log_fd: self.commands.line(
                        cell.memfs.path, cell.uid, log_fd, args, executable=call.executable,
                        pass_fds=code_fds, time_limit=math.ceil(call.limits.time)),
                    stdin=bool(call.stdin), split_stderr=call.split_stderr,
                    pass_fds=code_fds, cgroup=cell.cgroup)
            with jail:
                outcome = Exchange(jail, stdin=call.stdin, limits=call.limits,
                                   client=call.client, tap=call.tap).run()
            _check_started(outcome)
            return finish(self._collected(cell, outcome, warm=False))

    def _run_warm(self, call: Call, finish: Callable[[Ran], EvalResult]) -> EvalResult | None:
        """The run in a warm jail, or None when it must start cold. The jail is
        discarded and the pool refilled after ``finish``: after the answer."""
        pool = self.pool
        if pool is None or call.executable or call.split_stderr:
            return None
        job = warm_job(call.args, {f.path for f in call.files}, self._warm_modes)
        jail = pool.take() if job else None
        if job is None or jail is None:
            return None
        try:
            if call.limits != self.caps and not jail.cell.lower_limits(call.limits):
                return None
            jail.cell.memfs.write_files(call.files, self.files_limit, self.files_timeout)
            orig_argv = [self.config.exec_path, *self.config.exec_args, *call.args]
            payload = marshal.dumps((*job, orig_argv))
            outcome = Exchange(jail.process, stdin=call.stdin, limits=call.limits,
                               client=call.client, tap=call.tap,
                               job=(jail.job_w, payload, jail.close_job)).run()
            ran = self._collected(jail.cell, outcome, warm=True)
            if ran.report.child_status is None:
                log.warning("a warm jail was gone when handed its job; running cold instead")
                return None     # its interpreter never ran the job: it died waiting
            return finish(ran)
        finally:
            jail.discard()
            pool.refill()

    def _collected(self, cell: Cell, outcome: Outcome, warm: bool) -> Ran:
        """What a run in ``cell`` left: its report, files, usage and memory kills."""
        report = read_nsjail_log(outcome.log, quiet=self._quiet_mounts)
        files, files_error = cell.memfs.collect_files(self.files_limit, self.files_timeout) \
            if report.child_status is not None else ([], None)
        cpu, memory = cell.cgroup.usage()
        return Ran(outcome, report, files, files_error, cpu, memory,
                   cell.cgroup.oom_kills(), warm)


def _null_code_result(tap: OutputTap | None, started: float) -> EvalResult:
    """The result of -c code with a NUL: what Python says of it, which clients of
    python-discord/snekbox show, given to ``tap`` as the program's output."""
    said = "ValueError: embedded null byte"
    if tap is not None:
        tap.attach({"stdout": bytearray(said.encode())})
        tap.grew(live=True)
    return EvalResult(said, None, status="failed", error="the code contains a NUL character",
                      duration=time.monotonic() - started)


def _answered(answer: Callable[[EvalResult], None] | None, result: EvalResult) -> EvalResult:
    """``result``, once given to ``answer`` if there is one."""
    if answer:
        answer(result)
    return result


def _warm_jail_maker(sandbox: Sandbox) -> Callable[[], WarmJail]:
    """How the pool starts a warm jail for ``sandbox``: its thread holds this, not the
    sandbox, so that a sandbox dropped without close() can be collected and its
    finalizer end the pool."""
    ref = weakref.ref(sandbox)

    def start() -> WarmJail:
        alive = ref()
        if alive is None:
            raise SandboxUnavailable("the sandbox was closed")
        return start_warm_jail(alive)
    return start


def start_warm_jail(sandbox: Sandbox) -> WarmJail:
    """A new warm jail of ``sandbox``, its interpreter booting."""
    cell = sandbox.host.cell(sandbox.caps)
    pipes: list[int] = []
    try:
        job_r, job_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pipes = [job_r, job_w, ready_r, ready_w]
        bootstrap = _WARM_BOOTSTRAP.format(fd=job_r, ready=ready_w)
        # nsjail's own time limit is far off: should the server die while the jail
        # runs a job, the parent-death signal ends it (a cold jail's limit is its own).
        process = JailProcess(
            lambda log_fd: sandbox.commands.line(
                cell.memfs.path, cell.uid, log_fd, ["-c", bootstrap],
                pass_fds=(job_r, ready_w), time_limit=WARM_MAX_IDLE + sandbox.time_limit + 60),
            pass_fds=(job_r, ready_w), cgroup=cell.cgroup, tie_to_thread=True)
    except BaseException:
        for fd in pipes:
            os.close(fd)
        cell.close()
        raise
    os.close(job_r)
    os.close(ready_w)
    return WarmJail(cell, process, job_w, ready_r)


def _release(pool: WarmPool | None, host: Host) -> None:
    if pool:
        pool.close()
    host.release()


class _CodeOnDescriptor:
    """``args`` with -c code too large for one argument moved to a memfd that the jail
    inherits (and a bootstrap reading it in its place), closed at the end."""

    def __init__(self, args: list[str]):
        self.args, self.fds = list(args), []
        index = code_argument_index(args)
        if index is not None and len(args[index].encode("utf-8")) > MAX_ARG_BYTES:
            fd = os.memfd_create("snekbox-code", 0)
            self.fds.append(fd)
            os.write(fd, args[index].encode("utf-8"))
            os.lseek(fd, 0, os.SEEK_SET)
            self.args[index] = _LARGE_CODE_BOOTSTRAP.format(fd=fd)

    def __enter__(self) -> tuple[list[str], tuple[int, ...]]:
        return self.args, tuple(self.fds)

    def __exit__(self, *exc_info: object) -> None:
        for fd in self.fds:
            os.close(fd)


def _check_started(outcome: Outcome) -> None:
    """SandboxUnavailable when nsjail itself never ran (it is gone from where it was,
    or the jail's cgroup could not be joined): the host's fault, not the request's."""
    if not outcome.log and outcome.status in (JOIN_FAILED, 126, 127):
        said = (outcome.stdout + (outcome.stderr or b"")).decode("utf-8", "replace").strip()
        raise SandboxUnavailable(f"cannot start nsjail: {said[-300:] or outcome.status}")


def build_result(ran: Ran, started: float) -> EvalResult:
    """The EvalResult of a finished run, its ``duration`` counted from ``started``."""
    outcome, report = ran.outcome, ran.report
    returncode = _returncode(outcome, report)
    status = _status(ran, returncode)
    usage = None if returncode is None else \
        Usage(max(outcome.ended - outcome.started, 0.0), ran.cpu, ran.memory)
    error = _start_error(outcome, report) if returncode is None else \
        "cancelled: the client went away" if outcome.cancelled else ran.files_error
    return EvalResult(
        stdout=outcome.stdout.decode("utf-8", "replace"), returncode=returncode,
        files=ran.files, timed_out=report.timed_out or outcome.timed_out or outcome.killed,
        truncated=outcome.truncated,
        duration=time.monotonic() - started, error=error, status=status, usage=usage,
        stderr=None if outcome.stderr is None else outcome.stderr.decode("utf-8", "replace"),
        warm=ran.warm)


def _returncode(outcome: Outcome, report: NsjailReport) -> int | None:
    if outcome.truncated:
        return 128 + signal.SIGTERM     # as python-discord/snekbox
    if report.child_status is not None:
        return report.child_status
    if outcome.cancelled or outcome.killed or outcome.timed_out:
        return shell_status(outcome.status)
    return None    # nsjail never started the process


def _status(ran: Ran, returncode: int | None) -> str:
    """One of STATUSES for the run."""
    outcome, report = ran.outcome, ran.report
    ended_by = {
        "failed": returncode is None,
        "cancelled": outcome.cancelled,
        "timeout": report.timed_out or outcome.timed_out or outcome.killed,
        "output": outcome.truncated,
        "memory": report.signaled and ran.oom_kills > 0,
        "signal": report.signaled,
        "error": returncode != 0,
    }
    return next((status for status, applies in ended_by.items() if applies), "ok")


def _start_error(outcome: Outcome, report: NsjailReport) -> str:
    """Why the jail could not start the process."""
    # nsjail reports a config it can't read on its stderr, which is the output (the
    # protobuf parser's own words as a warning).
    text = outcome.stdout + (outcome.stderr or b"")
    errors = report.errors or [m[2].decode("utf-8", "replace")
                               for m in map(_NSJAIL_LINE.match, text.splitlines())
                               if m and (m[1] in b"EF" or b"Error parsing" in m[2])]
    return "the jail could not start the process: " + (
        "; ".join(errors) if errors else f"nsjail exited with status {outcome.status}")


# --------------------------------------------------------------------------------------
# HTTP: request parsing, worker slots, metrics, tokens, /info and the OpenAPI document,
# the server and its handler
# --------------------------------------------------------------------------------------

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


class Field(NamedTuple):
    """A field of a ``POST /eval`` body: its JSON types, what the error says it must
    be, and what it does."""

    types: tuple[str, ...]
    must_be: str
    doc: str


# The one description of the POST /eval body: parse_eval_request checks each field's
# type from it, and /openapi.json is made from it.
EVAL_FIELDS = {
    "input": Field(("string",), "a string",
                   "Code: runs as `python3 -c <input>`, appended to `args`."),
    "args": Field(("array",), "an array of strings",
                  'Interpreter arguments, e.g. ["-m", "timeit", "1+1"]; ["-c"] by default '
                  "when `input` is given. At least one of `input` and `args` is required."),
    "stdin": Field(("string",), "a string", "Text fed to the program's standard input."),
    "files": Field(("array",), "an array",
                   "Files written to /home before the run: a path relative to /home and "
                   "the content in base64."),
    "executable_path": Field(("string", "null"), "a string",
                             "Another interpreter in the jail (GET /info lists them)."),
    "limits": Field(("object",), "an object",
                    "Lower limits for this evaluation, each at most the server's."),
    "stderr": Field(("boolean",), "true or false",
                    "true: standard error comes apart from standard output, as `stderr`."),
}
_JSON_TYPES = {"string": str, "array": list, "object": dict, "boolean": bool,
               "null": type(None)}


def _field(data: dict[str, Any], name: str, default: Any) -> Any:
    """The ``name`` field of ``data`` (``default`` when absent), of its JSON type."""
    value = data.get(name, default)
    field = EVAL_FIELDS[name]
    if not isinstance(value, tuple(_JSON_TYPES[t] for t in field.types)):
        raise InvalidRequest(400, f"{name} must be {field.must_be}, not {_json_type(value)}")
    return value


def _json_files(raw_files: list[Any], limit: int) -> list[File]:
    """The ``files`` of a request body as Files, their content decoded from base64."""
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


def parse_eval_request(body: bytes | bytearray, files_limit: int = DEFAULT_FILES_LIMIT,
                       caps: Limits | None = None) -> EvalRequest:
    """Validate a ``POST /eval`` body; raise InvalidRequest naming the bad field.

    The uploads are checked as ``Sandbox.run`` checks them (``check_files``), and the
    limits against ``caps`` if given, here already so that a bad request is refused
    before it waits for a worker.
    """
    data = _json_object(body)
    if "input" not in data and "args" not in data:
        raise InvalidRequest(400, "input or args is required")
    args = _field(data, "args", ["-c"] if "input" in data else None)
    args = [_string(a, f"args[{i}]", nul_ok=True) for i, a in enumerate(args)]
    if "input" in data:
        args.append(_string(_field(data, "input", ""), "input", nul_ok=True))
    stdin = _string(_field(data, "stdin", ""), "stdin", nul_ok=True).encode("utf-8")
    executable = _field(data, "executable_path", None)
    if executable is not None:
        executable = _string(executable, "executable_path")
    files = check_files(_json_files(_field(data, "files", []), files_limit), files_limit)
    limits, stderr = _field(data, "limits", {}), _field(data, "stderr", False)
    if caps is not None:
        check_limits(limits, caps)
    ignored = [name for name in data if name not in EVAL_FIELDS]
    return EvalRequest(args, stdin, files, executable, limits, stderr, ignored)


def _json_object(body: bytes | bytearray) -> dict[str, Any]:
    """The body parsed as a JSON object; InvalidRequest for anything else."""
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
    return data


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
        self._queue: collections.deque[object] = collections.deque()
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
                raise Busy("the server is stopping", "stopping")
            if len(self._queue) >= self.max_queue:
                raise Busy(f"all {self.workers} workers are busy and the queue of "
                           f"{self.max_queue} is full; try again", "queue_full")
            self._queue.append(ticket)
            try:
                deadline = time.monotonic() + (self.max_wait or float("inf"))
                while not (self._queue[0] is ticket and self._slots.acquire(blocking=False)):
                    remaining = deadline - time.monotonic()
                    if self._closed:
                        raise Busy("the server is stopping", "stopping")
                    if remaining <= 0:
                        raise Busy(f"no worker was free within --max-wait {self.max_wait:g} s",
                                   "max_wait")
                    if gone():
                        raise Busy("the client went away", "client_gone")
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

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECTION_CAUSES = ("queue_full", "max_wait", "stopping", "client_gone", "body_memory",
                    "connections", "sandbox")


class Histogram:
    """Observations counted in buckets by upper bound, as Prometheus histograms are."""

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str) -> Iterable[str]:
        """The exposition lines of the buckets, their sum and count."""
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            total += count
            yield f'{name}_bucket{{le="{"+Inf" if bound == math.inf else bound}"}} {total}'
        yield f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count {total}"


def _labels(**labels: object) -> str:
    """Prometheus labels, their values escaped."""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def _counted(counter: collections.Counter[Any], *names: str) -> list[str]:
    """The samples (labels and value) of a counter keyed by the values of ``names``."""
    return [f"{_labels(**dict(zip(names, key if isinstance(key, tuple) else (key,))))} {n}"
            for key, n in sorted(counter.items())]


class Metrics:
    """What the server has done since it started, for ``GET /metrics``; thread-safe.

    Paths outside the route table count as one, "other", so that no client can make
    the exposition grow.
    """

    def __init__(self, paths: Iterable[str]):
        self.paths = frozenset(paths)
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.evaluations = collections.Counter(
            {(status, jail): 0 for status in STATUSES for jail in ("warm", "cold")})
        self.rejections = collections.Counter(dict.fromkeys(REJECTION_CAUSES, 0))
        self.bytes_in = self.bytes_out = 0
        self.evaluation_seconds = Histogram()
        self.queue_seconds = Histogram()

    def count_request(self, path: str, status: int, received: int, sent: int) -> None:
        """One request answered: its path, status and body bytes in and out."""
        with self._lock:
            self.requests[path if path in self.paths else "other", status] += 1
            self.bytes_in += received
            self.bytes_out += sent

    def count_evaluation(self, result: EvalResult) -> None:
        """One evaluation: how it ended, warm or cold, and how long it took."""
        with self._lock:
            self.evaluations[result.status, "warm" if result.warm else "cold"] += 1
            self.evaluation_seconds.observe(result.duration)

    def count_wait(self, seconds: float) -> None:
        """A request got a worker after waiting ``seconds``."""
        with self._lock:
            self.queue_seconds.observe(seconds)

    def count_rejection(self, cause: str) -> None:
        """A 503 for ``cause`` (one of REJECTION_CAUSES)."""
        with self._lock:
            self.rejections[cause] += 1

    def exposition(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The text format (version 0.0.4) of every metric, and of ``gauges``: a name's
        help text and value."""
        with self._lock:
            families = [
                ("snekbox_http_requests_total", "counter", "HTTP requests answered",
                 _counted(self.requests, "path", "status")),
                ("snekbox_evaluations_total", "counter", "evaluations by how they ended",
                 _counted(self.evaluations, "status", "jail")),
                ("snekbox_rejected_requests_total", "counter", "503 answers by cause",
                 _counted(self.rejections, "cause")),
                ("snekbox_http_request_body_bytes_total", "counter", "request body bytes read",
                 [f" {self.bytes_in}"]),
                ("snekbox_http_response_bytes_total", "counter", "answer body bytes sent",
                 [f" {self.bytes_out}"]),
            ]
            histograms = [
                ("snekbox_evaluation_duration_seconds", "seconds from request to result",
                 list(self.evaluation_seconds.samples("snekbox_evaluation_duration_seconds"))),
                ("snekbox_queue_wait_seconds", "seconds a request waited for a worker",
                 list(self.queue_seconds.samples("snekbox_queue_wait_seconds"))),
            ]
        lines = [f'snekbox_build_info{_labels(version=__version__)} 1']
        lines[:0] = ["# HELP snekbox_build_info the version of snekbox",
                     "# TYPE snekbox_build_info gauge"]
        for name, kind, text, samples in families:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
                      *(name + sample for sample in samples)]
        for name, text, samples in histograms:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *samples]
        for name, (text, value) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


MIN_TOKEN_LENGTH = 16
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")    # RFC 6750's token characters


class BearerTokens:
    """The tokens clients may present (``--token-file``: one a line, ``#`` comments),
    kept only as SHA-256 digests; ``reload`` reads the file again (on SIGHUP)."""

    def __init__(self, path: str):
        # Imported here: hashlib loads OpenSSL's libcrypto, megabytes that a server
        # without tokens need not hold.
        import hashlib
        import hmac
        self._sha256, self._same = hashlib.sha256, hmac.compare_digest
        self.path = path
        self._digests = self._read()

    def _read(self) -> tuple[bytes, ...]:
        """The digests of the file's tokens; SetupError naming the first bad line."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read(MiB + 1)
                mode = os.fstat(f.fileno()).st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise SetupError(f"cannot read the token file {self.path}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        if len(text) > MiB:
            raise SetupError(f"the token file {self.path} is over 1 MiB")
        if mode & 0o022:
            raise SetupError(f"others may write the token file {self.path} (and so add a "
                             "token): chmod go-w it")
        shared = mode & 0o044
        digests = []
        for number, line in enumerate(text.splitlines(), 1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if not _B64TOKEN.fullmatch(token) or len(token) < MIN_TOKEN_LENGTH:
                raise SetupError(f"{self.path}, line {number}: a token must be at least "
                                 f"{MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / "
                                 "(e.g. from: openssl rand -hex 32)")
            digests.append(self._sha256(token.encode("ascii")).digest())
        if not digests:
            raise SetupError(f"the token file {self.path} holds no token")
        if shared:
            log.warning("others may read the token file %s: chmod go= it", self.path)
        return tuple(digests)

    def __len__(self) -> int:
        """How many tokens are in force."""
        return len(self._digests)

    def reload(self) -> None:
        """Read the file again; if it is unusable now, the tokens had so far stay."""
        try:
            self._digests = self._read()
        except SetupError as e:
            log.error("%s; the %d tokens read before stay in force", e, len(self))
            return
        log.info("read %d token%s from %s", len(self), "" if len(self) == 1 else "s",
                 self.path)

    def allow(self, authorization: str | None) -> bool:
        """Whether an Authorization header's value holds one of the tokens. Every
        token's digest is compared, in constant time, whatever matches."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = self._sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return sum(self._same(digest, known) for known in self._digests) > 0


def jailed_interpreters(sandbox: Sandbox) -> list[dict[str, Any]]:
    """The interpreters of ``sandbox``'s config that run in its jail, each with the
    version it gives there: asked in a jail, never on the host (a config may mount a
    folder whose files nobody should run outside one), once per real file."""
    versions: dict[str, tuple[int, ...] | None] = {}
    found = []
    for path, real in find_interpreters(sandbox.config):
        if real not in versions:
            try:
                result = sandbox.run(list(VERSION_ARGS), executable_path=path)
                versions[real] = parse_version(result.stdout) if result.returncode == 0 \
                    else None
            except (InvalidRequest, SandboxUnavailable):
                versions[real] = None
        if version := versions[real]:
            found.append({"path": path, "version": ".".join(map(str, version)),
                          "default": path == sandbox.config.exec_path})
    return found


def service_info(settings: Settings, sandbox: Sandbox) -> dict[str, Any]:
    """What ``GET /info`` tells a client: the version, the interpreters (the config's
    default first) and packages in the jail, the limits and the capacity. Found once,
    at start-up: the interpreters are asked for their versions."""
    caps, config = sandbox.caps, sandbox.config
    return {
        "version": __version__,
        "interpreters": jailed_interpreters(sandbox),
        "limits": {"time": caps.time, "memory": caps.memory, "processes": caps.processes,
                   "output": caps.output, "cpu_ms_per_sec": config.cpu_ms_per_sec,
                   "memfs": settings.memfs_size, "files": settings.files_limit,
                   "request_size": settings.max_request_size, "args": MAX_ARGS_TOTAL},
        "workers": settings.workers, "max_queue": settings.queue_limit,
        "max_wait": settings.max_wait, "warm_jails": settings.prewarm,
        "packages": installed_packages(settings.user_base),
    }


# Base64 as the files' content may come: line breaks and spaces anywhere (b64decode
# after _SPACES is taken out).
BASE64_PATTERN = (r"^[ \t\r\n]*(?:(?:[A-Za-z0-9+/][ \t\r\n]*){4})*"
                  r"(?:(?:[A-Za-z0-9+/][ \t\r\n]*){2}=[ \t\r\n]*=|"
                  r"(?:[A-Za-z0-9+/][ \t\r\n]*){3}=)?[ \t\r\n]*$")


def _object(properties: dict[str, Any], optional: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON Schema of an object with exactly these properties, all but ``optional``
    required."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": [name for name in properties if name not in optional]}


def _eval_request_schema(files_limit: int, caps: Limits) -> dict[str, Any]:
    """The JSON Schema of a ``POST /eval`` body, from EVAL_FIELDS and the server's caps."""
    properties: dict[str, Any] = {
        name: {"type": list(field.types) if len(field.types) > 1 else field.types[0],
               "description": field.doc} for name, field in EVAL_FIELDS.items()}
    properties["args"]["items"] = {"type": "string"}
    properties["files"].update(maxItems=files_limit, items={
        **_object({"path": {"type": "string"},
                   "content": {"type": "string", "contentEncoding": "base64",
                               "pattern": BASE64_PATTERN}}, ["content"]),
        "additionalProperties": True})
    properties["limits"].update(additionalProperties=False, properties={
        name: {"type": "number" if name == "time" else "integer", "exclusiveMinimum": 0,
               "description": unit, "maximum": getattr(caps, name) or MAX_LIMIT}
        for name, unit in LIMIT_NAMES.items()})
    return {"type": "object", "properties": properties,
            "anyOf": [{"required": ["input"]}, {"required": ["args"]}]}


def _eval_result_schema() -> dict[str, Any]:
    """The JSON Schema of an evaluation's answer (EvalResult.to_json and warnings)."""
    number, text = {"type": "number"}, {"type": "string"}
    usage = _object({"wall": number, "cpu": {"type": ["number", "null"]},
                     "memory": {"type": ["integer", "null"]}})
    file = _object({"path": text, "size": {"type": "integer"},
                    "content": {**text, "contentEncoding": "base64"}})
    return _object({
        "stdout": text, "stderr": text, "returncode": {"type": ["integer", "null"]},
        "timed_out": {"type": "boolean"}, "truncated": {"type": "boolean"},
        "duration": number, "error": {"type": ["string", "null"]},
        "status": {"enum": list(STATUSES)}, "usage": {"oneOf": [usage, {"type": "null"}]},
        "warnings": {"type": "array", "items": text},
        "files": {"type": "array", "items": file}}, optional=("stderr", "warnings"))


def _info_schema() -> dict[str, Any]:
    """The JSON Schema of ``GET /info`` (service_info)."""
    count, text = {"type": "integer", "minimum": 0}, {"type": "string"}
    return _object({
        "version": text, "warm_jails": count, "warm_jails_ready": count,
        "interpreters": {"type": "array", "items": _object(
            {"path": text, "version": text, "default": {"type": "boolean"}})},
        "limits": _object({name: {"type": "number", "minimum": 0} for name in (
            *LIMIT_NAMES, "cpu_ms_per_sec", "memfs", "files", "request_size", "args")}),
        "workers": count, "max_queue": count, "max_wait": {"type": "number"},
        "packages": {"type": "array", "items": _object(
            {"name": text, "version": text, "python": text})}})


def _health_schema() -> dict[str, Any]:
    """The JSON Schema of ``GET /health``."""
    count = {"type": "integer", "minimum": 0}
    return _object({"status": {"enum": ["ok", "starting", "stopping"]},
                    "ready": {"type": "boolean"}, "version": {"type": "string"},
                    "workers": count, "running": count, "waiting": count,
                    "max_queue": count, "warm": count})


# What each path may answer besides 200, and what a 200 of it holds.
_ERRORS = {"/eval": (400, 403, 408, 411, 413, 415, 431, 501, 503),
           "/health": (400, 431, 503)}
_OPERATIONS = {
    "/eval": ("Run code in a fresh jail; with Accept: application/x-ndjson, the output "
              "streams as JSON lines before the answer", "EvalResult", "application/json"),
    "/health": ("Whether the server takes requests (503 while starting or stopping)",
                "Health", "application/json"),
    "/info": ("The version, interpreters, packages, limits and capacity", "Info",
              "application/json"),
    "/metrics": ("Counters and gauges in the Prometheus text format", None,
                 "text/plain; version=0.0.4; charset=utf-8"),
    "/openapi.json": ("This document", None, "application/json"),
}


def openapi_document(routes: dict[str, dict[str, str]], protected: Iterable[str],
                     settings: Settings, caps: Limits) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API as this server runs it: its paths, the
    body and answer schemas made from the definitions the code checks with, its
    limits, and the token the ``protected`` paths need (when it has tokens)."""
    schemas = {"EvalRequest": _eval_request_schema(settings.files_limit, caps),
               "EvalResult": _eval_result_schema(), "Info": _info_schema(),
               "Health": _health_schema(),
               "Error": _object({"title": {"type": "string"},
                                 "description": {"type": "string"}})}
    paths: dict[str, Any] = {}
    for path, methods in routes.items():
        summary, schema, content_type = _OPERATIONS[path]
        body = {"$ref": f"#/components/schemas/{schema}"} if schema else \
            {"type": "object"} if content_type == "application/json" else {"type": "string"}
        responses: dict[str, Any] = {"200": {"description": "OK",
                                             "content": {content_type: {"schema": body}}}}
        if path == "/eval":
            responses["200"]["content"]["application/x-ndjson"] = {"schema": {
                "type": "string", "description": 'One JSON object a line: {"stdout": ...} '
                '(or {"stderr": ...}) for each piece of output as it comes, then the answer.'}}
        errors = set(_ERRORS.get(path, (400, 431)))
        if path in protected:
            errors.add(401)
        for status in sorted(errors):
            responses[str(status)] = {
                "description": HTTPStatus(status).phrase,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for method in methods:
            if method == "HEAD":
                continue
            operation: dict[str, Any] = {"summary": summary, "responses": responses}
            if method == "POST":
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EvalRequest"}}}}
            if path in protected:
                operation["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "snekbox", "version": __version__,
                 "description": "Runs Python code in an nsjail sandbox."},
        "paths": paths, "components": {"schemas": schemas}}
    if protected:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                "scheme": "bearer"}}
    return document


class SnekboxServer(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, at most ``max_connections`` of them.

    ``tokens``, if given, are what a client must present for the protected paths.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, settings: Settings, sandbox: Sandbox,
                 tokens: BearerTokens | None = None):
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        self.settings = settings
        self.sandbox = sandbox
        self.tokens = tokens
        self.info = service_info(settings, sandbox)
        self.metrics = Metrics(SnekboxHandler.ROUTES)
        # The paths that need a token (none without tokens).
        self.protected = frozenset() if tokens is None else SnekboxHandler.PROTECTED | (
            {"/metrics"} if settings.protect_metrics else set())
        self.openapi = openapi_document(SnekboxHandler.ROUTES, self.protected, settings,
                                        sandbox.caps)
        self.slots = WorkerSlots(settings.workers, settings.queue_limit, settings.max_wait)
        self.bodies = BodyBudget(settings.body_budget)
        self.self_tested = False    # until the start-up self-test has passed
        self.stopping = False
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        super().__init__((settings.host, settings.port), SnekboxHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host up in DNS, slowing start-up.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: tuple[str, int]) -> None:
        if not self._connections.acquire(blocking=False):
            # Over the cap: answer at once instead of starting another thread.
            self.metrics.count_rejection("connections")
            try:
                request.setblocking(False)
                request.send(_raw_busy_response("too many open connections"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


def _resident_memory() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _json_bytes(data: dict[str, Any]) -> bytes:
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

    def readinto(self, buffer: Any) -> int:
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


# What a client's text may not bring into a log line as it is: controls and line
# separators (U+2028 and the like end a line for some readers), and the quote and
# backslash that would end or fake a quoted field.
_UNSAFE_IN_LOG = re.compile(r'[^\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd]|["\\]')


def _printable(text: str) -> str:
    """``text`` from a client with what could forge a log line escaped."""
    def escape(match: re.Match[str]) -> str:
        code = ord(match[0])
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
            else f"\\U{code:08x}"
    return _UNSAFE_IN_LOG.sub(escape, text)


def _has_body(headers: Message) -> bool:
    return headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in headers


def content_length(headers: Message) -> int | None:
    """The request's Content-Length (None without one); InvalidRequest (400) unless it is
    ASCII digits, the same in every copy of the header."""
    values = {value.strip(" \t") for value in headers.get_all("Content-Length") or ()}
    if not values:
        return None
    value = values.pop()
    if values or not _LENGTH.fullmatch(value):
        raise InvalidRequest.http(400, "the Content-Length header is not a valid length")
    return int(value)


def is_chunked(headers: Message) -> bool:
    """Whether the body comes in chunks; InvalidRequest for framing a proxy in front might read
    differently (RFC 9112, 6.1 and 6.3): another transfer coding, or one with a length."""
    codings = headers.get_all("Transfer-Encoding")
    if not codings:
        return False
    if "Content-Length" in headers:
        raise InvalidRequest.http(400, "Content-Length and Transfer-Encoding together are ambiguous")
    coding = ",".join(codings).strip(" \t").lower()
    if coding != "chunked":
        raise InvalidRequest.http(501, f"Transfer-Encoding {coding[:50]!r} is not supported; "
                             "only chunked is")
    return True


NDJSON = "application/x-ndjson"
_Q_ZERO = re.compile(r"q=0(?:\.0{0,3})?", re.IGNORECASE)


def wants_ndjson(headers: Message) -> bool:
    """Whether the request's Accept names application/x-ndjson (not with q=0): its
    answer then streams. Anything else (none, */*, application/json) gets the plain
    answer."""
    for item in ",".join(headers.get_all("Accept") or ()).split(","):
        kind, *params = item.split(";")
        if kind.strip(" \t").lower() == NDJSON:
            return not any(_Q_ZERO.fullmatch(p.replace(" ", "")) for p in params)
    return False


# Errors after which a body not read yet can't be trusted to end where it says.
CLOSING_ERRORS = frozenset((400, 408, 411, 413, 415, 501))
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110's token
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(sent: str | None) -> str:
    """The id of a request: the client's X-Request-Id when it is sane, else a new one."""
    if sent and _SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return os.urandom(8).hex()


def _in_time(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``read``, with its timeout an InvalidRequest (408)."""
    def read_in_time(size: int) -> bytes:
        try:
            return read(size)
        except (TimeoutError, socket.timeout):
            raise InvalidRequest.http(408, "the body did not arrive in time") from None
    return read_in_time


def read_exactly(read: Callable[[int], bytes], length: int,
                 hold: Callable[[int], None]) -> bytearray:
    """``length`` bytes from ``read``; each piece is passed to ``hold`` (which may refuse
    it) before it is read, as it arrives and not as claimed: a client must send what it
    holds."""
    data = bytearray()
    while len(data) < length:
        size = min(length - len(data), 64 * 1024)
        hold(size)
        piece = read(size)
        data += piece
        if len(piece) < size:
            raise InvalidRequest.http(400, "the body is shorter than its Content-Length")
    return data


def read_chunked(read: Callable[[int], bytes], readline: Callable[[int], bytes], limit: int,
                 hold: Callable[[int], None]) -> bytearray:
    """A chunked body of at most ``limit`` bytes (RFC 9112, 7.1), trailers skipped."""
    body = bytearray()
    while True:
        match = _CHUNK_SIZE.fullmatch(readline(1024))
        if not match:
            raise InvalidRequest.http(400, "a chunk of the chunked body has no valid size")
        size = int(match[1], 16)
        if len(body) + size > limit:
            raise InvalidRequest.http(413, f"the body is over the limit of {limit} bytes")
        if size == 0:
            while (line := readline(1024)) != b"\r\n":
                if not line.endswith(b"\r\n"):
                    raise InvalidRequest.http(400, "a trailer of the chunked body is malformed")
            return body
        body += read_exactly(read, size, hold)
        if read_exactly(read, 2, hold) != b"\r\n":
            raise InvalidRequest.http(400, "a chunk of the chunked body is malformed")


def answer_pieces(result: EvalResult,
                  extra: dict[str, Any] | None = None) -> tuple[int, Iterable[bytes]]:
    """The JSON answer of ``result`` (and the ``extra`` fields) as its length and the
    pieces to send, so that a big answer never stands whole in memory: files are
    encoded as they go out."""
    fields = {**result.to_json(files=False), **(extra or {})}
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


def ndjson_lines(pieces: Iterable[tuple[str, bytes]]) -> Iterator[bytes]:
    """The lines of a streamed answer for pieces of output: ``{"stdout": "..."}`` or
    ``{"stderr": "..."}``. Each stream is decoded as UTF-8 on its own and as it comes,
    so that its lines joined are its text in the final answer: a character split
    between two pieces stays one, and invalid bytes are replaced alike."""
    decoders: dict[str, codecs.IncrementalDecoder] = {}
    for name, data in pieces:
        if name not in decoders:
            decoders[name] = codecs.getincrementaldecoder("utf-8")("replace")
        yield from _ndjson_line(name, decoders[name].decode(data))
    for name, decoder in decoders.items():
        yield from _ndjson_line(name, decoder.decode(b"", final=True))


def _ndjson_line(name: str, text: str) -> list[bytes]:
    return [_json_bytes({name: text}) + b"\n"] if text else []


class AnswerStream:
    """The body of a streamed answer on ``sock``: each part a chunk (``chunked``), or
    as it is where the end of the connection ends the body (HTTP/1.0).

    Paced as every answer is: a client must take each part within ``timeout`` seconds
    and all it was sent at MIN_ANSWER_RATE beyond ``timeout``, counting only the time
    spent waiting on the client, not the program's pauses.
    """

    def __init__(self, sock: socket.socket, timeout: float, chunked: bool):
        self.sock, self.timeout, self.chunked = sock, timeout, chunked
        self.sent = 0
        self._waited = 0.0

    def send(self, data: bytes) -> None:
        if data:
            self._send(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def end(self) -> None:
        """The end of the body (chunked: the last chunk; else the connection's end)."""
        if self.chunked:
            self._send(b"0\r\n\r\n")

    def _send(self, data: bytes) -> None:
        allowed = self.timeout + (self.sent + len(data)) / MIN_ANSWER_RATE - self._waited
        self.sock.settimeout(max(min(self.timeout, allowed), 0.001))
        began = time.monotonic()
        try:
            self.sock.sendall(data)
        finally:
            self._waited += time.monotonic() - began
        self.sent += len(data)


class SnekboxHandler(BaseHTTPRequestHandler):
    """Answers the paths of ROUTES: JSON, but for /metrics (Prometheus text) and a
    streamed /eval (JSON lines)."""

    protocol_version = "HTTP/1.1"
    server_version = "snekbox"
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024           # headers and a small body leave in one write
    server: SnekboxServer

    # The handler of each method on each path.
    ROUTES = {"/eval": {"POST": "_eval"}, "/health": {"GET": "_health", "HEAD": "_health"},
              "/info": {"GET": "_info", "HEAD": "_info"},
              "/metrics": {"GET": "_metrics", "HEAD": "_metrics"},
              "/openapi.json": {"GET": "_openapi", "HEAD": "_openapi"}}
    # Paths that need a token when the server has tokens (and /metrics with
    # --protect-metrics); the others are for probes and tools.
    PROTECTED = frozenset(("/eval", "/info"))
    QUIET = frozenset(("/health", "/metrics"))      # probes and scrapes: logged at DEBUG

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.client_timeout = self.server.settings.client_timeout
        super().setup()
        self.connection.settimeout(self.client_timeout)
        # Reads share a deadline, so a client trickling bytes can't hold the thread.
        self._reader = _DeadlineReader(self.connection)
        self._buffered = io.BufferedReader(self._reader)
        self.rfile = self._buffered
        self._served = False
        self.request_id = request_id(None)

    def handle_one_request(self) -> None:
        if self._served and not self._next_request_begins():
            self.close_connection = True
            return
        self._served = True
        # The request line and headers get client_timeout from their first byte on, and
        # MAX_HEAD_BYTES together (http.server bounds each line, not all of them).
        self._reader.set_deadline(time.monotonic() + self.client_timeout)
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
            return bool(self._buffered.peek(1))
        except OSError:
            return False

    # One handler for every method, known or new (QUERY, say): the route table decides
    # what's allowed, and a method it doesn't list gets a 405, not http.server's 501.
    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _handle(self) -> None:
        started = time.monotonic()
        self._status, self._size, self._body_read, self._body_held = 0, 0, False, 0
        self._note, self._received = "", 0
        self._stream: AnswerStream | None = None
        self.request_id = request_id(self.headers.get("X-Request-Id"))
        try:
            self._route()
        except InvalidRequest as e:
            self._note = str(e)
            self._send_error(e.status, e.title, str(e), e.headers)
        except OSError as e:
            self._abort()
            log.info("%s: connection lost: %s", self.client_address[0], e)
        except Exception:
            log.exception("bug while answering %s %s", _printable(self.command),
                          _printable(self.path[:200]))
            self._send_error(500, "Internal Server Error",
                             "an internal error; the server's log has details")
        finally:
            if not self._body_read and _has_body(self.headers):
                self.close_connection = True    # what is left can't be taken for a request
            self.server.bodies.give_back(self._body_held)
            self._log_access(f"{self.command} {self.path}", started)

    def _path(self) -> str:
        """The request's path without its query ("" before its line is read)."""
        return getattr(self, "path", "").split("?", 1)[0]

    def _log_access(self, request: str, started: float) -> None:
        """Count the request in the metrics and log it: its client, request line,
        status, answer size, time, id and, for an error, why."""
        path = self._path()
        self.server.metrics.count_request(path, self._status, self._received, self._size)
        level = logging.DEBUG if path in self.QUIET else logging.INFO
        if not log.isEnabledFor(level):
            return
        fields = {"client": self.client_address[0], "request": _printable(request[:200]),
                  "status": self._status, "size": self._size,
                  "ms": round((time.monotonic() - started) * 1000, 1), "id": self.request_id}
        reason = ""
        if self._note:
            fields["reason"] = _printable(self._note[:200])
            reason = f' reason="{fields["reason"]}"'
        log.log(level, '%s "%s" %d %d %.1fms id=%s%s', fields["client"], fields["request"],
                self._status, self._size, fields["ms"], self.request_id, reason,
                extra={"fields": fields})

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
        handler = self._handler()
        if handler is None:
            self._send_answer(200, 0, (), {"Allow": ", ".join(self._methods())})
        else:
            getattr(self, handler)()

    def _methods(self) -> dict[str, str]:
        """The route table's handlers of the request's path, by method; InvalidRequest
        (400, 404) for a method that is not a token or a path that isn't there."""
        if not _METHOD.fullmatch(self.command):
            raise InvalidRequest.http(400, "the request's method is not a valid token")
        path = self._path()
        methods = self.ROUTES.get(path)
        if methods is None:
            raise InvalidRequest.http(404, f"no such endpoint: {path[:100]}; try POST /eval")
        return methods

    def _handler(self) -> str | None:
        """The name of the method that answers the request (None: OPTIONS, answered with
        Allow); InvalidRequest (400, 401, 404, 405) when there is none it may use."""
        methods = self._methods()
        if self.command == "OPTIONS":
            return None
        handler = methods.get(self.command)
        path = self._path()
        if handler is None:
            raise InvalidRequest.http(405, f"{path} takes {' or '.join(methods)}",
                                      {"Allow": ", ".join(methods)})
        self._authorize(path)
        return handler

    def _authorize(self, path: str) -> None:
        """InvalidRequest (401) unless the request may use ``path``: the path needs no
        token (or the server has none), or the request has one."""
        tokens = self.server.tokens
        if tokens is None or path not in self.server.protected:
            return
        if len(self.headers.get_all("Authorization") or ()) > 1:
            raise InvalidRequest.http(400, "send one Authorization header, not several")
        sent = self.headers.get("Authorization")
        if tokens.allow(sent):
            return
        challenge = 'Bearer realm="snekbox"' + (', error="invalid_token"' if sent else "")
        raise InvalidRequest.http(401, f"{path} needs a token: send Authorization: Bearer "
                                       "<token>" + (" with a valid token" if sent else ""),
                                  {"WWW-Authenticate": challenge})

    def _health(self) -> None:
        slots = self.server.slots
        ready = self.server.self_tested and not self.server.stopping
        status = "ok" if ready else "stopping" if self.server.stopping else "starting"
        self.send_json(200 if ready else 503, {
            "status": status, "ready": ready, "version": __version__,
            "workers": slots.workers, "running": slots.running, "waiting": slots.waiting,
            "max_queue": slots.max_queue, "warm": self.server.sandbox.warm_jails})

    def _info(self) -> None:
        self.send_json(200, {**self.server.info, "warm_jails_ready":
                             self.server.sandbox.warm_jails})

    def _metrics(self) -> None:
        slots, sandbox = self.server.slots, self.server.sandbox
        text = self.server.metrics.exposition({
            "snekbox_evaluations_running": ("evaluations running now", slots.running),
            "snekbox_evaluations_waiting": ("requests waiting for a worker", slots.waiting),
            "snekbox_workers": ("evaluations that may run at once", slots.workers),
            "snekbox_warm_jails_ready": ("warm jails ready for an evaluation",
                                         sandbox.warm_jails),
            "snekbox_request_body_bytes_held": ("request body bytes held in memory now",
                                                self.server.bodies.used),
            "process_resident_memory_bytes": ("the server's resident memory (RSS)",
                                              _resident_memory()),
        }).encode("utf-8")
        self._send_answer(200, len(text), (text,),
                          content_type="text/plain; version=0.0.4; charset=utf-8")

    def _openapi(self) -> None:
        self.send_json(200, self.server.openapi)

    def _eval(self) -> None:
        # A web page can POST here from a browser without asking (no Content-Type is
        # JSON): refuse what a browser sends across sites. Other clients send no Origin.
        if "Origin" in self.headers or self.headers.get("Sec-Fetch-Site", "none") not in (
                "none", "same-origin"):
            raise InvalidRequest.http(403, "requests from web pages in a browser are refused")
        # No Content-Type is taken for JSON, as python-discord/snekbox does.
        content_type = self.headers.get("Content-Type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise InvalidRequest(415, "the body must be JSON, sent as Content-Type: "
                                      "application/json", "415 Unsupported Media Type")
        settings = self.server.settings
        request = parse_eval_request(self._read_body(settings.max_request_size),
                                     settings.files_limit, self.server.sandbox.caps)
        self._take_slot()
        # The slot is held until the jail is gone, after the answer: the answers held in
        # memory are then at most one per worker, whoever doesn't read them.
        try:
            self._run(request)
        finally:
            self.server.slots.release()

    def _take_slot(self) -> None:
        queued = time.monotonic()
        try:
            self.server.slots.acquire(gone=lambda: _peer_gone(self.connection))
        except Busy as e:
            self.server.metrics.count_rejection(e.cause)
            raise InvalidRequest.http(503, str(e), {"Retry-After": "1"}) from None
        self.server.metrics.count_wait(time.monotonic() - queued)

    def _run(self, request: EvalRequest) -> None:
        """Run ``request`` in the sandbox; answer as soon as the result is known (with
        Accept: application/x-ndjson, the output streams meanwhile)."""
        warnings = [f"{name}: no such field; it was ignored" for name in request.ignored]
        relay = OutputRelay(self._send_lines, self._hang_up) \
            if wants_ndjson(self.headers) else None
        try:
            self.server.sandbox.run(
                request.args, stdin=request.stdin, files=request.files,
                executable_path=request.executable_path, client=self.connection,
                limits=request.limits, split_stderr=request.stderr,
                answer=lambda result: self._answer(result, warnings, relay),
                tap=relay.tap if relay else None)
        except SandboxUnavailable as e:
            log.error("%s", e)
            self.server.metrics.count_rejection("sandbox")
            raise InvalidRequest.http(503, str(e), {"Retry-After": "1"}) from None
        finally:
            if relay is not None:
                relay.abandon()     # unanswered: nothing was sent, an error answer can be

    def _answer(self, result: EvalResult, warnings: list[str],
                relay: OutputRelay | None = None) -> None:
        """Count and log the evaluation, and send its answer (unless its client went
        away); with a ``relay``, the rest of the output first, and the answer as the
        last line."""
        self.server.metrics.count_evaluation(result)
        usage = result.usage or Usage(0.0, None, None)
        fields = {"id": self.request_id, "status": result.status,
                  "returncode": result.returncode, "jail": "warm" if result.warm else "cold",
                  **usage.to_json(), "duration": round(result.duration, 4),
                  "error": result.error}
        log.info("evaluation id=%s status=%s returncode=%s %s wall=%.3fs cpu=%s memory=%s "
                 "duration=%.3fs%s", self.request_id, result.status, result.returncode,
                 fields["jail"], usage.wall,
                 "-" if usage.cpu is None else f"{usage.cpu:.3f}s",
                 "-" if usage.memory is None else usage.memory, result.duration,
                 f" error={result.error!r}" if result.error else "", extra={"fields": fields})
        if relay is not None and not relay.finish():
            self._note = f"the stream was cut off: {relay.error}"
            self._abort()
            return
        if result.status == "cancelled":
            self.close_connection = True
            return      # nobody to answer
        length, pieces = answer_pieces(result, {"warnings": warnings} if warnings else {})
        if relay is None:
            self._send_answer(200, length, pieces)
            return
        for piece in pieces:
            self._stream_send(piece)
        self._stream_send(b"\n")
        self._stream_end()

    def _send_lines(self, pieces: Iterator[tuple[str, bytes]]) -> None:
        """The relay's work: each piece of output to the client as an ndjson line."""
        for line in ndjson_lines(pieces):
            self._stream_send(line)

    def _hang_up(self, error: OSError) -> None:
        """The client did not take the stream in time, or is gone: hanging up cancels
        the run (the Exchange watches the connection)."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _stream_send(self, data: bytes) -> None:
        """Send ``data`` as the next part of a streamed answer, after the status line
        and headers the first time."""
        if self._stream is None:
            chunked = self.request_version != "HTTP/1.0"
            self.close_connection = self.close_connection or not chunked
            self.connection.settimeout(self.client_timeout)
            self._send_head(200, {"Content-Type": NDJSON,
                                  **({"Transfer-Encoding": "chunked"} if chunked else {})})
            self.wfile.flush()
            self._stream = AnswerStream(self.connection, self.client_timeout, chunked)
            self._status = 200
        self._stream.send(data)
        self._size = self._stream.sent

    def _stream_end(self) -> None:
        if self._stream is not None:
            self._stream.end()
            self._size = self._stream.sent

    def _read_body(self, limit: int) -> bytearray:
        """The request's body, at most ``limit`` bytes, counted against the server's
        budget as it arrives; InvalidRequest (408, 411, 413, ...) if it can't be had."""
        chunked = is_chunked(self.headers)
        length = None if chunked else content_length(self.headers)
        if not chunked and length is None:
            raise InvalidRequest.http(411, "a Content-Length header is required")
        if length is not None and length > limit:
            raise InvalidRequest.http(413, f"the body is {length} bytes; the limit is "
                                           f"{limit} bytes")
        self._reader.pace(self.client_timeout)
        read, readline = _in_time(self._buffered.read), _in_time(self._buffered.readline)
        body = read_chunked(read, readline, limit, self._hold_body) if chunked \
            else read_exactly(read, length or 0, self._hold_body)
        self._body_read, self._received = True, len(body)
        return body

    def _hold_body(self, size: int) -> None:
        """Count ``size`` more bytes of body against the server's budget, or refuse."""
        if not self.server.bodies.take(size):
            self.server.metrics.count_rejection("body_memory")
            raise InvalidRequest.http(503, "the server holds as many request bodies as it "
                                           "may; try again", {"Retry-After": "1"})
        self._body_held += size

    def send_json(self, status: int, data: dict[str, Any],
                  headers: dict[str, str] | None = None) -> None:
        """Send ``data`` as the whole answer, in one write where it fits."""
        body = _json_bytes(data)
        self._send_answer(status, len(body), (body,), headers)

    def _send_answer(self, status: int, length: int, pieces: Iterable[bytes],
                     headers: dict[str, str] | None = None,
                     content_type: str = "application/json") -> None:
        """Send an answer (JSON unless said otherwise) of ``length`` bytes, made of
        ``pieces``.

        A client must take each piece within client_timeout and the whole at
        MIN_ANSWER_RATE (it holds a worker meanwhile), or the connection is closed: once
        the status line is out, no error can be answered any more.
        """
        deadline = time.monotonic() + self.client_timeout + length / MIN_ANSWER_RATE
        self.connection.settimeout(self.client_timeout)    # the read deadline may be spent
        self._send_head(status, {"Content-Type": content_type,
                                 "Content-Length": str(length)}, headers)
        if self.command != "HEAD":
            for piece in pieces:
                self.connection.settimeout(max(min(self.client_timeout,
                                                   deadline - time.monotonic()),
                                               0.001))
                self.wfile.write(piece)
        self.wfile.flush()
        self._status, self._size = status, length

    def _send_head(self, status: int, framing: dict[str, str],
                   headers: dict[str, str] | None = None) -> None:
        """The status line and headers of an answer: ``framing`` (its type, and its
        length or coding) first, then the request id and ``headers``."""
        self.send_response(status)
        for name, value in framing.items():
            self.send_header(name, value)
        self.send_header("X-Request-Id", self.request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection or self.server.stopping:
            self.close_connection = True
            self.send_header("Connection", "close")
        self._response_started = True
        self.end_headers()

    def _send_error(self, status: int, title: str, description: str,
                    headers: dict[str, str] | None = None) -> None:
        """Answer an error, closing the connection after it where it must be."""
        if self._response_started:
            self.close_connection = True    # too late for another status line
            return
        if self._must_close_after(status):
            self.close_connection = True
        try:
            self.send_json(status, {"title": title, "description": description}, headers)
        except OSError:
            self.close_connection = True    # the client is gone; nothing to tell it

    def _must_close_after(self, status: int) -> bool:
        """Whether the connection can't carry another request after an error: the rest
        of this one's body, unread, would be taken for one (or its framing is in
        doubt)."""
        return not self._body_read and (_has_body(self.headers) or status in CLOSING_ERRORS)

    def handle_expect_100(self) -> bool:
        """Refuse a body before the client sends it when the request can't be answered
        (no such path or method, no token) or the body is unusable or too large; else
        100 Continue."""
        limit = self.server.settings.max_request_size
        try:
            self._handler()
            if not is_chunked(self.headers):
                length = content_length(self.headers)
                if length is not None and length > limit:
                    raise InvalidRequest.http(413, f"the body is {length} bytes; the limit "
                                                   f"is {limit} bytes")
        except InvalidRequest as e:
            self.send_error(e.status, str(e), headers=e.headers)
            return False
        super().handle_expect_100()
        self.wfile.flush()      # wfile is buffered: the client waits for this line
        return True

    def parse_request(self) -> bool:
        self.request_id = request_id(None)
        self.path = ""      # until this request's line is read: not the last one's
        try:
            ok = super().parse_request()
        finally:
            self._reader.head_left = None   # the body has limits of its own
        if ok and self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return ok

    def send_error(self, code: int, message: str | None = None, explain: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
        """http.server's own errors (malformed request, header too long), and refusals
        before the body, as JSON."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"   # a status line and headers all the same
        self.close_connection = True
        self._status, self._size, self._body_read, self._received = code, 0, True, 0
        description = f"{message}: {explain}" if message and explain else message or explain
        self._note = description or ""
        self._send_error(code, HTTPStatus(code).phrase,
                         description or HTTPStatus(code).description, headers)
        self._log_access(getattr(self, "requestline", ""), time.monotonic())

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass    # _handle logs each request once it's answered

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], _printable(format % args))



# --------------------------------------------------------------------------------------
# Command line: Settings, the flags that fill them, logging, signals, one evaluation,
# and main
# --------------------------------------------------------------------------------------

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
    max_output_size: int = DEFAULT_OUTPUT_SIZE
    max_request_size: int = 16 * MiB
    memfs_size: int = DEFAULT_MEMFS_SIZE
    files_limit: int = DEFAULT_FILES_LIMIT
    files_timeout: float = DEFAULT_FILES_TIMEOUT
    user_base: str | None = None
    client_timeout: float = 10.0
    keepalive_timeout: float = 75.0     # longer than common clients' pools keep them
    max_connections: int = 256
    prewarm: int = 4
    max_body_memory: int = 0      # 0: 4 times max_request_size
    jail_uid_base: int = 0        # 0: a random block
    log_level: str = "INFO"
    log_format: str = "text"
    token_file: str | None = None
    protect_metrics: bool = False

    def __init__(self, **values: Any):
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
    ("--log-format", "text, or json: one JSON object a line (default: %(default)s)",
     None, None),
    ("--token-file", "file of bearer tokens, one a line: /eval and /info then need "
                     "Authorization: Bearer <token>; read again on SIGHUP", None, None),
    ("--protect-metrics", "/metrics needs a token too (with --token-file)", None, None),
)


def _flag_type(kind: type, low: float | None, high: float | None) -> Callable[[str], object]:
    """An argparse type: ``kind`` of the text, within ``low`` and ``high`` if given."""
    def convert(text: str) -> object:
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

def _switch(text: str) -> bool:
    """An on/off flag's environment variable: 1, true, yes or on; 0, false, no or off."""
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise argparse.ArgumentTypeError(f"{text!r} is not 1, true, yes, on, 0, false, no or off")
    return value in ("1", "true", "yes", "on")


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
        convert = _switch if isinstance(default, bool) else \
            str if default is None or isinstance(default, str) else \
            _flag_type(type(default), low, high)
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except argparse.ArgumentTypeError as e:
                p.env_errors.append(f"{env}: {e}")  # type: ignore[attr-defined]
        if convert is _switch:
            p.add_argument(flag, action="store_true", default=default, help=f"{help} [{env}]")
        else:
            p.add_argument(flag, type=convert, default=default, help=f"{help} [{env}]")
    p.add_argument("--version", action="version", version=f"snekbox {__version__}")
    _add_commands(p)
    return p


CLI_FAILED = 125    # snekbox could not run the program (as docker run's 125)


def _add_commands(parser: argparse.ArgumentParser) -> None:
    """``run`` and ``eval``: one evaluation from the command line instead of the server."""
    how = ("One evaluation in a fresh jail, with the jail config and the flags the server "
           "would use (no warm jails), and no server. The program's stdout and stderr "
           "come out on ours as it writes them. Standard input, when it is not a terminal, "
           "is read whole and given to the program; from a terminal it gets none. The "
           f"exit status is the program's (128+N after signal N); {CLI_FAILED} when the "
           "jail could not run it, 2 for bad usage.")
    commands = parser.add_subparsers(
        dest="command", title="one evaluation without a server",
        description="snekbox.py [FLAGS] run FILE.py [ARGS...] | eval CODE [ARGS...]")
    run = commands.add_parser("run", help="run FILE.py in the sandbox", description=how)
    run.add_argument("file", metavar="FILE.py", help="the program: it goes into the jail's "
                                                     "/home under its base name")
    run.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    evaluate = commands.add_parser("eval", help="run CODE as python3 -c CODE", description=how)
    evaluate.add_argument("code", metavar="CODE")
    evaluate.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")


class CommandLineJob(NamedTuple):
    """The evaluation of ``run`` or ``eval``: interpreter arguments and uploads."""

    args: list[str]
    files: list[File]


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse the command line (and environment) into Settings; exit 2 on bad values."""
    return parse_command_line(argv)[0]


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[Settings, CommandLineJob | None]:
    """The Settings, and the evaluation to run instead of the server (None: serve);
    exit 2 on bad values or usage."""
    parser = build_arg_parser()
    if parser.env_errors:   # type: ignore[attr-defined]
        parser.error("; ".join(parser.env_errors))   # type: ignore[attr-defined]
    ns = parser.parse_args(argv)
    if ns.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR")
    if ns.log_format not in ("text", "json"):
        parser.error("--log-format must be text or json")
    if ns.protect_metrics and not ns.token_file:
        parser.error("--protect-metrics needs --token-file: without tokens nothing is protected")
    job = command_line_job(parser, ns) if ns.command else None
    values = {name: value for name, value in vars(ns).items() if name in Settings.__annotations__}
    return Settings(**{**values, "log_level": ns.log_level.upper()}), job


def command_line_job(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> CommandLineJob:
    """The job of ``eval`` (``-c CODE``) or ``run`` (the file uploaded under its base
    name and run by it, so that tracebacks name it); a usage error for a file that
    can't be read."""
    if ns.command == "eval":
        return CommandLineJob(["-c", ns.code, *ns.args], [])
    try:
        with open(ns.file, "rb") as f:
            source = f.read()
    except OSError as e:
        parser.error(f"cannot read {ns.file}: {e.strerror}")
    name = os.path.basename(ns.file)
    # A name that looks like an option would be taken for one by the interpreter.
    return CommandLineJob([f"./{name}" if name.startswith("-") else name, *ns.args],
                          [File(name, source)])


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


def run_once(settings: Settings, job: CommandLineJob) -> int:
    """Run ``job`` in a sandbox of its own (no warm jails), its output passed on to our
    stdout and stderr as it comes; the exit status (see ``_add_commands``)."""
    settings.prewarm = 0
    try:
        sandbox = sandbox_for(settings)
    except (SetupError, OSError) as e:
        print(f"snekbox.py: {e}", file=sys.stderr)
        return CLI_FAILED
    relay = OutputRelay(copy_output)
    try:
        result = sandbox.run(job.args, stdin=_stdin_bytes(), files=job.files,
                             split_stderr=True, tap=relay.tap)
    except (InvalidRequest, SandboxUnavailable) as e:
        relay.abandon()
        print(f"snekbox.py: {e}", file=sys.stderr)
        return 2 if isinstance(e, InvalidRequest) else CLI_FAILED
    except KeyboardInterrupt:
        relay.abandon()
        return 128 + signal.SIGINT
    finally:
        sandbox.close()
    relay.finish()
    return exit_status(result, sandbox.caps)


def _stdin_bytes() -> bytes:
    """All of standard input, unless it is a terminal (or closed): then nothing."""
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def copy_output(pieces: Iterator[tuple[str, bytes]]) -> None:
    """A relay's work on the command line: the program's stdout to ours, its stderr to
    ours, as they come."""
    for name, data in pieces:
        fd = sys.stderr.fileno() if name == "stderr" else sys.stdout.fileno()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def exit_status(result: EvalResult, caps: Limits) -> int:
    """The exit status of a run from the command line; says on stderr why the jail
    could not run the program, or which limit stopped it."""
    if result.returncode is None:
        print(f"snekbox.py: {result.error}", file=sys.stderr)
        return CLI_FAILED
    limits = {"timeout": f"stopped at the time limit of {caps.time:g} s",
              "memory": f"killed at the memory limit of {caps.memory} bytes",
              "output": f"stopped at the output limit of {caps.output} bytes"}
    if result.status in limits:
        print(f"snekbox.py: {result.status}: the program was {limits[result.status]} "
              f"(exit status {result.returncode})", file=sys.stderr)
    return min(result.returncode, 255)


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


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger and message, and the fields a
    record carries (``extra={"fields": {...}}``), such as a request's status and id."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)   # ASCII: no raw U+2028 in a line


def set_up_logging(settings: Settings) -> None:
    """Log to stderr at ``settings.log_level``, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if settings.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    if settings.log_level != "DEBUG":
        nsjail_log.setLevel(logging.WARNING)    # nsjail's INFO: a dozen lines per run


def reload_on_sighup(tokens: BearerTokens | None) -> None:
    """From now on SIGHUP reads the token file again (and no longer ends the process)."""
    def reload(*_: object) -> None:
        if tokens is None:
            log.info("SIGHUP: there is no token file to read again")
        else:
            tokens.reload()
    signal.signal(signal.SIGHUP, reload)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server, or run one evaluation (``run``, ``eval``); return the exit
    status (the server's: 0 after SIGTERM or SIGINT)."""
    settings, job = parse_command_line(argv)
    # Until the tokens are read, a SIGHUP (a reload during start-up) must not end us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if job is not None and settings.log_level == "INFO":
        settings.log_level = "WARNING"      # the log shares stderr with the program's
    set_up_logging(settings)
    if job is not None:
        return run_once(settings, job)
    try:
        tokens = BearerTokens(settings.token_file) if settings.token_file else None
        sandbox = sandbox_for(settings)
    except (SetupError, OSError) as e:
        log.critical("%s", e)
        return 1
    try:
        server = SnekboxServer(settings, sandbox, tokens)
    except OSError as e:
        log.critical("cannot listen on %s:%s: %s", settings.host, settings.port, e.strerror)
        sandbox.close()
        return 1

    stop = stop_on_signals()
    reload_on_sighup(tokens)
    # Serve while the self-test runs, so that the first requests need not wait for it;
    # /health answers 503 until it has passed, and a failure stops everything.
    # The poll interval is how long a stop waits for the accepting loop to notice.
    threading.Thread(target=server.serve_forever, args=(0.1,), name="accept",
                     daemon=True).start()
    try:
        self_test(sandbox)
    except SetupError as e:
        log.critical("%s", e)
        stop_server(server, sandbox)
        return 1
    server.self_tested = True
    release_free_memory()
    host, port = server.server_name, server.server_port
    log.info("snekbox %s listening on http://%s:%d with %d worker%s (nsjail %s, cgroup v%d)%s",
             __version__, f"[{host}]" if ":" in host else host, port, settings.workers,
             "" if settings.workers == 1 else "s", sandbox.nsjail, sandbox.cgroups.version,
             f", {len(tokens)} bearer token{'' if len(tokens) == 1 else 's'}" if tokens else "")
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

