"""Folder-per-class image data: scanning, a seeded stratified split, and a dataset that never crashes.

A data set is a folder with one sub-folder per class (``flowers/daisy/*.jpg``, ...), read through
:func:`effnetv2.images.open_image`. Unreadable files are found before training (:func:`check_images`),
reported once (:func:`report_bad_files`) and skipped; one that breaks later is replaced at read time.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import threading
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from ..images import BYTES_PER_PIXEL, ImageLoadError, image_pixels, open_image, verify_image
from ..shapes import make_shapes_dataset  # noqa: F401  (effnetv2.data's, as SPEC.md names it)

# Lower-case suffixes; files match whatever their case (``IMG_1.JPG``).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Sample = tuple[str, int]


class DatasetError(ValueError):
    """The data set cannot be trained on as it is; the message says what to change."""


def is_image_file(path: str | Path) -> bool:
    """True for a visible file name with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, recursively and sorted, skipping hidden files and hidden folders."""
    files = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]  # do not descend into .git etc.
        files += [Path(parent, name) for name in names if not name.startswith(".")]
    return sorted(files)


def scan_folder(root: str | Path) -> tuple[list[Sample], list[str]]:
    """``(samples, classes)`` of the folder-per-class data set at ``root``: the visible sub-folder names, sorted,
    and every visible image file under ``root/<class>/`` (recursively, sorted) as ``(path, class_index)``.
    :class:`DatasetError` for a missing root, no class folders, a single class, or a class without images."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist: give the folder that holds one sub-folder "
                           f"per class (e.g. {root}/daisy/*.jpg)")
    if not root.is_dir():
        raise DatasetError(f"data path {root} is a file, not a folder: give the folder that holds one "
                           f"sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = sum(is_image_file(p) for p in root.iterdir())
        hint = f" (it holds {loose} loose image(s): move them into one sub-folder per class)" if loose else ""
        raise DatasetError(f"{root} has no class sub-folders{hint}: put each class's images in its own "
                           f"sub-folder, e.g. {root}/daisy/*.jpg and {root}/rose/*.jpg")
    if len(classes) < 2:
        raise DatasetError(f"{root} has a single class ({classes[0]}): a classifier needs at least two; "
                           f"add a sub-folder of images for each other class")
    samples = []
    for index, name in enumerate(classes):
        files = _visible_files(root / name)
        images = [str(p) for p in files if is_image_file(p)]
        if not images:
            others = Counter(p.suffix.lower() or "(no extension)" for p in files)
            found = f"; it holds {sum(others.values())} other file(s): {', '.join(sorted(others))}" if others else ""
            raise DatasetError(f"class folder {root / name} has no images (looked for "
                               f"{', '.join(IMAGE_EXTENSIONS)}){found}: add images, convert them, or "
                               f"remove the folder")
        samples += [(path, index) for path in images]
    return samples, classes


def _val_count(n: int, val_fraction: float) -> int:
    """Validation images taken from a class of ``n``: the fraction rounded half up, at least one."""
    return max(1, math.floor(n * val_fraction + 0.5)) if val_fraction > 0 else 0


def split_samples(samples: list[Sample], val_fraction: float = 0.2, seed: int = 0,
                  classes: list[str] | None = None) -> tuple[list[Sample], list[Sample]]:
    """Seeded stratified split into ``(train, val)``: ``val_fraction`` of each class (rounded half up, at least
    one; none for 0) to validation, each class shuffled by its own generator seeded with ``(seed, class)``, so
    the result depends only on the seed and the file names. :class:`DatasetError` names a class (by
    ``classes``) that would be left without a training or a validation image."""
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction (--val-fraction) must be at least 0 and below 1, got {val_fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in samples:
        by_class[label].append(path)
    train, val = [], []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        random.Random(f"{seed}-{label}").shuffle(paths)
        n_val = _val_count(len(paths), val_fraction)
        if n_val >= len(paths):
            name = repr(classes[label]) if classes else f"{label} ({os.path.dirname(paths[0])})"
            need = next(n for n in itertools.count(2) if _val_count(n, val_fraction) < n)
            raise DatasetError(
                f"class {name} has {len(paths)} image(s), too few to give it both a training and a validation "
                f"image with a validation fraction of {val_fraction}: add images to that class (at least "
                f"{need} in all){' or lower --val-fraction' if len(paths) > 1 else ''}")
        val += [(p, label) for p in paths[:n_val]]
        train += [(p, label) for p in paths[n_val:]]
    return train, val


def save_class_indices(path: str | Path, classes: list[str]) -> None:
    """Write ``class_indices.json``: ``{"0": "daisy", "1": "rose", ...}`` (string keys, like ``id2label``)."""
    Path(path).write_text(json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2))


def write_split(path: str | Path, train: list[Sample], val: list[Sample], classes: list[str],
                root: str | Path) -> None:
    """Record the split as JSON (``split.json``): ``root`` by its folder name only (the file is published with
    the model), ``classes``, per-class counts, and ``train`` / ``val`` as ``[path relative to root, class]``."""
    def rel(samples: list[Sample]) -> list[list]:
        return [[Path(os.path.relpath(p, root)).as_posix(), label] for p, label in samples]

    def counts(samples: list[Sample]) -> dict[str, int]:
        seen = Counter(label for _, label in samples)
        return {name: seen[i] for i, name in enumerate(classes)}

    head = json.dumps({"root": Path(os.path.abspath(root)).name, "classes": list(classes),
                       "counts": {"train": counts(train), "val": counts(val)}}, indent=1)[:-2]
    rows = {key: ",\n".join(f"  {json.dumps(row)}" for row in rel(part)) for key, part in (("train", train), ("val", val))}
    # one [path, label] pair per line: readable and diff-able for thousands of images
    Path(path).write_text(f'{head},\n "train": [\n{rows["train"]}\n ],\n "val": [\n{rows["val"]}\n ]\n}}\n')


def read_split(path: str | Path, root: str | Path | None = None) -> tuple[list[Sample], list[Sample], list[str]]:
    """``(train, val, classes)`` from a :func:`write_split` record, paths joined to ``root`` (default:
    the root it was written with), e.g. to resume a run on exactly the same images."""
    record = json.loads(Path(path).read_text())
    base = Path(root if root is not None else record["root"])
    train, val = ([(str(base / p), label) for p, label in record[key]] for key in ("train", "val"))
    return train, val, record["classes"]


# Decoded pixels that check_images lets its threads hold at once: one 200 MP image (4 bytes a pixel) at a
# time, or ten 25 MP photos.
CHECK_MEMORY_BUDGET = 1 << 30


class _MemoryBudget:
    """Lets a job start only while the bytes reserved by the running ones, summed, fit in ``total``."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.total)  # a job larger than the whole budget waits until it runs alone
        with self._changed:
            self._changed.wait_for(lambda: self.free >= nbytes)
            self.free -= nbytes
        try:
            yield
        finally:
            with self._changed:
                self.free += nbytes
                self._changed.notify_all()


def _load_problem(path: str | bytes | None, budget: _MemoryBudget) -> str | None:
    """Why ``path`` (or an encoded image's bytes) cannot be used, or ``None`` when it decodes fully."""
    if path is None:  # a dataset row without an image
        return "the row has no image"
    try:
        with budget.reserve(image_pixels(path) * BYTES_PER_PIXEL):
            verify_image(path)
    except ImageLoadError as err:
        return err.reason
    return None


def check_images(samples: list[Sample], num_workers: int | None = None, memory_budget: int = CHECK_MEMORY_BUDGET,
                 source: Callable = str, name: Callable = str) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every image once (:func:`effnetv2.images.verify_image`: fails exactly where ``open_image`` would).

    Up to ``num_workers`` threads (default: twice the CPU count, at most 16) decode at once, as many as fit in
    ``memory_budget`` bytes at 4 bytes a pixel (one always runs). A sample's image is ``source(key)`` (a path,
    an encoded image's bytes, or None: no image), named ``name(key)`` in the report.
    Returns ``(good, bad)``: the readable samples in their order, and ``(name, reason)`` for the others.
    """
    workers = num_workers if num_workers and num_workers > 0 else min(16, 2 * (os.cpu_count() or 1))
    load_problem = partial(_load_problem, budget=_MemoryBudget(memory_budget))
    good, bad = [], []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(samples), 256):  # a chunk of (encoded) images in memory at a time
            chunk = samples[start:start + 256]
            for sample, problem in zip(chunk, pool.map(load_problem, [source(key) for key, _ in chunk])):
                if problem is None:
                    good.append(sample)
                else:
                    bad.append((name(sample[0]), problem))
    return good, bad


def report_bad_files(bad: list[tuple[str, str]]) -> None:
    """Emit one ``UserWarning`` listing every skipped file with its reason (nothing when ``bad`` is empty)."""
    if bad:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        warnings.warn(f"skipping {len(bad)} unreadable image file(s); fix or delete them to use them:\n{lines}",
                      stacklevel=2)


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs for ``samples`` (``[(path, class_index), ...]``, or any key ``read`` opens as an
    RGB image or fails with ``ImageLoadError``, e.g. a Hub dataset's row index).

    ``image`` is ``transform(pil_rgb_image)``, or a float tensor ``[3, H, W]`` in 0..1 without a transform.
    A file that fails at read time is recorded in ``bad_files`` (path → reason; per ``DataLoader`` worker),
    warned about once, and replaced by the next readable image of its class, the same for the same index.
    """

    def __init__(self, samples: list[Sample], classes: list[str], transform: Callable | None = None,
                 read: Callable = open_image):
        if not samples:
            raise DatasetError("no images to load: the sample list is empty")
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform, self.read = transform, read
        self.bad_files: dict[str, str] = {}
        self._by_class: dict[int, list[int]] = defaultdict(list)
        self._rank: list[int] = []  # position of each sample within its class list
        for i, (_, label) in enumerate(self.samples):
            self._rank.append(len(self._by_class[label]))
            self._by_class[label].append(i)

    def set_transform(self, transform: Callable | None) -> None:
        """Use ``transform`` from now on (e.g. a new image size at a progressive-learning stage)."""
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.samples[index][1]
        same_class, start = self._by_class[label], self._rank[index]
        for step in range(len(same_class)):
            path = self.samples[same_class[(start + step) % len(same_class)]][0]
            if path in self.bad_files:
                continue
            try:
                image = self.read(path)
            except ImageLoadError as err:
                self.bad_files[path] = err.reason
                warnings.warn(f"skipping unreadable image {err}; using another image of its class instead",
                              stacklevel=2)
                continue
            return (self.transform or to_tensor)(image), label
        raise DatasetError(f"no readable image left in class {self.classes[label]!r}: all its files failed "
                           f"to load (see the warnings above); check that the data folder is still there")

    @property
    def targets(self) -> list[int]:
        """The class index of every sample, in order (as torchvision's ``ImageFolder``)."""
        return [label for _, label in self.samples]
