"""Batch prediction throughput: the local engine of `python -m effnetv2.predict` vs Ray Data by actor count.

    python benchmarks/batch_predict.py                                 # bundled model, 600 shapes at 256 px
    python benchmarks/batch_predict.py --images 2000 --actors 1,2,4 --batch-size 64
    python benchmarks/batch_predict.py --address auto --actors 4,8,16  # on a running cluster (shared storage)

Writes ``--images`` `shapes` images (PNG) to a temp folder (or uses ``--data``), then prints images/s of:
1. the local engine (``predict_files``: a decoding thread pool beside the model, one process);
2. ``--engine ray`` for each actor count, on one Ray started once (or ``--address``): decoding in Ray tasks,
   one Predictor per actor. A run's time includes its actors' start (loading the model, an ONNX Runtime
   session); Ray's own start is printed apart. Each actor reserves ``--cpus-per-actor`` CPUs (default: an
   equal share of all CPUs but one, at most 1, which leaves a CPU for decoding).
Every Ray run must give the local rows (same labels, probabilities to 1e-5); the script stops if not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from effnetv2.batch_ray import RayOptions, import_ray, predictions_on_ray, ray_session
from effnetv2.inference import Predictor
from effnetv2.predict import find_images, predict_files
from effnetv2.shapes import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def same_rows(rows, expected) -> bool:
    return len(rows) == len(expected) and all(
        (a.path, a.error, [label for label, _ in a.top]) == (b.path, b.error, [label for label, _ in b.top])
        and all(abs(p - q) <= 1e-5 for (_, p), (_, q) in zip(a.top, b.top)) for a, b in zip(rows, expected))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "model"))
    parser.add_argument("--data", default=None, help="an image folder (default: --images generated shapes)")
    parser.add_argument("--images", type=int, default=600, help="generated images (default 600)")
    parser.add_argument("--image-size", type=int, default=256, help="generated images' side (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts (default 1,2)")
    parser.add_argument("--cpus-per-actor", type=float, default=None)
    parser.add_argument("--address", default=None, help="a Ray cluster (default: a local Ray started here)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = make_shapes_dataset(Path(tmp) / "shapes", num_per_class=-(-args.images // 5),
                                            image_size=args.image_size, seed=0)
        files, _ = find_images([args.data])
        predictor = Predictor(args.model)  # also exports the ONNX graph the actors on this host then load
        print(f"{len(files)} images, {predictor!r}, batch {args.batch_size}, {os.cpu_count()} CPU cores")

        start = time.perf_counter()
        expected = list(predict_files(predictor, files, 5, args.batch_size, progress=False))
        local = time.perf_counter() - start
        print(f"  {'local engine (threads + one Predictor)':<44} {len(files) / local:8.1f} img/s  ({local:.1f} s)")

        ray = import_ray()
        start = time.perf_counter()
        with ray_session(args.address):
            print(f"  {'Ray start / connect':<44} {time.perf_counter() - start:8.1f} s")
            cpus = ray.cluster_resources()["CPU"]
            for actors in map(int, args.actors.split(",")):
                cpus_each = args.cpus_per_actor or min(1.0, (cpus - 1) / actors)
                options = RayOptions(num_actors=actors, cpus_per_actor=cpus_each)
                start = time.perf_counter()
                rows = list(predictions_on_ray(predictor.model, files, 5, args.batch_size, options, progress=False))
                took = time.perf_counter() - start
                if not same_rows(rows, expected):
                    sys.exit("the Ray rows differ from the local engine's")
                name = f"Ray Data, {actors} actor(s) x {cpus_each:g} CPU"
                print(f"  {name:<44} {len(files) / took:8.1f} img/s  ({took:.1f} s, {took / local:.2f}x local's time)")


if __name__ == "__main__":
    main()
