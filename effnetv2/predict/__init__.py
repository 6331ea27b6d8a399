"""Batch prediction over image files and folders, on this machine or on a Ray cluster.

    python -m effnetv2.predict --model SOURCE PATH... [--output preds.jsonl|preds.csv|preds.parquet]
    python -m effnetv2.predict --engine ray [--address auto|HOST:PORT|ray://HOST:PORT] ...

Every input is one row, in input order (folders searched recursively, sorted by path): its top-k, or the error
that kept it from the model; what a folder holds that cannot be searched or read is a row after the files.
``.jsonl`` and ``.parquet`` hold a record per file (``path``, ``predictions`` [{``label``, ``probability``}],
``error``), ``.csv`` a row per (file, rank): ``path, rank, label, probability, error``. The output is written
to a hidden file beside it (``.NAME.PID.tmp``) that replaces it in one rename once every row is written.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import stat
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from PIL import Image

from ..data import is_image_file
from ..images import ImageLoadError, open_image
from ..inference import Predictor, import_optional

OUTPUT_FORMATS = (".jsonl", ".csv", ".parquet")
PARQUET_INSTALL = "pip install pyarrow, or 'effnetv2[scale]'"
_PARQUET_ROWS = 4096  # rows per Parquet row group: streamed out, never the whole run in memory


class Prediction(NamedTuple):
    """One input file: its ``top`` ``(label, probability)`` pairs, best first, or the ``error``
    (in words) that kept it from the model, with ``top`` empty."""

    path: str
    top: list[tuple[str, float]]
    error: str | None = None


# What a path that is neither a file nor a folder is, in words, by its file type
_SPECIAL_FILES = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}


def _link_problem(path: Path, err: OSError) -> str:
    """Why ``path`` could not be followed, ``err`` being what ``stat`` raised."""
    if path.is_symlink():
        if err.errno == errno.ELOOP:
            return "symbolic link loop: it never reaches a file or folder"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"broken symbolic link: its target {os.readlink(path)} does not exist"
    return f"could not be read ({err.strerror or err})"


def _visit(path: Path, ancestors: frozenset[tuple[int, int]], files: list[str], problems: list[tuple[str, str]],
           given: bool = False) -> None:
    """Add the image files at or under ``path`` to ``files`` (``given``: named by the user, kept whatever its
    name) and what cannot be searched or read to ``problems``; ``ancestors``: the (device, inode) of the
    folders above, where a link loop would lead. Only folders are opened, so a FIFO never blocks."""
    try:
        info = path.stat()
    except OSError as err:  # in a folder, a name without a suffix may have been a link to a folder
        if given or is_image_file(path) or (not path.suffix and not path.name.startswith(".")):
            missing = given and not os.path.lexists(path)
            problems.append((str(path), "no such file or folder" if missing else _link_problem(path, err)))
        return
    if stat.S_ISDIR(info.st_mode):
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            problems.append((str(path), "symbolic link loop: it leads back to a folder above it, not searched again"))
            return
        try:
            with os.scandir(path) as entries:
                names = [entry.name for entry in entries]
        except OSError as err:
            problems.append((str(path), f"folder could not be listed ({err.strerror or err}): its images were not "
                                        f"searched"))
            return
        for name in names:
            _visit(path / name, ancestors | {key}, files, problems)
    elif given or is_image_file(path):
        if stat.S_ISREG(info.st_mode):
            files.append(str(path))
        else:
            kind = _SPECIAL_FILES.get(stat.S_IFMT(info.st_mode), "not a regular file")
            problems.append((str(path), f"{kind}, not an image file: not read"))


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """``(files, problems)``: files as given (any extension) and the images of folders (recursively, sorted,
    following links), and ``(path, reason)`` for each input or folder entry that cannot be read as an image
    (missing, unlistable, a broken link or loop, a FIFO, socket or device)."""
    files, problems = [], []
    for path in map(Path, paths):
        found, inside = [], []
        _visit(path, frozenset(), found, inside, given=True)
        files += sorted(found)
        problems += sorted(inside)
    return files, problems


def load_input(transform: Callable[[Image.Image], torch.Tensor], path: str) -> torch.Tensor | str:
    """``transform(open_image(path))`` (the model's input ``[3, S, S]``), or the reason it could not be made."""
    try:
        return transform(open_image(path))
    except ImageLoadError as err:
        return err.reason
    except (OSError, ValueError, RuntimeError) as err:  # e.g. a decoder failing inside the transform
        return f"{type(err).__name__}: {err}"


def _decoded(predictor: Predictor, files: list[str], pool: ThreadPoolExecutor,
             ahead: int) -> Iterator[tuple[str, torch.Tensor | str]]:
    """``(path, tensor or reason)`` in input order, decoding at most ``ahead`` files in advance."""
    pending: deque[tuple[str, Future]] = deque()
    for path in files:
        pending.append((path, pool.submit(load_input, predictor.transform, path)))
        if len(pending) >= ahead:
            first, future = pending.popleft()
            yield first, future.result()
    while pending:
        first, future = pending.popleft()
        yield first, future.result()


def predict_batch(predictor: Predictor, decoded: list[tuple[str, torch.Tensor | str]],
                  top_k: int) -> list[Prediction]:
    """The rows of ``(path, input [3, S, S] or why it could not be read)``, in order, from one forward."""
    inputs = [item for _, item in decoded if not isinstance(item, str)]
    tops = iter(predictor.topk(predictor(torch.stack(inputs)), top_k) if inputs else [])
    return [Prediction(path, [], item) if isinstance(item, str) else Prediction(path, next(tops))
            for path, item in decoded]


def predict_files(predictor: Predictor, files: list[str], top_k: int = 5, batch_size: int = 16,
                  workers: int = 4, progress: bool = True) -> Iterator[Prediction]:
    """One :class:`Prediction` per file of ``files``, in their order (a bad file has its ``error``), yielded as
    their batch is done. Decoding runs in ``workers`` threads ahead of the model."""
    from tqdm import tqdm

    pending: list[tuple[str, torch.Tensor | str]] = []  # decoded since the last forward
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress) as bar:
        for path, item in _decoded(predictor, files, pool, ahead=2 * batch_size + workers):
            pending.append((path, item))
            bar.update(1)
            if sum(isinstance(x, torch.Tensor) for _, x in pending) == batch_size:
                yield from predict_batch(predictor, pending, top_k)
                pending.clear()
        yield from predict_batch(predictor, pending, top_k)


