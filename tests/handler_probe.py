"""Run a probe inside a request handler and bring its result back to the test.

``in_handler(module, kind_name, paths, probe, client=...)`` builds a server of
``module`` (stdlib ``socketserver`` or ``fastsocketserver``), connects one client,
runs ``probe(handler)`` inside ``handle()`` and returns what it returned.  An
exception escaping the probe is returned as ``("raised", ExceptionTypeName)`` so
the two modules can be compared value for value.  ``client(sock)`` runs in the
test's thread while the handler runs (to send data, pass descriptors, read the
handler's output); the client socket is closed afterwards.

Every wait is bounded (``JOIN_TIMEOUT``) and the server is always shut down and
closed (``serving``).
"""

from __future__ import annotations

import threading

from conftest import JOIN_TIMEOUT, get_kind, make_server, serving


def raised(exc: BaseException) -> tuple[str, str]:
    return ("raised", type(exc).__name__)


def outcome(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``'s value, or ``("raised", TypeName)``."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # compared by type between the modules
        return raised(exc)


def in_handler(module, kind_name, paths, probe, *, client=None,
               handler_base="BaseRequestHandler", handler_attrs=None):
    kind = get_kind(kind_name)
    box: dict = {}
    done = threading.Event()

    def handle(self):
        try:
            box["value"] = probe(self)
        except Exception as exc:
            box["value"] = raised(exc)
        finally:
            done.set()

    attrs = dict(handler_attrs or {})
    attrs["handle"] = handle
    handler = type("Probe", (getattr(module, handler_base),), attrs)
    server = make_server(module, kind, handler, paths)
    with serving(server):
        with kind.client(server.server_address, paths) as sock:
            if client is not None:
                box["client"] = client(sock)
            assert done.wait(JOIN_TIMEOUT), "the handler did not finish"
    return box["value"] if client is None else (box["value"], box["client"])
