"""The package's imports point one way: no module of effnetv2 imports (directly or through others) a module
that imports it back, and each one imports on its own."""
import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "effnetv2"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _never_runs_during_import(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (annotations only), a module's ``__getattr__`` (PEP 562: old names kept as
    aliases, looked up only on a module that has finished importing, so they cannot see a partial one),
    and a command line (``main`` and ``_..._main``: the top layer, e.g. ``python -m effnetv2.convert --to``
    loading any model source through ``effnetv2.sources``; the library never calls it)."""
    if isinstance(node, ast.If):
        return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    return isinstance(node, ast.FunctionDef) and (node.name in ("__getattr__", "main") or
                                                  (node.name.startswith("_") and node.name.endswith("_main")))


def package_imports(module: str) -> set[str]:
    """The effnetv2 modules that ``module`` imports, at module level or inside functions (those run
    too), except those that never run while a module is being imported (see above)."""
    found = set()

    def visit(node: ast.AST) -> None:
        if _never_runs_during_import(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("effnetv2."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("effnetv2."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")))
    return found & set(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_package_imports_have_no_cycle():
    graph = {module: package_imports(module) for module in MODULES}
    assert graph["model"] >= {"attention", "card", "checkpoint", "configs", "hub"}  # the parser sees imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_each_module_imports_alone():
    """Each module imported first, with no other effnetv2 module loaded (third-party ones stay cached)."""
    script = ("import importlib, sys\n"
              f"for name in {MODULES!r}:\n"
              "    for loaded in [m for m in sys.modules if m == 'effnetv2' or m.startswith('effnetv2.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module('effnetv2.' + name)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
