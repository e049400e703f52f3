"""The operator options that every fastsocketserver command line shares.

``python -m fastsocketserver`` and ``python -m fastsocketserver.http`` both take the
worker options (``--workers``, ``--reuse-port``, ``--graceful-timeout``,
``--max-requests``, ``--max-requests-jitter``, ``--worker-timeout``), the PROXY
protocol options and ``--fd`` (with systemd socket activation as its fallback). This
module adds them to a parser (``add_operator_arguments``), checks the combinations
that cannot work (``conflict``), finds the inherited socket (``inherited_fd``) and
turns a parsed namespace into a server class (``operator_class``): the base class
with the ``proxy_*`` attributes, under ``PreforkMixIn`` when a worker option is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Any

from ._prefork import PreforkMixIn
from ._systemd import listen_fds

__all__ = [
    "add_operator_arguments",
    "conflict",
    "count",
    "inherited_fd",
    "log_supervisor",
    "network",
    "operator_class",
    "prefork_attributes",
    "proxy_attributes",
    "seconds",
]


# -- argument types -------------------------------------------------------------------


def count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def network(text: str) -> str:
    """An IP network (an address alone is a network of one), normalised."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP network or address: {text!r}") from None


# -- the options ----------------------------------------------------------------------


def add_operator_arguments(parser: argparse.ArgumentParser, *, tcp_only: bool = False) -> None:
    """Add the worker, PROXY protocol and ``--fd`` options to ``parser``.

    ``tcp_only``: the command serves TCP alone (HTTP), so the help texts leave UDP and
    Unix sockets out.
    """
    w = parser.add_argument_group(
        "workers and lifecycle",
        "With any of these, the server runs under PreforkMixIn: SIGTERM stops gracefully "
        "(in-flight requests finish), SIGINT/SIGQUIT stop at once, SIGHUP replaces every "
        "worker (a new one is ready before an old one stops), SIGTTIN/SIGTTOU add/remove "
        "a worker. Without them, SIGTERM and SIGINT stop the server at once.",
    )
    w.add_argument("--workers", "-w", type=count, metavar="N",
                   help="serve with N pre-forked worker processes under a supervisor that "
                   "binds once, respawns dead workers and stops on a crash loop; 0 serves "
                   "in this process with the graceful SIGTERM drain")
    w.add_argument("--reuse-port", action="store_true",
                   help="give each worker its own SO_REUSEPORT socket (even spread) instead of "
                   "one shared accept queue (the default, which loses nothing when a worker "
                   "is replaced; with --reuse-port a replaced worker's queued connections "
                   "are reset unless net.ipv4.tcp_migrate_req=1)" + ("" if tcp_only else "; TCP only"))
    w.add_argument("--graceful-timeout", type=seconds, metavar="S",
                   help="seconds a graceful stop waits for in-flight requests before killing "
                   "what is left (default: 30)")
    w.add_argument("--max-requests", type=count, metavar="N",
                   help="recycle a worker after N requests (" + ("connections" if tcp_only else
                   "connections or datagrams") + "); 0: never")
    w.add_argument("--max-requests-jitter", type=count, metavar="N",
                   help="add a random 0..N to each worker's --max-requests")
    w.add_argument("--worker-timeout", type=seconds, metavar="S",
                   help="replace a worker that for S seconds neither sent its heartbeat nor "
                   "used CPU time (stopped or deadlocked; a busy worker is kept); 0: never "
                   "(default: 30)")
    x = parser.add_argument_group(
        "behind a load balancer",
        "With --proxy-protocol every connection must start with a PROXY protocol header "
        "(HAProxy's send-proxy / send-proxy-v2, also nginx, AWS NLB, ...): the handler's "
        "client_address is then the original client. A connection without a valid header, "
        "or from a peer outside --proxy-trusted, is closed with a warning"
        + ("." if tcp_only else "; TCP and Unix streams only."),
    )
    x.add_argument("--proxy-protocol", choices=("v1", "v2"),
                   help="read a PROXY protocol header of this version on every connection")
    x.add_argument("--proxy-trusted", type=network, action="append", metavar="NETWORK",
                   help="accept headers only from peers in this network (repeatable; e.g. "
                   "10.0.0.0/8; default: 127.0.0.0/8 and ::1"
                   + (")" if tcp_only else "; Unix socket peers are always trusted)"))
    x.add_argument("--proxy-header-timeout", type=seconds, metavar="S",
                   help="seconds a connection may take to send its header (default: 5; 0: no limit)")
    kinds = "a listening TCP socket, IPv4 or IPv6" if tcp_only else "its family and type decide TCP/UDP/Unix"
    parser.add_argument("--fd", type=count, metavar="N",
                        help=f"serve the already listening socket on descriptor N instead of binding "
                        f"({kinds}). Without --fd, sockets passed by systemd socket activation "
                        f"(LISTEN_FDS/LISTEN_PID) are served; READY=1/STOPPING=1 go to "
                        f"NOTIFY_SOCKET when it is set")


