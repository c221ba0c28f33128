"""The package's imports flow one way, down the layers (issue #23, docs/design.md §7).

Every module of the package source (deqir_fast/**/*.py) is parsed with ``ast`` and every
import of another module of the package is collected: at module level and inside
functions and methods, relative and absolute, ``import deqir_fast as dq`` followed by
``dq.solve`` (resolved through the facade's lazy name table), and literal
``importlib.import_module`` calls. Importing ``deqir_fast.ops.fused_round`` from outside
``ops`` also imports ``deqir_fast/ops/__init__.py`` first, so that counts as an import of
``deqir_fast.ops`` too. Then

- no two modules may import each other, directly or round a circle (lazy imports
  included: a lazy import is still a dependency, and the circle is still there);
- every import goes to the importer's own layer or one below it (``LAYERS``);
- every module has exactly one layer (a new module must be placed here).

``deqir_fast/__init__.py``, the lazy re-export facade, may import anything; a module that
imports a name from it depends on the module the name comes from.
"""
from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

# The layer map: lower = more basic. A module may import modules of its own layer or of a
# lower one, never of a higher one. Names are relative to ``deqir_fast``; ``ops`` is
# ``ops/__init__.py``; ``*`` matches the modules of a subpackage (``cli.*`` also matches
# ``cli.main.x``). This list is the one place the layering is written down.
LAYERS: List[Tuple[Tuple[str, ...], str]] = [
    # 0-6: the hot operations. Pure tensor code that knows nothing of the maths' classes.
    (("_checks",), "argument checks shared by every layer"),
    (("ops.layout",), "the fused round's column layout, shared with the kernels"),
    (("ops.native",), "loader of the native kernels (kernels/, built by CMake)"),
    (("ops.backends",), "which backend runs each op, and the kernels' validation"),
    (("ops.triton_scan", "ops.triton_round"), "Triton kernels"),
    (("ops.scan", "ops.fused_round", "ops.anderson"), "the hot ops: references and dispatch"),
    (("ops",), "ops/__init__.py: re-exports the hot ops"),
    # 7-10: the maths, each module one concept
    (("schedules", "operators"), "noise schedules; degradation operators"),
    (("chains",), "samplers as per-step affine chains"),
    (("linearize",), "the Jacobian guesses of the linearised scan"),
    (("system",), "F, the serial sampler and the fused round's system"),
    # 11-14: solving
    (("solvers", "solvers.*"), "the fixed-point solver loop and update rules"),
    (("distributed",), "step sharding over a process group"),
    (("gradients",), "implicit gradients (the adjoint system)"),
    (("api",), "solve, sample_serial, backward and their defaults"),
    # 15: built on solve
    (("optimize", "peers"), "initialisation optimisation; peer methods as solve configurations"),
    # 16-18: adapters at the edge: other libraries' samplers, models and pipelines
    (("diffusers_compat", "k_diffusion", "testing"),
     "diffusers schedulers and k-diffusion's Euler as chains; the exact test denoiser"),
    (("models",), "model adapters: diffusers networks, the bundled model"),
    (("pipelines",), "drop-in diffusers pipelines (imports diffusers)"),
    # 19-21: the tools and the command line
    (("tasks", "telemetry", "image_io", "figures", "calibration"),
     "task registry, GPU telemetry, image files, plots, calibration catalogue"),
    (("cli", "cli.*", "benchmark", "benchmark.*"), "the command line and the benchmark"),
    (("__main__",), "python -m deqir_fast"),
]

PACKAGE = "deqir_fast"
FACADE = PACKAGE            # deqir_fast/__init__.py: exempt, may import anything


def package_dir() -> Path:
    import deqir_fast
    return Path(deqir_fast.__file__).resolve().parent


# -- collecting the imports -------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    importer: str          # full module names
    target: str
    path: Path             # the importer's file
    line: int
    how: str = ""          # e.g. "as the parent package of deqir_fast.ops.scan"

    def where(self, root: Path) -> str:
        rel = self.path.relative_to(root.parent) if root.parent in self.path.parents else self.path
        return f"{rel}:{self.line}" + (f" ({self.how})" if self.how else "")


