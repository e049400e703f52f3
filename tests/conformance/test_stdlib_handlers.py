"""The stdlib's own handlers served by fastsocketserver to real clients.

``http.server.SimpleHTTPRequestHandler`` (to ``urllib.request``, ``http.client`` and
``curl``), ``python -m fastsocketserver.http``, ``xmlrpc.server`` (to
``xmlrpc.client.ServerProxy``) and ``wsgiref`` (to ``urllib.request``), each compared
with the same handler on the stdlib's server: same status, same headers apart from
``Date``, same body.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import http.client
import http.server
import inspect
import io
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client
import xmlrpc.server
from wsgiref import simple_server

import pytest

import fastsocketserver
import fastsocketserver.http
import fastsocketserver.wsgi
import fastsocketserver.xmlrpc

TIMEOUT = 10.0
HOST = "127.0.0.1"
#: headers that legitimately differ between two runs of the same handler
VOLATILE_HEADERS = {"date"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def serving(server):
    """Run ``server.serve_forever`` in a thread; always shut down, close and join."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "serve_forever did not return after shutdown()"


def base_url(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def stable_headers(items) -> list[tuple[str, str]]:
    """Headers in order, without those that depend on the time of the request."""
    return [(k.lower(), v) for k, v in items if k.lower() not in VOLATILE_HEADERS]


def urlopen(url: str, method: str = "GET", data: bytes | None = None, headers=None):
    """(status, stable headers, body) of one urllib request; HTTP errors included."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, stable_headers(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, stable_headers(err.headers.items()), err.read()


def raw_request(server, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, reason, stable headers, body) through http.client (no redirects)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.reason, stable_headers(resp.getheaders()), resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# http.server.SimpleHTTPRequestHandler
# ---------------------------------------------------------------------------

BIG = random.Random(1234).randbytes(1 << 20)
FILES = {
    "hello.txt": b"hello, world\n",
    "page.html": b"<!doctype html><title>t</title><p>page</p>\n",
    "empty.txt": b"",
    "data.bin": BIG,
    "with space.txt": b"spaced out\n",
    "sub/nested.json": b'{"nested": true}\n',
    "site/index.html": b"<p>index</p>\n",
}


@pytest.fixture(scope="module")
def docroot():
    root = tempfile.mkdtemp(prefix="fsshttp", dir="/tmp")
    for name, content in FILES.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    # one fixed mtime, so that Last-Modified is a stable header
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (1_700_000_000, 1_700_000_000))
    yield root
    shutil.rmtree(root, ignore_errors=True)


class QuietHTTPHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 -- the stdlib's signature
        pass


class QuietHTTP11Handler(QuietHTTPHandler):
    protocol_version = "HTTP/1.1"


HTTP_SERVERS = {
    "stdlib": http.server.ThreadingHTTPServer,
    "fast": fastsocketserver.http.ThreadingHTTPServer,
}


@contextlib.contextmanager
def http_servers(docroot, handler=QuietHTTPHandler):
    """The same handler on the stdlib's and on our ThreadingHTTPServer: {name: server}."""
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, cls in HTTP_SERVERS.items():
            server = cls((HOST, 0), functools.partial(handler, directory=docroot))
            stack.callback(server.server_close)  # if the next constructor fails
            servers[name] = stack.enter_context(serving(server))
        yield servers


HTTP_CASES = [
    ("GET", "/hello.txt"),
    ("GET", "/page.html"),
    ("GET", "/empty.txt"),
    ("GET", "/data.bin"),
    ("GET", "/with%20space.txt"),
    ("GET", "/sub/nested.json"),
    ("GET", "/site/"),            # index.html
    ("GET", "/"),                 # directory listing
    ("GET", "/sub/"),             # directory listing
    ("GET", "/sub"),              # 301, followed by urllib
    ("GET", "/missing.txt"),      # 404
    ("GET", "/hello.txt?x=1#frag"),
    ("HEAD", "/data.bin"),
    ("HEAD", "/missing.txt"),
    ("POST", "/hello.txt"),       # 501
]


def test_http_class_attributes():
    ours, theirs = fastsocketserver.http, http.server
    assert issubclass(ours.HTTPServer, fastsocketserver.TCPServer)
    assert ours.ThreadingHTTPServer.__bases__ == (fastsocketserver.ThreadingMixIn, ours.HTTPServer)
    for name in ("HTTPServer", "ThreadingHTTPServer"):
        for attr in ("allow_reuse_address", "daemon_threads", "block_on_close", "request_queue_size"):
            assert getattr(getattr(ours, name), attr, None) == getattr(getattr(theirs, name), attr, None), (name, attr)
    with ours.HTTPServer((HOST, 0), QuietHTTPHandler) as server:
        ref = http.server.HTTPServer((HOST, 0), QuietHTTPHandler)
        try:
            assert (server.server_name, server.server_port) == (ref.server_name, server.server_address[1])
            assert ref.server_port == ref.server_address[1]
        finally:
            ref.server_close()


@pytest.mark.parametrize("method,path", HTTP_CASES)
def test_simple_http_urllib_differential(docroot, method, path):
    with http_servers(docroot) as servers:
        results = {name: urlopen(base_url(s) + path, method=method) for name, s in servers.items()}
    status, headers, body = results["fast"]
    assert results["fast"] == results["stdlib"]
    # and the reference itself is what the file system says
    name = urllib.parse.unquote(urllib.parse.urlsplit(path).path.lstrip("/"))
    if name in FILES and method == "GET":
        assert (status, body) == (200, FILES[name])
        assert ("content-length", str(len(FILES[name]))) in headers
    if path == "/missing.txt":
        assert status == 404
    if path in ("/", "/sub/", "/sub") and method == "GET":
        assert status == 200 and b"Directory listing for" in body


def test_simple_http_redirect_and_raw_differential(docroot):
    with http_servers(docroot) as servers:
        got = {
            name: [
                raw_request(s, "GET", "/sub"),                    # 301 Moved Permanently
                raw_request(s, "GET", "/hello.txt", headers={"If-Modified-Since": "Wed, 01 Jan 2031 00:00:00 GMT"}),
                raw_request(s, "GET", "/%2e%2e/%2e%2e/etc/passwd"),
                raw_request(s, "BREW", "/"),
            ]
            for name, s in servers.items()
        }
    assert got["fast"] == got["stdlib"]
    assert [r[0] for r in got["fast"]] == [301, 304, 404, 501]


def test_simple_http_concurrent_big_downloads(docroot):
    """Eight 1 MiB downloads at once, all complete and intact."""
    with http_servers(docroot) as servers:
        url = base_url(servers["fast"]) + "/data.bin"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: urlopen(url), range(8)))
    for status, _, body in results:
        assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()


