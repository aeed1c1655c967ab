"""The package layout, read from the source with `ast` and enforced.

    edge_runtime   the device: depends on no other devft package, never imports torch, transformers
                   or peft at module level (the ExecuTorch backend imports torch lazily, inside its trainer)
    export         below the server: may use edge_runtime (the manifest), never server_sdk
    server_sdk     the coordinator: may use both
    benchmarks     on top of everything

Inside server_sdk, rooms in the same order (a room may use the rooms before it, never one after it):

    server_sdk/*.py   the foundation every room shares: config, data, tasks, progress, quiet, disk
    method/           DEVFT's science (grouping, fusion, fold-back, submodels, schedules, aggregation, strategies)
    engine/           the round loop, executors, simulated training, model, checkpoints, report
    fleet/            real devices over MQTT: the coordinator, broker, artifacts, web gateway
    cli/              the `devft` command line; nothing imports it

The one arrow out of the foundation: `RunConfig.validate` reads the rule tables of method/ and engine/
(the names a config may choose) inside the function, so a config loads without torch.

Besides the arrows between packages: no import cycle between modules, no `__import__` and no
`importlib.import_module` of a devft module (or of a name computed at run time), and no private name
(`_foo`) taken from another module, by `from m import _foo` or as `m._foo` on an imported module.

    python tests/test_layout.py     # prints the import graph's numbers and every problem
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "export", "server_sdk", "benchmarks")
# package -> the devft packages it must not import
FORBIDDEN = {"edge_runtime": {"export", "server_sdk", "benchmarks"}, "export": {"server_sdk", "benchmarks"},
             "server_sdk": {"benchmarks"}}
DEVICE_FREE = ("torch", "transformers", "peft")  # never at module level in edge_runtime
LAZY_TORCH_OK = {"edge_runtime.backends.executorch_backend"}  # may import torch inside a function
ROOMS = ("method", "engine", "fleet", "cli")  # server_sdk's rooms, lowest first; the foundation sits below them
CHOICE_TABLES = {"server_sdk.config"}  # foundation modules that may read rooms' name tables inside a function


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a devft module where the name resolves to one, else the dotted name)
    names: tuple[str, ...]  # names taken with `from target import ...`
    line: int
    module_level: bool  # runs at import time (not inside a function)
    type_only: bool  # inside `if TYPE_CHECKING:`


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def package_arrows(self) -> Counter[tuple[str, str]]:
        """(from package, to package) -> number of import statements, for imports between devft packages."""
        return Counter((top(i.source), top(i.target)) for i in self.imports
                       if i.target in self.modules and top(i.source) != top(i.target))

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module (or a module importing itself)."""
        edges: dict[str, set[str]] = {m: set() for m in self.modules}
        for i in self.imports:
            if i.target in self.modules and not i.type_only:
                edges[i.source].add(i.target)
        return [sorted(c) for c in strongly_connected(edges) if len(c) > 1 or next(iter(c)) in edges[next(iter(c))]]


def top(module: str) -> str:
    return module.split(".", 1)[0]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
    """Every module of `packages` under `root`, its imports, and the problems that need no graph."""
    graph = Graph()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            graph.modules[module_name(root, path)] = path
    for module, path in graph.modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> devft module it is bound to
        for node, module_level, type_only in walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    graph.imports.append(Import(module, alias.name, (), node.lineno, module_level, type_only))
                    if alias.name in graph.modules:
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or top(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(module, is_package, node.module, node.level)
                plain = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in graph.modules:  # `from package import submodule`
                        graph.imports.append(Import(module, sub, (), node.lineno, module_level, type_only))
                        aliases[alias.asname or alias.name] = sub
                    else:
                        plain.append(alias.name)
                if plain or not node.names:
                    graph.imports.append(Import(module, base, tuple(plain), node.lineno, module_level, type_only))
            elif isinstance(node, ast.Call):
                graph.problems += string_import(module, node, graph.modules)
        graph.problems += private_attributes(module, tree, aliases, graph.modules)
    return graph


def resolve(module: str, is_package: bool, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool, bool]]:
    """(node, runs at import time, inside `if TYPE_CHECKING:`) for every node."""

    def visit(node: ast.AST, module_level: bool, type_only: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
        yield node, module_level, type_only
        inner = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        guarded = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        body = {id(child) for child in node.body} if guarded else set()
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner, type_only or id(child) in body)

    yield from visit(tree, True, False)


