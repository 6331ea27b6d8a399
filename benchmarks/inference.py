"""Inference speed, side by side in one run: torchvision eager (the reference) vs our model eager,
fused (BatchNorm folded, channels_last), on the fast runtimes (ONNX Runtime, OpenVINO) in float32 and
int8, and on CUDA through the Predictor (bf16, channels_last, torch.compile with CUDA graphs at batch 1).

    python benchmarks/inference.py                       # s@384 and b0@224, batch 1 and 16
    python benchmarks/inference.py --cases s@384 --batch-sizes 1 --iters 20
    python benchmarks/inference.py --paths reference,onnxruntime,int8-onnxruntime,int8-openvino
    python benchmarks/inference.py --paths fused,openvino,compile   # compile: torch.compile (slow to build)
    python benchmarks/inference.py --device cuda         # GPU, batch 1 and 128: bf16, channels_last
                                                         # (torchvision eager, ours eager, fused, compiled)
    python benchmarks/inference.py --accuracy assets/model --eval-data data/shapes-eval-192 \
        --calibration data/shapes-calibration          # int8 vs float32: top-1 and agreement (annotations)

int8 graphs are calibrated on ``--calibration DIR`` (default: 64 fresh ``shapes`` images at the
case's size); with random weights the figure is speed only (accuracy: tests/test_quantize.py, README).

Random weights (nothing is downloaded); the inputs, the BatchNorm statistics and the int8 calibration
are rendered ``shapes`` images (three different seeds), so int8 errors are measured on inputs like the
calibration ones. Each path is warmed up, then the paths are timed in
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

CPU_PATHS = ("reference", "eager", "fused", "onnxruntime", "openvino", "int8-onnxruntime", "int8-openvino")
GPU_PATHS = ("reference", "eager", "fused", "predictor")
ALL_PATHS = CPU_PATHS + ("compile", "predictor")


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


def shapes_batch(model: EfficientNetV2, size: int, count: int, seed: int) -> torch.Tensor:
    """``count`` rendered ``shapes`` images through the model's eval transform: ``[count, 3, size, size]``."""
    import random

    from effnetv2.shapes import SHAPES, render_shape
    from effnetv2.transforms import transforms_for

    rng, transform = random.Random(seed), transforms_for(model, image_size=size)
    return torch.stack([transform(render_shape(SHAPES[i % len(SHAPES)], rng, size)[0]) for i in range(count)])


