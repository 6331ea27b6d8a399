"""How far the training-based tests are from their thresholds, across seeds, thread counts and CPUs.

    python benchmarks/training_test_margins.py                      # 3 seeds x {1, default} threads x 3 CPUs
    python benchmarks/training_test_margins.py --seeds 0 --threads default --cpus native sse41

Each cell runs the ``measure`` function of a test module (the same computation its tests assert
on) in a fresh process with ``EFFNETV2_TEST_SEED``, ``OMP_NUM_THREADS`` (unset for ``default``) and,
for the emulated CPUs, ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``: a short training run's
outcome depends on float summation order, which those change. It prints one row per check: the
measured value, the test's threshold, and the margin (how far the value is on the passing side).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPUS = {  # name -> environment (PyTorch's own kernels, oneDNN's)
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def _module(name: str):
    # this checkout's tests measure this checkout's package (as `python -m pytest` from its root does),
    # whatever effnetv2 is installed; the test modules import their helpers (train_script, ...)
    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attention_mass(tmp: Path) -> list[tuple[str, float, str, float]]:
    t = _module("test_attention_mass")
    result = t.measure(tmp)
    share, rows = result["share"], []
    for i, run in enumerate(result["runs"]):
        (acc0, mass0, _), (acc1, mass1, transposed1) = run["before"], run["after"]
        rows += [(f"attention_mass init {i}: untrained |mass - share|", abs(mass0 - share), "<", t.MAX_UNTRAINED_OFFSET),
                 (f"attention_mass init {i}: trained mass / share", mass1 / share, ">", t.MIN_MASS_OVER_SHARE),
                 (f"attention_mass init {i}: trained mass / transposed maps' mass", mass1 / transposed1, ">",
                  t.MIN_MASS_OVER_TRANSPOSED),
                 (f"attention_mass init {i}: trained accuracy", acc1, ">=", t.MIN_ACCURACY)]
    mean = sum(run["after"][1] for run in result["runs"]) / len(result["runs"]) / share
    return rows + [("attention_mass: trained mass / share, mean of inits", mean, ">", t.MIN_MEAN_MASS_OVER_SHARE)]


def bundled_model(tmp: Path) -> list[tuple[str, float, str, float]]:
    t = _module("test_bundled_model")
    result = t.measure(tmp)
    return [("bundled_model: accuracy", result["accuracy"], ">=", t.MIN_ACCURACY),
            ("bundled_model: mass / share", result["mass_over_share"], ">", t.MIN_MASS_OVER_SHARE),
            ("bundled_model: images with mass > share", result["images_with_mass_above_share"], ">",
             t.MIN_IMAGES_ABOVE_SHARE)]


def fine_tune(tmp: Path) -> list[tuple[str, float, str, float]]:
    t = _module("test_train_learning")
    final = t.fine_tune(tmp)["final"]
    return [("fine_tune: val accuracy", final["val_accuracy"], ">=", t.MIN_FINE_TUNE_ACCURACY)]


def from_scratch(tmp: Path) -> list[tuple[str, float, str, float]]:
    t = _module("test_train_learning")
    m = t.from_scratch(tmp)
    return [("from_scratch: val accuracy", m["final"]["val_accuracy"], ">=", t.MIN_SCRATCH_ACCURACY),
            ("from_scratch: val loss", m["final"]["val_loss"], "<", t.MAX_SCRATCH_VAL_LOSS)]


MEASURES = {f.__name__: f for f in (attention_mass, bundled_model, fine_tune, from_scratch)}


def worker(name: str) -> None:
    """In the child process: run one measure and print its rows as JSON on the last line."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows = MEASURES[name](Path(tmp))
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "rows": rows}))


def run_cell(name: str, seed: int, threads: str, cpu: str) -> dict:
    env = {**os.environ, **CPUS[cpu], "EFFNETV2_TEST_SEED": str(seed), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    done = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def margin(value: float, op: str, threshold: float) -> float:
    """Signed distance to the threshold, positive on the passing side."""
    return threshold - value if op == "<" else value - threshold


def passes(value: float, op: str, threshold: float) -> bool:
    return {"<": value < threshold, ">": value > threshold, ">=": value >= threshold}[op]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", nargs="+", default=["1", "default"], help="OMP_NUM_THREADS values, or default")
    parser.add_argument("--cpus", nargs="+", default=list(CPUS), choices=list(CPUS))
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=list(MEASURES))
    parser.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    parser.add_argument("--worker", choices=list(MEASURES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    cells = list(itertools.product(args.measures, args.seeds, args.threads, args.cpus))
    print(f"{'check':<52} {'seed':>4} {'threads':>7} {'cpu':>6} {'capability':>10} {'value':>8} "
          f"{'threshold':>11} {'margin':>8}  verdict", flush=True)
    failures = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for (name, seed, threads, cpu), result in zip(cells, pool.map(lambda c: run_cell(*c), cells)):
            if "error" in result:
                failures += 1
                print(f"{name:<52} {seed:>4} {threads:>7} {cpu:>6}  ERROR {result['error']}", flush=True)
                continue
            for check, value, op, threshold in result["rows"]:
                ok = passes(value, op, threshold)
                failures += not ok
                print(f"{check:<52} {seed:>4} {result['threads']:>7} {cpu:>6} {result['capability']:>10} "
                      f"{value:>8.3f} {op:>2} {threshold:>8.3f} {margin(value, op, threshold):>+8.3f}  "
                      f"{'pass' if ok else 'FAIL'}", flush=True)
    print(f"{failures} failing check(s) in {len(cells)} cell(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