def string_import(module: str, call: ast.Call, modules: dict[str, Path]) -> list[str]:
    func = ast.unparse(call.func)
    if func == "__import__":
        return [f"{module}:{call.lineno}: __import__(...): import by name, explicitly"]
    if func in ("importlib.import_module", "import_module"):
        arg = call.args[0] if call.args else None
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            return [f"{module}:{call.lineno}: importlib.import_module of a computed name"]
        if top(arg.value) in {top(m) for m in modules}:
            return [f"{module}:{call.lineno}: importlib.import_module({arg.value!r}): import it explicitly"]
    return []


def private_attributes(module: str, tree: ast.AST, aliases: dict[str, str], modules: dict[str, Path]) -> list[str]:
    """`alias._name` where alias is a devft module imported here (`m._foo` reaches into another module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = ast.unparse(node.value)
            target = aliases.get(owner.split(".")[0])
            if target is not None:
                dotted = ".".join([target, *owner.split(".")[1:]])
                if dotted in modules and dotted != module:
                    found.append(f"{module}:{node.lineno}: {owner}.{node.attr} is private to {dotted}")
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)
    return groups


def room(module: str) -> int | None:
    """server_sdk's room of a module, by rank: 0 the foundation, 1.. ROOMS; None outside server_sdk."""
    parts = module.split(".")
    if parts[0] != "server_sdk":
        return None
    return ROOMS.index(parts[1]) + 1 if len(parts) > 2 and parts[1] in ROOMS else 0


def room_problem(i: Import, modules: dict[str, Path]) -> str | None:
    src, dst = room(i.source), room(i.target)
    if i.target not in modules or src is None or dst is None or dst <= src or i.type_only:
        return None
    if src == 0 and i.source in CHOICE_TABLES and not i.module_level:
        return None
    names = ("the foundation", *(f"{r}/" for r in ROOMS))
    return f"{i.source}:{i.line}: {names[src]} imports {i.target}; {names[dst]} sits above {names[src]}"


def problems(graph: Graph) -> list[str]:
    """Everything that breaks the layout, one line each."""
    found = list(graph.problems)
    for i in graph.imports:
        src, dst = top(i.source), top(i.target)
        where = f"{i.source}:{i.line}"
        if i.target in graph.modules and dst in FORBIDDEN.get(src, ()):
            found.append(f"{where}: {src} imports {i.target}; {src} sits below {dst}")
        if src == "edge_runtime" and top(i.target) in DEVICE_FREE and not i.type_only:
            if i.module_level:
                found.append(f"{where}: edge_runtime imports {i.target} at module level; devices have no {top(i.target)}")
            elif i.source not in LAZY_TORCH_OK:
                found.append(f"{where}: edge_runtime imports {i.target}; only {sorted(LAZY_TORCH_OK)} may, lazily")
        if (bad_room := room_problem(i, graph.modules)) is not None:
            found.append(bad_room)
        if i.target in graph.modules and i.target != i.source:
            found += [f"{where}: imports private {n!r} from {i.target}; make it public where it lives"
                      for n in i.names if is_private(n)]
    found += [f"import cycle: {' <-> '.join(c)}" for c in graph.cycles()]
    return found


# --------------------------------------------------------------------------- the tests


def test_the_source_tree_keeps_its_layout():
    graph = scan()
    assert len(graph.modules) > 50 and len(graph.imports) > 300  # the scan saw the tree
    assert problems(graph) == []


def test_the_server_rooms_exist_and_hold_their_modules():
    modules = scan().modules
    for name in ("server_sdk.method.fusion", "server_sdk.method.strategies.devft", "server_sdk.engine.rounds",
                 "server_sdk.fleet.coordinator", "server_sdk.fleet.broker", "server_sdk.cli.main", "server_sdk.config"):
        assert name in modules, name
    flat = sorted(m for m, path in modules.items() if m.count(".") == 1 and m.startswith("server_sdk.")
                  and path.name != "__init__.py")
    assert flat == ["server_sdk.config", "server_sdk.data", "server_sdk.disk", "server_sdk.progress",
                    "server_sdk.quiet", "server_sdk.tasks"], flat  # a new module goes into a room


def test_no_arrow_points_up():
    arrows = scan().package_arrows()
    assert arrows[("export", "edge_runtime")] > 0 and arrows[("server_sdk", "export")] > 0
    for (src, dst) in arrows:
        assert dst not in FORBIDDEN.get(src, ()), (src, dst)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "edge_runtime/__init__.py": "",
    "edge_runtime/manifest.py": "import json\n\nLIMIT = 1\n\ndef load():\n    return json.loads('{}')\n",
    "edge_runtime/backends/__init__.py": "",
    "edge_runtime/backends/executorch_backend.py": "def make():\n    import torch\n    return torch\n",
    "export/__init__.py": "from edge_runtime.manifest import LIMIT\n",
    "export/onnx.py": "from export import LIMIT\nfrom . import naming\n",
    "export/naming.py": "def to_name(x):\n    return x\n",
    "server_sdk/__init__.py": "",
    "server_sdk/fleet.py": "import export.onnx\nfrom export import naming\nfrom server_sdk.config import Y\n\n"
                           "X = naming.to_name(Y)\n",
    "server_sdk/config.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:  # not a run-time arrow: no cycle\n"
                            "    from server_sdk.fleet import X\n\nY = 1\n",
    "benchmarks/__init__.py": "",
}


