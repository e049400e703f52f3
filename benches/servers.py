"""The servers under test of the fastsocketserver benchmark, one per process.

    python benches/servers.py IMPL TRANSPORT ADDRESS [--cpus 0,1] [--native-bin PATH]

``IMPL`` is one of

* ``fss:<Class>`` / ``stdlib:<Class>``: a server class of ``fastsocketserver`` or of the
  standard library's ``socketserver`` (``TCPServer``, ``ThreadingTCPServer``,
  ``ForkingTCPServer``, ``UDPServer``, ``ThreadingUDPServer``, ``ThreadingUnixStreamServer``,
  ...), serving the *same handler source* (see ``handler_for``);
* ``asyncio:streams``, ``asyncio:protocol``, ``uvloop:streams``, ``uvloop:protocol``: an
  asyncio (or uvloop) echo server; ``:protocol`` on UDP is a ``DatagramProtocol`` echo;
* ``fss:protocol``: the event-driven handler of fastsocketserver (issue 7): the same
  ``asyncio.Protocol`` echo class as asyncio/uvloop, handed to fastsocketserver's
  ``TCPServer``/``UDPServer``/``UnixStreamServer``. A fastsocketserver without protocol
  handlers (before issue 7) makes it report "not implemented" (exit status 3) instead of
  serving anything;
* ``fss:native``: fastsocketserver's ``TCPServer``/``UDPServer``/``UnixStreamServer`` with
  ``_core.NativeEcho``, an echo protocol written in Rust that the engine's event loop runs
  without calling Python: the ceiling of the same engine, which shows what the Python
  callbacks cost;
* ``native``: the Rust echo server of benches/loadgen (thread per connection, blocking
  ``std::net``, no fastsocketserver): the ceiling of the blocking handler's I/O pattern,
  exec'd in place.

``TRANSPORT`` is ``tcp``, ``udp`` or ``unix``; ``ADDRESS`` is ``HOST:PORT`` (port 0 picks a
free one) or a socket path. Once listening the process prints ``LISTENING <address>`` on
stdout, and it serves until killed. SIGINT is at its default (KeyboardInterrupt), whatever
the parent's disposition was. On SIGUSR1 it prints ``RUSAGE {json}``: its own
``getrusage(RUSAGE_SELF)`` and ``RUSAGE_CHILDREN`` totals, which count threads that have already
exited (``/proc/PID/task`` does not); benches/run.py reads it at the start and end of each
measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import os
import resource
import signal
import socket
import sys
import threading
from typing import Any

NOT_IMPLEMENTED = 3

# ---------------------------------------------------------------------------------------------
# The CPU-bound workload (--work-us): a fixed pure-Python loop per request line, calibrated once
# at server start (before any fork) to take about that many microseconds.

WORK_LOOPS = 0


def burn(n: int | None = None) -> int:
    x = 0
    for i in range(WORK_LOOPS if n is None else n):
        x = (x * 31 + i) & 0xFFFF
    return x


def calibrate(work_us: float) -> int:
    """Loop count for about *work_us* microseconds of pure Python (best of several timings)."""
    from time import perf_counter

    n = 10000
    best = min((lambda t0: (burn(n), perf_counter() - t0)[1])(perf_counter()) for _ in range(20))
    return max(1, round(n * work_us * 1e-6 / best))


#: Pre-forked workers (PreforkMixIn.workers) for impls suffixed "+wN"; 0: no PreforkMixIn.
WORKERS = 0


def with_workers(cls: type) -> type:
    if not WORKERS:
        return cls
    from fastsocketserver import PreforkMixIn

    return type("Prefork" + cls.__name__, (PreforkMixIn, cls), {"workers": WORKERS})


# ---------------------------------------------------------------------------------------------
# The handlers. One source for both socketserver modules: the class body is identical, only the
# module providing the base class differs.

def handler_for(socketserver: Any, datagram: bool) -> type:
    """The line-echo handler, built on *socketserver*'s own base class."""
    base = socketserver.DatagramRequestHandler if datagram else socketserver.StreamRequestHandler

    class LineEcho(base):  # type: ignore[misc, valid-type]
        def handle(self) -> None:
            for line in self.rfile:
                if WORK_LOOPS:
                    burn()
                self.wfile.write(line)

    return LineEcho


