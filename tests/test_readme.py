"""Every ```python block of the README runs as written, offline, and its comments tell the truth.

The blocks of one section (``## ...``) run in order in one namespace, as a reader pastes them into one
session; each section starts afresh. They run in a folder holding what the README assumes a reader
has: ``cat.jpg`` (a photo), ``assets/`` (the repo's, with the bundled model). What they fetch comes
from loopback: Hub ids (``org/name``) from the test Hub (tests/hubserver.py), torchvision weights from
a torch cache made here, ``torch.hub.load("org/effnetv2", ...)`` from this checkout (only the GitHub
download is replaced), and the app's address is that of an app this test starts. Shapes written as
``# [1, 1000]`` after an assignment are checked against the value.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from app_server import running_app
from hubserver import hub_server  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
IMAGENET_LABELS = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.meta["categories"]
APP_ADDRESS = "http://127.0.0.1:7860/"  # where the README's client block expects `python app.py`


def python_blocks(text: str) -> dict[str, list[tuple[int, str]]]:
    """``{section title: [(line number, code), ...]}`` for every ```python block, in README order."""
    sections: dict[str, list[tuple[int, str]]] = {}
    title, block, start = "", None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if block is None and line.startswith("## "):
            title = line[3:].strip()
        elif block is None and line.strip() == "```python":
            block, start = [], number + 1
        elif block is not None and line.strip() == "```":
            sections.setdefault(title, []).append((start, "\n".join(block)))
            block = None
        elif block is not None:
            block.append(line)
    return sections


SECTIONS = python_blocks(README)
SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*\[(\d+(?:,\s*\d+)*)\]")


def bash_line(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix`` (the first match), split into arguments."""
    line = next(line for line in README.splitlines() if line.startswith(prefix))
    return line.split("#")[0].split()


@pytest.fixture
def reader_folder(tmp_path, monkeypatch, torchvision_home):
    """The reader's working folder: cat.jpg, the repo's assets/, a torch cache with torchvision's S weights."""
    shutil.copy(ROOT / "assets" / "examples" / "photo_cat.jpg", tmp_path / "cat.jpg")
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    monkeypatch.setenv("TORCH_HOME", str(torchvision_home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda repo, *args, **kwargs: str(ROOT))
    return tmp_path


def run_section(title: str, replace: tuple[str, str] | None = None) -> dict:
    """Run the section's blocks statement by statement in one namespace, checking each shape comment
    right after the assignment it follows; return the namespace."""
    namespace: dict = {}
    assert SECTIONS.get(title), f"the README has no ```python block under '## {title}'"
    for start, code in SECTIONS[title]:
        if replace:
            code = code.replace(*replace)
        lines = code.splitlines()
        for statement in ast.parse(code).body:
            exec(compile(ast.Module([statement], []), f"README.md:{start}", "exec"), namespace)
            match = SHAPE_COMMENT.match(lines[statement.end_lineno - 1])
            if match:
                shape = tuple(int(d) for d in match.group(2).split(","))
                line = start + statement.end_lineno - 1
                assert tuple(namespace[match.group(1)].shape) == shape, f"README.md:{line}: {lines[statement.end_lineno - 1]}"
    return namespace


def test_every_python_block_belongs_to_a_section_this_test_runs():
    assert set(SECTIONS) == {"Python API", "Prediction, export and speed", "Converting official weights",
                             "The demo app"}, f"a README section has new python blocks: run them here ({sorted(SECTIONS)})"


@pytest.mark.numerics
def test_python_api_then_prediction_and_conversion(reader_folder, hub_server):
    """The Python API pushes org/name; the Predictor loads it from the Hub; the README's commands export
    my-model to timm and torchvision, which the conversion section loads."""
    ns = run_section("Python API")
    assert hub_server.lfs_paths("org/name") == {"model.safetensors"}  # push_to_hub really pushed
    assert ns["model"].variant == "b0" and ns["maps"].shape == (1, 8, 6, 6)
    torch.testing.assert_close(ns["maps"].sum((2, 3)), torch.ones(1, 8))  # "each map sums to 1"
    with torch.no_grad():  # "shares.sum((1, 2, 3)) + rest == the predicted class's logit, exactly"
        logits = ns["model"](ns["images"])
    torch.testing.assert_close((ns["shares"].sum((1, 2, 3)) + ns["rest"]).float(), logits.max(1).values)
    assert ns["deletion_auc"](ns["model"], ns["images"], ns["shares"]).shape == (1,)

    ns = run_section("Prediction, export and speed")
    [top] = ns["predictor"].predict([ns["Image"].open("cat.jpg")], top_k=5)
    assert [label for label, _ in top] and {label for label, _ in top} <= {
        "daisy", "dandelion", "roses", "sunflowers", "tulips"}  # the labels pushed with org/name

    for prefix in ("python -m effnetv2.convert --to timm", "python -m effnetv2.convert --to torchvision"):
        done = subprocess.run([sys.executable, *bash_line(prefix)[1:]], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # installed or not
        assert done.returncode == 0, done.stderr
    ns = run_section("Converting official weights")
    assert ns["model"].num_classes == 5  # torch.hub's random-init entry, asked for 5 classes


def test_the_demo_app_client(reader_folder, tmp_path):
    with running_app(tmp_path / "app.log") as url:
        ns = run_section("The demo app", replace=(APP_ADDRESS, url))
    assert len(ns["top5"]["confidences"]) == 5 and ns["imagenet5"]["label"] in IMAGENET_LABELS
    assert f"Why {ns['top5']['label']}?" in str(ns["faithfulness"])  # /explain explains the class /classify gives