def test_a_clean_synthetic_tree_passes(tmp_path):
    graph = scan(write(tmp_path, CLEAN))
    assert problems(graph) == []
    assert graph.package_arrows() == {("export", "edge_runtime"): 1, ("server_sdk", "export"): 2}


def test_the_checker_catches_each_kind_of_bad_import(tmp_path):
    bad = {
        **CLEAN,
        "export/onnx.py": "from export import LIMIT\nfrom . import naming\nfrom server_sdk.fleet import X\n",
        "edge_runtime/manifest.py": "import torch\nfrom export.naming import to_name\n",
        "edge_runtime/batching.py": "def f():\n    from transformers import AutoTokenizer\n",
        "edge_runtime/backends/onnx_backend.py": "from edge_runtime.backends.executorch_backend import _helper\n",
        "server_sdk/cli.py": "import importlib\n\ndef load(name):\n    __import__(name)\n"
                             "    importlib.import_module('server_sdk.' + name)\n"
                             "    importlib.import_module('server_sdk.fleet')\n",
        "server_sdk/rounds.py": "from server_sdk import fleet\n\nY = fleet._private\n",
        "server_sdk/a.py": "from server_sdk.b import B\nA = 1\n",
        "server_sdk/b.py": "from server_sdk.a import A\nB = 2\n",
        "server_sdk/method/grouping.py": "from server_sdk.engine.rounds import R\n",
        "server_sdk/engine/rounds.py": "def f():\n    from server_sdk.fleet.coordinator import C\nR = 1\n",
        "server_sdk/fleet/coordinator.py": "from server_sdk.method.grouping import G\nfrom server_sdk.cli.main import M\nC = 1\n",
        "server_sdk/data.py": "from server_sdk.method.grouping import G\n",
        "server_sdk/cli/main.py": "M = 1\n",
    }
    found = "\n".join(problems(scan(write(tmp_path, bad))))
    for expected in (
        "export.onnx:3: export imports server_sdk.fleet; export sits below server_sdk",
        "edge_runtime.manifest:1: edge_runtime imports torch at module level",
        "edge_runtime.manifest:2: edge_runtime imports export.naming",
        "edge_runtime.batching:2: edge_runtime imports transformers; only",
        "edge_runtime.backends.onnx_backend:1: imports private '_helper' from edge_runtime.backends.executorch_backend",
        "server_sdk.cli:4: __import__",
        "server_sdk.cli:5: importlib.import_module of a computed name",
        "server_sdk.cli:6: importlib.import_module('server_sdk.fleet')",
        "server_sdk.rounds:3: fleet._private is private to server_sdk.fleet",
        "import cycle: server_sdk.a <-> server_sdk.b",
        "import cycle: export.onnx <-> server_sdk.fleet",  # the upward arrow closes a loop as well
        "server_sdk.method.grouping:1: method/ imports server_sdk.engine.rounds; engine/ sits above method/",
        "server_sdk.engine.rounds:2: engine/ imports server_sdk.fleet.coordinator; fleet/ sits above engine/",
        "server_sdk.fleet.coordinator:2: fleet/ imports server_sdk.cli.main; cli/ sits above fleet/",
        "server_sdk.data:1: the foundation imports server_sdk.method.grouping; method/ sits above the foundation",
    ):
        assert expected in found, (expected, found)
    assert "server_sdk.fleet.coordinator:1" not in found  # fleet/ may use method/
    assert "import cycle: server_sdk.engine.rounds <-> server_sdk.fleet.coordinator <-> server_sdk.method.grouping" in found
    assert len(found.splitlines()) == 16, found


def summary(graph: Graph) -> str:
    arrows = graph.package_arrows()
    lines = [f"{len(graph.modules)} modules, {len(graph.imports)} import statements"]
    lines += [f"  {a} -> {b}: {n}" for (a, b), n in sorted(arrows.items())]
    lines.append(f"  cycles: {len(graph.cycles())}")
    return "\n".join(lines)


if __name__ == "__main__":
    g = scan()
    print(summary(g))
    for p in problems(g):
        print(p)
    sys.exit(1 if problems(g) else 0)
