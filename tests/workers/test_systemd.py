"""systemd integration: socket activation (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES),
sd_notify, ``server_from_fd`` and the command line's ``--fd`` and worker options.

Socket activation is set up as systemd does it: the listening socket is descriptor 3
of a process whose LISTEN_PID is its own pid (a small launcher moves the socket to 3,
sets the variables and execs), and also through Debian's ``systemd-socket-activate``
when it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

import fastsocketserver as fss
from supervised import PROBE, ask, run, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process model")

#: Moves descriptor argv[1] to 3, sets LISTEN_* for its own pid, execs argv[2:].
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    fd, names, pid_offset = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    os.dup2(fd, 3)
    os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid() + pid_offset)
    if names:
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable] + sys.argv[4:])
    """
)


def listener(kind=socket.SOCK_STREAM):
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    return sock


def activated(cfg, sock, names="web", pid_offset=0, env=None):
    argv = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), names, str(pid_offset), PROBE, json.dumps(cfg)]
    return run(cfg, argv=argv, pass_fds=(sock.fileno(),), env=env)


# -- listen_fds -----------------------------------------------------------------------


def test_socket_activation_serves_the_inherited_socket_and_unsets_the_variables():
    with listener() as sock:
        port = sock.getsockname()[1]
        with activated({"fd": "systemd", "attrs": {"workers": 2}}, sock) as sup:
            sock.close()  # only the server holds it now
            assert sup.port == port
            err_line = json.loads(sup.proc.stderr.readline())
            assert err_line == {"fds": [[3, "web"]], "env": []}
            workers = sup.wait_workers(2)
            assert ask(port) in workers
            sup.signal(signal.SIGTERM)
            assert sup.wait() == 0
            sup.assert_gone()


