"""``python -m fastsocketserver``: serve a request handler from the command line."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
from typing import Any

import fastsocketserver as socketserver

from . import _cli
from .echo import DatagramEchoHandler, LineEchoHandler


def _load_handler(spec: str) -> Any:
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise argparse.ArgumentTypeError(f"handler must look like module:Class, not {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise argparse.ArgumentTypeError(f"cannot import {module_name!r}: {exc}") from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise argparse.ArgumentTypeError(f"{module_name!r} has no attribute {qualname!r}") from None
    return obj


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastsocketserver",
        description=(
            "Serve a socketserver request handler on fastsocketserver's Rust engine. "
            "Without a handler, a line echo (TCP, Unix) or datagram echo (UDP) is served."
        ),
        epilog="Example: python -m fastsocketserver --port 8000 mymodule:MyHandler",
    )
    p.add_argument(
        "handler",
        nargs="?",
        type=_load_handler,
        help="request handler class as module:Class (default: fastsocketserver.echo:LineEchoHandler, "
        "or DatagramEchoHandler with --udp)",
    )
    p.add_argument("--bind", "-b", default="127.0.0.1", metavar="ADDRESS",
                   help="IP address to listen on (default: 127.0.0.1; IPv6 addresses work too)")
    p.add_argument("--port", "-p", type=int, default=8000,
                   help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--udp", action="store_true", help="serve UDP datagrams instead of TCP streams")
    p.add_argument("--unix", metavar="PATH", help="listen on this Unix socket path instead of TCP/UDP")
    p.add_argument("--threading", action="store_true",
                   help="handle each connection concurrently (ThreadingMixIn) instead of one at a time")
    _cli.add_operator_arguments(p)
    return p


def _inherited_socket(args: argparse.Namespace) -> int | None:
    """The descriptor to serve instead of binding (--fd, or socket activation), after
    making the other options agree with its family and type."""
    fd = _cli.inherited_fd(args)
    if fd is None:
        return None
    try:
        probe = socket.socket(fileno=fd)
    except OSError as exc:
        raise SystemExit(f"fastsocketserver: cannot serve descriptor {fd}: {exc}") from None
    try:
        args.udp = probe.type == socket.SOCK_DGRAM
        args.unix = "" if probe.family == socket.AF_UNIX else None
        args.bind = "::" if probe.family == socket.AF_INET6 else "0.0.0.0"
    finally:
        probe.detach()
    return fd


def _server_class(args: argparse.Namespace) -> type:
    if args.unix is not None:
        base: type = socketserver.UnixDatagramServer if args.udp else socketserver.UnixStreamServer
    else:
        base = socketserver.UDPServer if args.udp else socketserver.TCPServer
    if args.unix is None and ":" in args.bind:
        base = type("IPv6" + base.__name__, (base,), {"address_family": socket.AF_INET6})
    if args.threading:
        base = type("Threading" + base.__name__, (socketserver.ThreadingMixIn, base), {})
    return _cli.operator_class(base, args, allow_reuse_address=args.unix is None)


def _describe(server: Any, udp: bool) -> str:
    addr = server.server_address
    if isinstance(addr, (str, bytes)):
        return f"unix://{os.fsdecode(addr)}"
    host, port = addr[0], addr[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{'udp' if udp else 'tcp'}://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fd = _inherited_socket(args)
    problem = _cli.conflict(args, fd)
    if problem is not None:
        print(f"fastsocketserver: {problem}", file=sys.stderr)
        return 2
    if args.udp and args.proxy_protocol is not None:
        print("fastsocketserver: --proxy-protocol needs a stream server (TCP or Unix), not --udp",
              file=sys.stderr)
        return 2
    handler = args.handler or (DatagramEchoHandler if args.udp else LineEchoHandler)
    address: Any = args.unix if args.unix else (args.bind, args.port)
    prefork = _cli.prefork_attributes(args) is not None
    # Ctrl-C must stop the server even when started from a non-interactive shell, which
    # leaves SIGINT ignored; without workers SIGTERM stops it the same way (with them,
    # the supervisor gives SIGTERM its graceful meaning).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not prefork:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    if prefork:
        _cli.log_supervisor()
    try:
        if fd is not None:
            server = socketserver.server_from_fd(_server_class(args), fd, handler)
        else:
            server = _server_class(args)(address, handler)
    except (OSError, ValueError) as exc:
        where = f"descriptor {fd}" if fd is not None else repr(address)
        print(f"fastsocketserver: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    with server:
        name = f"{handler.__module__}:{handler.__qualname__}"
        print(f"fastsocketserver: serving {name} on {_describe(server, args.udp)} (Ctrl-C to stop)", flush=True)
        try:
            if not prefork:
                socketserver.sd_notify("READY=1")
            server.serve_forever()
        except KeyboardInterrupt:
            print("fastsocketserver: stopped", flush=True)
        except socketserver.WorkerCrashLoop as exc:
            print(f"fastsocketserver: {exc}", file=sys.stderr, flush=True)
            return 3
        finally:
            if args.unix:
                try:
                    os.unlink(args.unix)
                except OSError:
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
