"""Batch prediction over image files and folders.

    python -m effnetv2.predict --model SOURCE PATH... [--top-k 5] [--batch-size N] [--backend B]
                               [--output preds.jsonl|preds.csv] [--workers N]

Folders are searched recursively for images (``effnetv2.data.IMAGE_EXTENSIONS``, any case).
Images are decoded and preprocessed in a thread pool while the model runs; unreadable files are
listed in one warning and skipped. Results keep the order of the inputs (folders sorted by path).
Without ``--output`` a table goes to stdout; ``.jsonl`` writes one JSON object per image,
``.csv`` one row per (image, rank).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .data import IMAGE_EXTENSIONS, is_image_file, report_bad_files
from .images import ImageLoadError, open_image
from .inference import BACKENDS, Predictor

Prediction = tuple[str, list[tuple[str, float]]]


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand ``paths`` into image files: files are kept as given (whatever their extension),
    folders are searched recursively (sorted). Returns ``(files, [(missing path, reason), ...])``."""
    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.is_file():
            files.append(str(path))
        else:
            missing.append((str(path), "no such file or folder"))
    return files, missing


def _load(predictor: Predictor, path: str) -> torch.Tensor | str:
    """The preprocessed image ``[3, S, S]``, or the reason it could not be read."""
    try:
        return predictor.transform(open_image(path))
    except ImageLoadError as err:
        return err.reason
    except (OSError, ValueError, RuntimeError) as err:  # e.g. a decoder failing inside the transform
        return f"{type(err).__name__}: {err}"


def _decoded(predictor: Predictor, files: list[str], pool: ThreadPoolExecutor,
             ahead: int) -> Iterator[tuple[str, torch.Tensor | str]]:
    """``(path, tensor or reason)`` in input order, decoding at most ``ahead`` files in advance."""
    pending: deque[tuple[str, Future]] = deque()
    for path in files:
        pending.append((path, pool.submit(_load, predictor, path)))
        if len(pending) >= ahead:
            first, future = pending.popleft()
            yield first, future.result()
    while pending:
        first, future = pending.popleft()
        yield first, future.result()


def predict_files(predictor: Predictor, files: list[str], top_k: int = 5, batch_size: int = 16,
                  workers: int = 4, progress: bool = True) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Top-k predictions for ``files``, in their order: ``([(path, [(label, p), ...]), ...],
    [(bad path, reason), ...])``. Decoding runs in ``workers`` threads ahead of the model."""
    from tqdm import tqdm

    results: list[Prediction] = []
    bad: list[tuple[str, str]] = []
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        logits = predictor(torch.stack([tensor for _, tensor in batch]))
        results.extend(zip([path for path, _ in batch], predictor.topk(logits, top_k)))
        batch.clear()

    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress) as bar:
        for path, item in _decoded(predictor, files, pool, ahead=2 * batch_size + workers):
            if isinstance(item, str):
                bad.append((path, item))
            else:
                batch.append((path, item))
                if len(batch) == batch_size:
                    flush()
            bar.update(1)
        if batch:
            flush()
    return results, bad


def write_results(results: list[Prediction], output: str | os.PathLike | None) -> None:
    """A table on stdout (``output`` None), or ``.jsonl`` / ``.csv`` to the file ``output``."""
    if output is None:
        width = max([len(path) for path, _ in results] + [5])
        for path, top in results:
            shown = "  ".join(f"{label} {prob:.3f}" for label, prob in top)
            print(f"{path:<{width}}  {shown}")
        return
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as f:
        if output.suffix.lower() == ".csv":
            writer = csv.writer(f)
            writer.writerow(["path", "rank", "label", "probability"])
            for path, top in results:
                writer.writerows([path, rank, label, f"{prob:.6f}"] for rank, (label, prob) in enumerate(top, 1))
        else:
            for path, top in results:
                record = {"path": path, "predictions": [{"label": label, "probability": prob} for label, prob in top]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    parser.add_argument("--model", required=True, help="folder, Hub id org/name[@revision], or torchvision:<variant>")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    parser.add_argument("--output", default=None, help="write predictions to a .jsonl or .csv file")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.output and Path(args.output).suffix.lower() not in (".jsonl", ".csv"):
        parser.error(f"--output {args.output}: use a .jsonl or .csv file name")
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")

    files, missing = find_images(args.paths)
    if not files:
        report_bad_files(missing)
        print(f"error: no image files in {' '.join(args.paths)} (looked for {', '.join(IMAGE_EXTENSIONS)})",
              file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.model, backend=args.backend)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results, bad = predict_files(predictor, files, args.top_k, args.batch_size, args.workers,
                                 progress=not args.quiet)
    report_bad_files(missing + bad)
    write_results(results, args.output)
    if args.output:
        print(f"{len(results)} predictions written to {args.output} (backend {predictor.backend}, "
              f"{len(missing) + len(bad)} skipped)", file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
