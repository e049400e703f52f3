"""``python -m fastsocketserver.bench``: run the cross-language benchmark.

The benchmark itself lives in the repository's ``benches/`` directory (``benches/run.py``, the
servers under test in ``benches/servers.py``, the Rust load generator in ``benches/loadgen``,
built with cargo on first use). This entry point finds that directory next to the package
source (an editable install or a checkout on ``sys.path``), or where ``--benches PATH`` or the
``FASTSOCKETSERVER_BENCHES`` environment variable says, and runs it with the remaining
arguments (``--quick``, ``--only REGEX``, ``--pin``, ...; ``--help`` lists them).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["find_benches", "main"]


def find_benches(explicit: str | None = None) -> Path | None:
    """The ``benches`` directory holding ``run.py``, or None."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("FASTSOCKETSERVER_BENCHES"):
        candidates.append(Path(os.environ["FASTSOCKETSERVER_BENCHES"]))
    here = Path(__file__).resolve().parent  # python/fastsocketserver
    candidates += [here.parent.parent / "benches", Path.cwd() / "benches"]
    for c in candidates:
        if (c / "run.py").is_file() and (c / "loadgen" / "Cargo.toml").is_file():
            return c.resolve()
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    explicit = None
    if "--benches" in args:
        i = args.index("--benches")
        if i + 1 >= len(args):
            print("--benches needs a path", file=sys.stderr)
            return 2
        explicit = args[i + 1]
        del args[i:i + 2]
    benches = find_benches(explicit)
    if benches is None:
        print("fastsocketserver.bench: cannot find the benches/ directory of a fastsocketserver "
              "checkout; run from the repository, or pass --benches PATH "
              "(or set FASTSOCKETSERVER_BENCHES)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("fastsocketserver_benches_run", benches / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run
    spec.loader.exec_module(run)
    return int(run.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