def module_files(root: Path, package: str = PACKAGE) -> Dict[str, Path]:
    """{full module name: file} for every .py file under ``root`` (the package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        name = ".".join([package, *parts])
        if name not in out or is_init:     # x/__init__.py and x.py: Python imports the package
            out[name] = path
    return out


def facade_names(init: Path, package: str) -> Dict[str, str]:
    """The facade's lazy table {public name: full module name} (``_ATTRIBUTES``)."""
    tree = ast.parse(init.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_ATTRIBUTES"
                                                for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: (package + mod if mod.startswith(".") else mod)
                    for name, mod in table.items()}
    return {}


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, path: Path, modules: Dict[str, Path], facade: Dict[str, str],
                 package: str):
        self.name, self.path, self.modules, self.facade, self.package = \
            name, path, modules, facade, package
        is_pkg = path.name == "__init__.py"
        self.here = name if is_pkg else name.rpartition(".")[0]   # what level 1 refers to
        self.edges: List[Edge] = []
        self.aliases: Dict[str, str] = {}        # local name -> module it is bound to

    # resolution
    def _absolute(self, module: Optional[str], level: int) -> Optional[str]:
        if level == 0:
            return module
        base = self.here.split(".")
        if level - 1 > len(base) - 1:
            return None
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def _ours(self, name: Optional[str]) -> bool:
        return bool(name) and (name == self.package or name.startswith(self.package + "."))

    def _add(self, target: str, line: int, how: str = "") -> None:
        if target == self.name:
            return
        self.edges.append(Edge(self.name, target, self.path, line, how))
        # importing a.b.c imports a.b first (its __init__), unless we are inside a.b
        parts = target.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if parent in self.modules and not (self.name == parent
                                               or self.name.startswith(parent + ".")):
                self.edges.append(Edge(self.name, parent, self.path, line,
                                       f"as the parent package of {target}"))

    def _resolve_name(self, module: str, attr: str) -> str:
        """The module that ``from module import attr`` depends on."""
        if f"{module}.{attr}" in self.modules:
            return f"{module}.{attr}"
        if module == self.package and attr in self.facade:
            return self.facade[attr]
        return module

    def _attribute_chain(self, node: ast.Attribute) -> Optional[Tuple[str, List[str]]]:
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.aliases:
            return self.aliases[node.id], attrs[::-1]
        return None

    # visitors
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not self._ours(alias.name):
                continue
            if alias.name != self.package:
                self._add(alias.name, node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                self.aliases[alias.name.split(".")[0]] = self.package

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self._absolute(node.module, node.level)
        if not self._ours(module):
            return
        for alias in node.names:
            if alias.name == "*":
                target = module
            else:
                target = self._resolve_name(module, alias.name)
                if target in self.modules and target == f"{module}.{alias.name}":
                    self.aliases[alias.asname or alias.name] = target
            if target != self.package:        # a name the facade itself defines: no edge
                self._add(target, node.lineno)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = self._attribute_chain(node)
        if chain is not None:
            base, attrs = chain
            target = base
            for k in range(len(attrs), 0, -1):              # the longest module prefix
                candidate = ".".join([base, *attrs[:k]])
                if candidate in self.modules:
                    target = candidate
                    break
            else:
                target = self._resolve_name(base, attrs[0])
            if target != self.package:
                self._add(target, node.lineno)
            return                                            # the chain is handled whole
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if fname in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            text = node.args[0].value
            level = len(text) - len(text.lstrip("."))
            target = self._absolute(text[level:] or None, level) if level else text
            if self._ours(target) and target != self.package:
                self._add(target, node.lineno, "importlib")
        self.generic_visit(node)


def collect(root: Path, package: str = PACKAGE) -> Tuple[Dict[str, Path], List[Edge]]:
    """(modules, intra-package import edges; the facade's own imports left out)."""
    modules = module_files(root, package)
    init = root / "__init__.py"
    facade = facade_names(init, package) if init.is_file() else {}
    edges = []
    for name, path in modules.items():
        if name == package:
            continue                      # the facade may import anything
        collector = _Collector(name, path, modules, facade, package)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector.visit(tree)             # a first pass binds the aliases (``dq``, ``io``) ...
        collector.edges = []
        collector.visit(tree)             # ... so that a use above its import resolves too
        edges.extend(collector.edges)
    return modules, edges


# -- checks -----------------------------------------------------------------------------------
def layer_of(short: str, layers=LAYERS) -> List[int]:
    hits = []
    for i, (patterns, _) in enumerate(layers):
        if any(short == p or (p.endswith(".*") and fnmatch.fnmatchcase(short, p)) for p in patterns):
            hits.append(i)
    return hits


def short_name(name: str, package: str = PACKAGE) -> str:
    return name[len(package) + 1:] if name != package else ""


def cycles(modules, edges) -> List[List[Edge]]:
    """One circle of edges for each strongly connected group of modules (Tarjan)."""
    graph: Dict[str, Dict[str, Edge]] = defaultdict(dict)
    for e in edges:
        graph[e.importer].setdefault(e.target, e)
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]

    def strong(v):                                        # recursion depth <= module count
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            groups.append(set(group))

    for v in sorted(set(modules) | set(graph)):
        if v not in index:
            strong(v)
    circles = []
    for group in groups:
        if len(group) < 2 and not any(w == v for v in group for w in graph[v]):
            continue
        covered = set()
        for start in sorted(group):                   # circles until each member is on one
            if start in covered:
                continue
            circle = _shortest_circle(graph, group, start)
            covered.update(e.importer for e in circle)
            circles.append(circle)
    return circles