def test_simple_http_keep_alive_http11(docroot):
    """HTTP/1.1: several requests on one persistent connection."""
    with http_servers(docroot, handler=QuietHTTP11Handler) as servers:
        transcripts = {}
        for name, server in servers.items():
            host, port = server.server_address[:2]
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
            try:
                seen, sock = [], None
                # send_error() closes the connection: the 404 comes last
                for path in ("/hello.txt", "/data.bin", "/sub/nested.json", "/", "/missing.txt"):
                    conn.request("GET", path)
                    assert sock is None or conn.sock is sock, f"{name}: connection was not kept alive"
                    sock = conn.sock
                    resp = conn.getresponse()
                    seen.append((resp.status, stable_headers(resp.getheaders()), resp.read()))
                transcripts[name] = seen
            finally:
                conn.close()
    assert transcripts["fast"] == transcripts["stdlib"]
    assert [t[0] for t in transcripts["fast"]] == [200, 200, 200, 200, 404]


# -- curl ---------------------------------------------------------------------

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install -y curl)")


def curl(url: str, *args: str):
    """(status line, stable headers, body) as curl sees them."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        hfile, bfile = os.path.join(tmp, "h"), os.path.join(tmp, "b")
        proc = subprocess.run(
            [CURL, "--silent", "--show-error", "--max-time", str(TIMEOUT), "--globoff",
             "--dump-header", hfile, "--output", bfile, *args, url],
            capture_output=True, timeout=TIMEOUT + 5,
        )
        assert proc.returncode == 0, f"curl {args} {url}: rc={proc.returncode} {proc.stderr!r}"
        with open(hfile, "rb") as f:
            # one header block per response (more than one when redirects are followed)
            blocks = [b.split("\r\n") for b in f.read().decode("iso-8859-1").split("\r\n\r\n") if b]
        body = b""
        if os.path.exists(bfile) and "--head" not in args:  # with --head it holds the headers
            with open(bfile, "rb") as f:
                body = f.read()
    head = blocks[-1]
    fields = [tuple(line.split(": ", 1)) for line in head[1:]]
    return " | ".join(b[0] for b in blocks), stable_headers(fields), body


@needs_curl
def test_simple_http_curl_differential(docroot):
    requests = [
        ("/hello.txt",), ("/data.bin",), ("/",), ("/sub/",), ("/missing.txt",),
        ("/data.bin", "--head"), ("/sub", "--location"), ("/data.bin", "--range", "100-199"),
        ("/page.html", "--http1.0"), ("/hello.txt", "--compressed"),
    ]
    with http_servers(docroot) as servers:
        got = {name: [curl(base_url(s) + path, *args) for path, *args in requests] for name, s in servers.items()}
    assert got["fast"] == got["stdlib"]
    status_lines = [r[0] for r in got["fast"]]
    assert status_lines[:6] == ["HTTP/1.0 200 OK"] * 4 + ["HTTP/1.0 404 File not found", "HTTP/1.0 200 OK"]
    assert got["fast"][1][2] == BIG and got["fast"][5][2] == b""


@needs_curl
def test_simple_http_curl_parallel(docroot):
    """One curl fetching eight 1 MiB files at once over eight connections."""
    with http_servers(docroot) as servers, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        url = base_url(servers["fast"]) + "/data.bin"
        args = [CURL, "--silent", "--show-error", "--max-time", str(TIMEOUT), "--parallel", "--parallel-max", "8"]
        for i in range(8):
            args += ["--output", os.path.join(tmp, f"out{i}"), url]
        proc = subprocess.run(args, capture_output=True, timeout=TIMEOUT + 5)
        assert proc.returncode == 0, proc.stderr
        for i in range(8):
            with open(os.path.join(tmp, f"out{i}"), "rb") as f:
                assert f.read() == BIG


# -- python -m fastsocketserver.http ---------------------------------------------

BANNER = re.compile(rb"Serving HTTP on 127\.0\.0\.1 port (\d+) \(http://127\.0\.0\.1:(\d+)/\) \.\.\.\n")


def _read_until(proc, pattern: re.Pattern, timeout: float = TIMEOUT) -> bytes:
    """Read the process's stdout until ``pattern`` matches (bounded by ``timeout``)."""
    data, deadline = b"", time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while not pattern.search(data):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no {pattern.pattern!r} within {timeout}s; stdout so far: {data!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"stdout closed before {pattern.pattern!r}: {data!r}; rc={proc.poll()}")
        data += chunk
    return data