def test_listen_pid_of_another_process_is_ignored():
    with listener() as sock:
        port = sock.getsockname()[1]
        with activated({"fd": "systemd", "attrs": {"workers": 1}}, sock, pid_offset=1) as sup:
            err_line = json.loads(sup.proc.stderr.readline())
            # Not ours: nothing taken, the variables left for whoever they are for.
            assert err_line["fds"] == []
            assert set(err_line["env"]) == {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
            assert sup.port != port
            sup.wait_workers(1)
            sup.signal(signal.SIGTERM)
            assert sup.wait() == 0
            sup.assert_gone()


def test_listen_fds_in_process(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert fss.listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    monkeypatch.setenv("LISTEN_PID", "not a pid")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert fss.listen_fds() == []
    monkeypatch.delenv("LISTEN_PID")
    assert fss.listen_fds() == []
    assert os.environ["LISTEN_FDS"] == "1"


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_systemd_socket_activate_runs_the_command_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        "systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=echo",
        sys.executable, "-m", "fastsocketserver", "--workers", "2",
    ]
    with run({}, argv=argv, expect_line=False) as sup:
        # systemd-socket-activate listens, then execs the server on the first connection.
        def connect():
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionRefusedError:
                return None

        with wait_for(connect, message="systemd-socket-activate listening") as c:
            c.sendall(b"hello\n")
            assert c.recv(100) == b"hello\n"
        wait_for(lambda: len(sup.workers()) == 2, message="2 workers")
        assert sup.proc.stdout.readline().startswith("fastsocketserver: serving")
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


# -- server_from_fd ---------------------------------------------------------------------


class Echo(fss.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


@pytest.mark.parametrize("listening", [True, False])
def test_server_from_fd_serves_an_existing_socket(listening):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if listening:
        sock.listen(4)
    address = sock.getsockname()
    server = fss.server_from_fd(fss.TCPServer, sock.detach(), Echo, timeout=10)
    with server:
        assert server.server_address == address and server.timeout == 10
        t = threading.Thread(target=server.handle_request)
        t.start()
        with socket.create_connection(address, timeout=10) as c:
            c.sendall(b"ping\n")
            assert c.recv(100) == b"ping\n"
        t.join(10)
        assert not t.is_alive()
    assert server.fileno() == -1


def test_server_from_fd_adapts_the_family():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = socket.socket(socket.AF_INET6)
    try:
        sock.bind(("::1", 0))
    except OSError:
        sock.close()
        pytest.skip("no ::1")
    sock.listen(4)
    with fss.server_from_fd(fss.TCPServer, sock.detach(), Echo) as server:
        assert server.address_family == socket.AF_INET6
        assert server.server_address[0] == "::1"


def test_server_from_fd_bad_input():
    with pytest.raises(TypeError):
        fss.server_from_fd(fss.TCPServer, "3", Echo)
    with tempfile.TemporaryFile() as f:
        with pytest.raises(ValueError, match="not a socket"):
            fss.server_from_fd(fss.TCPServer, f.fileno(), Echo)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        fss.server_from_fd(fss.TCPServer, r, Echo)
    with listener(socket.SOCK_DGRAM) as udp:
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            fss.server_from_fd(fss.TCPServer, udp.fileno(), Echo)
        udp.getsockname()  # still open: a refused descriptor is not closed


# -- sd_notify ----------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tempfile.TemporaryDirectory() as tmp:
        if request.param == "path":
            name = os.path.join(tmp, "notify")
            sock.bind(name)
        else:
            name = "@fss-test-%d-%d" % (os.getpid(), id(sock))
            sock.bind("\0" + name[1:])
        sock.settimeout(20)
        with sock:
            yield sock, name


def test_sd_notify_in_process(notify_socket, monkeypatch):
    sock, name = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert fss.sd_notify("STATUS=hello")
    assert sock.recv(100) == b"STATUS=hello"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not fss.sd_notify("READY=1")


def test_supervisor_notifies_ready_reloading_and_stopping(notify_socket):
    sock, name = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": name}
    with run({"attrs": {"workers": 2}}, env=env) as sup:
        assert sock.recv(200).startswith(b"READY=1")
        assert len(sup.wait_workers(2)) == 2
        sup.signal(signal.SIGHUP)
        assert sock.recv(200).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert sock.recv(200).startswith(b"READY=1")
        sup.signal(signal.SIGTERM)
        assert sock.recv(200) == b"STOPPING=1"
        assert sup.wait() == 0
        sup.assert_gone()


def test_single_process_notifies(notify_socket):
    sock, name = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": name}
    with run({"attrs": {"workers": 0}}, env=env) as sup:
        assert sock.recv(200) == b"READY=1"
        assert ask(sup.port) == sup.pid
        sup.signal(signal.SIGTERM)
        assert sock.recv(200) == b"STOPPING=1"
        assert sup.wait() == 0


# -- the command line -------------------------------------------------------------------


def cli(*args):
    return [sys.executable, "-m", "fastsocketserver", *args]


def test_cli_help_explains_the_options():
    out = subprocess.run(cli("--help"), capture_output=True, text=True, timeout=30).stdout
    for flag in ("--workers", "--reuse-port", "--graceful-timeout", "--max-requests", "--fd", "SIGHUP", "tcp_migrate_req"):
        assert flag in out


def test_cli_bad_values_are_usage_errors():
    for args in (["--workers", "-1"], ["--graceful-timeout", "soon"], ["--fd", "x"]):
        proc = subprocess.run(cli(*args), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "error" in proc.stderr


def serving_port(sup) -> int:
    line = sup.info["line"]
    assert line.startswith("fastsocketserver: serving"), line
    return int(line.rsplit(":", 1)[1].split()[0])


def test_cli_workers_and_graceful_stop():
    argv = cli("--port", "0", "--workers", "2", "--threading", "--max-requests", "100", "--graceful-timeout", "5")
    with run({}, argv=argv) as sup:
        port = serving_port(sup)
        wait_for(lambda: len(sup.workers()) == 2, message="2 workers")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hi\n")
            assert c.recv(100) == b"hi\n"
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def test_cli_fd():
    with listener() as sock:
        port = sock.getsockname()[1]
        argv = cli("--fd", str(sock.fileno()), "--workers", "1")
        with run({}, argv=argv, pass_fds=(sock.fileno(),)) as sup:
            sock.close()
            assert serving_port(sup) == port
            wait_for(lambda: len(sup.workers()) == 1, message="a worker")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"fd\n")
                assert c.recv(100) == b"fd\n"
            sup.signal(signal.SIGTERM)
            assert sup.wait() == 0
            sup.assert_gone()


def test_cli_fd_refuses_reuse_port():
    with listener() as sock:
        argv = cli("--fd", str(sock.fileno()), "--workers", "1", "--reuse-port")
        proc = subprocess.run(argv, pass_fds=(sock.fileno(),), capture_output=True, text=True, timeout=30,
                              start_new_session=True)
        assert proc.returncode == 2
        assert "--reuse-port binds a socket per worker" in proc.stderr
