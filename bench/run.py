#!/usr/bin/env python3
"""Benchmark line-echo servers side by side: stdlib socketserver, trio, asyncio, trio_socketserver.

    python bench/run.py            # full run: 3 rounds x (pingpong 5 s, connrate 5 s), idle 1000
    python bench/run.py --quick    # seconds-long smoke run

Writes bench/results/latest.json and bench/results/latest.md (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN_SRC = BENCH / "loadgen.c"
BUILD_DIR = BENCH / "build"
LOADGEN = BUILD_DIR / "loadgen"
SERVERS_PY = BENCH / "servers.py"
HOST = "127.0.0.1"

ALL_SERVERS = [
    "stdlib-threading",
    "stdlib-forking",
    "trio-raw",
    "asyncio",
    "native",
    "compat-threading",
    "compat-forking",
    "workers-1",
    "workers-2",
]
# Servers of several processes: never pinned (their point is to use more than one CPU), and
# compared with ONE_PROCESS, the same server in one process, measured in the same run.
WORKERS_PREFIX = "workers-"
ONE_PROCESS = "native"
SCENARIOS = ["pingpong", "connrate", "idle"]
ERROR_KINDS = ["connect", "reset", "eof", "timeout", "bad_echo", "unanswered", "other"]
BASELINE = "trio-raw"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NA = "\u2013"  # en dash: "no value"
X = "\u00d7"  # multiplication sign, as in "x trio-raw"


def stdlib_ref(name: str) -> str:
    """The stdlib server of the same kind (forking servers vs. everything else)."""
    return "stdlib-forking" if name.endswith("forking") else "stdlib-threading"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- build


def find_cc() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def build_loadgen(force: bool = False) -> Path:
    """Compile bench/loadgen.c into bench/build/loadgen if missing or older than the source."""
    if (
        not force
        and LOADGEN.exists()
        and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime
        and os.access(LOADGEN, os.X_OK)
    ):
        return LOADGEN
    cc = find_cc()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BUILD_DIR / f"loadgen.tmp.{os.getpid()}"
    cmd = [cc, "-O2", "-Wall", "-o", str(tmp), str(LOADGEN_SRC)]
    log(f"building load generator: {' '.join(cmd)}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise RuntimeError(f"compiling loadgen failed:\n{res.stderr}")
    os.replace(tmp, LOADGEN)  # atomic: concurrent runs never see a half-written binary
    return LOADGEN


# ------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time) of a live (non-zombie) process, to guard against PID reuse."""
    st = proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return None
    return (pid, int(st[19]))


def still_same(ident: tuple[int, int]) -> bool:
    return proc_identity(ident[0]) == ident


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def process_tree(pid: int) -> list[tuple[int, int]]:
    """Live processes of the tree rooted at pid, as (pid, start time)."""
    seen: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        ident = proc_identity(p)
        if ident is None or ident in seen:
            continue
        seen.append(ident)
        todo.extend(children(p))
    return seen


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS (and PSS) summed over the server process and all its descendants."""
    tree = process_tree(pid)
    rss = sum(status_kib(p, "VmRSS") for p, _ in tree)
    threads = sum(status_kib(p, "Threads") for p, _ in tree)
    pss_values = [pss_kib(p) for p, _ in tree]
    pss = (
        sum(v for v in pss_values if v is not None)
        if all(v is not None for v in pss_values)
        else None
    )
    return {"rss_kib": rss, "pss_kib": pss, "processes": len(tree), "threads": threads}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user+sys) used so far by the tree rooted at pid.

    Counts every process of the tree, zombies included (a forked child that exited but is not
    reaped yet still shows its own time), plus the time of reaped children (cutime/cstime),
    so that differences between two samples stay right while children come and go.
    """
    total = 0
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        st = proc_stat(p)
        if st is None:
            continue
        total += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
        todo.extend(children(p))
    return total / CLK_TCK


def kill_tree(idents: list[tuple[int, int]]) -> list[int]:
    """SIGKILL every listed process that is still the same process (checked by start time)."""
    killed = []
    for ident in idents:
        if still_same(ident):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(ident[0], signal.SIGKILL)
                killed.append(ident[0])
    return killed


STARTED: list[subprocess.Popen[Any]] = []


