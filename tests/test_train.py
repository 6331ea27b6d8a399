"""train.py end to end on tiny shapes sets: outputs, schedule, freezing, progressive learning, bad data,
two processes, resume after a kill, and a short real fine-tune."""
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effnetv2 import EfficientNetV2, convert, transforms_for
from effnetv2.checkpoint import weights_fingerprint
from effnetv2.data import make_shapes_dataset
from effnetv2.images import open_image
from effnetv2 import run_folder

from train_script import (fresh_accelerate, patch_training_loss, real_cross_entropy,  # noqa: F401  (autouse)
                          reset_accelerate, train)


def cosine_factor(step: int, total: int, lrf: float = 0.01, warmup: int = 0) -> float:
    """The lr multiplier at optimizer step ``step`` (SPEC's formula after ``warmup`` linear steps)."""
    if step < warmup:
        return (step + 1) / warmup
    return ((1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup))) / 2) * (1 - lrf) + lrf

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

ROOT = Path(__file__).resolve().parents[1]

SMOKE = ["--variant", "b0", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--cpu", "--seed", "0"]
CLASSES = ["circle", "hexagon", "square", "star", "triangle"]  # sorted folder names


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """30 images (6 per class, 40 px): 25 for training, 5 for validation."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_per_class=6, image_size=40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """15 images (3 per class, 32 px): 10 for training (2 steps of 4 per epoch), 5 for validation."""
    return make_shapes_dataset(tmp_path_factory.mktemp("tiny") / "tiny", num_per_class=3, image_size=32)


def run(data, out, *extra):
    return train.main(["--data-path", str(data), "--output-dir", str(out), *SMOKE, *extra])


def subprocess_env():
    # the same thread count as this process, so that results can be compared bit for bit
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def test_smoke_run_writes_everything_and_saves_the_ema(shapes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    drawn, draw = [], run_folder.confusion_matrix_png  # the matrices confusion_matrix.png shows
    monkeypatch.setattr(run_folder, "confusion_matrix_png", lambda cm, *args: drawn.append(cm) or draw(cm, *args))
    rc = run(shapes, out, "--epochs", "2", "--lr", "0.05", "--ema", "--ema-decay", "0.9",
             "--push-to-hub", "someone/shapes-b0")
    printed = capsys.readouterr().out
    assert rc == 1  # offline: the push fails, and says how to retry
    assert "pushing to someone/shapes-b0 failed" in printed and "hf upload someone/shapes-b0" in printed
    assert f"Everything is saved in {out}" in printed

    model = EfficientNetV2.from_pretrained(out)
    assert not model.training and list(model.id2label.values()) == CLASSES
    assert model.config["image_size"] == 32 and model(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    m = metrics_of(out)
    assert m["steps_per_epoch"] == 25 // 4 and m["optimizer_steps"] == 12 == m["total_steps"]
    assert [h["epoch"] for h in m["history"]] == [1, 2] and [h["step"] for h in m["history"]] == [6, 12]
    assert [h["lr"] for h in m["history"]] == pytest.approx([0.05 * cosine_factor(6, 12), 0.05 * 0.01])
    assert m["final"]["val_images"] == 5 and m["history"][0]["train_images"] == 24
    assert m["replicas_in_sync"] and m["fingerprint"] == weights_fingerprint(model)

    # the saved weights are the EMA, not the raw weights of the last step
    saved = load_file(out / "model.safetensors")
    ema = load_file(out / "checkpoints" / "epoch_2" / "ema.safetensors")
    raw = load_file(out / "checkpoints" / "epoch_2" / "model.safetensors")
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert not torch.equal(saved["head.classifier.weight"], raw["head.classifier.weight"])

    split = json.loads((out / "split.json").read_text())
    train_files, val_files = {p for p, _ in split["train"]}, {p for p, _ in split["val"]}
    assert len(train_files) == 25 and len(val_files) == 5 and not train_files & val_files
    assert {p.split("/")[0] for p in val_files} == set(CLASSES)  # stratified: one per class
    assert json.loads((out / "class_indices.json").read_text()) == {str(i): c for i, c in enumerate(CLASSES)}
    # the confusion matrix: the saved model's answers on the validation files, row = true class
    val = [(shapes / path, label) for path, label in split["val"]]
    expected = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(val), 4):  # the run's batches of 4
            chunk = val[start:start + 4]
            x = torch.stack([transforms_for(model)(open_image(path)) for path, _ in chunk])
            for (_, label), pred in zip(chunk, model(x).argmax(1).tolist()):
                expected[label, pred] += 1
    assert [cm.tolist() for cm in drawn] == [expected.tolist()]
    assert not torch.equal(expected, expected.T)  # not symmetric: a transposed matrix would show
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert "EMA of the weights" in card and "python train.py --data-path" in card and "| accuracy |" in card
    from huggingface_hub import ModelCard

    [result] = ModelCard.load(out / "README.md").data.eval_results  # model-index: what the Hub shows
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (result.dataset_name, result.dataset_split) == ("shapes", "validation")
    assert result.metric_value == round(final["val_accuracy"], 4)
    # nothing about this machine in what is pushed: the data folder and the output folder by name only
    assert split["root"] == "shapes" and "--data-path shapes --output-dir run --variant b0" in card
    for name in ("README.md", "split.json", "metrics.json"):
        text = (out / name).read_text()
        assert str(shapes.parent) not in text and str(tmp_path) not in text, name
    assert "| gradient clipping (max L2 norm) | off |" in card  # off for an avg pool
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1", "epoch_2"]


def test_grad_accum_warmup_and_progressive_stages(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(shapes, out, "--epochs", "2", "--grad-accum", "2", "--warmup-steps", "1", "--progressive",
               "--stages", "2", "--keep-checkpoints", "1") == 0
    printed = capsys.readouterr().out
    m = metrics_of(out)
    # 6 batches per epoch, 2 per optimizer step: 3 steps per epoch, 6 in all
    assert m["steps_per_epoch"] == 3 and m["optimizer_steps"] == 6
    assert [h["lr"] for h in m["history"]] == pytest.approx([0.01 * cosine_factor(3, 6, 0.01, 1), 0.01 * 0.01])
    # b0's plan (82 -> 192 px) scaled to --image-size 32: 14 -> 16 px (the floor), then 32
    assert "progressive stage 1: from epoch 1, image size 16, RandAugment magnitude 5" in printed
    assert "progressive stage 2: from epoch 2, image size 32, RandAugment magnitude 15" in printed
    assert [h["image_size"] for h in m["history"]] == [16, 32]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_2"]


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(shapes, tmp_path):
    initial = EfficientNetV2("b0", num_classes=3, image_size=32, pool="attention", num_heads=2, attn_dim=32)
    initial.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    assert run(shapes, out, "--weights", str(tmp_path / "base"), "--epochs", "1", "--lr", "0.1") == 0  # freezes by default
    tuned = EfficientNetV2.from_pretrained(out)
    assert tuned.pool_type == "attention" and tuned.num_classes == 5  # the pool is kept, the classifier replaced
    before, after = initial.state_dict(), tuned.state_dict()
    backbone = [k for k in before if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # weights and BatchNorm statistics
    for changed in ("head.project_conv.conv.weight", "head.project_conv.bn.running_mean", "head.attn_pool.attn.v_proj.weight"):
        assert not torch.equal(before[changed], after[changed]), changed
    assert "| gradient clipping (max L2 norm) | 1.0 |" in (out / "README.md").read_text()  # on for attention pools


@pytest.mark.parametrize("clip", [None, 1e-6])
def test_clip_grad_bounds_every_optimizer_step(shapes, tmp_path, clip):
    """Plain SGD (lr 1, no momentum, no weight decay) for 6 steps: unclipped, the backbone moves far;
    with --clip-grad 1e-6 the whole update is at most 6 * lr * 1e-6 in global L2 norm."""
    initial = EfficientNetV2("b0", num_classes=5, image_size=32)
    initial.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    extra = ["--clip-grad", str(clip)] if clip else []
    assert run(shapes, out, "--weights", str(tmp_path / "base"), "--no-freeze-layers", "--epochs", "1", "--lr", "1",
               "--momentum", "0", "--weight-decay", "0", "--lrf", "1", *extra) == 0
    before, after = dict(initial.named_parameters()), load_file(out / "model.safetensors")
    moved = torch.stack([(after[k] - before[k].detach()).norm() for k in before if not k.startswith("head.")]).norm()
    if clip:
        assert moved <= 6 * clip * 1.01, moved
    else:
        assert moved > 1e-2, moved


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_bad(tiny, tmp_path, capsys, monkeypatch):
    """The loss turns infinite from the first batch of epoch 2 on (2 batches per epoch): epoch 1's
    checkpoint stays as it was, nothing of epoch 2 is written, and the message names the epoch and lr."""
    batches, real_loss = 0, real_cross_entropy

    def loss_infinite_from_epoch_2(logits, targets):
        nonlocal batches
        batches += 1
        loss = real_loss(logits, targets)
        return loss * float("inf") if batches > 2 else loss

    patch_training_loss(monkeypatch, loss_infinite_from_epoch_2)
    out = tmp_path / "run"
    rc = run(tiny, out, "--epochs", "3", "--lr", "0.05")
    printed = capsys.readouterr().out
    assert rc == 1 and batches == 4, printed
    assert "training diverged in epoch 2" in printed and "peak lr 0.05" in printed and "--clip-grad" in printed
    assert f"the last checkpoint written is {out / 'checkpoints' / 'epoch_1'}" in printed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]  # no epoch 2, no temporary folder
    state = json.loads((out / "checkpoints" / "epoch_1" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 2 and state["history"][0]["train_loss"] < float("inf")
    assert not (out / "model.safetensors").exists()


def _folder(root, counts):
    """A folder-per-class tree with ``counts[name]`` images in each class folder."""
    src = make_shapes_dataset(root / ".src", max(counts.values()) or 1, 32, classes=("circle", "square")) / "circle"
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for path in sorted(src.iterdir())[:count]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.mark.parametrize("counts, message", [
    ({"only": 5}, "single class"),
    ({"a": 5, "b": 0}, "has no images"),
    ({"a": 5, "b": 1}, "too few"),
])
def test_bad_data_is_a_clear_error_before_training(tmp_path, capsys, counts, message):
    data = _folder(tmp_path / "data", counts)
    assert run(data, tmp_path / "run", "--epochs", "1") == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_files_are_reported_and_skipped(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    for cls in CLASSES:
        (data / cls).mkdir(parents=True)
        for src in sorted((shapes / cls).iterdir())[:4]:
            (data / cls / src.name).write_bytes(src.read_bytes())
    png = (shapes / "star" / "star_0000.png").read_bytes()
    (data / "circle" / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "square" / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    (data / "star" / "empty.webp").write_bytes(b"")
    with pytest.warns(UserWarning, match="3 unreadable") as record:
        assert run(data, tmp_path / "run", "--epochs", "1", "--max-steps", "1") == 0
    text = "\n".join(str(w.message) for w in record)
    assert all(name in text for name in ("truncated.png", "garbage.jpg", "empty.webp"))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 20  # the 3 bad files are out

    # a class whose every image is unreadable is an error
    for f in (data / "triangle").iterdir():
        f.write_bytes(b"junk")
    capsys.readouterr()
    assert run(data, tmp_path / "run2", "--epochs", "1") == 2
    assert "triangle have no readable image" in capsys.readouterr().out


def test_command_line_error_exits_without_traceback(tmp_path):
    data = _folder(tmp_path / "data", {"only": 3})
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-path", str(data), "--output-dir",
                             str(tmp_path / "run"), *SMOKE], capture_output=True, text=True, env=subprocess_env(),
                            timeout=300)
    assert result.returncode == 2
    assert "single class" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_offline_torchvision_weights_are_one_error_line_at_once(tiny, tmp_path, capsys, monkeypatch):
    """Offline (HF_HUB_OFFLINE, set by conftest) with no cached torchvision weights: no download is
    tried (so no network wait), and the run ends with the loader's helpful sentence as its one error line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    monkeypatch.setattr(convert, "download_file", lambda *a, **k: pytest.fail("a download was tried"))
    rc = run(tiny, tmp_path / "run", "--weights", "torchvision:s", "--epochs", "1")
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 2 and printed[:-1] == [
        "data: 10 training and 5 validation images in 5 classes (circle, hexagon, square, star, triangle)"], printed
    assert printed[-1].startswith("error: --weights torchvision:s: ") and "offline" in printed[-1]
    assert printed[-1].endswith("or pass the path of a local .pth instead.")


def test_a_plain_bug_keeps_its_traceback(tiny, tmp_path, monkeypatch):
    """Only the user's errors become one line: a ValueError from a bug propagates out of main() whole."""
    def buggy(*args, **kwargs):
        first, second = (1, 2, 3)  # noqa: F841  (the bug: too many values to unpack)

    monkeypatch.setattr(train, "epoch_coverage", buggy)
    with pytest.raises(ValueError, match="too many values to unpack"):
        run(tiny, tmp_path / "run", "--epochs", "1")


@pytest.mark.parametrize("flags, message", [
    (["--clip-grad", "-1"], "--clip-grad -1.0: give a positive max gradient norm"),
    (["--clip-grad", "nan"], "--clip-grad nan: give a positive max gradient norm"),
    (["--crop-scale", "0.9", "0.5"], "--crop-scale 0.9 0.5: give MIN MAX"),
])
def test_bad_flag_values_are_named(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--data-path", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def launch_two_processes(*args: str, env: dict) -> subprocess.CompletedProcess:
    """``accelerate launch`` of train.py ``args`` on 2 processes, output captured.

    `accelerate launch --cpu` starts a single process; --multi_gpu starts N (torchrun), and train.py's
    --cpu makes them a gloo process group on the CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_train_on_disjoint_shards_and_stay_in_sync(shapes, tmp_path):
    out = tmp_path / "ddp"
    result = launch_two_processes("--data-path", str(shapes), "--output-dir", str(out), *SMOKE, "--epochs", "2",
                                  "--ema", env={**subprocess_env(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m = metrics_of(out)
    assert m["processes"] == 2
    # each process gets its own 3 batches of 4 (25 images // (4 * 2)): shards, not copies of the data
    assert m["steps_per_epoch"] == 3 and m["optimizer_steps"] == 6
    assert [h["train_images"] for h in m["history"]] == [24, 24]
    assert m["final"]["val_images"] == 5  # gather_for_metrics drops the padding of the uneven last batch
    assert m["replicas_in_sync"]  # both processes ended with identical weights and BatchNorm statistics
    assert m["command"].startswith("accelerate launch --num_processes 2 train.py")
    assert weights_fingerprint(EfficientNetV2.from_pretrained(out)) == m["fingerprint"]


def test_resume_after_kill_continues_the_same_run(shapes, tmp_path):
    args = ["--data-path", str(shapes), *SMOKE, "--epochs", "3", "--lr", "0.05", "--ema", "--mixup", "0.2"]
    killed = tmp_path / "killed"
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--output-dir", str(killed)],
                            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "epoch_1").is_dir():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert done in (["epoch_1"], ["epoch_1", "epoch_2"]) and not (killed / "model.safetensors").exists()

    assert train.main([*args, "--output-dir", str(killed), "--resume", "latest"]) == 0
    m = metrics_of(killed)
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert [h["step"] for h in m["history"]] == [6, 12, 18] and m["optimizer_steps"] == 18
    assert [h["lr"] for h in m["history"]] == pytest.approx([0.05 * cosine_factor(s, 18) for s in (6, 12, 18)])

    # the same weights as a run that was never interrupted: same data order, RNG, optimizer and EMA
    reset_accelerate()
    straight = tmp_path / "straight"
    assert train.main([*args, "--output-dir", str(straight)]) == 0
    assert metrics_of(straight)["fingerprint"] == m["fingerprint"]

    reset_accelerate()
    assert train.main([*args, "--output-dir", str(killed), "--resume", "latest", "--batch-size", "8"]) == 2


def test_resume_latest_without_checkpoints_is_an_error(shapes, tmp_path, capsys):
    assert run(shapes, tmp_path / "run", "--epochs", "1", "--resume", "latest") == 2
    assert "no complete checkpoint" in capsys.readouterr().out


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in train.py catches it."""


def test_a_reused_output_dir_never_yields_another_runs_model(tiny, tmp_path, capsys, monkeypatch):
    """The issue's scenario, with 2 epochs: a finished run in out/, then a run on other data into
    out/, killed in epoch 2, then --resume latest. The other run's folder is refused, its checkpoints
    cannot be resumed on other data, and with --overwrite the new run (and only it) is checkpointed,
    resumed and saved."""
    other = make_shapes_dataset(tmp_path / "other", num_per_class=4, image_size=32, seed=1,
                                classes=("circle", "square", "star"))
    out = tmp_path / "out"
    assert run(tiny, out, "--epochs", "2") == 0
    first = {name: (out / name).read_bytes() for name in ("model.safetensors", "README.md", "config.json")}
    first_checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()

    # another run into the same folder is refused, and changes nothing there
    assert run(other, out, "--epochs", "2") == 2
    printed = capsys.readouterr().out
    assert f"--output-dir {out} already holds a run" in printed
    assert "--resume latest" in printed and "--overwrite" in printed
    # resuming the folder's run on other data is refused too, naming what changed
    assert run(other, out, "--epochs", "2", "--resume", "latest") == 2
    printed = capsys.readouterr().out
    assert f"--data-path ({tiny.resolve()} vs {other.resolve()})" in printed
    assert "training images (10 vs 9)" in printed and "validation images (5 vs 3)" in printed
    assert {name: (out / name).read_bytes() for name in first} == first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first_checkpoints

    # --overwrite: the new run starts in an emptied folder; it is killed in epoch 2 (2 steps per epoch)
    batches, real_loss = 0, real_cross_entropy

    def killed_in_epoch_2(logits, targets):
        nonlocal batches
        batches += 1
        if batches == 4:
            raise Killed
        return real_loss(logits, targets)

    patch_training_loss(monkeypatch, killed_in_epoch_2)
    with pytest.raises(Killed):
        run(other, out, "--epochs", "2", "--overwrite")
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()

    reset_accelerate()
    capsys.readouterr()
    assert run(other, out, "--epochs", "2", "--resume", "latest") == 0
    resumed = f"resumed from {out / 'checkpoints' / 'epoch_1'}: 1 epoch(s) and 2 optimizer steps done"
    assert resumed in capsys.readouterr().out
    m = metrics_of(out)  # 9 training images: 2 full batches of 4 per epoch
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["optimizer_steps"] == m["total_steps"]
    assert list(EfficientNetV2.from_pretrained(out).id2label.values()) == ["circle", "square", "star"]
    assert "circle, square, star" in (out / "README.md").read_text().replace("`", "")
    run_ids = {json.loads((p / "train_state.json").read_text())["run_id"] for p in (out / "checkpoints").iterdir()}
    assert len(run_ids) == 1


@pytest.mark.parametrize("kind", ["file", "inside a file", "read-only"])
def test_an_unusable_output_dir_is_one_line_before_the_data_is_scanned(tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "target"
    if kind == "read-only":
        target.mkdir()
        target.chmod(0o555)
        if os.access(target, os.W_OK):  # root writes anyway: have the system say read-only, as it would to a user
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != target and real_access(p, mode, **kw))
        out, expected = target / "run", f"is not writable ({target} is read-only for this user)"
    else:
        target.write_text("a file")
        out, expected = (target, "is a file") if kind == "file" else (target / "run", f"{target} is a file")
    rc = run(tmp_path / "no such data", out, "--epochs", "1")  # a data error would come later
    printed = capsys.readouterr().out
    assert rc == 2 and printed.startswith(f"error: --output-dir {out} ") and expected in printed, printed
    assert len(printed.strip().splitlines()) == 1 and "no such data" not in printed


def failing_write(real, when):
    """``real`` (torch.save or safetensors' save_file) that, for a path ``when`` accepts, writes a few
    bytes and then fails as a full disk does."""
    def write(obj, path, *args, **kwargs):
        if not when(Path(path)):
            return real(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # accelerate writes the optimizer state with torch.save: fail it in epoch 2
    monkeypatch.setattr(torch, "save", failing_write(torch.save, lambda p: "epoch_2" in str(p)))
    assert run(tiny, out, "--epochs", "2") == 1
    printed = capsys.readouterr().out
    assert f"error: no space left on the device for {out / 'checkpoints' / 'epoch_2'}: it needs about" in printed
    assert f"the last checkpoint, {out / 'checkpoints' / 'epoch_1'}, is intact" in printed
    assert "--resume latest" in printed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]  # the partial one is gone
    monkeypatch.undo()

    reset_accelerate()
    assert run(tiny, out, "--epochs", "2", "--resume", "latest") == 0  # epoch 1's checkpoint is whole
    assert [h["step"] for h in metrics_of(out)["history"]] == [2, 4]


def test_a_full_disk_while_saving_keeps_the_previous_model(tiny, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", "1") == 0
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json", "README.md")}
    capsys.readouterr()

    reset_accelerate()
    monkeypatch.setattr(safetensors.torch, "save_file",
                        failing_write(safetensors.torch.save_file, lambda p: p.name == "model.safetensors"))
    assert run(tiny, out, "--epochs", "1", "--resume", "latest") == 1  # evaluates and saves the checkpoint again
    printed = capsys.readouterr().out
    needed = float(printed.split("it needs about ")[1].split(" MB")[0])
    assert f"error: no space left on the device for {out}: it needs about" in printed
    assert needed == pytest.approx(len(before["model.safetensors"]) / 2**20, abs=0.1)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_hub_weights_name_the_base_model_and_freeze_by_default(tiny, tmp_path, monkeypatch):
    """--weights is parsed once: a Hub id (with @revision) is the card's base_model; a local folder that
    happens to be spelt org/name is not; both count as weights, so the backbone is frozen by default."""
    EfficientNetV2("b0", num_classes=3, image_size=32).save_pretrained(tmp_path / "org" / "name")
    asked = []
    real = EfficientNetV2.from_pretrained.__func__

    def from_hub(cls, repo, **kwargs):
        if Path(repo).is_dir():
            return real(cls, repo, **kwargs)
        asked.append((repo, kwargs.get("revision")))
        return real(cls, str(tmp_path / "org" / "name"))

    monkeypatch.setattr(EfficientNetV2, "from_pretrained", classmethod(from_hub))
    monkeypatch.chdir(tmp_path / "org")  # "org/name" does not exist from here: a Hub id
    assert run(tiny, tmp_path / "hub", "--weights", "org/name@v2", "--max-steps", "1", "--epochs", "1") == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert asked == [("org/name", "v2")]
    assert "base_model: org/name\n" in card and "Fine-tuned from `org/name`" in card
    assert "| frozen backbone | True |" in card and "| initial weights | org/name@v2 |" in card
    monkeypatch.chdir(tmp_path)  # now it is a local folder
    assert run(tiny, tmp_path / "local", "--weights", "org/name", "--max-steps", "1", "--epochs", "1") == 0
    card = (tmp_path / "local" / "README.md").read_text()
    assert asked == [("org/name", "v2")]  # the Hub was not asked again
    assert "base_model" not in card and "| frozen backbone | True |" in card