#: The command line's names for PreforkMixIn's attributes.
_PREFORK_OPTIONS = {
    "workers": "workers",
    "reuse_port": "reuse_port",
    "graceful_timeout": "graceful_timeout",
    "max_requests": "max_requests",
    "max_requests_jitter": "max_requests_jitter",
    "worker_timeout": "worker_timeout",
}


def prefork_attributes(args: argparse.Namespace) -> dict[str, Any] | None:
    """PreforkMixIn's attributes from the worker options; None when none is given."""
    given = {attr: getattr(args, opt) for opt, attr in _PREFORK_OPTIONS.items()
             if getattr(args, opt) is not None and getattr(args, opt) is not False}
    if not given:
        return None
    given.setdefault("workers", 0)
    return given


def proxy_attributes(args: argparse.Namespace) -> dict[str, Any]:
    """The server attributes of the --proxy-* options (none without --proxy-protocol)."""
    if args.proxy_protocol is None:
        return {}
    attrs: dict[str, Any] = {"proxy_protocol": args.proxy_protocol}
    if args.proxy_trusted:
        attrs["proxy_trusted"] = tuple(args.proxy_trusted)
    if args.proxy_header_timeout is not None:
        attrs["proxy_header_timeout"] = args.proxy_header_timeout or None
    return attrs


def conflict(args: argparse.Namespace, fd: int | None) -> str | None:
    """What is wrong with this combination of options (``fd``: the inherited socket
    that will be served, if any), or None."""
    if fd is not None and args.reuse_port:
        return ("--reuse-port binds a socket per worker; it cannot share an "
                "inherited one (--fd, socket activation)")
    if args.proxy_protocol is None and (args.proxy_trusted or args.proxy_header_timeout is not None):
        return "--proxy-trusted and --proxy-header-timeout need --proxy-protocol"
    return None


def inherited_fd(args: argparse.Namespace) -> int | None:
    """The descriptor to serve instead of binding: ``--fd``, else the first socket of
    systemd socket activation, else None."""
    if args.fd is not None:
        return int(args.fd)
    fds = listen_fds()
    return fds[0][0] if fds else None


def operator_class(base: type, args: argparse.Namespace, **attributes: Any) -> type:
    """``base`` with ``attributes`` and the PROXY protocol attributes, under
    ``PreforkMixIn`` (with its attributes) when a worker option is given."""
    cls = type(base.__name__, (base,), {"__module__": base.__module__, **attributes, **proxy_attributes(args)})
    prefork = prefork_attributes(args)
    if prefork is not None:
        cls = type("Prefork" + cls.__name__, (PreforkMixIn, cls), {"__module__": base.__module__, **prefork})
    return cls


def log_supervisor() -> None:
    """Send the supervisor's and workers' log records (INFO and up) to stderr."""
    logging.basicConfig(level=logging.INFO, format="fastsocketserver: %(message)s")
