"""``python -m fastsocketserver.http`` with the operator options of ``python -m
fastsocketserver``: pre-forked workers serving a directory, a graceful SIGTERM, an
inherited listening socket (``--fd``), the PROXY protocol (the access log names the
original client) and the usage errors.

Every server runs in its own session (tests/workers/supervised.py), bound to an
ephemeral loopback port, and is killed with its workers when a test leaves.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request

import pytest

from supervised import run, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process model")

TIMEOUT = 10.0
BANNER = re.compile(r"Serving HTTP on (\S+) port (\d+) \(http://\S+/\) \.\.\.")
CONTENT = b"served by fastsocketserver.http\n"


@pytest.fixture
def docroot():
    with tempfile.TemporaryDirectory(prefix="fsshttpcli", dir="/tmp") as root:
        with open(os.path.join(root, "hello.txt"), "wb") as f:
            f.write(CONTENT)
        os.mkdir(os.path.join(root, "sub"))
        yield root


def http_cli(docroot, *args):
    return [sys.executable, "-u", "-m", "fastsocketserver.http", "--directory", docroot, *args]


def banner_port(sup) -> int:
    match = BANNER.match(sup.info["line"])
    assert match, sup.info["line"]
    return int(match.group(2))


def get(port: int, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, b""


def socket_owner(pids: set[int], server_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the server end of the loopback connection from
    ``client_port`` to ``server_port`` (its inode, from /proc/net/tcp)."""
    inode = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def keep_alive_get(port: int, workers: set[int]) -> int | None:
    """GET /hello.txt over HTTP/1.1 on a connection kept open; the worker serving it."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(CONTENT):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")
        return socket_owner(workers, port, sock.getsockname()[1])


@pytest.mark.parametrize("extra", [[], ["--reuse-port"]], ids=["shared-queue", "reuse-port"])
def test_workers_serve_the_directory_and_sigterm_stops_them(docroot, extra):
    argv = http_cli(docroot, "--bind", "127.0.0.1", "--workers", "2", "--protocol", "HTTP/1.1", *extra, "0")
    with run({}, argv=argv) as sup:
        port = banner_port(sup)
        workers = wait_for(lambda: w if len(w := sup.workers()) == 2 else None, message="2 workers")
        assert get(port, "/hello.txt") == (200, CONTENT)
        assert get(port, "/hello.txt", "HEAD") == (200, b"")
        assert get(port, "/missing.txt")[0] == 404
        if extra:
            # Each worker has its own socket, spread by the connection's ports: over
            # enough connections both answer.
            seen: set[int | None] = set()
            for _ in range(60):
                seen.add(keep_alive_get(port, workers))
                if seen >= workers:
                    break
            assert seen >= workers, (seen, workers)
        else:
            assert keep_alive_get(port, workers) in workers
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()
        err = sup.stderr()
    assert '"GET /hello.txt HTTP/1.1" 200' in err and '"GET /missing.txt HTTP/1.1" 404' in err
    assert "Traceback" not in err


def test_workers_sigint_exits_like_http_server(docroot):
    argv = http_cli(docroot, "--bind", "127.0.0.1", "--workers", "1", "0")
    with run({}, argv=argv) as sup:
        port = banner_port(sup)
        wait_for(lambda: len(sup.workers()) == 1, message="a worker")
        assert get(port, "/hello.txt") == (200, CONTENT)
        sup.signal(signal.SIGINT)
        assert sup.wait() == 0
        sup.assert_gone()
        assert sup.proc.stdout.read() == "\nKeyboard interrupt received, exiting.\n"


def loopback_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["inline", "workers"])
def test_fd_serves_the_inherited_socket(docroot, extra):
    with loopback_listener() as sock:
        port = sock.getsockname()[1]
        argv = http_cli(docroot, "--fd", str(sock.fileno()), *extra)
        with run({}, argv=argv, pass_fds=(sock.fileno(),)) as sup:
            sock.close()
            assert BANNER.match(sup.info["line"]).groups() == ("127.0.0.1", str(port))
            if extra:
                wait_for(lambda: len(sup.workers()) == 2, message="2 workers")
            assert get(port, "/hello.txt") == (200, CONTENT)
            assert get(port, "/sub")[0] == 200  # redirected to /sub/, a listing
            assert get(port, "/missing.txt")[0] == 404
            sup.signal(signal.SIGTERM)
            # Without workers SIGTERM is http.server's: the default action.
            assert sup.wait() == (0 if extra else -signal.SIGTERM)
            sup.assert_gone()


def exchange(port: int, data: bytes) -> bytes:
    """What the server answers to ``data`` before closing (a reset, as when the server
    closes with the request unread, ends the answer too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(4096):
                out += chunk
        except ConnectionResetError:
            pass
        return out


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["inline", "workers"])
def test_proxy_protocol_logs_the_original_client(docroot, extra):
    argv = http_cli(docroot, "--bind", "127.0.0.1", "--proxy-protocol", "v1", *extra, "0")
    with run({}, argv=argv) as sup:
        port = banner_port(sup)
        if extra:
            wait_for(lambda: len(sup.workers()) == 2, message="2 workers")
        header = b"PROXY TCP4 203.0.113.7 198.51.100.1 40123 80\r\n"
        reply = exchange(port, header + b"GET /hello.txt HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 200 ") and reply.endswith(CONTENT)
        # No header: the connection is closed unanswered.
        assert exchange(port, b"GET /hello.txt HTTP/1.0\r\n\r\n") == b""
        sup.signal(signal.SIGTERM)
        assert sup.wait() == (0 if extra else -signal.SIGTERM)
        sup.assert_gone()
        err = sup.stderr()
    assert re.search(r'^203\.0\.113\.7 - - \[.*\] "GET /hello\.txt HTTP/1\.0" 200 ', err, re.M), err
    assert "127.0.0.1 - - [" not in err
    assert "PROXY protocol" in err


