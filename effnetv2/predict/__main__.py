"""``python -m effnetv2.predict``: the command line of :mod:`effnetv2.predict` (usage in its docstring)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

from effnetv2 import predict as prediction
from effnetv2.data import IMAGE_EXTENSIONS, report_bad_files
from effnetv2.inference import BACKENDS, Predictor, import_optional
from effnetv2.predict import (OUTPUT_FORMATS, PARQUET_INSTALL, Prediction, check_output, find_images, missing_rows,
                              predict_files, write_results)
from effnetv2.sources import load_model


def _noting_errors(rows: Iterable[Prediction], bad: list[tuple[str, str]]) -> Iterator[Prediction]:
    """``rows`` passed on, the ``(path, error)`` of each failed one appended to ``bad`` on the way."""
    for row in rows:
        if row.error:
            bad.append((row.path, row.error))
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.predict", description=prediction.__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    parser.add_argument("--model", required=True, help="folder, Hub id org/name[@revision], or torchvision:<variant>")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    parser.add_argument("--output", default=None, help="write predictions to a .jsonl, .csv or .parquet file")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="decoding threads (--engine local)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="local: this process; ray: Ray Data, decoding in tasks, the model in an actor pool")
    ray_options = parser.add_argument_group("--engine ray (pip install 'effnetv2[scale]')")
    ray_options.add_argument("--address", default=None,
                             help="Ray cluster: auto (the one `ray start` runs here), HOST:PORT or ray://HOST:PORT "
                                  "(default: $RAY_ADDRESS, else a new Ray on this machine, on loopback only)")
    ray_options.add_argument("--num-actors", type=int, default=1, help="model replicas (one Predictor each)")
    ray_options.add_argument("--cpus-per-actor", type=float, default=1.0,
                             help="CPUs each replica reserves (and its ONNX Runtime threads)")
    ray_options.add_argument("--gpus-per-actor", type=float, default=0.0,
                             help="GPUs each replica reserves; > 0 runs the torch backend on CUDA")
    ray_options.add_argument("--object-store-memory", type=int, default=None, metavar="BYTES",
                             help="object store size of a Ray this command starts (default: Ray's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_FORMATS:
        parser.error(f"--output {args.output}: use a {', '.join(OUTPUT_FORMATS)} file name")
    if args.top_k < 1 or args.batch_size < 1 or args.num_actors < 1:
        parser.error("--top-k, --batch-size and --num-actors must be at least 1")
    if args.object_store_memory and args.address:
        parser.error("--object-store-memory sizes a Ray this command starts; with --address, size it in `ray start`")

    try:  # what can fail fast first (the output, the inputs, --model, a package), before any work or Ray starts
        output = check_output(args.output) if args.output else None
        absent = [path for path in args.paths if not os.path.lexists(path)]
        if absent:
            raise ValueError(f"no such file or folder: {', '.join(absent)}")
        files, problems = find_images(args.paths)
        if not files:
            report_bad_files(problems)
            raise ValueError(f"no image files in {' '.join(args.paths)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if output and output.suffix.lower() == ".parquet":
            import_optional("pyarrow.parquet", "writing .parquet", PARQUET_INSTALL)
        if args.engine == "local":
            predictor = Predictor(args.model, backend=args.backend)
        else:
            from effnetv2.batch_ray import RayOptions, import_ray, predictions_on_ray, ray_session

            import_ray()
            model = load_model(args.model)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad: list[tuple[str, str]] = []
    try:
        if args.engine == "local":
            rows = predict_files(predictor, files, args.top_k, args.batch_size, args.workers, progress=not args.quiet)
            write_results(_noting_errors(chain(rows, missing_rows(problems)), bad), output)
            engine = f"backend {predictor.backend}"
        else:
            options = RayOptions(args.num_actors, args.cpus_per_actor, args.gpus_per_actor, args.backend)
            with ray_session(args.address, object_store_memory=args.object_store_memory):
                rows = predictions_on_ray(model, files, args.top_k, args.batch_size, options, progress=not args.quiet)
                write_results(_noting_errors(chain(rows, missing_rows(problems)), bad), output)
            engine = f"Ray Data, {args.num_actors} actor(s)"
    except ConnectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up
        print(f"error: {err}" + (f"; {output} is left as it was" if output else ""), file=sys.stderr)
        return 1
    report_bad_files(bad)
    total = len(files) + len(problems)
    if output:
        print(f"{total - len(bad)} predictions and {len(bad)} errors written to {output} ({engine})", file=sys.stderr)
    return 0 if len(bad) < total else 1


if __name__ == "__main__":
    sys.exit(main())
