"""The data path reads in one direction: processes -> transport -> dialects -> core ->
batcher -> models, with leaf modules anyone may use, and a client that imports no server
module. This reads every module's imports (statically) and holds them to that order."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "embedserve"
# Top to bottom: a module may import its own layer, any layer below it, and the leaves.
LAYERS: dict[str, tuple[str, ...]] = {
    "processes": ("cli", "commands", "supervisor", "worker", "__main__", "hub", "modelcache",
                  "ray"),
    "transport": ("server", "connections", "handler", "httphead", "dispatch", "routes",
                  "routing", "openapi", "guards"),
    "dialects": ("dialects", "rerank_dialects", "cohere"),
    "core": ("scoring", "service", "registry", "names", "requests", "metrics",
             "metricfiles"),
    "batcher": ("batcher",),
    "models": ("backends",),
}
LEAVES = ("__init__", "config", "contracts", "errors", "encoding", "hashing", "vectors",
          "quantize")
CLIENT_MAY_IMPORT = ("__init__", "client", "config", "contracts", "encoding", "hashing",
                     "vectors")
ORDER = list(LAYERS)


def top(module: str) -> str:
    """embedserve.backends.hash -> backends; embedserve -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(name: str) -> str | None:
    return next((layer for layer, names in LAYERS.items() if name in names), None)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "embedserve":
                found.update(f"embedserve.{alias.name}" for alias in node.names
                             if alias.name != "__version__")
            elif node.module.startswith("embedserve."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("embedserve."))
    return found


def modules() -> list[tuple[str, Path]]:
    return [("embedserve." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts), p)
            for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_place() -> None:
    for name, _ in modules():
        first = top(name)
        assert first in LEAVES or first == "client" or layer_of(first), \
            f"{name} is in no layer: add it to tests/test_layers.py"


def test_imports_point_down() -> None:
    wrong = []
    for name, path in modules():
        own = top(name)
        for imported in imports_of(path):
            target = top(imported)
            if own == "client":
                if target not in CLIENT_MAY_IMPORT:
                    wrong.append(f"{name} imports {imported} (the client imports no server "
                                 "module)")
                continue
            if target in LEAVES or target == own:
                continue
            if target == "client":
                # The shell commands are the client's front end; the package lends its names.
                if own not in ("commands", "__init__"):
                    wrong.append(f"{name} imports the client")
                continue
            mine, theirs = layer_of(own), layer_of(target)
            if own in LEAVES:
                wrong.append(f"leaf {name} imports {imported}")
            elif mine and theirs and ORDER.index(theirs) < ORDER.index(mine):
                wrong.append(f"{name} ({mine}) imports {imported} ({theirs}): upward")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_500_lines() -> None:
    long = {name: n for name, path in modules()
            if (n := len(path.read_text("utf-8").splitlines())) > 500}
    assert not long, long
