"""Inference speed, side by side in one run: torchvision eager (the reference) vs our model eager,
fused (BatchNorm folded, channels_last) and on the fast runtimes (ONNX Runtime, OpenVINO).

    python benchmarks/inference.py                       # s@384 and b0@224, batch 1 and 16
    python benchmarks/inference.py --cases s@384 --batch-sizes 1 --iters 20
    python benchmarks/inference.py --paths fused,openvino,compile   # compile: torch.compile (slow to build)
    python benchmarks/inference.py --device cuda         # GPU: bf16, channels_last (eager, fused, compile)

Random weights (nothing is downloaded). Each path is warmed up, then the paths are timed in
interleaved rounds (so a busy machine slows them all alike) and the median is reported, with the
ratio to the reference, the achieved GFLOP/s (2 x multiply-adds counted by PyTorch's FLOP counter)
and that as a share of a large fp32 (or bf16 on GPU) matrix multiply measured in the same run.
Every path's logits are compared with our eager model's (relative L2 error).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from effnetv2 import EfficientNetV2
from effnetv2.export import relative_error
from effnetv2.fuse import optimize_for_inference
from effnetv2.inference import Predictor

CPU_PATHS = ("reference", "eager", "fused", "onnxruntime", "openvino")
GPU_PATHS = ("reference", "eager", "fused")


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Median rate of an ``n x n`` matrix multiply (2 n^3 FLOP) in GFLOP/s."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times[1:]) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: torch.nn.Module, size: int) -> float:
    """FLOP (2 x multiply-adds) of one ``size x size`` image."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def reference_model(variant: str) -> tuple[str, torch.nn.Module] | None:
    """torchvision's model for s/m/l; timm's ``tf_efficientnetv2_<variant>`` for the others."""
    if variant in ("s", "m", "l"):
        import torchvision

        return "torchvision eager", getattr(torchvision.models, f"efficientnet_v2_{variant}")(weights=None)
    try:
        import timm
    except ImportError:
        return None
    return "timm eager", timm.create_model(f"tf_efficientnetv2_{variant}", pretrained=False)


@torch.no_grad()
def calibrate(model: EfficientNetV2, size: int) -> None:
    """Give BatchNorm statistics measured on random images, as training would, so the logits have a
    realistic scale (a fresh model's are ~1e-6 and any error looks small)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()(torch.randn(4, 3, size, size))
    for bn in norms:
        bn.momentum = 0.1
    torch.nn.init.normal_(model.head.classifier.weight, 0, model.head.classifier.in_features ** -0.5)
    model.eval()


def build_paths(variant: str, size: int, names: list[str], device: torch.device, dtype: torch.dtype,
                threads: int | None, cache_dir: str) -> tuple[dict[str, Callable], dict[str, str], EfficientNetV2]:
    """``{path name: callable(x) -> logits}`` plus a display label per path, and our eager model."""
    model = EfficientNetV2(variant)
    calibrate(model, size)
    paths: dict[str, Callable] = {}
    labels: dict[str, str] = {}
    channels_last = device.type == "cuda"
    for name in names:
        if name == "reference":
            found = reference_model(variant)
            if found is None:
                continue
            labels[name], ref = found
            ref = ref.eval().to(device, dtype)
            if channels_last:
                ref = ref.to(memory_format=torch.channels_last)
            paths[name] = ref
        elif name == "eager":
            labels[name], paths[name] = "ours eager", model.to(device, dtype)
        elif name == "fused":
            labels[name] = "ours fused (BN folded, channels_last)"
            paths[name] = optimize_for_inference(model, device=device, dtype=dtype)
        elif name == "compile":
            labels[name] = "ours fused + torch.compile"
            paths[name] = torch.compile(optimize_for_inference(model, device=device, dtype=dtype))
        elif name in ("onnxruntime", "openvino"):
            try:
                paths[name] = Predictor(model, backend=name, num_threads=threads, cache_dir=cache_dir)
            except ImportError as err:
                print(f"  skipping {name}: {err}", file=sys.stderr)
                continue
            labels[name] = f"ours {name}"
        else:
            raise SystemExit(f"unknown path {name!r}: choose from {CPU_PATHS + ('compile',)}")
    return paths, labels, model


def run_path(fn: Callable, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        out = fn(x)
    sync(device)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="s@384,b0@224", help="comma-separated variant@size")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--paths", default=None, help=f"comma-separated, from {CPU_PATHS + ('compile',)}")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds (batch 1); fewer for large batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    names = args.paths.split(",") if args.paths else list(GPU_PATHS if device.type == "cuda" else CPU_PATHS)
    gemm = matmul_gflops(device, dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"{where}; torch {torch.__version__}; {str(dtype).removeprefix('torch.')} matmul 2048^3: {gemm:.1f} GFLOP/s")
    cache_dir = tempfile.mkdtemp(prefix="effnetv2-bench-")
    header = (f"{'model':<9} {'batch':>5}  {'path':<40} {'ms/img':>8} {'img/s':>7} {'x ref':>6} "
              f"{'GFLOP/s':>8} {'% mm':>5} {'rel err':>8}")
    for case in args.cases.split(","):
        variant, size = case.split("@")
        size = int(size)
        started = time.time()
        paths, labels, model = build_paths(variant, size, names, device, dtype, threads, cache_dir)
        flops = count_flops(model.float().cpu(), size)
        model.to(device, dtype)
        print(f"\nEfficientNetV2-{variant} at {size}x{size}: {flops / 1e9:.2f} GFLOP/image "
              f"(paths built in {time.time() - started:.0f}s)")
        print(header)
        for batch in map(int, args.batch_sizes.split(",")):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
            xl = x.contiguous(memory_format=torch.channels_last)
            expected = run_path(model, x, device).float().cpu()
            times: dict[str, list[float]] = {name: [] for name in paths}
            errors = {}
            for name, fn in paths.items():
                for _ in range(args.warmup):
                    out = run_path(fn, xl if name in ("fused", "compile") else x, device)
                errors[name] = relative_error(out.float().cpu(), expected) if out.shape == expected.shape else None
            rounds = max(3, args.iters if batch == 1 else args.iters // 2)
            for _ in range(rounds):
                for name, fn in paths.items():
                    inp = xl if name in ("fused", "compile") else x
                    start = time.perf_counter()
                    run_path(fn, inp, device)
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(t) for name, t in times.items()}
            reference = medians.get("reference", medians.get("eager"))
            for name, seconds in medians.items():
                rate = flops * batch / seconds / 1e9
                err = "n/a" if errors[name] is None or name == "reference" else f"{errors[name]:.1e}"
                print(f"{variant + '@' + str(size):<9} {batch:>5}  {labels[name]:<40} {seconds / batch * 1e3:>8.1f} "
                      f"{batch / seconds:>7.1f} {reference / seconds:>6.2f} {rate:>8.1f} {100 * rate / gemm:>5.0f} {err:>8}")
    print("\nx ref: speed-up over the first row of each block (torchvision eager for s, timm eager for b0); "
          "rel err: vs ours eager.")


if __name__ == "__main__":
    main()
