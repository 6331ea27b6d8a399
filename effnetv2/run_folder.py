"""A train.py run's folder: output-folder check, epoch checkpoints, data fingerprint, final model and metrics,
written atomically. Not Accelerate's ``automatic_checkpoint_naming``: it prunes every run's, ours only this run's.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_state_dict, weights_fingerprint
from .errors import UsageError
from .model import EfficientNetV2
from .viz import confusion_matrix_png

CHECKPOINT_PREFIX = "epoch_"
RUN_MARKERS = ("checkpoints", "metrics.json", "split.json")  # what every train.py run folder holds
# a checkpoint resumes only with these train.py settings (and the same data)
RESUME_MUST_MATCH = ("variant", "weights", "pool", "batch_size", "grad_accum", "optimizer", "lr", "lrf", "epochs",
                     "seed", "val_fraction", "ema", "ema_decay", "progressive", "stages")
# torch.save reports a full disk as a RuntimeError ("file write failed"), safetensors as a SafetensorError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class RunError(Exception):
    """A run that cannot start or go on: one line for the user (no traceback) and the exit ``status``."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints ``folder/epoch_N`` (written atomically by train.py), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def prune_checkpoints(folder: str | Path, run_id: str, keep: int) -> list[Path]:
    """Delete run ``run_id``'s checkpoints in ``folder`` but its newest ``keep`` (at least one); returns them."""
    own = [p for p in list_checkpoints(folder)
           if json.loads((p / "train_state.json").read_text()).get("run_id") == run_id]
    doomed = own[:-max(1, keep)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def find_resume_checkpoint(resume: str, folder: str | Path, settings: dict, data: dict) -> tuple[Path, dict]:
    """The checkpoint ``--resume`` names (a path, or ``"latest"`` in ``folder``) and its ``train_state.json``;
    RunError when there is none or it was made with other settings (:data:`RESUME_MUST_MATCH`) or data."""
    found = list_checkpoints(folder)
    path = (found[-1] if found else None) if resume == "latest" else Path(resume)
    if path is None or not (path / "train_state.json").is_file():
        where = f"in {folder}" if path is None else f"at {path}"
        raise RunError(f"--resume {resume}: no complete checkpoint {where}; start without --resume")
    state = json.loads((path / "train_state.json").read_text())
    changed = [f"--{k.replace('_', '-')} ({state['args'].get(k)} vs {settings.get(k)})"
               for k in RESUME_MUST_MATCH if state["args"].get(k) != settings.get(k)]
    mismatches = changed + data_changes(state.get("data"), data)
    if mismatches:
        raise RunError(f"--resume {path}: the checkpoint was made with different " + ", ".join(mismatches)
                       + "; resume with the original settings and data, or start a new run (--overwrite, or "
                         "another --output-dir)")
    return path, state


def load_checkpoint(accelerator, folder: str | Path, train_state: dict, scheduler, ema=None) -> None:
    """Restore :func:`save_checkpoint`'s ``folder`` (``accelerator.load_state``, after ``prepare``), schedule, EMA."""
    accelerator.load_state(str(folder))
    scheduler.load_state_dict(train_state["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(read_state_dict(Path(folder) / "ema.safetensors"))
        ema.n_averaged.fill_(train_state["ema"]["n_averaged"])


class OutputDirError(UsageError):
    """``--output-dir`` cannot take this run; the message says why and what to do."""


def check_output_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """:class:`OutputDirError` unless ``path`` is (or can be) a writable folder that is new, empty (hidden entries
    aside), this run's (``resume``) or a run folder to clear (``overwrite``); writes nothing."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise OutputDirError(f"--output-dir {path} is a file: give a folder (it is created if missing)" if existing == path
                             else f"--output-dir {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output-dir {path} is not writable ({existing} is read-only for this user): "
                             f"choose a folder you can write to")
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
    if not entries or resume:
        return
    listing = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    if not any((path / name).exists() for name in RUN_MARKERS):
        raise OutputDirError(f"--output-dir {path} is not empty ({listing}) and holds no train.py run: choose a new "
                             f"or empty folder")
    if not overwrite:
        resume_hint = "continue it with --resume latest, " if list_checkpoints(path / "checkpoints") else ""
        raise OutputDirError(f"--output-dir {path} already holds a run ({listing}): {resume_hint}replace it with "
                             f"--overwrite (deletes everything in it), or choose another --output-dir")


def start_output_dir(out: Path, data, overwrite: bool) -> None:
    """Create ``out`` (emptied, not deleted, with ``overwrite``) and write ``data``'s classes and split into it."""
    if overwrite and out.is_dir():
        for entry in out.iterdir():
            _remove(entry)
    out.mkdir(parents=True, exist_ok=True)
    data.save(out)


def data_fingerprint(root: str | Path, train: list[tuple[str, int]], val: list[tuple[str, int]]) -> dict:
    """What a run trains on, for the resume check: the data folder (absolute), the image counts, and a
    SHA-256 over every image's part (train/val), path relative to ``root``, class index and size."""
    digest = hashlib.sha256()
    for part, samples in (("train", train), ("val", val)):
        for path, label in samples:
            rel = Path(os.path.relpath(path, root)).as_posix()
            digest.update(f"{part}\0{rel}\0{label}\0{os.path.getsize(path)}\n".encode())
    return {"path": str(Path(root).resolve()), "train_images": len(train), "val_images": len(val),
            "sha256": digest.hexdigest()}


def data_changes(saved: dict | None, current: dict) -> list[str]:
    """How :func:`data_fingerprint` ``current`` differs from ``saved``: ``["what (checkpoint vs now)", ...]``."""
    if not saved:
        return ["data (the checkpoint records none: it was written by an older train.py)"]
    changes = [f"{what} ({saved.get(key)} vs {current.get(key)})" for key, what in
               (("path", "--data-path"), ("dataset", "--dataset"), ("config", "--dataset-config"),
                ("revision", "the dataset's revision")) if saved.get(key) != current.get(key)]
    counts = [f"{what} ({saved[key]} vs {current[key]})" for key, what in
              (("train_images", "training images"), ("val_images", "validation images")) if saved[key] != current[key]]
    if saved["sha256"] != current["sha256"] and not counts:
        counts = [f"image files (same counts, other names, classes or sizes: fingerprint {saved['sha256'][:12]} vs "
                  f"{current['sha256'][:12]})"]
    return changes + counts


class WriteError(OSError):
    """A file of the run could not be written (a full disk: the message says how much space it needs)."""


def _megabytes(size: int | None) -> str:
    return "an unknown amount" if size is None else f"{size / 2**20:.1f} MB"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def tensor_bytes(*objects) -> int:
    """Bytes of every tensor in ``objects`` (state dicts, nested dicts, lists and tuples)."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            total += tensor_bytes(*obj.values())
        elif isinstance(obj, (list, tuple)):
            total += tensor_bytes(*obj)
    return total


def _write_error(path: Path, err: BaseException, needed: int) -> WriteError:
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except OSError:
        free = None
    text = str(err)
    if (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
            or "StorageFull" in text or (free is not None and free < needed)):
        return WriteError(f"no space left on the device for {path}: it needs about {_megabytes(needed)} and "
                          f"{_megabytes(free)} are free there")
    return WriteError(f"could not write {path} ({type(err).__name__}: {text.splitlines()[0] if text else ''})")


@contextmanager
def _writing(tmp: Path, target: Path, needed: int) -> Iterator[None]:
    """Start from no ``tmp``; when the block fails, delete it (write failures: a WriteError naming ``target``)."""
    _remove(tmp)
    try:
        yield
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, WRITE_ERRORS) and not isinstance(err, WriteError):
            raise _write_error(target, err, needed) from None
        raise


@contextmanager
def atomic_path(path: str | Path, needed: int = 0) -> Iterator[Path]:
    """Write the file or folder ``path`` through a temporary sibling (``.tmp_<name>``, yielded), renamed
    over ``path`` when the block succeeds and deleted when it fails (a :class:`WriteError`)."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")
    with _writing(tmp, path, needed):
        yield tmp
        if path.is_dir():  # os.replace cannot replace a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)


def save_checkpoint(accelerator, folder: str | Path, train_state: dict, model: nn.Module,
                    optimizer: torch.optim.Optimizer, ema=None) -> None:
    """Write ``accelerator.save_state``, ``ema.safetensors`` and ``train_state.json`` into ``folder``, atomically.
    Every process calls it; only the main one writes (the others send their files); a failure on any process is
    a :class:`WriteError` on all of them."""
    from accelerate.utils import gather_object  # the [train] extra: importing this module needs no Accelerate

    folder = Path(folder)
    tmp = folder.with_name(f".tmp_{folder.name}")
    main = accelerator.is_main_process
    if main:
        _remove(tmp)
    accelerator.wait_for_everyone()
    error, files = None, {}
    with tempfile.TemporaryDirectory(prefix="effnetv2-state-") as own:
        try:
            accelerator.save_state(str(tmp if main else own))
            files = {} if main else {p.name: p.read_bytes() for p in Path(own).iterdir()}
        except WRITE_ERRORS as err:
            error = err
    sent = gather_object([files])  # every process takes part, failed or not
    try:
        if main and error is None:
            for name, data in ((n, d) for part in sent for n, d in part.items()):
                (tmp / name).write_bytes(data)
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / "ema.safetensors"))
                train_state = {**train_state, "ema": {"n_averaged": int(ema.n_averaged)}}
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
    except WRITE_ERRORS as err:
        error = err
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
    if failed.item():
        accelerator.wait_for_everyone()  # no process is still writing into tmp
        if main:
            _remove(tmp)
        needed = tensor_bytes(model.state_dict(), optimizer.state_dict(), ema.module.state_dict() if ema else {})
        if error is None:
            raise WriteError(f"could not write {folder} (another process could not write its part)")
        raise _write_error(folder, error, needed) from None
    if main:
        if folder.is_dir():  # this epoch again (a resumed run): the new checkpoint replaces it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def save_model(model: EfficientNetV2, folder: str | Path, model_card_kwargs: dict) -> None:
    """``model.save_pretrained(folder, model_card_kwargs=...)`` through a temporary folder, each file then
    renamed over the old one: a write failure leaves the previous files and raises :class:`WriteError`."""
    folder = Path(folder)
    tmp = folder / ".tmp_model"
    with _writing(tmp, folder, tensor_bytes(model.state_dict())):
        model.save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
        for file in sorted(tmp.iterdir()):
            os.replace(file, folder / file.name)
        tmp.rmdir()