class EchoProtocol(asyncio.Protocol):
    """Stream echo as an asyncio protocol (asyncio, uvloop, and the fastsocketserver slot)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if WORK_LOOPS:
            for _ in range(data.count(b"\n")):  # one unit of work per line, as LineEcho
                burn()
        self.transport.write(data)


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    """Datagram echo as an asyncio datagram protocol."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Stream echo with asyncio streams, line by line like the socketserver handler."""
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# Reporting

def rusage_line() -> bytes:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    d = {
        "utime": s.ru_utime, "stime": s.ru_stime, "nvcsw": s.ru_nvcsw, "nivcsw": s.ru_nivcsw,
        "maxrss_kb": s.ru_maxrss, "c_utime": c.ru_utime, "c_stime": c.ru_stime,
        "c_nvcsw": c.ru_nvcsw, "c_nivcsw": c.ru_nivcsw,
    }
    return b"RUSAGE " + json.dumps(d).encode() + b"\n"


def report_rusage(*_: Any) -> None:
    os.write(1, rusage_line())


def announce(address: str) -> None:
    os.write(1, f"LISTENING {address}\n".encode())


def not_implemented(why: str) -> None:
    os.write(1, f"NOT-IMPLEMENTED {why}\n".encode())
    sys.exit(NOT_IMPLEMENTED)


def parse_address(transport: str, address: str) -> Any:
    if transport == "unix":
        return address
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port))


def show_address(transport: str, addr: Any) -> str:
    if transport == "unix":
        return str(addr)
    return f"{addr[0]}:{addr[1]}"


# ---------------------------------------------------------------------------------------------
# Servers

def serve_socketserver(module_name: str, class_name: str, transport: str, address: Any) -> None:
    socketserver = importlib.import_module(module_name)
    cls = getattr(socketserver, class_name)
    if module_name == "fastsocketserver":
        cls = with_workers(cls)
    if transport == "unix" and os.path.exists(address):
        os.unlink(address)
    server = cls(address, handler_for(socketserver, datagram=(transport == "udp")))
    signal.signal(signal.SIGUSR1, report_rusage)
    announce(show_address(transport, server.server_address))
    with server:
        server.serve_forever()


def serve_asyncio(flavour: str, kind: str, transport: str, address: Any) -> None:
    if flavour == "uvloop":
        try:
            import uvloop
        except ImportError:
            not_implemented("uvloop is not installed (pip install uvloop, or the 'bench' extra)")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        loop.add_signal_handler(signal.SIGUSR1, report_rusage)
        if transport == "udp":
            if kind != "protocol":
                not_implemented("asyncio has no datagram streams")
            tr, _ = await loop.create_datagram_endpoint(EchoDatagramProtocol, local_addr=address)
            announce(show_address(transport, tr.get_extra_info("sockname")))
            await asyncio.Event().wait()
        if transport == "unix":
            if os.path.exists(address):
                os.unlink(address)
            if kind == "streams":
                srv = await asyncio.start_unix_server(echo_stream, address)
            else:
                srv = await loop.create_unix_server(EchoProtocol, address)
        else:
            if kind == "streams":
                srv = await asyncio.start_server(echo_stream, address[0], address[1])
            else:
                srv = await loop.create_server(EchoProtocol, address[0], address[1])
        announce(show_address(transport, srv.sockets[0].getsockname()))
        async with srv:
            await srv.serve_forever()

    loop.run_until_complete(main())


# --- fastsocketserver's event-driven (protocol) handler, issue 7 ------------------------------
#
# ``fastsocketserver.TCPServer(addr, EchoProtocol)`` (and ``UDPServer(addr,
# EchoDatagramProtocol)``, ``UnixStreamServer(path, EchoProtocol)``): the same protocol classes
# asyncio and uvloop serve above. It never fakes the figure: before announcing, it checks
# in-process that the server really echoes through the protocol (one client, one line); if it
# does not (a fastsocketserver from before issue 7), it reports "not implemented" and exits with
# status 3, and benches/run.py shows the row as not implemented.

