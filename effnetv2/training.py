"""Reusable pieces of ``train.py``: initial weights, freezing, mixup/cutmix, replicas, checkpoints, plots,
and the run's bookkeeping (its output folder, its identity and data, writes that never leave half a file)."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_state_dict
from .model import EfficientNetV2
from .sources import Source, load_model, parse_source

HEAD_PREFIX = "head."
# Parts a fine-tune may create afresh: the classifier always, the attention pool when the initial
# weights have none (e.g. ImageNet weights with average pooling, fine-tuned with --pool attention).
NEW_HEAD_KEYS = ("head.classifier.", "head.attn_pool.")
CHECKPOINT_PREFIX = "epoch_"
RUN_MARKERS = ("checkpoints", "metrics.json", "split.json")  # what every train.py run folder holds
PATH_FLAGS = ("--data-path", "--output-dir", "--weights", "--resume")  # flags that may name local paths
# torch.save reports a full disk as a RuntimeError ("file write failed"), safetensors as a SafetensorError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _state_model(state: dict[str, torch.Tensor], variant: str, path: Path, overrides: dict) -> EfficientNetV2:
    """An ``EfficientNetV2`` holding an effnetv2-layout state dict read from ``path``."""
    arch = {k: overrides[k] for k in ("pool", "num_heads", "attn_dim", "padding") if k in overrides}
    if "head.attn_pool.pos_embed" in state:  # the weights have an attention pool: keep it unless told otherwise
        arch.setdefault("pool", "attention")
        arch.setdefault("attn_dim", int(state["head.attn_pool.pos_embed"].shape[1]))
    classifier = state.get("head.classifier.weight")
    base = EfficientNetV2(variant, num_classes=int(classifier.shape[0]) if classifier is not None else 0, **arch)
    own = base.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(NEW_HEAD_KEYS)]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape and not k.startswith(NEW_HEAD_KEYS)]
    if missing or wrong:
        raise ValueError(f"{path} is not an EfficientNetV2-{variant} state dict (missing {missing[:3]}, wrong shape "
                         f"{wrong[:3]}): check --variant, or convert the file with `python -m effnetv2.convert`")
    base.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    return base


def load_initial_model(weights: str | Source, variant: str, overrides: dict) -> EfficientNetV2 | None:
    """The model ``weights`` names, before any change for the user's classes; None for "none".

    ``weights``: any source :func:`effnetv2.sources.parse_source` reads. A weights file is a
    torchvision EfficientNetV2 state dict (converted with ``effnetv2.convert.from_torchvision``) or
    an effnetv2 one for ``variant``, read with ``weights_only=True``; folders, Hub ids and
    ``torchvision:<variant>`` go to :func:`effnetv2.sources.load_model`.
    """
    source = parse_source(weights)
    if source.kind == "none":
        return None
    if source.kind == "weights":
        state = read_state_dict(source.path)
        if any(k.startswith("features.") for k in state):
            from .convert import from_torchvision

            return from_torchvision(state)
        return _state_model(state, variant, source.path, overrides)
    return load_model(source)


def build_model(weights: str | Source, variant: str, classes: list[str], **overrides) -> EfficientNetV2:
    """A model for ``classes`` initialised from ``weights`` (see :func:`load_initial_model`).

    The backbone (and an attention pool, when the weights have one and the new model keeps it) is
    loaded from the weights; the classifier is new, sized for ``classes``, which also become the
    labels. ``overrides`` (pool, num_heads, drop_path_rate, dropout, image_size, ...) replace the
    weights' config; with ``weights="none"`` the model is ``EfficientNetV2(variant, **overrides)``.
    The variant always comes from the weights when there are some.
    """
    id2label = dict(enumerate(classes))
    source = parse_source(weights)
    base = load_initial_model(source, variant, overrides)
    if base is None:
        return EfficientNetV2(variant, num_classes=len(classes), id2label=id2label, **overrides)
    config = {**base.config, **overrides, "num_classes": len(classes), "id2label": id2label, "label2id": None,
              "source": None}
    model = EfficientNetV2(**config)
    own = model.state_dict()
    state = {k: v for k, v in base.state_dict().items()
             if not k.startswith("head.classifier.") and k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in state and not k.startswith(NEW_HEAD_KEYS)]
    if missing:
        raise ValueError(f"weights {source.text!r} do not fit EfficientNetV2-{model.variant} with these options: "
                         f"missing or reshaped {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def freeze_backbone(model: EfficientNetV2) -> list[str]:
    """Train only the head (1x1 head conv + BN, attention pool, classifier): every other parameter
    gets ``requires_grad=False``. Returns the names of the trainable parameters."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEAD_PREFIX))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def backbone_batchnorm_eval(model: EfficientNetV2) -> None:
    """Put the backbone's BatchNorm layers in eval mode so their running statistics stay as they
    are (call after every ``model.train()``); the head's BatchNorm keeps training."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(HEAD_PREFIX):
            m.eval()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
              label_smoothing: float = 0.0, generator: torch.Generator | None = None):
    """Soft targets for a batch, with mixup (Beta(``mixup``, ``mixup``)) or CutMix (Beta(``cutmix``,
    ``cutmix``); chosen half the time when both are on) and label smoothing.

    ``x`` ``[B, 3, H, W]``, ``y`` ``[B]`` class indices → (images ``[B, 3, H, W]``, targets
    ``[B, num_classes]``, rows summing to 1). Alphas of 0 turn a method off.
    """
    off = label_smoothing / num_classes
    targets = F.one_hot(y, num_classes).float() * (1 - label_smoothing) + off
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand((), generator=generator).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    if use_cutmix:
        height, width = x.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy = int(torch.randint(0, height, (), generator=generator))
        cx = int(torch.randint(0, width, (), generator=generator))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually kept
    else:
        x = x * lam + x[perm] * (1 - lam)
    return x, targets * lam + targets[perm] * (1 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[B, C]`` against soft targets ``[B, C]`` (mixup, smoothing)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, prefix: str = "") -> int:
    """Precise BatchNorm: replace the running statistics of the BatchNorm layers whose names start
    with ``prefix`` by their exact average over ``batches`` (an iterable of ``[B, 3, H, W]`` tensors),
    computed with the current weights. Returns the number of batches used.

    Running statistics are an exponential average (momentum 0.1) over past weights; early in training
    from scratch they lag far behind (the first steps even start from mean 0 / var 1), and an EMA of
    the weights never matches the statistics it copies. Only BatchNorm runs in training mode here:
    dropout and drop-path stay off, so no random numbers are drawn.
    """
    layers = [m for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and name.startswith(prefix)]
    if not layers:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    count = 0
    for x in batches:
        if len(x) < 2 and count:  # a lone image gives no batch statistics at a 1x1 grid: skip a last one
            continue
        model(x)
        count += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)
    return count


@torch.no_grad()
def average_buffers(model: nn.Module, accelerator) -> None:
    """Average the floating-point buffers (BatchNorm running mean/var) over all processes.

    Under DDP the parameters stay identical on every process, but each process updates BatchNorm
    statistics from its own shard; averaging them makes every replica, and the saved model, the same.
    """
    if accelerator.num_processes == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = accelerator.reduce(torch.cat([b.reshape(-1).float() for b in buffers]), "mean")
    for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(value.view_as(b))


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints ``folder/epoch_N`` (written atomically by train.py), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def checkpoint_run_id(checkpoint: str | Path) -> str | None:
    """The run id stored in a checkpoint's ``train_state.json`` (None for checkpoints without one)."""
    return json.loads((Path(checkpoint) / "train_state.json").read_text()).get("run_id")