def check_finite(train_loss: float, epoch: int, lr: float, optimizer: str, checkpoints: Path) -> None:
    """RunError (status 1) when epoch ``epoch``'s (1-based) training loss is NaN or infinite."""
    if not math.isfinite(train_loss):
        last = list_checkpoints(checkpoints)
        raise RunError(f"training diverged in epoch {epoch}: the training loss became {train_loss} "
                       f"(peak lr {lr:g}, {optimizer}). Nothing of this epoch was saved"
                       + (f"; the last checkpoint written is {last[-1]}" if last else "")
                       + ". Run again with a lower --lr or with --clip-grad 1.0.", status=1)


def save_epoch(accelerator, out: Path, train_state: dict, model, optimizer, ema, keep: int, classes: list[str]) -> None:
    """Checkpoint the epoch, keep this run's newest ``keep`` and rewrite metrics.json; RunError (status 1)."""
    checkpoints, epoch = out / "checkpoints", train_state["epoch"]
    try:
        save_checkpoint(accelerator, checkpoints / f"epoch_{epoch}", train_state, model, optimizer, ema)
        if accelerator.is_main_process:
            prune_checkpoints(checkpoints, train_state["run_id"], keep)
            with atomic_path(out / "metrics.json") as tmp:
                tmp.write_text(json.dumps({"history": train_state["history"], "classes": classes}, indent=1))
    except WriteError as err:
        last = list_checkpoints(checkpoints)
        raise RunError(f"{err}. Nothing of epoch {epoch} was saved"
                       + (f"; the last checkpoint, {last[-1]}, is intact" if last else "")
                       + ". Free some space, then continue with --resume latest.", status=1) from None