@torch.no_grad()
def calibrate(model: EfficientNetV2, size: int) -> None:
    """Give BatchNorm statistics measured on images, as training would, so the logits have a
    realistic scale (a fresh model's are ~1e-6 and any error looks small)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()(shapes_batch(model, size, 4, seed=1))
    for bn in norms:
        bn.momentum = 0.1
    torch.nn.init.normal_(model.head.classifier.weight, 0, model.head.classifier.in_features ** -0.5)
    model.eval()


def calibration_folder(size: int, cache_dir: str, given: str | None) -> str:
    """``given``, else 64 ``shapes`` images at ``size`` written once into ``cache_dir``."""
    if given:
        return given
    from effnetv2.data import make_shapes_dataset

    return str(make_shapes_dataset(os.path.join(cache_dir, f"calibration-{size}"), num_per_class=13,
                                   image_size=size, seed=12345))


def build_paths(variant: str, size: int, names: list[str], device: torch.device, dtype: torch.dtype,
                threads: int | None, cache_dir: str, calibration: str | None = None,
                ) -> tuple[dict[str, Callable], dict[str, str], EfficientNetV2]:
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
        elif name == "predictor":
            labels[name] = "ours Predictor (bf16, channels_last, compiled)"
            paths[name] = Predictor(model, device=device, precision="bf16" if dtype == torch.bfloat16 else "fp32",
                                    compile=True)
        elif name.removeprefix("int8-") in ("onnxruntime", "openvino"):
            backend, int8 = name.removeprefix("int8-"), name.startswith("int8-")
            try:
                paths[name] = Predictor(model, backend=backend, num_threads=threads, cache_dir=cache_dir,
                                        precision="int8" if int8 else "fp32",
                                        calibration=calibration_folder(size, cache_dir, calibration) if int8 else None)
            except ImportError as err:
                print(f"  skipping {name}: {err}", file=sys.stderr)
                continue
            labels[name] = f"ours {backend}" + (" int8" if int8 else "")
        else:
            raise SystemExit(f"unknown path {name!r}: choose from {ALL_PATHS}")
    return paths, labels, model


def run_path(fn: Callable, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        out = fn(x)
    sync(device)
    return out


def int8_accuracy(source: str, eval_data: str, calibration: str) -> None:
    """Print top-1 (against ``annotations.json``) of the float32 and int8 graphs of ``source`` on the
    shapes set ``eval_data``, and int8's top-1 agreement with float32, per runtime."""
    import json
    from pathlib import Path

    annotations = json.loads((Path(eval_data) / "annotations.json").read_text())
    files = sorted(annotations)
    with tempfile.TemporaryDirectory(prefix="effnetv2-bench-") as cache:
        fp32 = Predictor(source, backend="onnxruntime", cache_dir=cache)
        labels = torch.tensor([int(fp32.config["label2id"][annotations[f]["label"]]) for f in files])
        x = fp32.preprocess([Path(eval_data) / f for f in files])
        reference = fp32(x).argmax(1)
        print(f"{source} on {len(files)} images of {eval_data}; int8 calibrated on {calibration}")
        print(f"float32 (onnxruntime): top-1 {(reference == labels).float().mean():.2%}")
        for backend in ("onnxruntime", "openvino"):
            predicted = Predictor(source, backend=backend, precision="int8", calibration=calibration,
                                  cache_dir=cache)(x).argmax(1)
            print(f"int8 ({backend}): top-1 {(predicted == labels).float().mean():.2%}, "
                  f"agreement with float32 {(predicted == reference).float().mean():.2%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="s@384,b0@224", help="comma-separated variant@size")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16; on CUDA 1,128)")
    parser.add_argument("--paths", default=None, help=f"comma-separated, from {ALL_PATHS}")
    parser.add_argument("--calibration", default=None, help="folder of images to calibrate the int8 paths on")
    parser.add_argument("--accuracy", metavar="MODEL", help="instead of speed: int8 vs float32 accuracy of MODEL "
                        "on --eval-data (a shapes folder with annotations.json), calibrated on --calibration")
    parser.add_argument("--eval-data", help="the shapes folder --accuracy measures on")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds (batch 1); fewer for large batches")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.accuracy:
        if not (args.eval_data and args.calibration):
            parser.error("--accuracy needs --eval-data and --calibration (folders of different seeds)")
        return int8_accuracy(args.accuracy, args.eval_data, args.calibration)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    names = args.paths.split(",") if args.paths else list(GPU_PATHS if device.type == "cuda" else CPU_PATHS)
    batch_sizes = args.batch_sizes or ("1,128" if device.type == "cuda" else "1,16")
    gemm = matmul_gflops(device, dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"{where}; torch {torch.__version__}; {str(dtype).removeprefix('torch.')} matmul 2048^3: {gemm:.1f} GFLOP/s; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    cache_dir = tempfile.mkdtemp(prefix="effnetv2-bench-")
    header = (f"{'model':<9} {'batch':>5}  {'path':<40} {'ms/img':>8} {'best':>7} {'img/s':>7} {'x ref':>6} "
              f"{'GFLOP/s':>8} {'% mm':>5} {'rel err':>8}")
    for case in args.cases.split(","):
        variant, size = case.split("@")
        size = int(size)
        started = time.time()
        paths, labels, model = build_paths(variant, size, names, device, dtype, threads, cache_dir, args.calibration)
        flops = count_flops(model.float().cpu(), size)
        model.to(device, dtype)
        print(f"\nEfficientNetV2-{variant} at {size}x{size}: {flops / 1e9:.2f} GFLOP/image "
              f"(paths built in {time.time() - started:.0f}s)")
        print(header)
        for batch in map(int, batch_sizes.split(",")):
            x = shapes_batch(model, size, batch, seed=2 + batch).to(device, dtype)
            xl = x.contiguous(memory_format=torch.channels_last)
            expected = run_path(model, x, device).float().cpu()
            times: dict[str, list[float]] = {name: [] for name in paths}
            errors = {}
            for name, fn in paths.items():
                # compiled paths: compile, then CUDA graphs' warm-up and recording runs before any timing
                for _ in range(max(args.warmup, 3) if name in ("compile", "predictor") else args.warmup):
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
                      f"{min(times[name]) / batch * 1e3:>7.1f} {batch / seconds:>7.1f} {reference / seconds:>6.2f} "
                      f"{rate:>8.1f} {100 * rate / gemm:>5.0f} {err:>8}")
    print(f"\nms/img: median over the interleaved rounds, best: the fastest round; x ref: ratio of medians, "
          f"the speed-up over the first row of each block (torchvision eager for s, timm eager for b0); "
          f"rel err: vs ours eager (int8, bf16: approximate by design). Load average at the end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
