"""Folder-per-class image data: scanning, a seeded stratified split, and a dataset that never crashes.

A data set is a folder with one sub-folder per class (``flowers/daisy/*.jpg``, ...). Unreadable files
are reported once, with their path and the reason, and skipped.

CLI: ``python -m effnetv2.data shapes OUT [--num-per-class N] [--image-size S] [--seed K]`` writes the
synthetic ``shapes`` set (see ``effnetv2.shapes``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from .images import ImageLoadError, open_image
from .shapes import SHAPES, make_shapes_dataset

__all__ = ["IMAGE_EXTENSIONS", "DatasetError", "scan_folder", "split_samples", "save_class_indices",
           "write_split", "check_images", "report_bad_files", "ImageFolderDataset", "make_shapes_dataset"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Sample = tuple[str, int]


class DatasetError(ValueError):
    """The data set cannot be trained on as it is; the message says what to change."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not Path(path).name.startswith(".")


def scan_folder(root: str | Path) -> tuple[list[Sample], list[str]]:
    """``(samples, classes)``: every image under ``root/<class>/`` (recursively) as ``(path, index)``,
    classes sorted by name. Hidden entries and non-image files are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data path {root} is not a folder: give a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders: put each class's images in its own "
                           f"sub-folder (e.g. {root}/daisy/*.jpg)")
    if len(classes) < 2:
        raise DatasetError(f"{root} has a single class ({classes[0]}): a classifier needs at least two")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*")
                       if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise DatasetError(f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                               f"add images or remove the folder")
        samples += [(f, index) for f in files]
    return samples, classes


def split_samples(samples: list[Sample], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Seeded stratified split: ``round(n * val_fraction)`` (at least 1) images of each class go to
    validation. Disjoint and deterministic; errors name a class too small to split."""
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in samples:
        by_class[label].append(path)
    train, val = [], []
    rng = random.Random(seed)
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        rng.shuffle(paths)
        n_val = max(1, round(len(paths) * val_fraction)) if val_fraction > 0 else 0
        if n_val >= len(paths):
            raise DatasetError(f"class {label} ({os.path.dirname(paths[0])}) has {len(paths)} image(s): too few "
                               f"to give both training and validation images; add images or lower --val-fraction")
        val += [(p, label) for p in paths[:n_val]]
        train += [(p, label) for p in paths[n_val:]]
    return train, val


def save_class_indices(path: str | Path, classes: list[str]) -> None:
    """Write ``class_indices.json``: ``{"0": "daisy", ...}``."""
    Path(path).write_text(json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2))


def write_split(path: str | Path, train: list[Sample], val: list[Sample], classes: list[str],
                root: str | Path) -> None:
    """Record the split (paths relative to ``root``) so a run can be audited and repeated."""
    def rel(samples):
        return [[os.path.relpath(p, root), label] for p, label in samples]
    Path(path).write_text(json.dumps({"root": str(root), "classes": classes, "train": rel(train),
                                      "val": rel(val)}, indent=1))


def _check(sample: Sample) -> str | None:
    try:
        open_image(sample[0])
    except ImageLoadError as err:
        return str(err).removeprefix(f"{sample[0]}: ")
    return None


def check_images(samples: list[Sample], num_workers: int = 4) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every image once (in threads): ``(readable samples, [(path, reason), ...])``."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        reasons = list(pool.map(_check, samples))
    good = [s for s, r in zip(samples, reasons) if r is None]
    bad = [(s[0], r) for s, r in zip(samples, reasons) if r is not None]
    return good, bad


def report_bad_files(bad: list[tuple[str, str]]) -> None:
    """One warning listing every skipped file with its reason (nothing when ``bad`` is empty)."""
    if bad:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        message = f"skipping {len(bad)} unreadable image file(s):\n{lines}"
        logger.warning(message)
        warnings.warn(message, stacklevel=2)


class ImageFolderDataset(Dataset):
    """``(image tensor, label)`` pairs from ``samples``; a file that fails at read time is recorded in
    ``bad_files``, warned about once, and replaced by the next image of the same class."""

    def __init__(self, samples: list[Sample], classes: list[str], transform: Callable | None = None):
        if not samples:
            raise DatasetError("no images to load")
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.bad_files: dict[str, str] = {}
        self._by_class: dict[int, list[int]] = defaultdict(list)
        for i, (_, label) in enumerate(self.samples):
            self._by_class[label].append(i)

    def set_transform(self, transform: Callable | None) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        label = self.samples[index][1]
        same_class = self._by_class[label]
        start = same_class.index(index)
        for step in range(len(same_class)):
            path = self.samples[same_class[(start + step) % len(same_class)]][0]
            if path in self.bad_files:
                continue
            try:
                image = open_image(path)
            except ImageLoadError as err:
                self.bad_files[path] = str(err)
                warnings.warn(f"skipping unreadable image {err}", stacklevel=2)
                continue
            return (self.transform(image) if self.transform else image), label
        raise DatasetError(f"no readable image left in class {self.classes[label]!r}; see the warnings above")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="write the synthetic shapes data set")
    shapes.add_argument("out", type=Path)
    shapes.add_argument("--num-per-class", type=int, default=60)
    shapes.add_argument("--image-size", type=int, default=96)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--classes", nargs="+", default=list(SHAPES), choices=SHAPES)
    args = parser.parse_args(argv)
    root = make_shapes_dataset(args.out, args.num_per_class, args.image_size, args.seed, tuple(args.classes))
    print(f"wrote {args.num_per_class * len(args.classes)} images of {args.image_size}px in "
          f"{len(args.classes)} classes ({', '.join(args.classes)}) to {root}, boxes in {root / 'annotations.json'}")


if __name__ == "__main__":
    main()