def usage(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastsocketserver.http", *args], capture_output=True,
                          text=True, timeout=30, start_new_session=True, **kwargs)


@pytest.mark.parametrize("args, says", [
    (["--fd", "0", "--reuse-port"], "--reuse-port binds a socket per worker"),
    (["--proxy-trusted", "10.0.0.0/8", "0"], "need --proxy-protocol"),
    (["--proxy-header-timeout", "1", "0"], "need --proxy-protocol"),
    (["--proxy-protocol", "v3", "0"], "invalid choice"),
    (["--proxy-protocol", "v1", "--proxy-trusted", "nowhere", "0"], "not an IP network"),
    (["--workers", "-1", "0"], "must be >= 0"),
    (["--graceful-timeout", "soon", "0"], "not a number of seconds"),
    (["--fd", "x"], "not a whole number"),
])
def test_bad_combinations_and_values_are_usage_errors(args, says):
    proc = usage(*args)
    assert proc.returncode == 2, proc
    assert "error:" in proc.stderr and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_fd_that_is_not_a_tcp_listener_is_refused():
    with tempfile.TemporaryDirectory(prefix="fsshttpcli", dir="/tmp") as tmp:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with unix:
            unix.bind(os.path.join(tmp, "s"))
            unix.listen(1)
            proc = usage("--fd", str(unix.fileno()), pass_fds=(unix.fileno(),))
        assert proc.returncode == 1 and "cannot serve descriptor" in proc.stderr and "AF_UNIX" in proc.stderr, proc
        r, w = os.pipe()
        try:
            proc = usage("--fd", str(r), pass_fds=(r,))
        finally:
            os.close(r)
            os.close(w)
        assert proc.returncode == 1 and "not a socket" in proc.stderr, proc
        assert "Traceback" not in proc.stderr


def test_help_lists_the_operator_options():
    proc = usage("--help")
    assert proc.returncode == 0
    for flag in ("--bind", "--directory", "--protocol", "--workers", "--reuse-port", "--graceful-timeout",
                 "--max-requests", "--max-requests-jitter", "--worker-timeout", "--fd", "LISTEN_FDS",
                 "--proxy-protocol", "--proxy-trusted", "--proxy-header-timeout", "SIGHUP"):
        assert flag in proc.stdout, flag


def test_operator_flags_reach_the_server_class(docroot):
    from fastsocketserver import http as cli

    args = cli._parser().parse_args(["--bind", "127.0.0.1", "--workers", "3", "--max-requests", "50",
                                     "--max-requests-jitter", "5", "--graceful-timeout", "2",
                                     "--worker-timeout", "7", "--proxy-protocol", "v2",
                                     "--proxy-trusted", "10.0.0.0/8", "--proxy-header-timeout", "0", "0"])
    server = cli._server(args, None)
    with server:
        assert (server.workers, server.max_requests, server.max_requests_jitter, server.graceful_timeout,
                server.worker_timeout, server.reuse_port) == (3, 50, 5, 2.0, 7.0, False)
        assert (server.proxy_protocol, server.proxy_trusted, server.proxy_header_timeout) == ("v2", ("10.0.0.0/8",), None)
        assert isinstance(server, cli.ThreadingHTTPServer) and server.server_address[0] == "127.0.0.1"
    plain = cli._server(cli._parser().parse_args(["--bind", "127.0.0.1", "0"]), None)
    with plain:
        import fastsocketserver as fss

        assert not isinstance(plain, fss.PreforkMixIn) and plain.proxy_protocol is None


@pytest.fixture
def notify_socket():
    with tempfile.TemporaryDirectory(prefix="fsshttpcli", dir="/tmp") as tmp:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(os.path.join(tmp, "notify"))
            sock.settimeout(20)
            yield sock


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["inline", "workers"])
def test_socket_activation_serves_the_passed_socket_and_notifies(docroot, notify_socket, extra):
    from test_systemd import LAUNCHER

    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    with loopback_listener() as sock:
        port = sock.getsockname()[1]
        # The launcher moves the socket to descriptor 3 and sets LISTEN_FDS/LISTEN_PID
        # for the process it execs, as systemd does.
        argv = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), "web", "0",
                "-u", "-m", "fastsocketserver.http", "--directory", docroot, *extra]
        with run({}, argv=argv, env=env, pass_fds=(sock.fileno(),)) as sup:
            sock.close()
            assert BANNER.match(sup.info["line"]).groups() == ("127.0.0.1", str(port))
            assert notify_socket.recv(200).startswith(b"READY=1")
            if extra:
                wait_for(lambda: len(sup.workers()) == 2, message="2 workers")
            assert get(port, "/hello.txt") == (200, CONTENT)
            sup.signal(signal.SIGTERM)
            if extra:
                assert notify_socket.recv(200) == b"STOPPING=1"
            assert sup.wait() == (0 if extra else -signal.SIGTERM)
            sup.assert_gone()
