"""Packaging: every import is installed by the extra that uses it; the card template ships as a real file."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Imports the package makes inside functions for optional features, and the extras that install
# them: the fast runtimes (the Predictor falls back to torch without them), timm for converting
# timm weights by name, matplotlib for train.py's confusion matrix and the app's colour maps.
# onnx edits the exported graph before int8 quantization; datasets reads Hub datasets (train.py, evaluate).
OPTIONAL = {"accelerate": ("train",), "onnx": ("fast",), "onnxruntime": ("fast", "scale"), "openvino": ("fast",),
            "ray": ("scale",), "pyarrow": ("scale",), "starlette": ("scale",), "timm": ("convert",),
            "matplotlib": ("train", "app"), "datasets": ("train",)}
SCRIPTS = {"train.py": "train", "app.py": "app"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonical(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in requirements}


CORE = requirement_names(PYPROJECT["project"]["dependencies"])
EXTRAS = {name: requirement_names(reqs) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
TO_DISTRIBUTION = importlib.metadata.packages_distributions()  # import name → installed distributions


def third_party_imports(path: Path) -> tuple[set[str], set[str]]:
    """Distributions that ``path`` imports at module level, and those imported inside functions."""
    module_level, in_functions = set(), set()

    def visit(node: ast.AST, nested: bool) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:  # the body only runs under a type checker, never on import
                visit(child, nested)
            return
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            names = []
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "effnetv2":
                distribution = TO_DISTRIBUTION.get(top, [top])[0]
                (in_functions if nested else module_level).add(canonical(distribution))
        for child in ast.iter_child_nodes(node):
            visit(child, nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return module_level, in_functions


MODULES = sorted((ROOT / "effnetv2").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_package_imports_are_installed_by_its_dependencies(path):
    module_level, in_functions = third_party_imports(path)
    assert module_level <= CORE, f"{path.name} imports {module_level - CORE} on import: add to dependencies"
    for name in in_functions - CORE:
        assert name in OPTIONAL, (f"{path.name} needs {name}, which `pip install effnetv2` does not install: "
                                  f"add it to dependencies, or to the extra of the feature that needs it")


@pytest.mark.parametrize("name, extras", OPTIONAL.items())
def test_optional_features_are_in_their_extras(name, extras):
    for extra in extras:
        assert name in EXTRAS[extra], f"{name} is missing from the [{extra}] extra"


@pytest.mark.parametrize("script, extra", SCRIPTS.items())
def test_scripts_imports_are_installed_by_their_extra(script, extra):
    module_level, in_functions = third_party_imports(ROOT / script)
    missing = (module_level | in_functions) - CORE - EXTRAS[extra]
    assert not missing, f"{script} imports {missing}, which pip install effnetv2[{extra}] does not install"


def test_card_template_ships_as_a_real_file_equal_to_the_repo_one():
    packaged = ROOT / "effnetv2" / "model_card.md"
    assert not packaged.is_symlink()  # a git symlink checks out as a one-line text file on Windows
    assert packaged.read_bytes() == (ROOT / "model_card.md").read_bytes()
    assert "model_card.md" in PYPROJECT["tool"]["setuptools"]["package-data"]["effnetv2"]
    from effnetv2 import card

    assert card.MODEL_CARD_TEMPLATE == packaged.read_text(encoding="utf-8")


def test_version_comes_from_the_package_metadata(monkeypatch):
    import importlib
    import importlib.metadata

    import effnetv2

    try:
        installed = importlib.metadata.version("effnetv2")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None:  # pip install -e . (the benchmarks need it)
        assert installed == PYPROJECT["project"]["version"] == effnetv2.__version__

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    try:
        assert importlib.reload(effnetv2).__version__ == "0+unknown"
    finally:
        monkeypatch.undo()
        importlib.reload(effnetv2)
