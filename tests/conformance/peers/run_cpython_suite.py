"""Run one of CPython's own test suites with fastsocketserver standing in for socketserver.

Usage::

    python tests/peers/run_cpython_suite.py SUITE [--stdlib] [--timeout SECONDS]
                                             [--verbose] [TEST_NAME ...]

``SUITE`` is a module of the installed interpreter's ``test`` package, e.g.
``test_httpservers``. Unless ``--stdlib`` is given, ``fastsocketserver`` is put into
``sys.modules['socketserver']`` before anything has imported ``socketserver`` (the
script checks that nothing has), then the suite is imported and the script checks that
the servers the suite uses really are built on ours. ``--stdlib`` runs the same suite
unchanged, so the environment's own skips can be told from ours.

``TEST_NAME`` arguments narrow the run to classes or methods of the suite, as
``python -m unittest test_httpservers.SomeCase.test_x`` would (given without the
module prefix: ``SomeCase`` or ``SomeCase.test_x``).

A hang is turned into a failure: after ``--timeout`` seconds faulthandler prints every
thread's stack to stderr and ends the process with a non-zero status.

The last line printed on stdout is ``PEERS-RESULT`` followed by one JSON object: the
counts (run, failures, errors, skipped, expected_failures, unexpected_successes), the
ids of the tests in each non-passing group with their tracebacks or reasons, the
elapsed seconds and whether the substitution was checked.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import sys
import time
import unittest

#: Modules that must not be imported before the substitution, or they would hold the
#: stdlib's socketserver.
GUARDED = ("socketserver", "http.server", "xmlrpc.server", "wsgiref.simple_server",
           "pydoc")

#: For each suite, (module, class name) pairs that must derive from our TCPServer
#: once the substitution has taken.
SERVER_CHECKS = {
    "test_httpservers": [("http.server", "HTTPServer"), ("http.server", "ThreadingHTTPServer")],
    "test_xmlrpc": [("xmlrpc.server", "SimpleXMLRPCServer")],
    "test_docxmlrpc": [("xmlrpc.server", "DocXMLRPCServer"), ("xmlrpc.server",
                                                               "SimpleXMLRPCServer")],
    "test_wsgiref": [("wsgiref.simple_server", "WSGIServer"), ("http.server", "HTTPServer")],
}

RESULT_TAG = "PEERS-RESULT"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite")
    parser.add_argument("tests", nargs="*")
    parser.add_argument("--stdlib", action="store_true",
                        help="run on the stdlib's socketserver (the reference)")
    parser.add_argument("--timeout", type=float, default=200.0,
                        help="seconds before a thread dump and exit")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_intermixed_args(argv)


def substitute() -> object:
    """Put fastsocketserver in place of socketserver; returns our module."""
    early = [name for name in GUARDED if name in sys.modules]
    if early:
        raise SystemExit(f"imported before the substitution: {early}")
    import fastsocketserver

    early = [name for name in GUARDED if name in sys.modules]
    if early:
        raise SystemExit(f"importing fastsocketserver imported {early}")
    sys.modules["socketserver"] = fastsocketserver
    return fastsocketserver


def check_substitution(suite_name: str, fast: object) -> list[str]:
    """Check that the suite's server classes are ours; returns the names checked."""
    import socketserver

    if socketserver is not fast:
        raise SystemExit("sys.modules['socketserver'] is not fastsocketserver")
    checked = []
    for module_name, class_name in SERVER_CHECKS.get(suite_name, []):
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
        if not issubclass(cls, fast.TCPServer):  # type: ignore[attr-defined]
            raise SystemExit(f"{module_name}.{class_name} is not built on "
                             f"fastsocketserver.TCPServer: {cls.__mro__}")
        checked.append(f"{module_name}.{class_name}")
    return checked


def load(module, tests: list[str]) -> unittest.TestSuite:
    loader = unittest.defaultTestLoader
    if not tests:
        return loader.loadTestsFromModule(module)
    return loader.loadTestsFromNames(tests, module)


def describe(result: unittest.TestResult, elapsed: float, checked: list[str],
             stdlib: bool) -> dict:
    return {
        "run": result.testsRun,
        "failures": len(result.failures),
        "errors": len(result.errors),
        "skipped": len(result.skipped),
        "expected_failures": len(result.expectedFailures),
        "unexpected_successes": len(result.unexpectedSuccesses),
        "failed_ids": {t.id(): tb for t, tb in result.failures},
        "error_ids": {t.id(): tb for t, tb in result.errors},
        "skipped_ids": {t.id(): reason for t, reason in result.skipped},
        "seconds": round(elapsed, 2),
        "substituted": not stdlib,
        "checked": checked,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    faulthandler.enable()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    fast = None if args.stdlib else substitute()
    module = importlib.import_module(f"test.{args.suite}")
    checked = [] if fast is None else check_substitution(args.suite, fast)
    suite = load(module, args.tests)
    started = time.monotonic()
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2 if args.verbose else 1)
    result = runner.run(suite)
    elapsed = time.monotonic() - started
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    print(RESULT_TAG, json.dumps(describe(result, elapsed, checked, args.stdlib)), flush=True)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
