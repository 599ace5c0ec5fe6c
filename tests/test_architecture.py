"""The package's shape: imports run one way and never in a cycle (docs/architecture.md).

Walks every module's imports with ``ast`` (module level and inside functions alike: a lazy
import is still a dependency) and fails on a wrong-way import, a cycle, or a module that grew
past the size where it should be split.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "capsfus"

# part -> the parts it may import (besides itself, `errors` and the package root's constants)
ALLOWED = {
    "rundir": set(),
    "ingest": {"rundir"},
    "engines": {"prompt", "models"},
    "prompt": set(),
    "models": set(),
    "stages": {"engines", "ingest", "rundir", "prompt", "models", "quality"},
    "executors": {"rundir"},
    "quality": {"engines", "rundir", "prompt"},
    "hub": {"quality", "rundir", "prompt"},
    "train": {"engines", "ingest", "rundir", "prompt", "models", "executors"},
    "perf": {"engines", "ingest", "rundir", "models", "executors", "stages", "hub"},
    "cli": {"rundir", "ingest", "engines", "stages", "executors", "quality", "hub", "train",
            "perf", "prompt", "models"},
}
# third-party packages a part must not import (an executor runs jobs it knows only through
# their protocol; it never loads a model)
FORBIDDEN_EXTERNAL = {"executors": {"torch", "transformers", "vllm"},
                      "rundir": {"torch", "transformers", "vllm", "submitit"}}
MAX_LINES = 600
# modules allowed past MAX_LINES, each with its reason
BIG = {}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> tuple[set[str], set[str]]:
    """(capsfus modules imported, top-level third-party names imported)."""
    is_pkg = path.name == "__init__.py"
    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name.startswith("capsfus") else theirs).add(
                    a.name if a.name.startswith("capsfus") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("capsfus"):
                theirs.add(target.split(".")[0])
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                ours.add(sub if sub in MODULES else target)
    return ours, theirs


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_parts_exist():
    for part in ("cli", "rundir", "ingest", "stages", "engines", "executors", "quality", "hub",
                 "train", "perf"):
        assert (PKG / part / "__init__.py").exists(), part
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 6, f"modules left flat in capsfus/: {top}"


def test_imports_run_one_way():
    wrong = []
    for mod, (ours, theirs) in GRAPH.items():
        part = _part(mod)
        if part not in ALLOWED:
            continue
        ok = ALLOWED[part] | {part, "errors", ""}
        for dep in ours:
            if _part(dep) not in ok:
                wrong.append(f"{mod} imports {dep}")
        for name in theirs & FORBIDDEN_EXTERNAL.get(part, set()):
            wrong.append(f"{mod} imports {name}")
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_outside_the_cli_imports_it():
    offenders = [m for m, (ours, _) in GRAPH.items()
                 if _part(m) != "cli" and any(_part(d) == "cli" for d in ours)]
    assert not offenders


def test_no_import_cycles():
    edges = {m: {d for d in ours if d in MODULES and d != m} for m, (ours, _) in GRAPH.items()}
    # Tarjan's strongly connected components: any component of two or more is a cycle
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not out, f"import cycles: {out}"


def test_modules_stay_readable():
    big = {m: n for m, p in MODULES.items()
           if (n := len(p.read_text().splitlines())) > MAX_LINES and m not in BIG}
    assert not big, f"split these (or say in BIG why not): {big}"


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    """The walk itself works: a lazy import of the CLI from the run dir is found."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..cli.common import make_console\n")
    ours, _ = _imports("capsfus.rundir.m", src)
    assert "capsfus.cli.common" in ours
