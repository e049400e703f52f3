"""The cross-language benchmark of fastsocketserver: one command, one sitting, same load.

    python benches/run.py [--quick] [--only REGEX] [--pin] [--repeat N] [--out DIR]
    python -m fastsocketserver.bench ...           (the same)

Every workload is run against every applicable server of benches/servers.py, one fresh server
process per run, driven by the Rust load generator of benches/loadgen over loopback. For each
run it records the load generator's figures (requests/s, p50/p99 latency, errors, its own CPU)
and the server's kernel accounting over exactly the measured window:

* CPU time: the server's own ``getrusage`` (self + reaped children) read through SIGUSR1 at the
  window's two marks (see servers.py), plus the live children's ``/proc/PID/stat``; falls back
  to ``/proc/PID/stat`` (utime+stime+cutime+cstime) if the server does not answer the signal;
* voluntary context switches: the same ``getrusage`` (``ru_nvcsw``, which, unlike
  ``/proc/PID/task/*/status``, keeps the threads that already exited), plus live children's
  ``/proc/PID/task/*/status``; fallback: the sum over the live threads only (a lower bound);
* peak RSS (``VmHWM``, or the sampled sum over the server and its children when that is higher)
  and the peak thread (and process) count, sampled every 50 ms.

Figures are also given as ratios to the stdlib server of the same kind (``fss X`` against
``stdlib X``; asyncio, uvloop, the native server and the protocol slot against the stdlib's
``Threading*Server`` of the transport, or ``UDPServer`` for UDP). Prints a table, writes
``results/latest.json`` and draws ``results/latest.png`` (stdlib only, see chart.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN_DIR = HERE / "loadgen"
SERVERS_PY = HERE / "servers.py"
HZ = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# What runs

@dataclass
class Server:
    label: str
    impl: str
    baseline: str
    group: str  # colour group of the chart: fss, stdlib, asyncio, uvloop, native


@dataclass
class Workload:
    key: str
    title: str
    mode: str
    transport: str
    conns: int
    size: int = 64
    quick: bool = False
    quick_conns: int | None = None
    work_us: float = 0  # pure-Python work per request in the handler (servers.py --work-us)
    servers: list[Server] = field(default_factory=list)


def _stdlib_has(name: str) -> bool:
    import socketserver

    return hasattr(socketserver, name)


def _group(impl: str) -> str:
    fam = impl.partition(":")[0]
    return {"fss": "fss", "stdlib": "stdlib", "asyncio": "asyncio", "uvloop": "uvloop"}.get(fam, "native")


def stream_servers(transport: str, *, sync: bool, forking: bool) -> list[Server]:
    t = {"tcp": "TCP", "unix": "UnixStream"}[transport]
    classes = ([f"{t}Server"] if sync else []) + [f"Threading{t}Server"]
    if forking and _stdlib_has(f"Forking{t}Server"):
        classes.append(f"Forking{t}Server")
    ref = f"stdlib Threading{t}Server"
    out: list[Server] = []
    for c in classes:
        out.append(Server(f"fss {c}", f"fss:{c}", f"stdlib {c}", "fss"))
        out.append(Server(f"stdlib {c}", f"stdlib:{c}", f"stdlib {c}", "stdlib"))
    # the event-driven handler (issue 7): the asyncio/uvloop protocol class on our server
    out.append(Server(f"fss {t}Server+Protocol", "fss:protocol", ref, "fss"))
    out.append(Server("asyncio streams", "asyncio:streams", ref, "asyncio"))
    out.append(Server("asyncio Protocol", "asyncio:protocol", ref, "asyncio"))
    out.append(Server("uvloop Protocol", "uvloop:protocol", ref, "uvloop"))
    out.append(Server(f"fss {t}Server+NativeEcho", "fss:native", ref, "native"))
    out.append(Server("native Rust echo", "native", ref, "native"))
    return out


def udp_servers() -> list[Server]:
    ref = "stdlib UDPServer"
    out: list[Server] = []
    for c in ("UDPServer", "ThreadingUDPServer"):
        out.append(Server(f"fss {c}", f"fss:{c}", f"stdlib {c}", "fss"))
        out.append(Server(f"stdlib {c}", f"stdlib:{c}", f"stdlib {c}", "stdlib"))
    out.append(Server("fss UDPServer+DatagramProtocol", "fss:protocol", ref, "fss"))
    out.append(Server("asyncio DatagramProtocol", "asyncio:protocol", ref, "asyncio"))
    out.append(Server("uvloop DatagramProtocol", "uvloop:protocol", ref, "uvloop"))
    out.append(Server("fss UDPServer+NativeEcho", "fss:native", ref, "native"))
    out.append(Server("native Rust echo", "native", ref, "native"))
    return out


def prefork_servers() -> list[Server]:
    """Our blocking ThreadingTCPServer and protocol TCPServer under PreforkMixIn, 1 and 2 workers.

    ``-w1`` is compared with the stdlib's ThreadingTCPServer, ``-w2`` with its own ``-w1``: the
    ``x std`` column of a ``-w2`` row is the w2/w1 ratio."""
    out: list[Server] = []
    for name, impl in (("threading", "fss:ThreadingTCPServer"), ("protocol", "fss:protocol")):
        out.append(Server(f"fss-{name}-w1", f"{impl}+w1", "stdlib ThreadingTCPServer", "fss"))
        out.append(Server(f"fss-{name}-w2", f"{impl}+w2", f"fss-{name}-w1", "fss"))
    return out


def workloads() -> list[Workload]:
    tcp1 = stream_servers("tcp", sync=True, forking=True)
    tcpn = stream_servers("tcp", sync=False, forking=True) + prefork_servers()
    cpu_servers = [Server("stdlib ThreadingTCPServer", "stdlib:ThreadingTCPServer", "stdlib ThreadingTCPServer",
                          "stdlib"), *prefork_servers()]
    return [
        Workload("tcp1-64", "TCP echo, 1 connection, 64 B", "tcp", "tcp", 1, 64, False, servers=tcp1),
        Workload("tcp32-64", "TCP echo, 32 connections, 64 B", "tcp", "tcp", 32, 64, True, servers=tcpn),
        Workload("tcp1-4k", "TCP echo, 1 connection, 4 KiB", "tcp", "tcp", 1, 4096, False, servers=tcp1),
        Workload("tcp32-4k", "TCP echo, 32 connections, 4 KiB", "tcp", "tcp", 32, 4096, False, servers=tcpn),
        Workload("connect8", "one request per connection, 8 clients", "tcp-connect", "tcp", 8, 64, True,
                 servers=stream_servers("tcp", sync=True, forking=True)),
        Workload("udp8", "UDP echo, 8 clients, 64 B", "udp", "udp", 8, 64, True, servers=udp_servers()),
        Workload("unix8", "Unix stream echo, 8 connections, 64 B", "unix", "unix", 8, 64, True,
                 servers=stream_servers("unix", sync=False, forking=True)),
        Workload("idle5000", "5,000 connections: one line each, then all stay open", "idle", "tcp", 5000, 64,
                 True, quick_conns=1000, servers=stream_servers("tcp", sync=False, forking=False)),
        Workload("cpu32", "CPU-bound: ~200 us of Python per request, 32 connections, 64 B", "tcp", "tcp", 32, 64,
                 False, work_us=200, servers=cpu_servers),
    ]


# ---------------------------------------------------------------------------------------------
# Building the load generator

def loadgen_binaries(rebuild: bool = False) -> tuple[Path, Path]:
    """Paths of ``loadgen`` and ``echo-server``, building them with cargo when missing or stale."""
    target = LOADGEN_DIR / "target" / "release"
    lg, es = target / "loadgen", target / "echo-server"
    sources = [LOADGEN_DIR / "Cargo.toml", *sorted((LOADGEN_DIR / "src").rglob("*.rs"))]
    newest = max(p.stat().st_mtime for p in sources)
    stale = not lg.exists() or not es.exists() or min(lg.stat().st_mtime, es.stat().st_mtime) < newest
    if rebuild or stale:
        cargo = shutil.which("cargo")
        if cargo is None:
            sys.exit("benches: cargo is needed to build the load generator (https://rustup.rs)")
        cmd = [cargo, "build", "--release", "--manifest-path", str(LOADGEN_DIR / "Cargo.toml")]
        print("building the load generator:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        now = time.time()
        for b in (lg, es):  # cargo leaves an up-to-date binary's mtime alone
            os.utime(b, (now, now))
    return lg, es


# ---------------------------------------------------------------------------------------------
# Kernel accounting of the server

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    s = _read(f"/proc/{pid}/stat")
    if s is None:
        return None
    return s[s.rindex(")") + 2:].split()  # fields from "state" (field 3) on


def _status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    out: dict[str, str] = {}
    for line in (_read(path) or "").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _kb(v: str | None) -> int:
    return int(v.split()[0]) if v else 0


def _pss_kb(pid: int) -> int:
    for line in (_read(f"/proc/{pid}/smaps_rollup") or "").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f is not None and int(f[1]) == pid:
                kids.append(int(d))
    return kids


def tasks_vcsw(pid: int) -> int:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        v = _status(pid, int(tid)).get("voluntary_ctxt_switches")
        if v:
            total += int(v)
    return total


class ServerProcess:
    """A server of servers.py running as a subprocess, with its stdout lines in a queue."""

    def __init__(self, cmd: list[str], forking: bool) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, start_new_session=True)
        self.pid = self.proc.pid
        self.forking = forking
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float, prefix: str = "") -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(prefix):
                return line

    def kids(self) -> list[int]:
        return children_of(self.pid) if self.forking else []

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counters now: the server's own getrusage (via SIGUSR1) and /proc."""
        snap: dict[str, Any] = {"t": time.monotonic()}
        f = _stat_fields(self.pid)
        if f is not None:  # utime stime cutime cstime are fields 14-17, here 11-14
            snap["proc_cpu"] = sum(int(x) for x in f[11:15]) / HZ
        snap["tasks_vcsw"] = tasks_vcsw(self.pid)
        kids_cpu, kids_vcsw = 0.0, 0
        for k in self.kids():
            kf = _stat_fields(k)
            if kf is not None:
                kids_cpu += sum(int(x) for x in kf[11:15]) / HZ
                kids_vcsw += tasks_vcsw(k)
        snap["kids_cpu"], snap["kids_vcsw"] = kids_cpu, kids_vcsw
        while not self.lines.empty():  # stale lines
            if self.lines.get_nowait() is None:
                break
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return snap
        line = self.next_line(2.0, "RUSAGE ")
        if line is not None:
            snap["ru"] = json.loads(line[len("RUSAGE "):])
        return snap

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        try:  # forked children left behind, if any: the whole process group we started
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            pass

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")