def prune_checkpoints(folder: str | Path, run_id: str, keep: int) -> list[Path]:
    """Delete run ``run_id``'s checkpoints in ``folder`` but its newest ``keep`` (at least one); the
    checkpoints of any other run are never touched. Returns the deleted folders."""
    own = [p for p in list_checkpoints(folder) if checkpoint_run_id(p) == run_id]
    doomed = own[:-max(1, keep)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


class OutputDirError(ValueError):
    """``--output-dir`` cannot take this run; ``reason`` says why and what to do."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"--output-dir {path} {reason}")
        self.path, self.reason = path, reason


def check_output_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`OutputDirError` unless a train.py run may write into ``path``; writes nothing.

    ``path`` must be a folder, or not exist yet, in a place this user can write to. A folder that
    already holds something (hidden entries aside) is taken only when ``resume`` (the same run goes
    on; the checkpoint's own check follows) or when ``overwrite`` and it is a train.py run folder
    (:func:`clear_output_dir` empties it): another run's model, card or checkpoints are never mixed
    into this one, and a folder of other files is never deleted.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(path, "is a file: give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise OutputDirError(path, f"cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(path, f"is not writable ({existing} is read-only for this user): choose a folder you "
                                   f"can write to")
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
    if not entries or resume:
        return
    listing = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    if not any((path / name).exists() for name in RUN_MARKERS):
        raise OutputDirError(path, f"is not empty ({listing}) and holds no train.py run: choose a new or empty folder")
    if not overwrite:
        resume_hint = "continue it with --resume latest, " if list_checkpoints(path / "checkpoints") else ""
        raise OutputDirError(path, f"already holds a run ({listing}): {resume_hint}replace it with --overwrite "
                                   f"(deletes everything in it), or choose another --output-dir")


def clear_output_dir(path: str | Path) -> None:
    """Delete everything inside ``path`` (kept itself, with its permissions), for ``--overwrite``."""
    path = Path(path)
    if path.is_dir():
        for entry in path.iterdir():
            _remove(entry)


def data_fingerprint(root: str | Path, train: list[tuple[str, int]], val: list[tuple[str, int]]) -> dict:
    """What a run trains on, recorded in its checkpoints for the resume check: the data folder
    (absolute), the image counts, and a SHA-256 over every image's part (train/val), path relative to
    ``root``, class index and size in bytes."""
    digest = hashlib.sha256()
    for part, samples in (("train", train), ("val", val)):
        for path, label in samples:
            rel = Path(os.path.relpath(path, root)).as_posix()
            digest.update(f"{part}\0{rel}\0{label}\0{os.path.getsize(path)}\n".encode())
    return {"path": str(Path(root).resolve()), "train_images": len(train), "val_images": len(val),
            "sha256": digest.hexdigest()}


def data_changes(saved: dict | None, current: dict) -> list[str]:
    """How the data of :func:`data_fingerprint` record ``current`` differs from ``saved``, in words
    (``"what (checkpoint vs now)"``); empty when it is the same data."""
    if not saved:
        return ["data (the checkpoint records none: it was written by an older train.py)"]
    changes = [f"--data-path ({saved['path']} vs {current['path']})"] if saved["path"] != current["path"] else []
    counts = [f"{what} ({saved[key]} vs {current[key]})" for key, what in
              (("train_images", "training images"), ("val_images", "validation images")) if saved[key] != current[key]]
    if saved["sha256"] != current["sha256"] and not counts:
        counts = [f"image files (same counts, other names, classes or sizes: fingerprint {saved['sha256'][:12]} vs "
                  f"{current['sha256'][:12]})"]
    return changes + counts


def resume_mismatches(state: dict, args: dict, keys: tuple[str, ...], data: dict) -> list[str]:
    """Why the checkpoint whose ``train_state.json`` is ``state`` cannot go on with the settings
    ``args`` (only ``keys`` are compared) and the data ``data`` (:func:`data_fingerprint`), in words."""
    changed = [f"--{k.replace('_', '-')} ({state['args'].get(k)} vs {args.get(k)})"
               for k in keys if state["args"].get(k) != args.get(k)]
    return changed + data_changes(state.get("data"), data)


def public_argv(argv: list[str]) -> list[str]:
    """``argv`` fit to publish (the model card's command): a local path given to one of
    :data:`PATH_FLAGS` (or an abbreviation) that is absolute, starts with ``~`` or climbs out with
    ``..`` is shown by its last name (``/home/me/flowers`` → ``flowers``); relative paths, Hub ids,
    ``torchvision:s`` and ``latest`` stay as given."""
    def is_path_flag(arg: str) -> bool:
        return len(arg) > 2 and arg.startswith("--") and any(flag.startswith(arg) for flag in PATH_FLAGS)

    shown, takes_path = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if takes_path:
            shown.append(_public_path(arg))
        elif eq and is_path_flag(flag):
            shown.append(f"{flag}={_public_path(value)}")
        else:
            shown.append(arg)
        takes_path = not eq and is_path_flag(arg)
    return shown


def _public_path(value: str) -> str:
    if os.path.isabs(value) or value.startswith("~") or ".." in Path(value).parts:
        return Path(os.path.abspath(os.path.expanduser(value))).name or value
    return value


class WriteError(OSError):
    """A file of the run could not be written, most often because the disk is full. ``path`` is what
    was being written, ``needed`` the bytes it takes, ``free`` those left there (None: unknown)."""

    def __init__(self, path: Path, reason: str, needed: int, free: int | None, out_of_space: bool):
        self.path, self.reason, self.needed, self.free, self.out_of_space = path, reason, needed, free, out_of_space
        if out_of_space:
            super().__init__(f"no space left on the device for {path}: it needs about {_megabytes(needed)} and "
                             f"{_megabytes(free)} are free there")
        else:
            super().__init__(f"could not write {path} ({reason})")


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
    """``err``, raised while writing ``path`` (its temporary files already deleted), as a WriteError."""
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except OSError:
        free = None
    text = str(err)
    out_of_space = (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
                    or "StorageFull" in text or (free is not None and free < needed))
    return WriteError(path, f"{type(err).__name__}: {text.splitlines()[0] if text else ''}", needed, free, out_of_space)


@contextmanager
def _writing(tmp: Path, target: Path, needed: int) -> Iterator[None]:
    """Start from no ``tmp``; when the block fails, delete ``tmp`` and raise write failures as
    :class:`WriteError` naming ``target``."""
    _remove(tmp)
    try:
        yield
    except WriteError:
        _remove(tmp)
        raise
    except WRITE_ERRORS as err:
        _remove(tmp)
        raise _write_error(target, err, needed) from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_path(path: str | Path, needed: int = 0) -> Iterator[Path]:
    """Write the file or folder ``path`` through a temporary sibling (``.tmp_<name>``, yielded): it
    replaces ``path`` in one rename when the block succeeds, and is deleted when it fails, so ``path``
    keeps its previous content. Write failures raise :class:`WriteError` (``needed``: the bytes the
    write takes, for its message)."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")
    with _writing(tmp, path, needed):
        yield tmp
        if path.is_dir():  # os.replace cannot replace a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)


def save_checkpoint(accelerator, folder: str | Path, train_state: dict, model: nn.Module,
                    optimizer: torch.optim.Optimizer, ema=None) -> None:
    """Write the checkpoint ``folder`` (``checkpoints/epoch_N``): ``accelerator.save_state`` (model,
    optimizer, every process's random state, sampler), the EMA weights (``ema.safetensors``, its
    settings in ``train_state``) and ``train_state.json``.

    Atomic: everything goes into ``.tmp_epoch_N``, renamed to ``epoch_N`` once complete, so a kill or
    a full disk leaves the earlier checkpoints as they were. Every process calls it; a failure on any
    raises :class:`WriteError` on all of them, naming ``folder``. ``model`` and ``optimizer`` size
    the message.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp_{folder.name}")
    if accelerator.is_main_process:
        _remove(tmp)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / "ema.safetensors"))
                train_state = {**train_state, "ema": {k: v for k, v in ema.state_dict().items() if k != "module"}}
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
    except WRITE_ERRORS as err:
        error = err
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
    if failed.item():
        accelerator.wait_for_everyone()  # no process is still writing into tmp
        if accelerator.is_main_process:
            _remove(tmp)
        needed = tensor_bytes(model.state_dict(), optimizer.state_dict(), ema.module.state_dict() if ema else {})
        if error is None:
            raise WriteError(folder, "another process could not write its part", needed, None, False)
        raise _write_error(folder, error, needed) from None
    if accelerator.is_main_process:
        if folder.is_dir():  # this epoch again (a resumed run): the new checkpoint replaces it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def save_model(model: EfficientNetV2, folder: str | Path, model_card_kwargs: dict) -> None:
    """``model.save_pretrained(folder, model_card_kwargs=...)`` that never leaves a half-written model:
    config.json, model.safetensors and README.md are written into a temporary folder, then each moved
    over the old file in one rename. On a write failure the previous files stay as they were and
    :class:`WriteError` names ``folder``."""
    folder = Path(folder)
    tmp = folder / ".tmp_model"
    with _writing(tmp, folder, tensor_bytes(model.state_dict())):
        model.save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
        for file in sorted(tmp.iterdir()):
            os.replace(file, folder / file.name)
        tmp.rmdir()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts from predictions and labels ``[N]``: row = true class, column = predicted."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix: torch.Tensor, classes: list[str], path: str | Path, title: str = "") -> None:
    """Save the ``[C, C]`` confusion matrix as a PNG, counts in the cells (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(2.0 + 0.7 * n, 1.6 + 0.6 * n), dpi=100)
    ax.imshow(matrix.numpy(), cmap="Blues", vmin=0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = int(matrix.max()) if matrix.numel() else 0
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
