"""The import graph of our own code, read from the source with `ast` (nothing is imported).

Every import counts, also those inside functions (a lazy import still ties the two modules together), and
`from pkg import name` points at the submodule `pkg.name` when there is one. The graph must have no cycle; the
library (`converters/`) must not import Airflow; and no module may reach back into its own package's
`__init__` for a private name (such a helper belongs in a module of its own).

Roots: `converters/` and `operators/` from the repository root; `dags/` and `plugins/` are roots of their own,
as Airflow puts those folders on `sys.path`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (folder on sys.path, what under it is ours: package names, or None for every module in the folder)
ROOTS = ((REPO, ("converters", "operators")), (REPO / "dags", None), (REPO / "plugins", None))


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[tuple[str, int]] = field(default_factory=list)  # (resolved own module, line)
    external: list[tuple[str, int]] = field(default_factory=list)  # (top-level name of a module not ours, line)
    private_from_own_package: list[tuple[str, int]] = field(default_factory=list)  # (the name, line)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def discover() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for root, packages in ROOTS:
        if packages is None:
            files = [p for p in root.rglob("*.py")]
        else:
            files = [p for pkg in packages for p in (root / pkg).rglob("*.py")]
        for path in sorted(files):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            assert name not in modules, f"{name}: both {modules[name].path} and {path}"
            modules[name] = Module(name, path, is_package)
    return modules


def _absolute(module: Module, level: int, target: str | None) -> str:
    """The absolute name of a relative `from ... import` in `module`."""
    if level == 0:
        return target or ""
    base = module.package.split(".") if module.package else []
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _own(name: str, modules: dict[str, Module]) -> str | None:
    """`name` itself when it is one of our modules, else the longest of its parents that is (None: not ours)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def analyse(modules: dict[str, Module]) -> None:
    """Fill in each module's imports (every `import` / `from ... import` statement in it, at any depth)."""
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    own = _own(alias.name, modules)
                    if own:
                        module.imports.append((own, node.lineno))
                    else:
                        module.external.append((alias.name.split(".")[0], node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node.level, node.module)
                if source == "__future__":
                    continue
                own = _own(source, modules)
                if not own:
                    module.external.append((source.split(".")[0], node.lineno))
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if alias.name != "*" and sub in modules:  # `from pkg import mod`: the submodule
                        module.imports.append((sub, node.lineno))
                        continue
                    module.imports.append((own, node.lineno))  # a name defined in `source` (its __init__ if a package)
                    if (
                        own == source
                        and source == module.package
                        and alias.name.startswith("_")
                        and not alias.name.startswith("__")
                    ):
                        module.private_from_own_package.append((alias.name, node.lineno))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [m0, m1, ..., m0], or None (depth-first search, iterative)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if colour.get(child, BLACK) == GREY:
                    return path[path.index(child) :] + [child]
                if colour.get(child) == WHITE:
                    colour[child] = GREY
                    path.append(child)
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                colour[node] = BLACK
                path.pop()
                stack.pop()
    return None


def build() -> dict[str, Module]:
    modules = discover()
    analyse(modules)
    return modules


def graph_of(modules: dict[str, Module]) -> dict[str, set[str]]:
    return {name: {target for target, _ in m.imports if target != name} for name, m in modules.items()}


def describe(cycle: list[str], modules: dict[str, Module]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        lines = sorted({line for target, line in modules[a].imports if target == b})
        steps.append(f"  {a} ({modules[a].path.relative_to(REPO)}:{','.join(map(str, lines))}) imports {b}")
    return "\n".join(steps)


# ---------------------------------------------------------------------------------------------------- tests


def test_the_graph_is_read():
    modules = build()
    graph = graph_of(modules)
    # a few edges the code is known to have, at module level and inside functions
    assert "converters.outputs.hashing" in graph["converters.io.safetensors"]
    assert "converters.io.safetensors" in graph["converters.outputs.manifest"]  # lazy, inside a function
    assert "converters.cli.commands.verify" in graph["converters.cli.commands.golden"]  # lazy
    assert "operators.commands" in graph["operators.lineage"]
    assert "ckptflow_ui.collect" in graph["ckptflow_ui.app"]  # plugins/ is a root of its own
    assert any(name == "convert_checkpoint" for name in modules)  # dags/ too


def test_no_import_cycle():
    modules = build()
    cycle = find_cycle(graph_of(modules))
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + describe(cycle, modules)


def test_find_cycle_reports_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_does_not_import_airflow():
    found = [
        f"{m.path.relative_to(REPO)}:{line}"
        for m in build().values()
        if m.name.split(".")[0] == "converters"
        for top, line in m.external
        if top == "airflow"
    ]
    assert found == [], "converters/ imports airflow at " + ", ".join(found)


def test_no_module_imports_a_private_name_from_its_own_package():
    found = [
        f"{m.path.relative_to(REPO)}:{line} imports {name} from {m.package}"
        for m in build().values()
        for name, line in m.private_from_own_package
    ]
    assert found == [], "move these helpers into a module of their own:\n" + "\n".join(found)