def missing_rows(problems: list[tuple[str, str]]) -> list[Prediction]:
    """The ``problems`` of :func:`find_images` as rows with their reason."""
    return [Prediction(path, [], reason) for path, reason in problems]


def _records(rows: Iterable[Prediction]) -> Iterator[dict]:
    """``rows`` as the records of the .jsonl and .parquet files."""
    for row in rows:
        yield {"path": row.path, "predictions": [{"label": label, "probability": prob} for label, prob in row.top],
               "error": row.error}


def _write_parquet(rows: Iterable[Prediction], output: Path) -> None:
    pq = import_optional("pyarrow.parquet", "writing .parquet", PARQUET_INSTALL)
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()),
                        ("predictions", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))),
                        ("error", pa.string())])
    records = _records(rows)
    with pq.ParquetWriter(output, schema) as writer:
        while chunk := list(islice(records, _PARQUET_ROWS)):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


def check_output(output: str | os.PathLike) -> Path:
    """``output`` as a Path, once a file can be written there (missing folders created, no file left);
    ``ValueError`` naming it and saying what to do otherwise."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder: give a file name, e.g. {path / ('preds' + path.suffix)}")
    above = next((p for p in path.parents if os.path.lexists(p)), Path("."))
    if not above.is_dir():
        raise ValueError(f"--output {path} cannot be written: {above} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()  # the check that also covers ACLs and read-only mounts
    except OSError as err:
        raise ValueError(f"--output {path} cannot be written ({err.strerror or err} in {path.parent}): choose a "
                         f"folder you can write to") from None
    return path


def write_results(rows: Iterable[Prediction], output: str | os.PathLike | None) -> None:
    """A table on stdout (``output`` None), or a ``.jsonl``, ``.csv`` or ``.parquet`` file written as the
    ``rows`` stream in, which replaces ``output`` once it ends (``output`` is untouched if it fails)."""
    if output is None:
        rows = list(rows)
        width = max([len(row.path) for row in rows] + [5])
        for path, top, error in rows:
            shown = f"error: {error}" if error else "  ".join(f"{label} {prob:.3f}" for label, prob in top)
            print(f"{path:<{width}}  {shown}")
        return
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        if output.suffix.lower() == ".parquet":
            _write_parquet(rows, tmp)
        else:
            _write_text(rows, tmp, csv_format=output.suffix.lower() == ".csv")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(rows: Iterable[Prediction], path: Path, csv_format: bool) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        if csv_format:
            writer = csv.writer(f)
            writer.writerow(["path", "rank", "label", "probability", "error"])
            for name, top, error in rows:
                if error:
                    writer.writerow([name, "", "", "", error])
                writer.writerows([name, rank, label, f"{prob:.6f}", ""] for rank, (label, prob) in enumerate(top, 1))
        else:
            for record in _records(rows):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
