"""Training throughput: train.py's steps against a bare forward/backward loop of the same model and
batch (what data loading, augmentation and Accelerate cost), a frozen backbone against full
fine-tuning, and with --compile, torch.compile against eager.

    python benchmarks/training.py                              # b0 at 128 px, batch 16, CPU
    python benchmarks/training.py --variant s --image-size 300 --batch-size 32 --device cuda   # GPU: bf16, channels_last
    python benchmarks/training.py --variant s --image-size 300 --batch-size 32 --device cuda --compile   # + compiled rows
    python benchmarks/training.py --skip-train-py              # the bare loop only

The bare loop feeds one pre-made batch of random images (no data loading) to SGD (momentum 0.9,
weight decay 1e-4, as train.py); its steps are timed after ``--warmup`` steps. train.py runs as a
subprocess on a generated ``shapes`` set for ``--steps`` optimizer steps (one epoch cut short by
--max-steps) and reports its own images/s, which include the first batch's data-loader start-up.
Random initial weights: nothing is downloaded.

--compile [BACKEND] (inductor by default) adds a compiled row per mode: the bare loop with
``torch.compile(model, backend=BACKEND)`` (compiled during its warmup steps) and train.py with
``--compile BACKEND``. train.py compiles during its first steps, so with --compile every train.py
run (eager too) trains two epochs without --max-steps and reports the second one's images/s. On a CPU
inductor needs a C++ compiler and takes minutes to compile; the figures worth having are a GPU's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
from effnetv2 import EfficientNetV2
from effnetv2.data import make_shapes_dataset
from effnetv2.training import backbone_batchnorm_eval, freeze_backbone

NUM_CLASSES = 5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(variant: str, size: int, batch: int, steps: int, warmup: int, device: torch.device,
              frozen: bool, backend: str | None = None) -> float:
    """Images per second of plain forward/backward/SGD steps on one resident batch; ``backend``:
    run the model through ``torch.compile`` with it (None: eager)."""
    model = EfficientNetV2(variant, num_classes=NUM_CLASSES).to(device)
    if frozen:
        freeze_backbone(model)
    model.train()
    if frozen:
        backbone_batchnorm_eval(model)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    if backend:
        model = torch.compile(model, backend=backend)
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    times = []
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def train_py(variant: str, size: int, batch: int, steps: int, device: torch.device, frozen: bool,
             data: Path, workers: int, backend: str | None = None, two_epochs: bool = False) -> float | None:
    """train.py's own images/s for ``steps`` optimizer steps, or None (with the reason printed).
    ``backend``: train.py --compile BACKEND; ``two_epochs``: two whole epochs, the second one's images/s."""
    script = ROOT / "train.py"
    if not script.is_file():
        print("  train.py not found: skipped", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="effnetv2-train-bench-") as out:
        command = [sys.executable, str(script), "--data-path", str(data), "--variant", variant, "--weights", "none",
                   "--image-size", str(size), "--eval-size", str(size), "--batch-size", str(batch),
                   "--output-dir", out, "--workers", str(workers), "--freeze-layers" if frozen else "--no-freeze-layers"]
        command += ["--epochs", "2"] if two_epochs else ["--epochs", "1", "--max-steps", str(steps)]
        command += ["--compile", backend] if backend else []
        command += ["--mixed-precision", "bf16", "--channels-last"] if device.type == "cuda" else ["--cpu"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        metrics = Path(out) / "metrics.json"
        if run.returncode != 0 or not metrics.is_file():
            print(f"  train.py failed (exit {run.returncode}):\n{run.stderr[-2000:]}", file=sys.stderr)
            return None
        history = json.loads(metrics.read_text())["history"]
        return float(history[-1]["images_per_second"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of the bare loop")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="train.py data workers")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-train-py", action="store_true")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="add torch.compile rows (default backend inductor)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) + ", bf16 autocast, channels_last" if device.type == "cuda" \
        else f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"EfficientNetV2-{args.variant}, {args.image_size}px, batch {args.batch_size}, {args.steps} steps; {where}"
          + (f"; torch.compile backend {args.compile}, train.py: the second of two epochs" if args.compile else ""))
    rows = []
    with tempfile.TemporaryDirectory(prefix="effnetv2-shapes-") as tmp:
        data = None
        if not args.skip_train_py:
            # Enough training images (80% split) for the steps, so no epoch ends before --max-steps
            # (with --compile, where train.py runs whole epochs: about --steps + 1 steps each).
            per_class = math.ceil(args.batch_size * (args.steps + 1) / (0.8 * NUM_CLASSES)) + 1
            data = make_shapes_dataset(Path(tmp) / "shapes", num_per_class=per_class, image_size=args.image_size)
        for frozen in (False, True):
            mode = "frozen backbone" if frozen else "full fine-tuning"
            for backend in (None, args.compile) if args.compile else (None,):
                bare = bare_loop(args.variant, args.image_size, args.batch_size, args.steps, args.warmup, device,
                                 frozen, backend)
                script = None if args.skip_train_py else train_py(
                    args.variant, args.image_size, args.batch_size, args.steps, device, frozen, data, args.workers,
                    backend, two_epochs=bool(args.compile))
                rows.append((mode + (", compiled" if backend else ""), bare, script))
    print(f"\n{'mode':<28} {'bare loop img/s':>16} {'train.py img/s':>15} {'train.py / bare':>16}")
    for mode, bare, script in rows:
        shown = f"{script:>15.1f} {script / bare:>16.2f}" if script else f"{'n/a':>15} {'':>16}"
        print(f"{mode:<28} {bare:>16.1f} {shown}")
    by_mode = {mode: (bare, script) for mode, bare, script in rows}
    comparisons = [("frozen backbone vs full fine-tuning", "frozen backbone", "full fine-tuning")]
    if args.compile:
        comparisons += [(f"compiled vs eager, {mode}", f"{mode}, compiled", mode)
                        for mode in ("full fine-tuning", "frozen backbone")]
    for title, faster, base in comparisons:
        (bare, script), (base_bare, base_script) = by_mode[faster], by_mode[base]
        print(f"\n{title} (bare loop): {bare / base_bare:.2f}x the images/s")
        if script and base_script:
            print(f"{title} (train.py): {script / base_script:.2f}x the images/s")


if __name__ == "__main__":
    main()