def _run_module_server(module: str, docroot: str):
    """``python -m <module> --bind 127.0.0.1 --directory docroot 0``: (stdout, stderr, rc,
    fetched). SIGINT is at its default in the child, as in an interactive shell."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", module, "--bind", HOST, "--directory", docroot, "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/tmp", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        out = _read_until(proc, BANNER)
        port = int(BANNER.search(out).group(1))
        url = f"http://{HOST}:{port}"
        fetched = [urlopen(url + p) for p in ("/hello.txt", "/data.bin", "/sub/", "/missing.txt")]
        time.sleep(0.1)  # let serve_forever go back to waiting, then Ctrl-C
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=TIMEOUT)
        return BANNER.sub(b"Serving HTTP on 127.0.0.1 port PORT ...\n", out + rest), err, proc.returncode, fetched
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


def test_python_m_fastsocketserver_http(docroot):
    out, err, rc, fetched = _run_module_server("fastsocketserver.http", docroot)
    ref_out, ref_err, ref_rc, ref_fetched = _run_module_server("http.server", docroot)
    assert (rc, out) == (ref_rc, ref_out) == (0, b"Serving HTTP on 127.0.0.1 port PORT ...\n"
                                             b"\nKeyboard interrupt received, exiting.\n"), err
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert fetched == ref_fetched
    assert [f[0] for f in fetched] == [200, 200, 200, 404] and fetched[1][2] == BIG
    # the request log on stderr, as http.server writes it
    for line in (b'"GET /hello.txt HTTP/1.1" 200', b'"GET /missing.txt HTTP/1.1" 404'):
        assert line in err and line in ref_err


def test_python_m_fastsocketserver_http_help():
    proc = subprocess.run([sys.executable, "-m", "fastsocketserver.http", "--help"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0
    for flag in ("--bind", "--directory", "--protocol", "port"):
        assert flag in proc.stdout


# ---------------------------------------------------------------------------
# xmlrpc.server
# ---------------------------------------------------------------------------

class QuietXMLRPCHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


def _fail():
    raise ValueError("boom")


def _custom_fault():
    raise xmlrpc.client.Fault(42, "custom fault")


def _register(server):
    server.register_function(lambda a, b: a + b, "add")
    server.register_function(lambda x: x, "echo")
    server.register_function(_fail, "fail")
    server.register_function(_custom_fault, "custom_fault")
    server.register_function(lambda seconds: time.sleep(seconds) or seconds, "sleep")
    server.register_function(pow)
    server.register_introspection_functions()
    server.register_multicall_functions()
    return server


XMLRPC_SERVERS = {
    "stdlib": xmlrpc.server.SimpleXMLRPCServer,
    "fast": fastsocketserver.xmlrpc.SimpleXMLRPCServer,
}


class _TimeoutTransport(xmlrpc.client.Transport):
    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = TIMEOUT
        return conn


def proxy(server) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(base_url(server) + "/RPC2", transport=_TimeoutTransport(),
                                     allow_none=True)


def _calls(server):
    """A transcript of calls: results, faults as ('fault', code, string)."""
    p = proxy(server)
    calls = [
        lambda: p.add(2, 3),
        lambda: p.add("a", "b"),
        lambda: p.pow(2, 10),
        lambda: p.echo([1, 2.5, "x", True, None, {"k": [1, {"n": None}]}]),
        lambda: p.echo(xmlrpc.client.Binary(b"\x00\xff" * 1000)).data,
        lambda: p.echo("é" * 100_000),
        lambda: p.fail(),
        lambda: p.custom_fault(),
        lambda: p.nope(1),
        lambda: p.add(1),
        lambda: sorted(p.system.listMethods()),
        lambda: p.system.methodHelp("system.listMethods"),
        lambda: p.system.multicall([{"methodName": "add", "params": [1, 2]},
                                    {"methodName": "fail", "params": []}]),
    ]
    out = []
    try:
        for call in calls:
            try:
                out.append(call())
            except xmlrpc.client.Fault as fault:
                out.append(("fault", fault.faultCode, fault.faultString))
    finally:
        p("close")()
    return out


def parameters(func, **replace) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter: the signature without annotations."""
    return [(p.name, p.kind, replace.get(p.name, p.default)) for p in inspect.signature(func).parameters.values()]


