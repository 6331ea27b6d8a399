"""Training throughput: train.py's steps against a bare forward/backward loop of the same model and
batch (what data loading, augmentation and Accelerate cost), and a frozen backbone against full
fine-tuning.

    python benchmarks/training.py                              # b0 at 128 px, batch 16, CPU
    python benchmarks/training.py --variant s --image-size 300 --batch-size 32 --device cuda   # GPU: bf16, channels_last
    python benchmarks/training.py --skip-train-py              # the bare loop only

The bare loop feeds one pre-made batch of random images (no data loading) to SGD (momentum 0.9,
weight decay 1e-4, as train.py); its steps are timed after ``--warmup`` steps. train.py runs as a
subprocess on a generated ``shapes`` set for ``--steps`` optimizer steps (one epoch cut short by
--max-steps) and reports its own images/s, which include the first batch's data-loader start-up.
Random initial weights: nothing is downloaded.
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
              frozen: bool) -> float:
    """Images per second of plain forward/backward/SGD steps on one resident batch."""
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
             data: Path, workers: int) -> float | None:
    """train.py's own images/s for ``steps`` optimizer steps, or None (with the reason printed)."""
    script = ROOT / "train.py"
    if not script.is_file():
        print("  train.py not found: skipped", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="effnetv2-train-bench-") as out:
        command = [sys.executable, str(script), "--data-path", str(data), "--variant", variant, "--weights", "none",
                   "--image-size", str(size), "--eval-size", str(size), "--batch-size", str(batch), "--epochs", "1",
                   "--max-steps", str(steps), "--output-dir", out, "--workers", str(workers),
                   "--freeze-layers" if frozen else "--no-freeze-layers"]
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
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) + ", bf16 autocast, channels_last" if device.type == "cuda" \
        else f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"EfficientNetV2-{args.variant}, {args.image_size}px, batch {args.batch_size}, {args.steps} steps; {where}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="effnetv2-shapes-") as tmp:
        data = None
        if not args.skip_train_py:
            # Enough training images (80% split) for the steps, so no epoch ends before --max-steps.
            per_class = math.ceil(args.batch_size * (args.steps + 1) / (0.8 * NUM_CLASSES)) + 1
            data = make_shapes_dataset(Path(tmp) / "shapes", num_per_class=per_class, image_size=args.image_size)
        for frozen in (False, True):
            mode = "frozen backbone" if frozen else "full fine-tuning"
            bare = bare_loop(args.variant, args.image_size, args.batch_size, args.steps, args.warmup, device, frozen)
            script = None if args.skip_train_py else train_py(args.variant, args.image_size, args.batch_size,
                                                              args.steps, device, frozen, data, args.workers)
            rows.append((mode, bare, script))
    print(f"\n{'mode':<18} {'bare loop img/s':>16} {'train.py img/s':>15} {'train.py / bare':>16}")
    for mode, bare, script in rows:
        shown = f"{script:>15.1f} {script / bare:>16.2f}" if script else f"{'n/a':>15} {'':>16}"
        print(f"{mode:<18} {bare:>16.1f} {shown}")
    full, frozen = rows[0][1], rows[1][1]
    print(f"\nfrozen backbone vs full fine-tuning (bare loop): {frozen / full:.2f}x the images/s")
    if rows[0][2] and rows[1][2]:
        print(f"frozen backbone vs full fine-tuning (train.py): {rows[1][2] / rows[0][2]:.2f}x the images/s")


if __name__ == "__main__":
    main()
