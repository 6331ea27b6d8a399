"""Hostile model folders: how long ``EfficientNetV2.from_pretrained`` takes to refuse each, and its peak memory.

    python benchmarks/hostile_inputs.py                 # every case
    python benchmarks/hostile_inputs.py --cases attn_dim_16000,header_1.2M_tensors

Each case is a folder with a ``config.json`` (and a ``model.safetensors``) that a stranger could
upload; each is loaded in a fresh subprocess. Printed per case: the seconds from_pretrained took
(imports excluded), the child's peak RSS (``VmHWM``, Linux; imports included: the first row,
``baseline``, loads a good b0 folder), and the start of the error.
The goal: every hostile case fails in under 2 s with a message naming the file and the key, and
peak RSS stays under 1 GB. Measures the installed effnetv2 (`pip install -e .`); set PYTHONPATH to measure
another checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from effnetv2 import EfficientNetV2
start = time.perf_counter()
try:
    EfficientNetV2.from_pretrained(sys.argv[1])
    outcome = "loaded"
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
seconds = time.perf_counter() - start
# VmHWM: this process's peak RSS since exec (ru_maxrss would carry over the forking parent's).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"seconds": seconds, "peak_mb": int(status["VmHWM"].split()[0]) / 1024, "outcome": outcome}))
"""


def write_header_bomb(path: Path, count: int) -> None:
    """A safetensors file whose JSON header declares ``count`` empty tensors (~65 bytes each)."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)


def make_cases(root: Path) -> dict[str, Path]:
    """Folder per case: a good b0 model, then config.json / weights edits of it."""
    from effnetv2 import EfficientNetV2

    good = root / "baseline"
    EfficientNetV2("b0", num_classes=3).save_pretrained(good)
    config = json.loads((good / "config.json").read_text())
    attention = {"pool": "attention", "num_heads": 8}
    no_labels = {"id2label": None, "label2id": None}
    edits = {
        "attn_dim_16000": {**attention, "attn_dim": 16000},
        "attn_dim_8e6": {**attention, "attn_dim": 8_000_000},
        "attn_dim_-8": {**attention, "attn_dim": -8},
        "num_classes_1e6": {"num_classes": 1_000_000, **no_labels},
        "num_heads_1e9": {**attention, "num_heads": 1_000_000_000},
        "mean_nan": {"mean": [float("nan")] * 3},
        "std_inf": {"std": [float("inf")] * 3},
        "config_200MB": {"source": {"notes": "x" * 200_000_000}},
        "header_1.2M_tensors": {},
    }
    cases = {"baseline": good}
    for name, edit in edits.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        if name.startswith("header"):
            write_header_bomb(folder / "model.safetensors", 1_200_000)
        else:
            os.link(good / "model.safetensors", folder / "model.safetensors")
        cases[name] = folder
    return cases


def run_case(folder: Path) -> tuple[float, float, str]:
    """(seconds in from_pretrained, peak RSS in MB, outcome) of a fresh interpreter loading ``folder``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env,
                          cwd=folder)  # not the repo: "-c" puts the working folder first on sys.path
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return float("nan"), float("nan"), f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    record = json.loads(lines[-1])
    return record["seconds"], record["peak_mb"], record["outcome"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = make_cases(Path(tmp))
        chosen = args.cases.split(",") if args.cases else list(cases)
        print(f"{'case':<22} {'seconds':>8} {'peak RSS MB':>12}  outcome")
        for name in ["baseline"] + [c for c in chosen if c != "baseline"]:
            seconds, peak, outcome = run_case(cases[name])
            print(f"{name:<22} {seconds:8.2f} {peak:12.0f}  {outcome[:150]}", flush=True)


if __name__ == "__main__":
    main()