def test_xmlrpc_signature_and_attributes():
    ours, theirs = fastsocketserver.xmlrpc.SimpleXMLRPCServer, xmlrpc.server.SimpleXMLRPCServer
    assert parameters(ours.__init__) == parameters(theirs.__init__)
    assert issubclass(ours, fastsocketserver.TCPServer)
    assert issubclass(ours, xmlrpc.server.SimpleXMLRPCDispatcher)
    assert (ours.allow_reuse_address, ours._send_traceback_header) == (
        theirs.allow_reuse_address, theirs._send_traceback_header)
    with ours((HOST, 0), bind_and_activate=False) as server:
        assert server.logRequests is True and server.allow_none is False
        assert server.RequestHandlerClass is xmlrpc.server.SimpleXMLRPCRequestHandler


def test_xmlrpc_server_proxy_differential():
    transcripts = {}
    for name, cls in XMLRPC_SERVERS.items():
        server = _register(cls((HOST, 0), QuietXMLRPCHandler, logRequests=False, allow_none=True))
        with serving(server):
            transcripts[name] = _calls(server)
    assert transcripts["fast"] == transcripts["stdlib"]
    t = transcripts["fast"]
    assert t[0] == 5 and t[2] == 1024
    assert t[6] == ("fault", 1, "<class 'ValueError'>:boom")
    assert t[7] == ("fault", 42, "custom fault")
    assert t[8][0] == "fault" and "nope" in t[8][2]
    assert t[12] == [[3], {"faultCode": 1, "faultString": "<class 'ValueError'>:boom"}]


def test_xmlrpc_raw_http_differential():
    body = xmlrpc.client.dumps((20, 22), "add").encode()
    got = {}
    for name, cls in XMLRPC_SERVERS.items():
        server = _register(cls((HOST, 0), QuietXMLRPCHandler, logRequests=False))
        with serving(server):
            got[name] = [
                raw_request(server, "POST", "/RPC2", body, {"Content-Type": "text/xml"}),
                raw_request(server, "POST", "/elsewhere", body, {"Content-Type": "text/xml"}),  # 404
                raw_request(server, "GET", "/RPC2"),  # 501
                raw_request(server, "POST", "/RPC2", b"<not xml", {"Content-Type": "text/xml"}),
            ]
    assert got["fast"] == got["stdlib"]
    assert [g[0] for g in got["fast"]][:3] == [200, 404, 501]
    assert xmlrpc.client.loads(got["fast"][0][3])[0] == (42,)


