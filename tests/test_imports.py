"""The import graph of the project's packages (read from the source with `ast`, nothing imported): no
circles, counting function-local imports too, and function-local imports of the project's own modules only
where DESIGN.md allows them (command dispatch, which keeps `unigrpo --help` from importing torch)."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder → installed package name (setup.py's package_dir)
PACKAGES = {"unigrpo": "unigrpo", "kernels": "unigrpo_kernels", "bench": "unigrpo_bench",
            "experiments": "unigrpo_experiments"}
# where a function-local import of a project module is by design (DESIGN.md, "Imports"):
# command dispatch loads one command's code on demand, so `unigrpo --help` does not import torch; the
# reward registry loads a reward's module (and its dependencies: transformers, requests) when it is used;
# the kernels load their optional backends (triton, the CUDA library) when one is asked for; the
# benchmark suites import what they time when they run
LAZY_BY_DESIGN = ("unigrpo.cli", "unigrpo.rewards.registry", "unigrpo_kernels.", "unigrpo_bench.")


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every project module."""
    out = {}
    for folder, pkg in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        if not os.path.isdir(base):
            continue
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([pkg] + rel)] = os.path.join(dirpath, f)
    return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The project module that `import name` loads (the longest known prefix), or None for a third party."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def _imports(mod: str, path: str, modules: dict[str, str]) -> list[tuple[str, bool, int]]:
    """(imported project module, is function-local, line) for each import in `mod`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    prefix = ".".join(pkg + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                # `from pkg import sub` may import a submodule: count it when it is one
                names = [f"{prefix}.{a.name}" if _resolve(f"{prefix}.{a.name}", modules) == f"{prefix}.{a.name}"
                         else prefix for a in child.names]
            else:
                visit(child, inner)
                continue
            if isinstance(child, ast.ImportFrom) or isinstance(child, ast.Import):
                if _type_checking(child, tree):
                    continue
                for n in names:
                    target = _resolve(n, modules)
                    if target and target != mod:
                        found.append((target, local, child.lineno))

    visit(tree, False)
    return found


def _type_checking(node, tree) -> bool:
    for parent in ast.walk(tree):
        if isinstance(parent, ast.If) and getattr(parent.test, "id", getattr(parent.test, "attr", "")) == "TYPE_CHECKING":
            if any(node is c for c in ast.walk(parent)):
                return True
    return False


def _graph():
    modules = _modules()
    edges = {m: _imports(m, p, modules) for m, p in modules.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for m in list(edges):
        for t, local, line in list(edges[m]):
            parts = t.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent != m and not m.startswith(parent + "."):
                    edges[m].append((parent, local, line))
    return modules, edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _, _ in edges.get(v, []):
            if w not in index:
                strong(w)
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

    import sys
    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def test_the_checker_sees_modules_and_imports():
    modules, edges = _graph()
    assert "unigrpo.trainer" in modules and "unigrpo_kernels.flow" in modules
    assert any(t == "unigrpo.config" for t, _, _ in edges["unigrpo.trainer"]) or \
        any(t == "unigrpo.config" for m in edges for t, _, _ in edges[m])
    # relative imports resolve (bench's modules import each other only relatively)
    assert any(t == "unigrpo_bench.checks" for t, _, _ in edges["unigrpo_bench.suites.flow"])
    # the checker finds a circle when there is one
    fake = {"a": [("b", False, 1)], "b": [("c", True, 1)], "c": [("a", False, 1)], "d": [("a", False, 1)]}
    assert _cycles(fake) == [["a", "b", "c"]]


def test_no_import_circles():
    _, edges = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import circles (module-level and function-local imports counted): " + "; ".join(
        " ↔ ".join(c) for c in cycles)


def test_function_local_imports_of_project_modules_only_in_command_dispatch():
    _, edges = _graph()
    bad = sorted({f"{m}:{line} imports {t}" for m, es in edges.items() if not m.startswith(LAZY_BY_DESIGN)
                  for t, local, line in es if local})
    assert not bad, "function-local imports of project modules outside LAZY_BY_DESIGN:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_every_folder_is_a_package(folder):
    base = os.path.join(ROOT, folder)
    if not os.path.isdir(base):
        pytest.skip(f"{folder}/ not in this checkout")
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{dirpath} holds modules but no __init__.py"
