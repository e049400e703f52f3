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
    w = p.add_argument_group(
        "workers and lifecycle",
        "With any of these, the server runs under PreforkMixIn: SIGTERM stops gracefully "
        "(in-flight requests finish), SIGINT/SIGQUIT stop at once, SIGHUP replaces every "
        "worker (a new one is ready before an old one stops), SIGTTIN/SIGTTOU add/remove "
        "a worker. Without them, SIGTERM and SIGINT stop the server at once.",
    )
    w.add_argument("--workers", "-w", type=_count, metavar="N",
                   help="serve with N pre-forked worker processes under a supervisor that "
                   "binds once, respawns dead workers and stops on a crash loop; 0 serves "
                   "in this process with the graceful SIGTERM drain")
    w.add_argument("--reuse-port", action="store_true",
                   help="give each worker its own SO_REUSEPORT socket (even spread) instead of "
                   "one shared accept queue (the default, which loses nothing when a worker "
                   "is replaced; with --reuse-port a replaced worker's queued connections "
                   "are reset unless net.ipv4.tcp_migrate_req=1); TCP only")
    w.add_argument("--graceful-timeout", type=_seconds, metavar="S",
                   help="seconds a graceful stop waits for in-flight requests before killing "
                   "what is left (default: 30)")
    w.add_argument("--max-requests", type=_count, metavar="N",
                   help="recycle a worker after N requests (connections or datagrams); 0: never")
    w.add_argument("--max-requests-jitter", type=_count, metavar="N",
                   help="add a random 0..N to each worker's --max-requests")
    w.add_argument("--worker-timeout", type=_seconds, metavar="S",
                   help="replace a worker that for S seconds neither sent its heartbeat nor "
                   "used CPU time (stopped or deadlocked; a busy worker is kept); 0: never "
                   "(default: 30)")
    x = p.add_argument_group(
        "behind a load balancer",
        "With --proxy-protocol every connection must start with a PROXY protocol header "
        "(HAProxy's send-proxy / send-proxy-v2, also nginx, AWS NLB, ...): the handler's "
        "client_address is then the original client. A connection without a valid header, "
        "or from a peer outside --proxy-trusted, is closed with a warning; TCP and Unix "
        "streams only.",
    )
    x.add_argument("--proxy-protocol", choices=("v1", "v2"),
                   help="read a PROXY protocol header of this version on every connection")
    x.add_argument("--proxy-trusted", type=_network, action="append", metavar="NETWORK",
                   help="accept headers only from peers in this network (repeatable; e.g. "
                   "10.0.0.0/8; default: 127.0.0.0/8 and ::1; Unix socket peers are always "
                   "trusted)")
    x.add_argument("--proxy-header-timeout", type=_seconds, metavar="S",
                   help="seconds a connection may take to send its header (default: 5; 0: no limit)")
    p.add_argument("--fd", type=_count, metavar="N",
                   help="serve the already listening socket on descriptor N instead of binding "
                   "(its family and type decide TCP/UDP/Unix). Without --fd, sockets passed "
                   "by systemd socket activation (LISTEN_FDS/LISTEN_PID) are served; "
                   "READY=1/STOPPING=1 go to NOTIFY_SOCKET when it is set")
    return p


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _network(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP network or address: {text!r}") from None


def _proxy_attributes(args: argparse.Namespace) -> dict[str, Any]:
    """The server attributes of the --proxy-* options (none without --proxy-protocol)."""
    if args.proxy_protocol is None:
        return {}
    attrs: dict[str, Any] = {"proxy_protocol": args.proxy_protocol}
    if args.proxy_trusted:
        attrs["proxy_trusted"] = tuple(args.proxy_trusted)
    if args.proxy_header_timeout is not None:
        attrs["proxy_header_timeout"] = args.proxy_header_timeout or None
    return attrs


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


#: The command line's names for PreforkMixIn's attributes.
_PREFORK_OPTIONS = {
    "workers": "workers",
    "reuse_port": "reuse_port",
    "graceful_timeout": "graceful_timeout",
    "max_requests": "max_requests",
    "max_requests_jitter": "max_requests_jitter",
    "worker_timeout": "worker_timeout",
}


def _prefork_attributes(args: argparse.Namespace) -> dict[str, Any] | None:
    given = {attr: getattr(args, opt) for opt, attr in _PREFORK_OPTIONS.items()
             if getattr(args, opt) is not None and getattr(args, opt) is not False}
    if not given:
        return None
    given.setdefault("workers", 0)
    return given


def _inherited_socket(args: argparse.Namespace) -> int | None:
    """The descriptor to serve instead of binding (--fd, or socket activation), after
    making the other options agree with its family and type."""
    fd = args.fd
    if fd is None:
        fds = socketserver.listen_fds()
        if not fds:
            return None
        fd = fds[0][0]
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
    cls = type(base.__name__, (base,), {"allow_reuse_address": args.unix is None, **_proxy_attributes(args)})
    prefork = _prefork_attributes(args)
    if prefork is not None:
        cls = type("Prefork" + cls.__name__, (socketserver.PreforkMixIn, cls), prefork)
    return cls


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
    if fd is not None and args.reuse_port:
        print("fastsocketserver: --reuse-port binds a socket per worker; it cannot share an "
              "inherited one (--fd, socket activation)", file=sys.stderr)
        return 2
    if args.udp and args.proxy_protocol is not None:
        print("fastsocketserver: --proxy-protocol needs a stream server (TCP or Unix), not --udp",
              file=sys.stderr)
        return 2
    if args.proxy_protocol is None and (args.proxy_trusted or args.proxy_header_timeout is not None):
        print("fastsocketserver: --proxy-trusted and --proxy-header-timeout need --proxy-protocol",
              file=sys.stderr)
        return 2
    handler = args.handler or (DatagramEchoHandler if args.udp else LineEchoHandler)
    address: Any = args.unix if args.unix else (args.bind, args.port)
    prefork = _prefork_attributes(args) is not None
    # Ctrl-C must stop the server even when started from a non-interactive shell, which
    # leaves SIGINT ignored; without workers SIGTERM stops it the same way (with them,
    # the supervisor gives SIGTERM its graceful meaning).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not prefork:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    if prefork:
        import logging

        logging.basicConfig(level=logging.INFO, format="fastsocketserver: %(message)s")
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
