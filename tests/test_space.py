"""The Hugging Face Space: the README's commands that create and fill it, and what it installs."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell commands starting with ``prefix``, continuation lines joined, split as a shell would."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith(prefix)]


def test_the_readme_space_commands_run_with_the_pinned_hf_cli(monkeypatch):
    """`hf repos create` and `hf upload` as the README writes them, through huggingface_hub's own CLI with
    the Hub calls recorded instead of sent: they parse, make a Gradio Space, and upload what the app needs
    (requirements-space.txt as the Space's requirements.txt) and nothing of the trainer or the tests."""
    import huggingface_hub
    from huggingface_hub import RepoUrl
    from huggingface_hub.cli.hf import app as hf
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def record(name):
        def call(self, *args, **kwargs):
            calls.append((name, kwargs))
            if name == "create_repo":
                return RepoUrl(f"https://huggingface.co/spaces/{kwargs['repo_id']}")
            return "https://huggingface.co/spaces/org/effnetv2-demo/commit/0"
        return call
    for name in ("create_repo", "upload_file", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    monkeypatch.chdir(ROOT)
    commands = _readme_commands("hf repos create org/effnetv2-demo") + _readme_commands("hf upload org/effnetv2-demo")
    assert len(commands) == 3
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    for command in commands:
        with pytest.raises(SystemExit) as done:
            hf(command[1:], prog_name="hf", windows_expand_args=False)  # what `hf` runs (cli.hf.main)
        assert done.value.code == 0, command
    (_, created), (_, _), (_, folder), (_, _), (_, file) = calls
    assert created["repo_type"] == "space" and created["space_sdk"] == "gradio"
    assert (file["path_or_fileobj"], file["path_in_repo"]) == ("requirements-space.txt", "requirements.txt")
    files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    chosen = set(filter_repo_objects(files, allow_patterns=folder["allow_patterns"]))
    assert {"app.py", "README.md", "effnetv2/model.py", "effnetv2/model_card.md", "assets/model/config.json",
            "assets/examples/star.png", "docs/screenshot_desktop.png"} <= chosen
    assert not {f for f in chosen if f.startswith(("tests/", "benchmarks/")) or f in ("train.py", "requirements.txt")}


def test_the_space_installs_the_apps_packages_with_cpu_torch_at_the_projects_pins():
    pins = dict(line.split("#")[0].strip().split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line.split("#")[0])
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-space.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    assert lines[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"  # CPU torch, no CUDA libraries
    space = dict(line.split("==") if "==" in line else (line, None) for line in lines[1:])
    for name, version in space.items():
        assert version is None or pins[name] == version, name  # what the tests ran with
    assert {"torch", "torchvision", "gradio", "onnxruntime", "huggingface_hub", "safetensors", "matplotlib"} <= set(space)
    assert not {"tensorboard", "openvino", "accelerate", "timm"} & set(space)  # the trainer's, not the app's