_PROTOCOL_SERVER_CLASS = {"tcp": "TCPServer", "udp": "UDPServer", "unix": "UnixStreamServer"}


def _protocol_probe(server: Any, transport: str) -> bool:
    """One echo through *server* in this process, with a deadline."""
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    ok = False
    try:
        if transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(1.0)
                c.sendto(b"probe\n", server.server_address)
                ok = c.recv(64) == b"probe\n"
        else:
            fam = socket.AF_UNIX if transport == "unix" else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as c:
                c.settimeout(1.0)
                c.connect(server.server_address)
                c.sendall(b"probe\n")
                ok = c.recv(64) == b"probe\n"
    except OSError:
        ok = False
    finally:
        server.shutdown()
        t.join(2.0)
    return ok


def serve_fss_protocol(transport: str, address: Any, native: bool = False) -> None:
    import fastsocketserver

    cls = getattr(fastsocketserver, _PROTOCOL_SERVER_CLASS[transport])
    proto: Any = EchoDatagramProtocol if transport == "udp" else EchoProtocol
    if native:
        proto = getattr(fastsocketserver._core, "NativeEcho", None)
        if proto is None:
            not_implemented("this fastsocketserver has no native echo protocol")
    if transport == "unix" and os.path.exists(address):
        os.unlink(address)
    saved_stderr = sys.stderr
    sys.stderr = io.StringIO()  # a handler without protocol support prints tracebacks here
    try:
        try:
            probe_server = cls(address, proto)
        except Exception as exc:  # a clear refusal at construction is also "not implemented"
            not_implemented(f"fastsocketserver refuses a protocol handler: {exc!r}")
        ok = _protocol_probe(probe_server, transport)
        probe_server.server_close()
    finally:
        captured, sys.stderr = sys.stderr, saved_stderr
    if not ok:
        lines = [ln.strip() for ln in captured.getvalue().splitlines()]
        first = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), "no echo")
        not_implemented(f"fastsocketserver does not serve asyncio.Protocol handlers yet (issue 7): {first}")
    if transport == "unix" and os.path.exists(address):
        os.unlink(address)
    server = with_workers(cls)(address, proto)
    signal.signal(signal.SIGUSR1, report_rusage)
    announce(show_address(transport, server.server_address))
    with server:
        server.serve_forever()


# --- end of slot ------------------------------------------------------------------------------


def default_native_bin() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "loadgen", "target", "release", "echo-server")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("impl")
    p.add_argument("transport", choices=["tcp", "udp", "unix"])
    p.add_argument("address")
    p.add_argument("--cpus", help="comma-separated CPUs to run on (sched_setaffinity)")
    p.add_argument("--native-bin", default=default_native_bin())
    p.add_argument("--work-us", type=float, default=0,
                   help="pure-Python work per request line, in microseconds (calibrated at start)")
    a = p.parse_args(argv)
    global WORK_LOOPS, WORKERS
    if a.work_us > 0:
        WORK_LOOPS = calibrate(a.work_us)
    impl, plus, w = a.impl.rpartition("+w")
    if plus and w.isdigit():  # "fss:ThreadingTCPServer+w2": under PreforkMixIn with 2 workers
        a.impl, WORKERS = impl, int(w)

    # A background process started from a non-interactive shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # 5,000 idle connections need more than the usual 1,024 descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    address = parse_address(a.transport, a.address)
    family, _, name = a.impl.partition(":")
    if a.impl == "native":
        os.execv(a.native_bin, [a.native_bin, a.transport, a.address])
    elif a.impl in ("fss:protocol", "fss:native"):
        serve_fss_protocol(a.transport, address, native=a.impl == "fss:native")
    elif family in ("fss", "stdlib"):
        serve_socketserver("fastsocketserver" if family == "fss" else "socketserver", name, a.transport, address)
    elif family in ("asyncio", "uvloop") and name in ("streams", "protocol"):
        serve_asyncio(family, name, a.transport, address)
    else:
        p.error(f"unknown server {a.impl!r}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
