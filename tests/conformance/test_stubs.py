"""``_core.pyi`` describes every class, method and attribute the engine exports."""

from __future__ import annotations

import ast
import pathlib

import fastsocketserver
from fastsocketserver import _core

STUB = pathlib.Path(fastsocketserver.__file__).with_name("_core.pyi")


def _stubbed() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    found: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            found[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            found[""].add(node.name)
        elif isinstance(node, ast.FunctionDef):
            found[""].add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[""].add(node.target.id)
    return found


def test_every_export_is_stubbed():
    stubbed = _stubbed()
    exported = {name for name in dir(_core) if not name.startswith("__")}
    assert exported == stubbed[""]
    for name in exported:
        cls = getattr(_core, name)
        if not isinstance(cls, type) or name == "PanicException":
            continue
        own = {m for m in vars(cls) if not m.startswith("__") or m in ("__enter__", "__exit__", "__iter__", "__next__", "__new__")}
        assert own == stubbed[name], f"{name}: engine {sorted(own ^ stubbed[name])} differ from the stub"
