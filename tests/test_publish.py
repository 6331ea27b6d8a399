"""effnetv2.publish: what a train.py run shows on the Hub (command, card fields) and the push that keeps the run."""
import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest

from effnetv2 import publish
from effnetv2.publish import card_fields, initial_weights_text, public_argv, published_command, push
from effnetv2.run_folder import RunError
from effnetv2.sources import parse_source


def test_the_published_command_names_no_local_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a path inside the working folder is no exception
    argv = ["--data-path", "/home/me/flower_photos", "--output-dir=/srv/runs/a", "--weights", str(tmp_path / "base"),
            "--resume", "latest", "--data", "~/x/shapes", "--lr", "0.1", "--weights", "org/name", "--output-dir",
            "runs/b", "--weights", "../elsewhere/tv.pth"]
    assert public_argv(argv) == [
        "--data-path", "flower_photos", "--output-dir=a", "--weights", "base", "--resume", "latest", "--data",
        "shapes", "--lr", "0.1", "--weights", "org/name", "--output-dir", "runs/b", "--weights", "tv.pth"]


def test_published_command_names_the_launcher():
    argv = ["--data-path", "/data/my photos", "--lr", "0.1"]
    assert published_command(argv, 1) == "python train.py --data-path 'my photos' --lr 0.1"
    assert published_command(argv, 4) == ("accelerate launch --num_processes 4 train.py --data-path 'my photos' "
                                          "--lr 0.1")


def test_initial_weights_text_names_a_local_folder_by_its_name():
    def text(weights: str) -> str:
        return initial_weights_text(parse_source(weights))

    assert text("/home/me/runs/shapes-b0") == "local folder `shapes-b0` (not published)"
    assert text("~/weights/b0.pth") == "local file `b0.pth` (not published)"
    assert text("org/name@v2") == "org/name@v2"
    assert text("none") == "none (from scratch)"


def test_card_fields_describe_the_run():
    args = argparse.Namespace(epochs=3, optimizer="sgd", lr=0.01, lrf=0.01, weight_decay=1e-4, batch_size=8,
                              grad_accum=2, label_smoothing=0.1, stages=4, progressive=False)
    run = {"final": {"val_accuracy": 0.87654, "val_loss": 0.41234, "epoch": 3}, "start_epoch": 0,
           "optimizer_steps": 30, "warmup_steps": 5, "processes": 2, "mixed_precision": "bf16",
           "train_image_size": 192, "saved_weights": "the final weights", "command": "python train.py ..."}
    fields = card_fields(args, parse_source("org/base@v1"), True, 0.0, {"dataset_name": "shapes"}, run)
    assert fields["metrics"] == {"accuracy": 0.8765, "val_loss": 0.4123} and fields["dataset_name"] == "shapes"
    assert fields["base_model"] == "org/base" and fields["command"] == "python train.py ..."
    training = fields["training"]
    assert training["epochs"] == "3 of 3" and training["gradient clipping (max L2 norm)"] == "off"
    assert training["mixed precision"] == "bf16" and training["frozen backbone"] is True
    assert training["initial weights"] == "org/base@v1" and training["progressive learning"] == "off"
    assert card_fields(args, parse_source("none"), False, 1.0, {}, run)["base_model"] is None


def test_a_failed_push_keeps_the_run_and_says_how_to_retry(tmp_path, monkeypatch):
    calls = []

    def upload(folder, repo_id, **kwargs):
        calls.append((folder, repo_id, kwargs))
        raise ConnectionError("the Hub is down\nsecond line")

    monkeypatch.setattr(publish, "upload_model_folder", upload)
    with pytest.raises(RunError) as info:
        push(tmp_path, "org/name", private=True, overwrite_card=False, val_accuracy=0.5)
    message, status = str(info.value), info.value.status
    assert status == 1 and "pushing to org/name failed (ConnectionError: the Hub is down)." in message
    assert "second line" not in message and f"Everything is saved in {tmp_path}" in message
    assert f"hf upload org/name {tmp_path} . --exclude 'checkpoints/*' --exclude 'logs/*'" in message
    assert calls[0][2]["ignore_patterns"] == ["checkpoints/*", "logs/*"] and calls[0][2]["private"] is True
    # the printed Python retry is a valid command line
    retry = next(line.strip() for line in message.splitlines() if line.strip().startswith("python -c"))
    code = retry[len('python -c "'):-1]
    compile(code, "retry", "exec")
    assert f"folder_path='{tmp_path}'" in code and "repo_id='org/name'" in code

    monkeypatch.setattr(publish, "upload_model_folder", lambda *a, **k: SimpleNamespace(repo_url="https://hub/org/name"))
    assert push(tmp_path, "org/name", private=False, overwrite_card=True, val_accuracy=0.5) == "https://hub/org/name"


def test_publish_imports_without_accelerate():
    code = "import sys; sys.modules['accelerate'] = None; import effnetv2.publish, effnetv2.run_folder"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