def save_run(model: EfficientNetV2, out: Path, card: dict, summary: dict, cm: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> None:
    """The Hub-ready model folder (weights in ``dtype``), metrics.json and confusion_matrix.png, each atomically;
    a failed write is a RunError (status 1)."""
    model = model.to("cpu", dtype).to(memory_format=torch.contiguous_format).eval()
    model.head.dropout.p = model.dropout_rate  # progressive learning set the last stage's dropout on the module
    try:
        save_model(model, out, card)
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        accuracy = summary["final"]["val_accuracy"]
        png = confusion_matrix_png(cm, summary["classes"], f"validation accuracy {accuracy:.3f}")
        with atomic_path(out / "confusion_matrix.png") as tmp:
            tmp.write_bytes(png)
    except WriteError as err:
        raise RunError(f"{err}. The files already in {out} are unchanged. Free some space, then run the same "
                       f"command with --resume latest to evaluate and save the last checkpoint again.",
                       status=1) from None


def replica_fingerprints(model: nn.Module, accelerator) -> list[str]:
    """Every process's :func:`weights_fingerprint` of ``model``; each also prints its own (every machine's log)."""
    from accelerate.utils import gather_object

    fingerprint = weights_fingerprint(model)
    if accelerator.num_processes > 1:
        print(f"process {accelerator.process_index} of {accelerator.num_processes}: final weights fingerprint "
              f"{fingerprint}", flush=True)
    return gather_object([fingerprint])
