"""The package's imports point one way: no module of effnetv2 imports (directly or through others) a module
that imports it back, and each one imports on its own."""
import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "effnetv2"


def module_name(path: Path) -> str:
    """``effnetv2/convert/__main__.py`` → ``convert.__main__``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"}
MODULES = sorted(FILES)
COMMANDS = [m for m in MODULES if m.endswith(".__main__")]  # `python -m effnetv2.<name>`: the top layer


def package_imports(module: str) -> set[str]:
    """The effnetv2 modules that ``module`` imports, anywhere in it: at module level, inside functions,
    under ``if TYPE_CHECKING:`` and ``if __name__ == "__main__":``. No import is exempt."""
    is_package = FILES[module].name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]  # the package relative imports start from
    found = set()
    for node in ast.walk(ast.parse(FILES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("effnetv2."):
                target = node.module[len("effnetv2."):]
            else:
                continue
            candidates = [target] + [f"{target}.{alias.name}".strip(".") for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name[len("effnetv2."):] for a in node.names if a.name.startswith("effnetv2.")]
        else:
            continue
        for name in candidates:  # `from effnetv2.convert import x`: convert; `from . import viz`: viz
            while name and name not in FILES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


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


def test_the_import_parser_sees_every_kind_of_import():
    assert package_imports("model") >= {"attention", "card", "checkpoint", "configs", "hub"}  # module level
    assert "sources" in package_imports("export.__main__")  # absolute, into a package
    assert "model" in package_imports("export")  # `from ..model import` under TYPE_CHECKING
    assert {"convert", "sources"} <= package_imports("convert.__main__")
    assert "batch_ray" in package_imports("predict.__main__")  # inside a function (--engine ray)


def test_package_imports_have_no_cycle():
    graph = {module: package_imports(module) for module in MODULES}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# The layer map of README.md's "Layout": a module imports modules of its own layer or below, never above.
LAYERS = [
    {"errors", "configs", "layers", "attention", "checkpoint", "card", "images", "shapes", "ray_cluster"},
    {"model", "hub"},
    {"transforms", "fuse", "training", "explain", "convert", "quantize", "viz", "sources", "data", "schedule",
     "progressive", "ema", "tracking", "walkthrough"},
    {"export", "finetune", "run_folder", "publish", "inference", "hub_data", "loading", "evaluate", "predict", "serve",
     "batch_ray"},
    set(COMMANDS),
]


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_imports_never_go_up_a_layer():
    assert set().union(*LAYERS) == set(MODULES), "place every module in one layer of LAYERS (and README's table)"
    for module in MODULES:
        for imported in package_imports(module):
            assert layer_of(imported) <= layer_of(module), f"{module} imports {imported}, a layer above it"


def test_command_lines_are_the_top_layer():
    """Nothing imports a command (``effnetv2/<name>/__main__.py``), and library modules hold no command line."""
    assert COMMANDS, "no command modules found"
    for module in MODULES:
        assert not package_imports(module) & set(COMMANDS), f"{module} imports a command line"
        if module not in COMMANDS:
            tree = ast.parse(FILES[module].read_text(encoding="utf-8"))
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert not names & {"main", "parse_args"}, f"{module} holds a command line: move it to a __main__.py"


def test_each_module_imports_alone():
    """Each module imported first, with no other effnetv2 module loaded (third-party ones stay cached)."""
    script = ("import importlib, sys\n"
              f"for name in {[m for m in MODULES if m not in COMMANDS]!r}:\n"
              "    for loaded in [m for m in sys.modules if m == 'effnetv2' or m.startswith('effnetv2.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module('effnetv2.' + name)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
