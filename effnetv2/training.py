"""Reusable pieces of ``train.py``: initial weights, freezing, mixup/cutmix, replicas, checkpoints, plots."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hub import read_state_dict
from .model import EfficientNetV2

HEAD_PREFIX = "head."
# Parts a fine-tune may create afresh: the classifier always, the attention pool when the initial
# weights have none (e.g. ImageNet weights with average pooling, fine-tuned with --pool attention).
NEW_HEAD_KEYS = ("head.classifier.", "head.attn_pool.")
CHECKPOINT_PREFIX = "epoch_"


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


def load_initial_model(weights: str, variant: str, overrides: dict) -> EfficientNetV2 | None:
    """The model ``weights`` names, before any change for the user's classes; None for "none".

    ``weights``: a ``.pth``/``.pt``/``.bin``/``.safetensors`` file (a torchvision EfficientNetV2
    state dict, converted with ``effnetv2.convert.from_torchvision``, or an effnetv2 one for
    ``variant``; read with ``weights_only=True``), or any source ``effnetv2.sources.load_model``
    takes (a folder, a Hub id ``org/name[@rev]``, ``torchvision:<variant>``).
    """
    if weights.lower() == "none":
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        state = read_state_dict(path)
        if any(k.startswith("features.") for k in state):
            from .convert import from_torchvision

            return from_torchvision(state)
        return _state_model(state, variant, path, overrides)
    from .sources import load_model

    return load_model(weights)


def build_model(weights: str, variant: str, classes: list[str], **overrides) -> EfficientNetV2:
    """A model for ``classes`` initialised from ``weights`` (see :func:`load_initial_model`).

    The backbone (and an attention pool, when the weights have one and the new model keeps it) is
    loaded from the weights; the classifier is new, sized for ``classes``, which also become the
    labels. ``overrides`` (pool, num_heads, drop_path_rate, dropout, image_size, ...) replace the
    weights' config; with ``weights="none"`` the model is ``EfficientNetV2(variant, **overrides)``.
    The variant always comes from the weights when there are some.
    """
    id2label = dict(enumerate(classes))
    base = load_initial_model(weights, variant, overrides)
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
        raise ValueError(f"weights {weights!r} do not fit EfficientNetV2-{model.variant} with these options: "
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


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, values): equal fingerprints, equal models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints ``folder/epoch_N`` (written atomically by train.py), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


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
    fig.savefig(path)
    plt.close(fig)
