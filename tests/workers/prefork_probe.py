"""A server under PreforkMixIn for tests/test_prefork.py and tests/test_systemd.py,
run as a subprocess: ``python prefork_probe.py '{json config}'``.

Prints one JSON line once bound: {"port": ..., "pid": ...}. The handlers answer one
line per request line, on a persistent connection:

  "pid"        the worker's pid
  "sleep S"    sleeps S seconds, then the pid
  "busy S"     S seconds of pure-Python work, then the pid
  "gil S"      one C call holding the GIL for about S seconds, then the pid
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import fastsocketserver as fss


def answer(line: bytes) -> bytes:
    words = line.split()
    if words and words[0] == b"sleep":
        time.sleep(float(words[1]))
    elif words and words[0] == b"busy":
        end = time.monotonic() + float(words[1])
        while time.monotonic() < end:
            pass
    elif words and words[0] == b"gil":
        # sum() over a range runs in C without the eval loop: nothing else gets the GIL.
        # Sized from a short run of the same call, so that it lasts about S seconds.
        began = time.perf_counter()
        sum(range(2_000_000))
        rate = 2_000_000 / max(time.perf_counter() - began, 1e-6)
        sum(range(int(float(words[1]) * rate)))
    return b"%d\n" % os.getpid()


class LineHandler(fss.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(answer(line))


class LineProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            self.transport.write(answer(line))


class DatagramHandler(fss.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(answer(self.rfile.read()))


BASES = {
    "threading": fss.ThreadingTCPServer,
    "tcp": fss.TCPServer,
    "udp": fss.UDPServer,
}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    base = BASES[cfg.get("base", "threading")]
    handler = {"line": LineHandler, "protocol": LineProtocol, "datagram": DatagramHandler}[
        cfg.get("handler", "datagram" if base is fss.UDPServer else "line")
    ]
    attrs = dict(cfg.get("attrs", {}))
    attrs["allow_reuse_address"] = True
    if cfg.get("init_exit") is not None:
        code = cfg["init_exit"]

        def worker_init(self):
            os._exit(code)

        attrs["worker_init"] = worker_init
    cls = type("Server", (fss.PreforkMixIn, base), attrs)
    fd = cfg.get("fd")
    if fd == "systemd":
        fds = fss.listen_fds()
        print(json.dumps({"fds": fds, "env": [k for k in os.environ if k.startswith("LISTEN_")]}), file=sys.stderr, flush=True)
        server = fss.server_from_fd(cls, fds[0][0], handler) if fds else cls(("127.0.0.1", 0), handler)
    else:
        server = cls(("127.0.0.1", 0), handler)
    with server:
        print(json.dumps({"port": server.server_address[1], "pid": os.getpid(),
                          "fd": server.socket.fileno()}), flush=True)
        try:
            server.serve_forever()
        except fss.WorkerCrashLoop as exc:
            print(f"crash loop: {exc}", file=sys.stderr, flush=True)
            return 3
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
