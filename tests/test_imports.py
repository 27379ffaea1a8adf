"""The package's modules import each other without a cycle (function-level imports counted), and
each imports on its own in a fresh interpreter."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyeffort"


def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every module of the package (a .pyx maps to None)."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.pyx")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f if f.suffix == ".py" else None
    return out


def imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The package modules that module ``name`` imports anywhere in its body."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found |= {sub} if sub in known else {base} if base in known else set()
    return found - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, f, known) for m, f in known.items() if f is not None}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(u, path):
        state[u] = 1
        path.append(u)
        for v in sorted(g.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v) :] + [v]
            if v not in state and (cycle := visit(v, path)):
                return cycle
        path.pop()
        state[u] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m, [])):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_has_no_cycle():
    g = graph()
    assert {"pyeffort.api", "pyeffort.buckets", "pyeffort.cuda"} <= set(g)
    assert "pyeffort.buckets" in g["pyeffort.api"]  # the graph sees imports
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first in a clean interpreter (pyeffort's modules dropped between them);
    modules whose optional dependency is missing here are skipped."""
    names = sorted(m for m, f in modules().items() if f is not None and m != "pyeffort.__main__")
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for k in [k for k in sys.modules if k == 'pyeffort' or k.startswith('pyeffort.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        if (e.name or '').startswith('pyeffort'):\n"
        "            raise\n"
        "        print('skipped', name, e.name)\n"
    )
    cmd = [sys.executable, "-c", code, *names]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
