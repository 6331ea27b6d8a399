"""Reusable pieces of ``train.py``: initial weights, freezing, mixup/cutmix, metrics and plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hub import read_state_dict
from .model import EfficientNetV2

HEAD_PREFIX = "head."
NEW_HEAD_KEYS = ("head.classifier.", "head.attn_pool.")


def build_model(weights: str, variant: str, classes: list[str], **model_kwargs) -> EfficientNetV2:
    """A model for ``classes`` initialised from ``weights``: "none", a ``.pth``/``.safetensors`` file
    (an effnetv2 or torchvision state dict), ``torchvision:<variant>``, a folder or a Hub id.

    The backbone comes from the weights; the classifier (and an attention pool the weights lack) is
    new. ``model_kwargs`` (pool, num_heads, drop_path_rate, ...) override the weights' config.
    """
    id2label = dict(enumerate(classes))
    if weights.lower() == "none":
        return EfficientNetV2(variant, num_classes=len(classes), id2label=id2label, **model_kwargs)
    path = Path(weights)
    if path.is_file():
        state = read_state_dict(path)
        if any(k.startswith("features.") for k in state):
            from .convert import from_torchvision

            base = from_torchvision(state)
        else:
            base = EfficientNetV2(variant, num_classes=int(state.get("head.classifier.weight", torch.zeros(0)).shape[0]),
                                  **{k: v for k, v in model_kwargs.items() if k in ("pool", "num_heads", "attn_dim", "padding")})
            base.load_state_dict(state, strict=False)
            missing = [k for k in base.state_dict() if k not in state and not k.startswith(NEW_HEAD_KEYS)]
            if missing:
                raise ValueError(f"{path} is not an EfficientNetV2-{variant} state dict (missing {missing[:3]}...): "
                                 f"check --variant, or convert it with `python -m effnetv2.convert`")
    else:
        from .sources import load_model

        base = load_model(weights)
    config = {**base.config, **model_kwargs, "num_classes": len(classes), "id2label": id2label, "label2id": None}
    model = EfficientNetV2(**config)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.classifier.")}
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in state and not k.startswith(NEW_HEAD_KEYS)]
    if missing:
        raise ValueError(f"weights {weights!r} do not fit EfficientNetV2-{model.variant}: missing {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def freeze_backbone(model: EfficientNetV2) -> list[str]:
    """Train only the head (1x1 head conv, attention pool, classifier); return the trainable names."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEAD_PREFIX))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def backbone_batchnorm_eval(model: EfficientNetV2) -> None:
    """Keep the frozen backbone's BatchNorm statistics as they are (call after ``model.train()``)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not name.startswith(HEAD_PREFIX):
            m.eval()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
              label_smoothing: float = 0.0, generator: torch.Generator | None = None):
    """Mixup (alpha ``mixup``) or CutMix (alpha ``cutmix``; chosen half the time when both are on) of a
    batch ``x`` ``[B, 3, H, W]``. Returns the mixed images and soft targets ``[B, num_classes]``."""
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
        cy, cx = torch.randint(0, height, (), generator=generator).item(), torch.randint(0, width, (), generator=generator).item()
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        x = x * lam + x[perm] * (1 - lam)
    return x, targets * lam + targets[perm] * (1 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets ``[B, C]`` (mixup, label smoothing)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix: torch.Tensor, classes: list[str], path: str | Path, title: str = "") -> None:
    """Save the confusion matrix as a PNG with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n), dpi=100)
    ax.imshow(matrix.numpy(), cmap="Blues")
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