def test_xmlrpc_threading_variant_runs_calls_concurrently():
    cls = fastsocketserver.xmlrpc.ThreadingSimpleXMLRPCServer
    assert cls.__bases__ == (fastsocketserver.ThreadingMixIn, fastsocketserver.xmlrpc.SimpleXMLRPCServer)
    server = _register(cls((HOST, 0), QuietXMLRPCHandler, logRequests=False))
    n, nap = 6, 0.5
    with serving(server):
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda _: proxy(server).sleep(nap), range(n)))
        elapsed = time.monotonic() - start
        assert proxy(server).add(1, 1) == 2
    assert results == [nap] * n
    assert elapsed < n * nap * 0.6, f"{n} calls sleeping {nap}s took {elapsed:.2f}s: not concurrent"


# ---------------------------------------------------------------------------
# wsgiref
# ---------------------------------------------------------------------------

ENV_KEYS = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH",
            "SERVER_PROTOCOL", "SERVER_NAME", "SCRIPT_NAME", "REMOTE_ADDR", "HTTP_X_CUSTOM",
            "wsgi.url_scheme", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once")


def wsgi_app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("X-Sha256", hashlib.sha256(data).hexdigest()),
                                  ("Content-Length", str(len(data)))])
        return [data]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"chunk %04d " % i + b"x" * 1000 + b"\n" for i in range(200))
    if path == "/error":
        raise RuntimeError("application failure")
    if path == "/teapot":
        start_response("418 I'm a teapot", [("Content-Type", "text/plain"), ("X-Multi", "1"), ("X-Multi", "2")])
        return [b"short and stout"]
    env = {k: environ.get(k) for k in ENV_KEYS}
    env["wsgi.version"] = list(environ["wsgi.version"])
    body = json.dumps(env, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class QuietWSGIHandler(simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass

    def get_stderr(self):
        return io.StringIO()  # the traceback of /error, not wanted on the test's stderr


MAKE_SERVER = {"stdlib": simple_server.make_server, "fast": fastsocketserver.wsgi.make_server}
POST_BODY = random.Random(99).randbytes(300_000)
WSGI_CASES = [
    ("GET", "/", None, {}),
    ("GET", "/some/path?a=1&b=%20", None, {"X-Custom": "yes"}),
    ("POST", "/", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("POST", "/echo", POST_BODY, {"Content-Type": "application/octet-stream"}),
    ("GET", "/stream", None, {}),
    ("GET", "/teapot", None, {}),
    ("GET", "/error", None, {}),
]


def test_wsgi_signatures_and_classes():
    ours = fastsocketserver.wsgi
    assert parameters(ours.make_server) == parameters(simple_server.make_server, server_class=ours.WSGIServer)
    assert issubclass(fastsocketserver.wsgi.WSGIServer, fastsocketserver.http.HTTPServer)
    assert fastsocketserver.wsgi.WSGIRequestHandler is simple_server.WSGIRequestHandler


def test_wsgi_urllib_differential():
    got = {}
    for name, make in MAKE_SERVER.items():
        server = make(HOST, 0, wsgi_app, handler_class=QuietWSGIHandler)
        with serving(server):
            got[name] = [urlopen(base_url(server) + path, method, data, headers)
                         for method, path, data, headers in WSGI_CASES]
            assert server.get_app() is wsgi_app
    assert got["fast"] == got["stdlib"]
    results = got["fast"]
    env = json.loads(results[1][2])
    assert env["PATH_INFO"] == "/some/path" and env["QUERY_STRING"] == "a=1&b=%20"
    assert env["HTTP_X_CUSTOM"] == "yes" and env["REMOTE_ADDR"] == HOST
    assert json.loads(results[2][2])["CONTENT_LENGTH"] == "3"
    assert results[3][0] == 200 and results[3][2] == POST_BODY
    assert ("x-sha256", hashlib.sha256(POST_BODY).hexdigest()) in results[3][1]
    stream = results[4][2]
    assert results[4][0] == 200 and len(stream) == 200 * 1012 and stream.startswith(b"chunk 0000 ")
    assert results[5][0] == 418 and ("x-multi", "1") in results[5][1] and ("x-multi", "2") in results[5][1]
    assert results[6][0] == 500


def test_wsgi_server_environ():
    with fastsocketserver.wsgi.make_server(HOST, 0, wsgi_app) as server:
        ref = simple_server.make_server(HOST, 0, wsgi_app)
        try:
            port = server.server_address[1]
            assert server.base_environ == dict(ref.base_environ, SERVER_PORT=str(port))
        finally:
            ref.server_close()