def cleanup_all() -> None:
    """Kill whatever this run started and is still alive (by PID, with its descendants)."""
    for p in STARTED:
        if p.poll() is None:
            kill_tree(process_tree(p.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)


class LineReader:
    """Read newline-terminated lines from a pipe with a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def readline(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buf += chunk
        if b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            return line
        line, self.buf = self.buf, b""
        return line or None


# --------------------------------------------------------------------------- pinning


@dataclass
class Pinning:
    enabled: bool
    client_cpu: int | None = None
    server_cpu: int | None = None
    note: str = ""

    def preexec(self, cpu: int | None) -> Callable[[], None] | None:
        if not self.enabled or cpu is None:
            return None
        target = {cpu}

        def pin() -> None:
            os.sched_setaffinity(0, target)

        return pin


def plan_pinning(disabled: bool) -> Pinning:
    if disabled:
        return Pinning(False, note="pinning disabled (--no-pin)")
    if not hasattr(os, "sched_setaffinity"):
        return Pinning(False, note="pinning unavailable (no sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(False, note=f"pinning impossible: only CPUs {cpus} available")
    client, server = cpus[0], cpus[1]
    try:
        os.sched_setaffinity(0, {client})  # run.py itself stays off the server's CPU
    except OSError as exc:
        return Pinning(False, note=f"pinning failed: {exc}")
    return Pinning(
        True,
        client,
        server,
        f"loadgen and run.py pinned to CPU {client}; servers (threads, children) to CPU {server}",
    )


def raise_nofile() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    hard_eff = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < hard_eff:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_eff, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": before, "soft": soft, "hard": hard}


# ---------------------------------------------------------------------------- server


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ident: tuple[int, int] | None
    pinned: bool

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def start_server(
    name: str, cfg: argparse.Namespace, pin: Pinning, log_path: Path, timeout: float = 20.0
) -> Server | str:
    """Start `servers.py NAME`; returns the Server, or an error string."""
    cmd = [sys.executable, str(SERVERS_PY), name, "--port", "0", "--grace", str(cfg.grace)]
    several = name.startswith(WORKERS_PREFIX)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        logf.write(f"=== {datetime.datetime.now().isoformat()} {' '.join(cmd)}\n".encode())
        logf.flush()
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logf,
            start_new_session=True,
            preexec_fn=None if several else pin.preexec(pin.server_cpu),
            cwd=str(REPO),
        )
    STARTED.append(popen)
    assert popen.stdout is not None
    line = LineReader(popen.stdout.fileno()).readline(timeout)
    try:
        port = int(line or b"")
    except ValueError:
        kill_tree(process_tree(popen.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)
        tail = log_tail(log_path)
        return f"did not announce a port within {timeout:.0f} s (rc={popen.poll()}): {tail}"
    pinned = False
    if pin.enabled and pin.server_cpu is not None and not several:
        with contextlib.suppress(OSError):
            pinned = os.sched_getaffinity(popen.pid) == {pin.server_cpu}
    return Server(name, popen, port, log_path, proc_identity(popen.pid), pinned)


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def count_tracebacks(path: Path) -> int:
    try:
        return path.read_text(errors="replace").count("Traceback")
    except OSError:
        return 0


def stop_servers(
    srvs: list[Server], bound: float, on_signal_sent: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """SIGTERM the servers; wait up to `bound` s for each whole process tree to exit.

    A server still running then is reported as hung and SIGKILLed with all its descendants.
    Several servers are signalled together and waited for in parallel.
    """
    results: list[dict[str, Any]] = [{"bound_s": bound} for _ in srvs]
    trees: list[list[tuple[int, int]]] = []
    pending: list[int] = []
    t0 = time.monotonic_ns()
    for i, srv in enumerate(srvs):
        trees.append(process_tree(srv.pid))
        if not srv.alive():
            results[i].update(hung=False, exit_s=None, note=f"exited early rc={srv.popen.poll()}")
            continue
        os.kill(srv.pid, signal.SIGTERM)
        results[i]["t0_ns"] = t0
        pending.append(i)
    if on_signal_sent is not None:
        on_signal_sent(t0)
    deadline = t0 + int(bound * 1e9)
    while pending and time.monotonic_ns() < deadline:
        for i in list(pending):
            srv, idents = srvs[i], trees[i]
            if srv.alive():
                idents.extend(x for x in process_tree(srv.pid) if x not in idents)
            elif not any(still_same(x) for x in idents if x[0] != srv.pid):
                now = time.monotonic_ns()
                results[i].update(
                    hung=False, exit_s=(now - t0) / 1e9, returncode=srv.popen.returncode
                )
                pending.remove(i)
        time.sleep(0.005)
    for i in pending:
        srv, idents = srvs[i], trees[i]
        if srv.alive():
            idents.extend(x for x in process_tree(srv.pid) if x not in idents)
        left = [x for x in idents if still_same(x)]
        kill_ns = time.monotonic_ns()
        killed = kill_tree(left)
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.popen.wait(5)
        results[i].update(
            hung=True,
            exit_s=None,
            kill_s=(kill_ns - t0) / 1e9,
            killed_pids=killed,
            parent_exited_before_kill=srv.ident not in left,
        )
    return results


# --------------------------------------------------------------------------- loadgen


def run_loadgen(args: list[str], timeout: float, pin: Pinning) -> dict[str, Any]:
    cmd = [str(LOADGEN), *args]
    try:
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            preexec_fn=pin.preexec(pin.client_cpu),
        )
    except subprocess.TimeoutExpired:
        return {"harness_error": f"loadgen did not finish within {timeout:.0f} s"}
    lines = [ln for ln in res.stdout.decode(errors="replace").splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        return {"harness_error": f"loadgen rc={res.returncode}: {res.stderr.decode()[-300:]}"}
    try:
        data: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        return {"harness_error": f"bad loadgen output: {exc}: {lines[-1][:200]}"}
    return data


def load_scenario(
    kind: str, srv: Server, cfg: argparse.Namespace, pin: Pinning, seconds: float
) -> dict[str, Any]:
    if kind == "pingpong":
        extra = ["--conns", str(cfg.conns), "--size", str(cfg.size)]
    else:
        extra = ["--concurrency", str(cfg.concurrency), "--size", str(cfg.size)]
    args = [kind, HOST, str(srv.port), "--seconds", f"{seconds:g}", *extra]
    args += ["--connect-timeout", f"{cfg.connect_timeout:g}", "--timeout", f"{cfg.timeout:g}"]
    sys0, own0, kids0 = system_cpu(), resource.getrusage(resource.RUSAGE_SELF), children_cpu()
    cpu0 = tree_cpu_seconds(srv.pid)
    t0 = time.monotonic()
    data = run_loadgen(args, timeout=seconds + 30, pin=pin)
    wall = time.monotonic() - t0
    cpu1 = tree_cpu_seconds(srv.pid)
    sys1, own1, kids1 = system_cpu(), resource.getrusage(resource.RUSAGE_SELF), children_cpu()
    # Whole-invocation figures (connect and drain included), so approximate.
    server = cpu1 - cpu0
    ours = (
        server + (kids1 - kids0) + (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    )
    data["server_cpu_util"] = round(server / wall, 3) if wall > 0 else None
    if sys0 is not None and sys1 is not None and wall > 0:
        # CPU used by processes that are not part of the benchmark (other users of the
        # machine), in cores, and CPU time the hypervisor stole from this VM.
        data["other_cpu_cores"] = round(max(0.0, (sys1[0] - sys0[0]) - ours) / wall, 3)
        data["steal_cores"] = round((sys1[1] - sys0[1]) / wall, 3)
    return data


def system_cpu() -> tuple[float, float] | None:
    """(user+nice+system, steal) seconds of all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, steal = (int(fields[i]) for i in (1, 2, 3, 8))
    return ((user + nice + system) / CLK_TCK, steal / CLK_TCK)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def idle_scenario(
    name: str, cfg: argparse.Namespace, pin: Pinning, log_dir: Path
) -> dict[str, Any]:
    """Fresh server: RSS at rest, RSS with N idle connections, then stop under load."""
    n = cfg.idle_conns
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[0] != resource.RLIM_INFINITY and limits[0] < n + 64:
        return {"skipped": f"RLIMIT_NOFILE soft limit {limits[0]} < {n} + 64 and cannot be raised"}
    started = start_server(name, cfg, pin, log_dir / f"{name}.idle.log")
    if isinstance(started, str):
        return {"harness_error": f"server failed to start: {started}"}
    srv = started
    out: dict[str, Any] = {"conns": n, "ramp": cfg.idle_ramp}
    lg: subprocess.Popen[bytes] | None = None
    try:
        time.sleep(cfg.settle)
        out["mem_base"] = tree_memory(srv.pid)
        cmd = [
            str(LOADGEN),
            "idle",
            HOST,
            str(srv.port),
            "--conns",
            str(n),
            "--ramp",
            str(cfg.idle_ramp),
            "--size",
            str(cfg.size),
            "--serve-timeout",
            f"{cfg.serve_timeout:g}",
            "--close-timeout",
            f"{cfg.stop_timeout + 5:g}",
            "--hold-max",
            f"{cfg.serve_timeout + cfg.stop_timeout + 60:g}",
            "--hold-fd-out",
        ]
        lg = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=pin.preexec(pin.client_cpu),
        )
        STARTED.append(lg)
        assert lg.stdout is not None and lg.stdin is not None
        reader = LineReader(lg.stdout.fileno())
        line = reader.readline(cfg.serve_timeout + 15)
        if line is None:
            out["harness_error"] = "loadgen idle: no 'served' report"
            return out
        served = json.loads(line)
        out["served_report"] = served
        time.sleep(cfg.settle)
        out["mem_idle"] = tree_memory(srv.pid)
        n_served = int(served.get("served", 0))
        if n_served > 0:
            delta = out["mem_idle"]["rss_kib"] - out["mem_base"]["rss_kib"]
            out["kib_per_conn"] = round(delta / n_served, 2)
            pss_i, pss_b = out["mem_idle"]["pss_kib"], out["mem_base"]["pss_kib"]
            if pss_i is not None and pss_b is not None:
                out["pss_kib_per_conn"] = round((pss_i - pss_b) / n_served, 2)
        stdin = lg.stdin

        def tell_loadgen(t0_ns: int) -> None:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(f"stop {t0_ns}\n".encode())
                stdin.flush()

        stop = stop_servers([srv], cfg.stop_timeout, on_signal_sent=tell_loadgen)[0]
        out["stop"] = stop
        # The server is gone (exited or killed); the served connections should all be closed
        # now.  Give the loadgen a moment for stragglers, then ask for its report.
        line = reader.readline(2.0)
        if line is None:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(b"quit\n")
                stdin.flush()
            line = reader.readline(5.0)
        if line is None:
            out["harness_error"] = "loadgen idle: no 'closed' report"
        else:
            closed = json.loads(line)
            if not cfg.keep_close_times:
                closed.pop("close_times_ms", None)
            out["closed_report"] = closed
    finally:
        if lg is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                if lg.stdin:
                    lg.stdin.close()
            try:
                lg.wait(5)
            except subprocess.TimeoutExpired:
                lg.kill()
                lg.wait(5)
        if srv.alive():
            kill_tree(process_tree(srv.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.popen.wait(5)
    return out


# ----------------------------------------------------------------------------- stats


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def add_errors(total: dict[str, int], data: dict[str, Any]) -> None:
    for k, v in (data.get("errors") or {}).items():
        total[k] = total.get(k, 0) + int(v)
    if "harness_error" in data:
        total["harness"] = total.get("harness", 0) + 1


@dataclass
class Row:
    name: str
    available: bool
    note: str = ""
    detail: str = ""
    warmup: list[dict[str, Any]] = field(default_factory=list)
    pingpong: list[dict[str, Any]] = field(default_factory=list)
    connrate: list[dict[str, Any]] = field(default_factory=list)
    idle: dict[str, Any] | None = None
    stop_no_clients: dict[str, Any] | None = None
    pinned: bool | None = None
    logs: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {}
        pp = [r for r in self.pingpong if "rps" in r]
        cr = [r for r in self.connrate if "cps" in r]
        s["req_s"] = median([r["rps"] for r in pp])
        s["p50_us"] = median([r["lat_us"].get("p50") for r in pp])
        s["p99_us"] = median([r["lat_us"].get("p99") for r in pp])
        s["conn_s"] = median([r["cps"] for r in cr])
        s["conn_p99_us"] = median([r["conn_us"].get("p99") for r in cr])
        s["client_cpu_pingpong"] = median([r.get("cpu_util") for r in pp])
        s["server_cpu_pingpong"] = median([r.get("server_cpu_util") for r in pp])
        s["client_cpu_connrate"] = median([r.get("cpu_util") for r in cr])
        s["server_cpu_connrate"] = median([r.get("server_cpu_util") for r in cr])
        s["other_cpu_cores"] = median([r.get("other_cpu_cores") for r in pp + cr])
        s["steal_cores"] = median([r.get("steal_cores") for r in pp + cr])
        errs: dict[str, int] = {}
        err_by: dict[str, int] = {}
        for label, runs in (
            ("warmup", self.warmup),
            ("pingpong", self.pingpong),
            ("connrate", self.connrate),
        ):
            before = sum(errs.values())
            for r in runs:
                add_errors(errs, r)
            err_by[label] = sum(errs.values()) - before
        idle = self.idle or {}
        before = sum(errs.values())
        if "served_report" in idle:
            add_errors(errs, idle["served_report"])
        closed = idle.get("closed_report") or {}
        if closed.get("closed_before_stop"):
            errs["closed_before_stop"] = int(closed["closed_before_stop"])
        if "harness_error" in idle:
            errs["harness"] = errs.get("harness", 0) + 1
        err_by["idle"] = sum(errs.values()) - before
        s["errors"] = sum(errs.values())
        s["error_kinds"] = {k: v for k, v in errs.items() if v}
        s["errors_by_scenario"] = err_by
        s["kib_per_conn"] = idle.get("kib_per_conn")
        s["pss_kib_per_conn"] = idle.get("pss_kib_per_conn")
        rep = idle.get("served_report") or {}
        s["idle_served"] = rep.get("served")
        s["idle_conns"] = idle.get("conns")
        stop = idle.get("stop") or {}
        s["stop_hung"] = bool(stop.get("hung"))
        s["stop_s"] = None
        if stop and not stop.get("hung") and stop.get("exit_s") is not None:
            close_max = (closed.get("close_ms_served") or {}).get("max")
            everyone = closed.get("served_open", 0) == 0
            s["stop_s"] = max(stop["exit_s"], (close_max or 0) / 1000) if everyone else None
            if not everyone:
                s["stop_hung"] = True
        s["close_p50_ms"] = (closed.get("close_ms_served") or {}).get("p50")
        s["close_max_ms"] = (closed.get("close_ms_served") or {}).get("max")
        nc = self.stop_no_clients or {}
        s["stop_no_clients_s"] = nc.get("exit_s")
        s["stop_no_clients_hung"] = bool(nc.get("hung"))
        return s


RATIO_METRICS = [
    ("req_s", "req/s"),
    ("p50_us", "p50"),
    ("p99_us", "p99"),
    ("conn_s", "conn/s"),
    ("kib_per_conn", "KiB/idle conn"),
    ("stop_s", "stop s"),
]


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return round(a / b, 3)
    return None


def compute_ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, s in summaries.items():
        r: dict[str, Any] = {"vs_trio_raw": {}, "vs_stdlib": {}, "stdlib_ref": stdlib_ref(name)}
        base = summaries.get(BASELINE)
        ref = summaries.get(stdlib_ref(name))
        one = summaries.get(ONE_PROCESS) if name.startswith(WORKERS_PREFIX) else None
        if one is not None:
            r["vs_one_process"] = {}
        for key, _ in RATIO_METRICS:
            r["vs_trio_raw"][key] = ratio(s.get(key), base.get(key)) if base else None
            r["vs_stdlib"][key] = ratio(s.get(key), ref.get(key)) if ref else None
            if one is not None:
                r["vs_one_process"][key] = ratio(s.get(key), one.get(key))
        out[name] = r
    return out


# ---------------------------------------------------------------------------- output


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return NA
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def fmt_ratio(v: Any) -> str:
    return NA if v is None else f"{v:.2f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def stop_cell(s: dict[str, Any], bound: float) -> str:
    if s.get("idle_served") is None:
        return NA
    if s["stop_hung"]:
        return f"hung (>{bound:g})"
    return fmt(s["stop_s"], 3)


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    rows = result["servers"]
    bound = meta["settings"]["stop_timeout"]
    out = [f"# Benchmark results ({meta['started']})", ""]
    out.append(
        f"`{meta['command']}` — {meta['settings']['rounds']} round(s) {X} "
        f"(pingpong {meta['settings']['seconds']:g} s, connrate {meta['settings']['seconds']:g} s) "
        f"after {meta['settings']['warmup']:g} s warm-up; idle {meta['settings']['idle_conns']} "
        f"conns; values are medians over rounds; errors are totals over all runs."
    )
    out.append("")
    out.append(
        f"Machine: {meta['cpu_model']}, {meta['cpus']} CPUs, Linux {meta['kernel']}, "
        f"Python {meta['python']}, trio {meta['trio']}. Pinning: {meta['pinning']['note']}. "
        f"Load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}."
    )
    out.append("")
    header = [
        "server",
        "req/s",
        "p50 µs",
        "p99 µs",
        "conn/s",
        "KiB/idle conn",
        "idle served",
        "stop s",
        "errors",
        f"{X} trio-raw",
        f"{X} stdlib",
    ]
    body = []
    for row in rows:
        if not row["available"]:
            body.append([row["name"], f"unavailable: {row['note']}"] + [""] * (len(header) - 2))
            continue
        s = row["summary"]
        r = row["ratios"]
        served = (
            f"{s['idle_served']}/{s['idle_conns']}"
            if s.get("idle_served") is not None
            else ("skipped" if (row.get("idle") or {}).get("skipped") else NA)
        )
        body.append(
            [
                row["name"],
                fmt(s["req_s"]),
                fmt(s["p50_us"]),
                fmt(s["p99_us"]),
                fmt(s["conn_s"]),
                fmt(s["kib_per_conn"], 1),
                served,
                stop_cell(s, bound),
                fmt(s["errors"]),
                fmt_ratio(r["vs_trio_raw"]["req_s"]),
                fmt_ratio(r["vs_stdlib"]["req_s"]) + f" ({r['stdlib_ref']})",
            ]
        )
    out.append(md_table(header, body))
    out.append("")
    out.append(
        f"`{X} trio-raw` / `{X} stdlib` = this row's req/s divided by the baseline's req/s, both "
        "measured in this run (stdlib = the stdlib server of the same kind, in parentheses). "
        "`KiB/idle conn` = (RSS with the idle connections open - RSS at rest) / served "
        "connections, RSS summed over the server's process tree. `stop s` = SIGTERM until the "
        "server's process tree exited and every served idle client saw EOF/reset; `hung` = "
        f"still running after {bound:g} s, then SIGKILLed."
    )
    out.append("")
    out.append("## Ratios per metric")
    out.append("")
    out.append(
        f"Each cell is `{X} trio-raw / {X} stdlib`. Higher is better for req/s and conn/s; "
        "lower is better for latency, memory and stop time."
    )
    out.append("")
    rh = ["server", *[label for _, label in RATIO_METRICS]]
    rb = []
    for row in rows:
        if not row["available"]:
            continue
        r = row["ratios"]
        rb.append(
            [row["name"]]
            + [
                f"{fmt_ratio(r['vs_trio_raw'][k])} / {fmt_ratio(r['vs_stdlib'][k])}"
                for k, _ in RATIO_METRICS
            ]
        )
    out.append(md_table(rh, rb))
    out.append("")
    several = [row for row in rows if row["available"] and row["name"].startswith(WORKERS_PREFIX)]
    if several:
        out.append("## Several processes")
        out.append("")
        out.append(
            f"`{X} {ONE_PROCESS}` = this row's value divided by `{ONE_PROCESS}`'s (the same server "
            "in one process, in this run). Worker rows are not pinned: their processes may use "
            "every CPU, the load generator's included. CPU = cores used on average, client / "
            "server (the server's whole process tree: supervisor and workers)."
        )
        out.append("")
        sh = [
            "server",
            "req/s",
            f"{X} {ONE_PROCESS}",
            "CPU pingpong",
            "conn/s",
            f"{X} {ONE_PROCESS}",
            "CPU connrate",
        ]
        sb = []
        for row in [r for r in rows if r["name"] == ONE_PROCESS and r["available"]] + several:
            s, versus = row["summary"], row["ratios"].get("vs_one_process") or {}
            sb.append(
                [
                    row["name"],
                    fmt(s["req_s"]),
                    fmt_ratio(versus.get("req_s", 1.0 if row["name"] == ONE_PROCESS else None)),
                    f"{cores(s['client_cpu_pingpong'])} / {cores(s['server_cpu_pingpong'])}",
                    fmt(s["conn_s"]),
                    fmt_ratio(versus.get("conn_s", 1.0 if row["name"] == ONE_PROCESS else None)),
                    f"{cores(s['client_cpu_connrate'])} / {cores(s['server_cpu_connrate'])}",
                ]
            )
        out.append(md_table(sh, sb))
        out.append("")
    out.append("## Details")
    out.append("")
    dh = [
        "server",
        "req/s per round",
        "conn/s per round",
        "conn p99 µs",
        "CPU client/server pingpong",
        "CPU client/server connrate",
        "RSS MiB rest→idle",
        "PSS KiB/conn",
        "procs/threads idle",
        "close p50/max ms",
        "stop s, no clients",
        "other CPU / steal",
        "errors",
    ]
    db = []
    for row in rows:
        if not row["available"]:
            continue
        s = row["summary"]
        idle = row.get("idle") or {}
        mb, mi = idle.get("mem_base") or {}, idle.get("mem_idle") or {}
        rss = (
            f"{mb['rss_kib'] / 1024:.1f}→{mi['rss_kib'] / 1024:.1f}"
            if mb.get("rss_kib") and mi.get("rss_kib")
            else NA
        )
        procs = f"{mi.get('processes', NA)}/{mi.get('threads', NA)}" if mi else NA
        nc = "hung" if s["stop_no_clients_hung"] else fmt(s["stop_no_clients_s"], 3)
        errs = ", ".join(f"{k}={v}" for k, v in s["error_kinds"].items()) or "0"
        if s["errors"]:
            by = ", ".join(f"{k}:{v}" for k, v in s["errors_by_scenario"].items() if v)
            errs += f" ({by})"
        db.append(
            [
                row["name"],
                " ".join(fmt(x.get("rps")) for x in row["pingpong"]) or NA,
                " ".join(fmt(x.get("cps")) for x in row["connrate"]) or NA,
                fmt(s["conn_p99_us"]),
                f"{pct(s['client_cpu_pingpong'])}/{pct(s['server_cpu_pingpong'])}",
                f"{pct(s['client_cpu_connrate'])}/{pct(s['server_cpu_connrate'])}",
                rss,
                fmt(s["pss_kib_per_conn"], 1),
                procs,
                f"{fmt(s['close_p50_ms'], 1)}/{fmt(s['close_max_ms'], 1)}",
                nc,
                f"{fmt(s['other_cpu_cores'], 2)} / {fmt(s['steal_cores'], 2)}",
                errs,
            ]
        )
    out.append(md_table(dh, db))
    out.append("")
    notes = [f"- {n}" for n in result["notes"]]
    if notes:
        out.append("## Notes")
        out.append("")
        out.extend(notes)
        out.append("")
    return "\n".join(out)


def pct(v: Any) -> str:
    return NA if v is None else f"{v * 100:.0f}%"


def cores(v: Any) -> str:
    return NA if v is None else f"{v:.2f}"


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark line-echo servers side by side (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s, 50 idle conns")
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated subset of: {', '.join(ALL_SERVERS)}",
    )
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of scenarios"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="per run (default 5, quick 1)")
    p.add_argument(
        "--warmup", type=float, default=None, help="per server, 0 = none (default 1, quick 0.5)"
    )
    p.add_argument("--conns", type=int, default=32, help="pingpong connections")
    p.add_argument("--concurrency", type=int, default=16, help="connrate connections in flight")
    p.add_argument("--size", type=int, default=64, help="line size in bytes, incl. newline")
    p.add_argument("--idle-conns", type=int, default=None, help="default 1000, quick 50")
    p.add_argument("--idle-ramp", type=int, default=8, help="idle: max connects in flight")
    p.add_argument(
        "--serve-timeout", type=float, default=None, help="idle: bound to serve all (10/quick 3)"
    )
    p.add_argument(
        "--stop-timeout", type=float, default=None, help="bound after SIGTERM (10/quick 3)"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="pingpong: bound for opening all connections (5/quick 2)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="per request/connection timeout (5/quick 2)"
    )
    p.add_argument("--grace", type=float, default=0.0, help="native: shutdown_grace seconds")
    p.add_argument("--settle", type=float, default=None, help="pause before RSS samples (0.5)")
    p.add_argument("--no-pin", action="store_true", help="do not pin client/server CPUs")
    p.add_argument("--out-dir", type=Path, default=BENCH / "results", help="results directory")
    p.add_argument(
        "--keep-close-times", action="store_true", help="keep per-connection close times in JSON"
    )
    p.add_argument("--rebuild", action="store_true", help="recompile the load generator")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds if a.rounds is not None else (1 if q else 3)
    a.seconds = a.seconds if a.seconds is not None else (1.0 if q else 5.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if q else 1.0)
    a.idle_conns = a.idle_conns if a.idle_conns is not None else (50 if q else 1000)
    a.serve_timeout = a.serve_timeout if a.serve_timeout is not None else (3.0 if q else 10.0)
    a.stop_timeout = a.stop_timeout if a.stop_timeout is not None else (3.0 if q else 10.0)
    a.connect_timeout = a.connect_timeout if a.connect_timeout is not None else (2.0 if q else 5.0)
    a.timeout = a.timeout if a.timeout is not None else (2.0 if q else 5.0)
    a.settle = a.settle if a.settle is not None else (0.3 if q else 0.5)
    a.server_list = [s.strip() for s in a.servers.split(",") if s.strip()]
    a.scenario_list = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    for s in a.server_list:
        if s not in ALL_SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}")
    for s in a.scenario_list:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if a.rounds < 1 or a.seconds <= 0 or a.idle_conns < 1:
        p.error("--rounds, --seconds and --idle-conns must be positive")
    return a


def check_available(names: list[str]) -> dict[str, dict[str, Any]]:
    """Run `servers.py --check NAME` for every server in parallel (imports only, no serving)."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(SERVERS_PY), "--check", name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        for name in names
    }
    out: dict[str, dict[str, Any]] = {}
    for name, proc in procs.items():
        STARTED.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            out[name] = {"name": name, "available": False, "reason": "check timed out"}
            continue
        try:
            out[name] = json.loads(stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            reason = f"check failed (rc={proc.returncode}): {stderr.strip()[-200:]}"
            out[name] = {"name": name, "available": False, "reason": reason}
    return out


def machine_meta() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    trio_version = "?"
    with contextlib.suppress(Exception):
        trio_version = subprocess.run(
            [sys.executable, "-c", "import trio; print(trio.__version__)"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()

    def sysctl(name: str) -> str:
        try:
            return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
        except OSError:
            return "?"

    def git(*args: str) -> str:
        try:
            res = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return res.stdout.strip() if res.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "src")
    return {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "src_uncommitted_changes": None if dirty == "?" else len(dirty.splitlines()),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio_version,
        "sysctl": {
            k: sysctl(k)
            for k in (
                "net.ipv4.tcp_tw_reuse",
                "net.ipv4.ip_local_port_range",
                "net.core.somaxconn",
            )
        },
    }


def read_loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def rotate(items: list[Any], k: int) -> Iterator[Any]:
    k %= max(1, len(items))
    yield from items[k:] + items[:k]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    t_start = time.monotonic()
    loadavg_start = read_loadavg()
    try:
        build_loadgen(force=cfg.rebuild)
    except RuntimeError as exc:
        log(str(exc))
        return 3

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    nofile = raise_nofile()
    pin = plan_pinning(cfg.no_pin)
    log(pin.note)
    out_dir: Path = cfg.out_dir
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    notes: list[str] = []
    rows: dict[str, Row] = {}
    checks = check_available(cfg.server_list)
    for name in cfg.server_list:
        info = checks[name]
        rows[name] = Row(
            name,
            bool(info.get("available")),
            note=str(info.get("reason", "")),
            detail=str(info.get("detail", "")),
        )
        if not info.get("available"):
            log(f"{name}: unavailable ({info.get('reason')})")
            notes.append(f"{name} unavailable: {info.get('reason')}")
    available = [n for n in cfg.server_list if rows[n].available]
    try:
        run_all(cfg, pin, rows, available, log_dir, notes)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        cleanup_all()
        return 130
    finally:
        cleanup_all()

    summaries = {n: rows[n].summary() for n in available}
    ratios = compute_ratios(summaries)
    refs = {BASELINE, *(stdlib_ref(n) for n in available)}
    if any(n.startswith(WORKERS_PREFIX) for n in available):
        refs.add(ONE_PROCESS)
    for ref in refs:
        if ref not in summaries:
            notes.append(f"baseline {ref} not measured in this run: its ratio column is empty")
    for n in available:
        s = summaries[n]
        for sc in ("pingpong", "connrate"):
            cu = s.get(f"client_cpu_{sc}")
            if cu is not None and cu >= 0.9:
                notes.append(
                    f"{n} {sc}: load generator used {cu:.0%} of its CPU — the client may have "
                    "been the bottleneck"
                )
        row = rows[n]
        harness = [
            f"{label}: {r['harness_error']}"
            for label, runs in (
                ("warm-up", row.warmup),
                ("pingpong", row.pingpong),
                ("connrate", row.connrate),
                ("idle", [row.idle] if row.idle else []),
            )
            for r in runs
            if "harness_error" in r
        ]
        if harness:
            distinct = list(dict.fromkeys(harness))
            notes.append(f"{n}: the harness could not measure everything: " + "; ".join(distinct))
        other = s.get("other_cpu_cores")
        if other is not None and other >= 0.1:
            notes.append(
                f"{n}: other processes on the machine used {other:.2f} CPU cores (median) during "
                "its pingpong/connrate runs; its numbers are disturbed by that load"
            )
        steal = s.get("steal_cores")
        if steal is not None and steal >= 0.05:
            notes.append(
                f"{n}: the hypervisor stole {steal:.2f} CPU cores (median) during its runs"
            )
        if s["stop_hung"]:
            notes.append(
                f"{n}: did not stop within {cfg.stop_timeout:g} s of SIGTERM with "
                f"{s['idle_served']} idle clients; SIGKILLed"
            )
        tb = sum(count_tracebacks(Path(p)) for p in rows[n].logs)
        if tb:
            notes.append(f"{n}: {tb} traceback(s) in the server log ({', '.join(rows[n].logs)})")
        if n.startswith(WORKERS_PREFIX) and pin.enabled and ONE_PROCESS in summaries:
            notes.append(
                f"{n} ran on every CPU and {ONE_PROCESS} pinned to one: for {X} {ONE_PROCESS}, "
                f"compare them in a --no-pin run"
            )
        if rows[n].pinned is False and pin.enabled and not n.startswith(WORKERS_PREFIX):
            notes.append(f"{n}: server pinning could not be verified")
    meta = machine_meta()
    meta["loadavg_start"] = loadavg_start
    meta["loadavg_end"] = read_loadavg()
    meta.update(
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        duration_s=round(time.monotonic() - t_start, 1),
        pinning={
            "enabled": pin.enabled,
            "client_cpu": pin.client_cpu,
            "server_cpu": pin.server_cpu,
            "note": pin.note,
        },
        rlimit_nofile=nofile,
        settings={
            k: getattr(cfg, k)
            for k in (
                "quick",
                "rounds",
                "seconds",
                "warmup",
                "conns",
                "concurrency",
                "size",
                "idle_conns",
                "idle_ramp",
                "serve_timeout",
                "stop_timeout",
                "grace",
                "settle",
                "connect_timeout",
                "timeout",
            )
        },
        scenarios=cfg.scenario_list,
        loadgen=str(LOADGEN.relative_to(REPO)),
    )
    result: dict[str, Any] = {"meta": meta, "servers": [], "notes": notes}
    for name in cfg.server_list:
        row = rows[name]
        entry: dict[str, Any] = {
            "name": name,
            "available": row.available,
            "note": row.note,
            "detail": row.detail,
            "stdlib_ref": stdlib_ref(name),
        }
        if row.available:
            entry.update(
                summary=summaries[name],
                ratios=ratios[name],
                pinned=row.pinned,
                warmup=row.warmup,
                pingpong=row.pingpong,
                connrate=row.connrate,
                idle=row.idle,
                stop_no_clients=row.stop_no_clients,
                logs=row.logs,
            )
        result["servers"].append(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    (out_dir / "latest.md").write_text(md)
    print(md)
    log(f"wrote {out_dir / 'latest.json'} and {out_dir / 'latest.md'} in {meta['duration_s']} s")
    return 0


def run_all(
    cfg: argparse.Namespace,
    pin: Pinning,
    rows: dict[str, Row],
    available: list[str],
    log_dir: Path,
    notes: list[str],
) -> None:
    want_load = any(s in cfg.scenario_list for s in ("pingpong", "connrate"))
    servers: dict[str, Server] = {}
    if want_load:
        # Phase A: all servers up at once (idle ones cost nothing), rounds interleaved so that
        # drift in the machine affects every server alike.
        for name in available:
            path = log_dir / f"{name}.load.log"
            rows[name].logs.append(str(path))
            started = start_server(name, cfg, pin, path)
            if isinstance(started, str):
                log(f"{name}: {started}")
                notes.append(f"{name}: server failed to start: {started}")
                rows[name].warmup.append({"harness_error": started})
                continue
            servers[name] = started
            rows[name].pinned = started.pinned
            log(f"{name}: pid {started.pid} port {started.port}; warm-up {cfg.warmup:g} s")
            for kind in ("pingpong", "connrate"):
                if kind in cfg.scenario_list and cfg.warmup > 0:
                    rows[name].warmup.append(load_scenario(kind, started, cfg, pin, cfg.warmup / 2))
        for rnd in range(cfg.rounds):
            for name in rotate(list(servers), rnd):
                srv = servers[name]
                for kind in ("pingpong", "connrate"):
                    if kind not in cfg.scenario_list:
                        continue
                    if not srv.alive():
                        msg = f"server exited early (rc={srv.popen.poll()})"
                        getattr(rows[name], kind).append({"harness_error": msg})
                        continue
                    data = load_scenario(kind, srv, cfg, pin, cfg.seconds)
                    getattr(rows[name], kind).append(data)
                    val = data.get("rps", data.get("cps"))
                    err = data.get("errors_total", data.get("harness_error"))
                    log(f"round {rnd + 1}/{cfg.rounds} {name} {kind}: {fmt(val)}/s errors={err}")
        # Stop them all at once (no clients connected): informational exit time.
        stops = stop_servers(list(servers.values()), cfg.stop_timeout)
        for name, stop in zip(servers, stops, strict=True):
            rows[name].stop_no_clients = stop
    if "idle" in cfg.scenario_list:
        for name in available:
            log(f"{name}: idle scenario, {cfg.idle_conns} connections")
            rows[name].logs.append(str(log_dir / f"{name}.idle.log"))
            rows[name].idle = idle = idle_scenario(name, cfg, pin, log_dir)
            rep = idle.get("served_report") or {}
            stop = idle.get("stop") or {}
            log(
                f"{name}: served {rep.get('served')}/{idle.get('conns')}, "
                f"KiB/conn {idle.get('kib_per_conn')}, "
                f"stop {'hung' if stop.get('hung') else stop.get('exit_s')}"
                + (f", {idle['harness_error']}" if "harness_error" in idle else "")
                + (f", skipped: {idle['skipped']}" if "skipped" in idle else "")
            )


if __name__ == "__main__":
    sys.exit(main())
