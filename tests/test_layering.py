"""The import layering of mmjax: no cycle between modules, no import from a higher layer.

Every import of every module under mmjax/ and kernels/ (imported as `mmjax.kernels`, the
pyproject package-dir mapping) is read with `ast`, at module level and inside functions alike
(a lazy import is still a dependency). How an import names its target:
  * `import mmjax.a.b` and `from mmjax.a.b import name` depend on the module mmjax.a.b (or, when
    that is no module, on the closest enclosing one: its package's __init__);
  * `from mmjax.a import b` depends on the submodule mmjax.a.b when there is one, and on the
    package mmjax.a (its __init__) for every imported name that is not a submodule;
  * relative imports are resolved against the importing module (a package's __init__ is the
    package itself); imports of the root `mmjax` package and of a module by itself are ignored.
"""

from __future__ import annotations

import ast
import os

# Layer of each package (or top-level module) of mmjax, lowest first. A module may import
# modules of its own layer or of lower ones, never of a higher one. Every package under mmjax/
# must be listed (test_every_package_has_a_layer), so a new one is placed deliberately; names
# listed here that do not exist (yet) are allowed.
LAYERS = {
    "errors": 0, "configs": 0, "xla_options": 0,
    "kernels": 1, "parallel": 1,
    "ops": 2,
    "nn": 3,
    "models": 4, "data": 4,
    "convert": 5, "generate": 5, "eval": 5, "checkpoint": 5, "peft": 5,
    "train": 6,
    "tasks": 7, "textgen": 7, "rag": 7, "align": 7,
    "bench": 8, "cli": 8, "__main__": 8,
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = (("mmjax", "mmjax"), ("kernels", "mmjax.kernels"))  # directory -> import name


# ------------------------------------------------------------------------------------------
# The checker (pure functions over {module: (source, is_package)}, so it can test itself)
# ------------------------------------------------------------------------------------------


def read_sources(root: str = ROOT) -> dict[str, tuple[str, bool]]:
    """{module name: (source text, is a package __init__)} of every .py file of the package."""
    out = {}
    for directory, prefix in SOURCES:
        base = os.path.join(root, directory)
        for d, _, files in os.walk(base):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(d, f)
                rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                is_pkg = f == "__init__.py"
                mod = prefix if rel == "__init__" else prefix + "." + rel.removesuffix(".__init__")
                with open(path, encoding="utf-8") as fh:
                    out[mod] = (fh.read(), is_pkg)
    return out


def imports_of(mod: str, source: str, is_pkg: bool) -> set[tuple[str, tuple[str, ...]]]:
    """(absolute module named, names imported from it) for every import statement."""
    out = set()
    for node in ast.walk(ast.parse(source, mod)):
        if isinstance(node, ast.Import):
            out.update((a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                name = ".".join(parts + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add((name, tuple(a.name for a in node.names)))
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the mmjax modules it imports}."""
    graph = {}
    for mod, (source, is_pkg) in sources.items():
        deps = set()
        for name, names in imports_of(mod, source, is_pkg):
            if name != "mmjax" and not name.startswith("mmjax."):
                continue
            targets = [f"{name}.{n}" for n in names if f"{name}.{n}" in sources]
            if len(targets) < len(names) or not names:  # names that are not submodules
                targets.append(name)
            for t in targets:
                while t and t not in sources:
                    t = t.rpartition(".")[0]
                if t and t != mod and t != "mmjax":
                    deps.add(t)
        graph[mod] = deps
    return graph


def package_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """'a -> b' for every import of a module from a higher layer than the importer's."""
    out = []
    for mod, deps in graph.items():
        a = package_of(mod)
        for dep in deps:
            b = package_of(dep)
            if a in layers and b in layers and layers[b] > layers[a]:
                out.append(f"{mod} -> {dep}")
    return sorted(out)


def unplaced(modules, layers: dict[str, int]) -> list[str]:
    """Packages (or top-level modules) of mmjax that have no layer."""
    return sorted({p for p in map(package_of, modules) if p is not None and p not in layers})


# ------------------------------------------------------------------------------------------
# The rules, on the real package
# ------------------------------------------------------------------------------------------

SOURCES_READ = read_sources()
GRAPH = import_graph(SOURCES_READ)


def test_the_whole_package_is_read():
    # guards against passing on an empty graph (wrong root, moved directories)
    for mod in ("mmjax.errors", "mmjax.kernels.flash_attention", "mmjax.generate.loop",
                "mmjax.train.loop", "mmjax.cli"):
        assert mod in GRAPH, f"{mod} not found under {ROOT}"
    assert "mmjax.errors" in GRAPH["mmjax.kernels.flash_attention"]


def test_no_import_cycles():
    found = cycles(GRAPH)
    report = "\n".join(" <-> ".join(c) for c in found)
    assert not found, ("import cycles between modules (break each by moving what both sides "
                       f"need into a module they can both import):\n{report}")


def test_no_upward_imports():
    found = upward_imports(GRAPH, LAYERS)
    report = "\n".join(found)
    assert not found, f"imports from a higher layer (LAYERS in tests/test_layering.py):\n{report}"


def test_every_package_has_a_layer():
    missing = unplaced(GRAPH, LAYERS)
    assert not missing, (f"packages of mmjax with no layer: {missing}; give each one in LAYERS "
                         "(tests/test_layering.py)")


# ------------------------------------------------------------------------------------------
# The checker on a synthetic package: it must be able to fail
# ------------------------------------------------------------------------------------------


def _synthetic():
    return {
        "mmjax": ("", True),
        "mmjax.errors": ("import os\n", False),
        "mmjax.ops": ("from mmjax.ops.a import f\n", True),
        # a <-> b, b's half inside a function, through a relative import
        "mmjax.ops.a": ("from mmjax import errors\nfrom mmjax.ops.b import g\n", False),
        "mmjax.ops.b": ("def g():\n    from .a import f\n    return f\n", False),
        # upward: ops (2) -> train (6), via `from pkg import submodule`
        "mmjax.ops.c": ("from mmjax.train import loop\n", False),
        "mmjax.train": ("", True),
        "mmjax.train.loop": ("import mmjax.ops.c\nfrom mmjax.errors import X\n", False),
        # `from pkg import name` (not a submodule) depends on pkg/__init__: d -> ops -> a
        "mmjax.nn": ("", True),
        "mmjax.nn.d": ("from mmjax.ops import f\n", False),
        "mmjax.mystery": ("import mmjax\n", True),
    }


def test_checker_reads_imports_as_the_rules_say():
    g = import_graph(_synthetic())
    assert g["mmjax.ops.a"] == {"mmjax.errors", "mmjax.ops.b"}
    assert g["mmjax.ops.b"] == {"mmjax.ops.a"}  # relative, inside a function
    assert g["mmjax.ops.c"] == {"mmjax.train.loop"}  # the submodule, not mmjax.train
    assert g["mmjax.train.loop"] == {"mmjax.ops.c", "mmjax.errors"}
    assert g["mmjax.nn.d"] == {"mmjax.ops"}  # a name of the package's __init__
    assert g["mmjax.ops"] == {"mmjax.ops.a"}
    assert g["mmjax.mystery"] == set()  # the root package is no dependency


def test_checker_detects_a_cycle_an_upward_import_and_an_unplaced_package():
    g = import_graph(_synthetic())
    assert cycles(g) == [["mmjax.ops.a", "mmjax.ops.b"],
                         ["mmjax.ops.c", "mmjax.train.loop"]]
    assert upward_imports(g, LAYERS) == ["mmjax.ops.c -> mmjax.train.loop"]
    assert unplaced(g, LAYERS) == ["mystery"]
    # and is quiet on a clean graph
    clean = {"mmjax.errors": set(), "mmjax.ops.a": {"mmjax.errors"}, "mmjax.nn.d": {"mmjax.ops.a"}}
    assert cycles(clean) == [] and upward_imports(clean, LAYERS) == []
    assert unplaced(clean, LAYERS) == []