class Sampler(threading.Thread):
    """Peak RSS, threads and processes of the server (and its children), every 50 ms."""

    def __init__(self, server: ServerProcess, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.stop_event = threading.Event()
        self.rss_kb = self.threads = self.procs = 0

    def sample(self) -> None:
        st = _status(self.server.pid)
        if not st:
            return
        forking = self.server.forking
        # a forking server's children share most pages with it: sum PSS, not RSS
        rss = _pss_kb(self.server.pid) if forking else _kb(st.get("VmRSS"))
        thr, procs = int(st.get("Threads", "0")), 1
        for k in self.server.kids():
            ks = _status(k)
            if ks:
                rss += _pss_kb(k)
                thr += int(ks.get("Threads", "0"))
                procs += 1
        self.rss_kb, self.threads, self.procs = max(self.rss_kb, rss), max(self.threads, thr), max(self.procs, procs)

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def finish(self) -> dict[str, Any]:
        self.sample()
        self.stop_event.set()
        if self.server.forking:
            return {"rss_peak_kb": self.rss_kb, "rss_kind": "sampled sum of PSS over the server and its children",
                    "threads_peak": self.threads, "procs_peak": self.procs}
        hwm = _kb(_status(self.server.pid).get("VmHWM"))
        return {"rss_peak_kb": max(hwm, self.rss_kb), "rss_kind": "VmHWM", "threads_peak": self.threads,
                "procs_peak": self.procs}


def cpu_busy_s() -> float:
    """All CPUs' non-idle time so far (/proc/stat), to see what else loaded the machine."""
    f = (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / HZ


def window(s0: dict[str, Any], s1: dict[str, Any]) -> dict[str, Any]:
    """Server CPU seconds and voluntary context switches between two snapshots."""
    kids_cpu = s1["kids_cpu"] - s0["kids_cpu"]
    kids_vcsw = s1["kids_vcsw"] - s0["kids_vcsw"]
    if "ru" in s0 and "ru" in s1:
        def cpu(r: dict[str, float]) -> float:
            return r["utime"] + r["stime"] + r["c_utime"] + r["c_stime"]

        a, b = s0["ru"], s1["ru"]
        return {"cpu_s": cpu(b) - cpu(a) + kids_cpu,
                "vcsw": (b["nvcsw"] + b["c_nvcsw"]) - (a["nvcsw"] + a["c_nvcsw"]) + kids_vcsw,
                "ivcsw": (b["nivcsw"] + b["c_nivcsw"]) - (a["nivcsw"] + a["c_nivcsw"]),
                "accounting": "rusage"}
    return {"cpu_s": s1.get("proc_cpu", 0) - s0.get("proc_cpu", 0) + kids_cpu,
            "vcsw": s1["tasks_vcsw"] - s0["tasks_vcsw"] + kids_vcsw, "ivcsw": None,
            "accounting": "/proc (live threads only: context switches are a lower bound)"}


# ---------------------------------------------------------------------------------------------
# One run

@dataclass
class Options:
    duration: float
    warmup: float
    pin: bool
    server_cpus: str
    load_cpus: str
    quick: bool
    loadgen: Path
    echo_server: Path
    udp_timeout_ms: int = 200


def _line_queue(stream: Any) -> queue.Queue[str | None]:
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_line(q: queue.Queue[str | None], timeout: float) -> str | None:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


def run_one(wl: Workload, srv: Server, opt: Options) -> dict[str, Any]:
    conns = wl.quick_conns if (opt.quick and wl.quick_conns) else wl.conns
    rec: dict[str, Any] = {"workload": wl.key, "title": wl.title, "server": srv.label, "impl": srv.impl,
                           "group": srv.group, "baseline": srv.baseline, "conns": conns, "size": wl.size,
                           "status": "ok", "notes": []}
    tmpdir = None
    if wl.transport == "unix":
        tmpdir = tempfile.mkdtemp(prefix="fss-bench-")
        address = os.path.join(tmpdir, "echo.sock")
    else:
        address = "127.0.0.1:0"
    cmd = [sys.executable, str(SERVERS_PY), srv.impl, wl.transport, address, "--native-bin", str(opt.echo_server)]
    if wl.work_us:
        cmd += ["--work-us", str(wl.work_us)]
    if opt.pin:
        cmd += ["--cpus", opt.server_cpus]
    # forking and pre-forked servers: their children's CPU, switches and PSS are counted
    server = ServerProcess(cmd, forking="Forking" in srv.impl or "+w" in srv.impl)
    lg = None
    try:
        first = server.next_line(30.0)
        if first is None or not first.startswith("LISTENING "):
            if first is not None and first.startswith("NOT-IMPLEMENTED"):
                rec["status"] = "not implemented"
                rec["notes"].append(first.partition(" ")[2])
            else:
                server.stop()
                rec["status"] = "failed to start"
                rec["notes"].append((first or "") + server.stderr_text()[-2000:])
            return rec
        listen = first.split(" ", 1)[1]
        sampler = Sampler(server)
        sampler.start()
        duration = opt.duration
        lg_cmd = [str(opt.loadgen), "--mode", wl.mode, "--addr", listen, "--conns", str(conns),
                  "--size", str(wl.size), "--duration", str(duration), "--warmup", str(opt.warmup), "--sync",
                  "--timeout-ms", str(opt.udp_timeout_ms)]
        if wl.mode == "idle":
            # at most 4 handshakes in flight: the stdlib's (and our) listen backlog is
            # request_queue_size = 5, and a full accept queue drops SYNs (a 1 s retry)
            lg_cmd += ["--hold", str(min(2.0, max(0.5, duration / 2))), "--idle-timeout", "60", "--concurrency", "4"]
        if opt.pin:
            lg_cmd = ["taskset", "-c", opt.load_cpus, *lg_cmd] if shutil.which("taskset") else lg_cmd
        lg = subprocess.Popen(lg_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, bufsize=1)
        assert lg.stdout is not None and lg.stdin is not None
        q = _line_queue(lg.stdout)
        if _wait_line(q, opt.warmup + 30) != "# start":
            rec["status"] = "load generator did not start"
            return rec
        s0 = server.snapshot()
        busy0 = cpu_busy_s()
        lg.stdin.write("\n")
        lg.stdin.flush()
        limit = duration + 10 + (70 if wl.mode == "idle" else 0)
        if _wait_line(q, limit) != "# stop":
            rec["status"] = "timeout"
            rec["notes"].append(f"no end of the window after {limit:.0f} s")
            return rec
        busy1 = cpu_busy_s()
        s1 = server.snapshot()
        peaks = sampler.finish()
        lg.stdin.write("\n")
        lg.stdin.flush()
        line = _wait_line(q, 10)
        if line is None:
            rec["status"] = "no report from the load generator"
            return rec
        res = json.loads(line)
        rec.update(res)
        rec.update(peaks)
        w = window(s0, s1)
        rec["server_cpu_s"] = w["cpu_s"]
        rec["server_vcsw"] = w["vcsw"]
        rec["server_ivcsw"] = w["ivcsw"]
        rec["accounting"] = w["accounting"]
        if w["accounting"] != "rusage":
            rec["notes"].append("the server did not answer SIGUSR1 within 2 s; " + w["accounting"])
        n = max(1, res["requests"])
        rec["cpu_us_per_req"] = 1e6 * w["cpu_s"] / n
        rec["vcsw_per_req"] = w["vcsw"] / n
        rec["server_cpu_pct"] = 100 * w["cpu_s"] / max(1e-9, res["duration_s"])
        other = (busy1 - busy0) - w["cpu_s"] - res["loadgen_cpu_s"]
        rec["other_cpu_pct"] = max(0.0, 100 * other / max(1e-9, res["duration_s"]))
        if not server.alive():
            rec["status"] = "server died"
            rec["notes"].append(f"exit status {server.proc.returncode}")
        if res.get("errors") or res.get("lost"):
            rec["notes"].append(f"{res.get('errors', 0)} errors, {res.get('lost', 0)} lost; first: {res.get('first_error')}")
        if wl.mode == "idle":
            if res.get("unserved"):
                rec["notes"].append(f"{res['unserved']} of {conns} connections not served")
            if res.get("closed_while_idle"):
                rec["notes"].append(f"{res['closed_while_idle']} served connections closed by the server while idle")
        return rec
    finally:
        if lg is not None and lg.poll() is None:
            try:
                lg.wait(5)
            except subprocess.TimeoutExpired:
                lg.kill()
                lg.wait()
        server.stop()
        err = server.stderr_text()
        if err.strip():
            n_tb = err.count("Traceback (most recent call last)")
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
            rec["server_stderr_tracebacks"] = n_tb
            rec["notes"].append(f"server stderr: {n_tb} traceback(s), last line: {last[:200]}")
            rec["server_stderr_tail"] = err[-3000:]
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Summary: medians over repeats, ratios, table

KEYS_MEDIAN = ["rps", "p50_us", "p99_us", "cpu_us_per_req", "vcsw_per_req", "rss_peak_kb", "threads_peak"]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[tuple[str, str]] = []
    for r in runs:
        k = (r["workload"], r["server"])
        if k not in by:
            order.append(k)
        by.setdefault(k, []).append(r)
    rows = []
    for k in order:
        rs = by[k]
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            rows.append(dict(rs[-1], repeats=len(rs)))
            continue
        # the run with the median req/s stands for the others; the figures are its own
        ok.sort(key=lambda r: r["rps"])
        row = dict(ok[len(ok) // 2], repeats=len(rs))
        if len(ok) > 1:
            row["rps_all"] = [round(r["rps"], 1) for r in ok]
        rows.append(row)
    index = {(r["workload"], r["server"]): r for r in rows}
    for r in rows:
        base = index.get((r["workload"], r["baseline"]))
        if r["status"] != "ok" or base is None or base["status"] != "ok":
            continue
        def ratio(key: str) -> float | None:
            b = base.get(key)
            v = r.get(key)
            return (v / b) if (v is not None and b) else None
        r["x_rps"] = ratio("rps")
        r["x_p99"] = ratio("p99_us")
        r["x_cpu"] = ratio("cpu_us_per_req")
        r["x_rss"] = ratio("rss_peak_kb")
    return rows


def _k(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v / 1000:.1f}ms"
    return f"{v:.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(rows: list[dict[str, Any]], wls: list[Workload]) -> str:
    """The results as a plain-text table, one section per workload."""
    head = (f"{'server':<32} {'req/s':>8} {'x std':>6} {'p50 us':>7} {'p99 us':>7} {'p99 x':>6} "
            f"{'CPU us/req':>10} {'vcsw/req':>8} {'RSS MiB':>8} {'thr':>6} {'err':>5} {'LG CPU':>6} {'other':>5}")
    idle_head = (f"{'server':<32} {'served':>11} {'conn/s':>8} {'p50 us':>7} {'p99 us':>7} {'CPU us/c':>8} "
                 f"{'vcsw/c':>6} {'RSS MiB':>8} {'RSS x':>6} {'thr':>6} {'closed':>6} {'LG CPU':>6} {'other':>5}")
    out = []
    titles = {w.key: w.title for w in wls}
    seen: list[str] = []
    for r in rows:
        if r["workload"] not in seen:
            seen.append(r["workload"])
    for wk in seen:
        idle = wk.startswith("idle")
        out.append("")
        out.append(f"== {wk}: {titles.get(wk, '')}")
        out.append(idle_head if idle else head)
        for r in (r for r in rows if r["workload"] == wk):
            if r["status"] != "ok":
                out.append(f"{r['server']:<32} {r['status']}")
                continue
            thr = str(r.get("threads_peak", "-"))
            if r.get("procs_peak", 1) > 1:
                thr += f"/{r['procs_peak']}p"
            tail = f"{r['loadgen_cpu_pct']:>5.0f}% {r.get('other_cpu_pct', 0):>4.0f}%"
            if idle:
                served = f"{r.get('served', 0)}/{r.get('conns', 0)}"
                out.append(
                    f"{r['server']:<32} {served:>11} {_k(r['rps']):>8} {_us(r['p50_us']):>7} {_us(r['p99_us']):>7} "
                    f"{r['cpu_us_per_req']:>8.1f} {r['vcsw_per_req']:>6.2f} {r['rss_peak_kb'] / 1024:>8.1f} "
                    f"{_x(r.get('x_rss')):>6} {thr:>6} {r.get('closed_while_idle', 0):>6} {tail}")
                continue
            errs = (r.get("errors") or 0) + (r.get("lost") or 0)
            out.append(
                f"{r['server']:<32} {_k(r['rps']):>8} {_x(r.get('x_rps')):>6} {_us(r['p50_us']):>7} "
                f"{_us(r['p99_us']):>7} {_x(r.get('x_p99')):>6} {r['cpu_us_per_req']:>10.1f} "
                f"{r['vcsw_per_req']:>8.2f} {r['rss_peak_kb'] / 1024:>8.1f} {thr:>6} {errs:>5} {tail}")
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    cpu = ""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info: dict[str, Any] = {
        "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "python_impl": platform.python_implementation(), "mem_total_kb": _kb(_status_line("/proc/meminfo", "MemTotal")),
    }
    try:
        import fastsocketserver

        info["fastsocketserver"] = getattr(fastsocketserver, "__version__", "?")
    except ImportError:
        info["fastsocketserver"] = None
    try:
        import uvloop

        info["uvloop"] = uvloop.__version__
    except ImportError:
        info["uvloop"] = None
    return info


def _status_line(path: str, key: str) -> str | None:
    for line in (_read(path) or "").splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return None


def loadavg() -> list[float]:
    return [float(x) for x in (_read("/proc/loadavg") or "0 0 0").split()[:3]]


# ---------------------------------------------------------------------------------------------
# Main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastsocketserver.bench",
                                description="Benchmark fastsocketserver against the stdlib, asyncio, uvloop "
                                            "and a native Rust echo server, over loopback.")
    p.add_argument("--quick", action="store_true", help="short runs and fewer workloads (under a minute)")
    p.add_argument("--only", action="append", metavar="REGEX",
                   help="run only the (workload, server) pairs whose 'workload server' matches REGEX "
                        "(case-insensitive; repeatable); the stdlib baselines they need run too")
    p.add_argument("--pin", action="store_true",
                   help="pin the server and the load generator to separate CPUs (see --server-cpus/--load-cpus)")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--load-cpus", default="1")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 5, --quick 0.5)")
    p.add_argument("--warmup", type=float, help="warmup seconds per run (default 1, --quick 0.2)")
    p.add_argument("--repeat", type=int, default=1, help="run the whole matrix N times, interleaved; "
                                                           "the run with the median req/s is reported")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where latest.json/latest.png go")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--rebuild", action="store_true", help="rebuild the load generator first")
    p.add_argument("--list", action="store_true", help="list the workloads and servers and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    wls = workloads()
    if a.quick:
        wls = [w for w in wls if w.quick]
    plan: list[tuple[Workload, Server]] = []
    pats = [re.compile(p, re.I) for p in (a.only or [])]
    for w in wls:
        chosen = [s for s in w.servers if not pats or any(p.search(f"{w.key} {s.label}") for p in pats)]
        if pats:  # the baselines their ratios need
            need = {s.baseline for s in chosen}
            chosen = [s for s in w.servers if s in chosen or s.label in need]
        plan += [(w, s) for s in chosen]
    if a.list:
        for w, s in plan:
            print(f"{w.key:<10} {s.label:<30} {s.impl}")
        return 0
    if not plan:
        print("nothing matches --only", file=sys.stderr)
        return 2
    lg, es = loadgen_binaries(a.rebuild)
    opt = Options(duration=a.duration if a.duration is not None else (0.5 if a.quick else 5.0),
                  warmup=a.warmup if a.warmup is not None else (0.2 if a.quick else 1.0),
                  pin=a.pin, server_cpus=a.server_cpus, load_cpus=a.load_cpus, quick=a.quick,
                  loadgen=lg, echo_server=es)
    if a.pin and (os.cpu_count() or 1) < 2:
        print("--pin needs at least 2 CPUs; running unpinned", file=sys.stderr)
        opt.pin = False
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = loadavg()
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    total = len(plan) * a.repeat
    i = 0
    for rep in range(a.repeat):
        for w, s in plan:
            i += 1
            print(f"[{i}/{total}] {w.key:<9} {s.label:<30}", end=" ", file=sys.stderr, flush=True)
            r = run_one(w, s, opt)
            r["repeat"] = rep
            runs.append(r)
            if r["status"] == "ok":
                print(f"{_k(r['rps']):>8} req/s  p99 {_us(r['p99_us'])}{'' if r['p99_us'] >= 10000 else ' us'}",
                      file=sys.stderr, flush=True)
            else:
                print(r["status"], file=sys.stderr, flush=True)
    elapsed = time.monotonic() - t0
    rows = summarize(runs)
    command = "python -m fastsocketserver.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {
        "started": started, "elapsed_s": round(elapsed, 1), "command": command.strip(),
        "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "options": {"duration_s": opt.duration, "warmup_s": opt.warmup, "pin": opt.pin,
                    "server_cpus": opt.server_cpus if opt.pin else None,
                    "load_cpus": opt.load_cpus if opt.pin else None, "repeat": a.repeat, "quick": a.quick},
        "workloads": {w.key: w.title for w in wls},
        "results": rows, "runs": runs if a.repeat > 1 else None,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latest.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    m = doc["machine"]
    print(f"\n{command.strip()}  ({started}, {elapsed:.0f} s)")
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, CPython {m['python']}, "
          f"uvloop {m['uvloop']}; load average before {load_before}, after {doc['loadavg_after']}; "
          f"{'pinned: server on CPU ' + opt.server_cpus + ', load on CPU ' + opt.load_cpus if opt.pin else 'unpinned'}")
    print(table(rows, wls))
    ratios = [(r["workload"], r["server"], r["x_rps"]) for r in rows
              if r["server"].endswith("-w2") and r.get("x_rps") is not None]
    if ratios:
        print("\nw2/w1 (req/s of 2 pre-forked workers over 1; the issue's target on 2 cores: >= 1.8):")
        for wk, sv, x in ratios:
            print(f"  {wk:<9} {sv[:-3]:<16} {x:.2f}")
    notes = [(r["workload"], r["server"], n) for r in rows for n in r.get("notes", [])]
    if notes:
        print("\nnotes:")
        for wk, sv, n in notes:
            print(f"  {wk} / {sv}: {n}")
    print("\nx std: ratio to the stdlib server of the same class ('fss X' vs 'stdlib X'); others vs the stdlib's "
          "Threading*Server (UDP: UDPServer). CPU and vcsw per request: server's, over the measured window. "
          "LG CPU: load generator's CPU; other: CPU used by everything else on the machine during the window "
          "(100% = one core).")
    print(f"wrote {a.out / 'latest.json'}", end="")
    if not a.no_chart:
        sys.path.insert(0, str(HERE))
        import chart

        chart.render(doc, a.out / "latest.png")
        print(f" and {a.out / 'latest.png'}")
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
