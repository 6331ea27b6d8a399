"""train.py on a Hub dataset against the same images as a folder: the same command but for
``--dataset org/shapes`` / ``--data-path shapes``, each a fresh ``python train.py`` process, timed whole
(start-up, data loading and checks, training, saving), in wall-clock and in CPU seconds (user + system
of the process and its children: on a shared machine the wall clock mostly measures the others' load). The Hub is the tests' loopback server
(``tests/hubserver.py``), serving the images as 2 parquet shards; the first Hub run downloads them
into an empty cache, the later ones read the cache.

    python benchmarks/hub_data.py                    # 3 classes x 40 images of 64 px, b0, 1 epoch, CPU
    python benchmarks/hub_data.py --per-class 100 --repeats 3
    python benchmarks/hub_data.py --load-only --repeats 5   # load_training_data alone, in this process

--load-only times what differs between the two, in one process: ``load_training_data`` (scan or
download, decode-check every image, split), the Hub dataset's first load into an empty cache apart.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from hub_datasets import hub_files, shapes_rows  # noqa: E402
from hubserver import HubServer, hub_env  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--load-only", action="store_true", help="time load_training_data, not train.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = shapes_rows(tmp / "shapes", args.per_class, seed=0)  # the folder and the dataset's rows
        server = HubServer().start()
        try:
            server.add_dataset("org/shapes", hub_files({"train": rows}))
            env = {**os.environ, **hub_env(server.url, tmp / "hf"), "PYTHONPATH": str(ROOT)}
            common = ["--variant", "b0", "--image-size", "64", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                      "--cpu", "--seed", "0", "--report-to", "none"]
            times, cpu = {"folder": [], "hub": []}, {"folder": [], "hub": []}
            if args.load_only:
                return time_loading(tmp, server.url, args.repeats)
            for repeat in range(args.repeats):
                for kind, data in (("hub", ["--dataset", "org/shapes"]), ("folder", ["--data-path", str(tmp / "shapes")])):
                    cmd = [sys.executable, str(ROOT / "train.py"), *data, "--output-dir", str(tmp / f"{kind}{repeat}"),
                           *common]
                    started, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                    subprocess.run(cmd, env=env, check=True, capture_output=True)
                    times[kind].append(time.perf_counter() - started)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu[kind].append(after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime)
                    print(f"{kind:6s} run {repeat + 1}: {times[kind][-1]:.1f} s, {cpu[kind][-1]:.1f} CPU s"
                          + (" (downloads into an empty cache)" if kind == "hub" and repeat == 0 else ""), flush=True)
        finally:
            server.stop()
    best = {kind: min(values) for kind, values in times.items()}
    least = {kind: min(values) for kind, values in cpu.items()}
    print(f"{3 * args.per_class} images, `{' '.join(common)}`: best of {args.repeats}: Hub dataset {best['hub']:.1f} s, "
          f"folder {best['folder']:.1f} s, ratio {best['hub'] / best['folder']:.2f}; CPU: Hub dataset "
          f"{least['hub']:.1f} s, folder {least['folder']:.1f} s, ratio {least['hub'] / least['folder']:.2f}")
    return 0


def time_loading(tmp: Path, endpoint: str, repeats: int) -> int:
    import pytest

    from effnetv2.hub_data import load_training_data
    from hubserver import point_client_at, point_datasets_at

    patch = pytest.MonkeyPatch()  # this process's huggingface_hub and datasets, pointed at the test Hub
    point_client_at(patch, endpoint, tmp / "hf-load", token=None)
    point_datasets_at(patch, endpoint, tmp / "hf-load" / "datasets")

    started = time.perf_counter()
    load_training_data(dataset="org/shapes", workers=2)
    print(f"Hub dataset, first load (download into an empty cache): {time.perf_counter() - started:.2f} s")
    times = {"hub": [], "folder": []}
    for _ in range(repeats):
        for kind, source in (("hub", {"dataset": "org/shapes"}), ("folder", {"data_path": str(tmp / "shapes")})):
            started = time.perf_counter()
            load_training_data(**source, workers=2)
            times[kind].append(time.perf_counter() - started)
    best = {kind: min(values) for kind, values in times.items()}
    print(f"load_training_data, best of {repeats}: Hub dataset (cached) {best['hub']:.2f} s, folder "
          f"{best['folder']:.2f} s, ratio {best['hub'] / best['folder']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