def _shortest_circle(graph, group, start) -> List[Edge]:
    """The shortest circle of edges through ``start`` inside ``group`` (breadth first)."""
    prev, frontier, found = {start: None}, [start], None
    while frontier and found is None:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    found = v
                    break
                if w in group and w not in prev:
                    prev[w] = v
                    nxt.append(w)
            if found is not None:
                break
        frontier = nxt
    path = [found]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    path = path[::-1]                                       # start ... found
    return [graph[a][b] for a, b in zip(path, path[1:] + [start])]


def describe_cycle(circle: List[Edge], root: Path, package: str = PACKAGE) -> str:
    names = " -> ".join(short_name(e.importer, package) for e in circle) + \
        f" -> {short_name(circle[0].importer, package)}"
    where = "; ".join(f"{short_name(e.importer, package)} -> {short_name(e.target, package)} at "
                      f"{e.where(root)}" for e in circle)
    return f"import cycle {names} ({where})"


def upward(modules, edges, root: Path, layers=LAYERS, package: str = PACKAGE) -> List[str]:
    out = []
    for e in edges:
        a, b = short_name(e.importer, package), short_name(e.target, package)
        la, lb = layer_of(a, layers), layer_of(b, layers)
        if not la or not lb or not b:
            continue                                       # reported by the map test
        if lb[0] > la[0]:
            out.append(f"{a} (layer {la[0]}: {layers[la[0]][1]}) imports {b} (layer {lb[0]}: "
                       f"{layers[lb[0]][1]}) at {e.where(root)}")
    return sorted(set(out))


ROOT = package_dir()


@pytest.fixture(scope="module")
def graph():
    return collect(ROOT)


# -- the package ------------------------------------------------------------------------------
def test_the_walker_sees_the_imports(graph):
    """A walker that sees nothing passes everything: check edges the code certainly has."""
    modules, edges = graph
    seen = {(short_name(e.importer), short_name(e.target)) for e in edges}
    assert ("system", "chains") in seen                     # module level, relative
    assert ("chains", "ops") in seen                        # parent package of ops.fused_round
    assert ("ops.fused_round", "ops.backends") in seen      # inside a function, `from . import`
    assert len(modules) > 30


def test_every_module_has_one_layer(graph):
    modules, _ = graph
    problems = []
    for name in modules:
        short = short_name(name)
        if not short:
            continue                                        # the facade
        hits = layer_of(short)
        if len(hits) != 1:
            problems.append(f"{short}: {'no layer' if not hits else f'layers {hits}'}")
    assert not problems, ("place each module in exactly one layer of LAYERS in "
                          "tests/test_imports.py: " + "; ".join(problems))


def test_no_import_cycles(graph):
    modules, edges = graph
    found = [describe_cycle(c, ROOT) for c in cycles(modules, edges)]
    assert not found, "\n".join(found)


def test_imports_go_down_the_layers(graph):
    modules, edges = graph
    bad = upward(modules, edges, ROOT)
    assert not bad, "imports up the layers (tests/test_imports.py LAYERS):\n" + "\n".join(bad)


# -- the walker itself, on a made-up package --------------------------------------------------
def _write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_walker_finds_lazy_relative_facade_and_parent_imports(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": '_ATTRIBUTES = {"solve": ".api"}\n',
        "low.py": "def f():\n    from .high import g\n    return g\n",
        "high.py": "from . import low\n",
        "api.py": "import importlib\n",
        "user.py": "import pkg as p\n\ndef h():\n    return p.solve\n",
        "user2.py": "from pkg import solve\nfrom pkg.sub.leaf import x\n",
        "mod.py": "def k():\n    import importlib\n    return importlib.import_module('.api', 'pkg')\n",
        "sub/__init__.py": "from .leaf import x\n",
        "sub/leaf.py": "from .. import low\nx = 1\n",
    })
    modules, edges = collect(root, "pkg")
    seen = {(e.importer, e.target) for e in edges}
    assert ("pkg.low", "pkg.high") in seen                   # lazy, relative
    assert ("pkg.user", "pkg.api") in seen                   # dq.solve through the facade
    assert ("pkg.user2", "pkg.api") in seen                  # from the facade
    assert ("pkg.user2", "pkg.sub.leaf") in seen and ("pkg.user2", "pkg.sub") in seen
    assert ("pkg.sub", "pkg.sub.leaf") in seen and ("pkg.sub.leaf", "pkg.low") in seen
    assert ("pkg.mod", "pkg.api") in seen                    # importlib
    assert not any(e.importer == "pkg" for e in edges)       # the facade is exempt
    found = cycles(modules, edges)
    assert len(found) == 1
    text = describe_cycle(found[0], root, "pkg")
    assert text.startswith("import cycle high -> low -> high") and "low.py:2" in text


def test_walker_reports_upward_imports(tmp_path):
    root = _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "def f():\n    from . import b\n",
                                     "b.py": ""})
    modules, edges = collect(root, "pkg")
    layers = [(("a",), "lower"), (("b",), "higher")]
    bad = upward(modules, edges, root, layers, "pkg")
    assert len(bad) == 1 and bad[0].startswith("a (layer 0: lower) imports b (layer 1: higher)")
    assert "a.py:2" in bad[0]
