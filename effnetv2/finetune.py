"""Fine-tuning's starting point: the model a run begins from (any source :mod:`effnetv2.sources` parses,
or a bare effnetv2 or torchvision state-dict file), built for the user's classes."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_state_dict
from .errors import UsageError
from .model import EfficientNetV2
from .sources import Source, load_model, parse_source

# what a fine-tune may create afresh: the classifier, and an attention pool the initial weights lack
NEW_HEAD_KEYS = ("head.classifier.", "head.attn_pool.")


def _state_model(state: dict[str, torch.Tensor], variant: str, path: Path, overrides: dict) -> EfficientNetV2:
    """An ``EfficientNetV2`` holding an effnetv2-layout state dict read from ``path``."""
    arch = {k: overrides[k] for k in ("pool", "num_heads", "attn_dim", "padding") if k in overrides}
    if "head.attn_pool.pos_embed" in state:  # the weights have an attention pool: keep it unless told otherwise
        arch.setdefault("pool", "attention")
        arch.setdefault("attn_dim", int(state["head.attn_pool.pos_embed"].shape[1]))
    classifier = state.get("head.classifier.weight")
    base = EfficientNetV2(variant, num_classes=int(classifier.shape[0]) if classifier is not None else 0, **arch)
    missing = _load_fitting(base, state)
    if missing:
        raise ValueError(f"{path} is not an EfficientNetV2-{variant} state dict (missing or reshaped {missing[:3]}): "
                         f"check --variant, or convert the file with `python -m effnetv2.convert`")
    return base


def _load_fitting(model: EfficientNetV2, state: dict[str, torch.Tensor]) -> list[str]:
    """Load the entries of ``state`` that fit ``model``; returns the keys left out, NEW_HEAD_KEYS aside."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(fitting, strict=False)
    return [k for k in own if k not in fitting and not k.startswith(NEW_HEAD_KEYS)]


def load_initial_model(weights: str | Source, variant: str, overrides: dict) -> EfficientNetV2 | None:
    """The model ``weights`` names (None for "none"): a weights file holds a torchvision state dict or an effnetv2
    one for ``variant``; the rest goes to :func:`effnetv2.sources.load_model`."""
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
    """A model for ``classes`` with ``weights``' backbone and a new classifier; ``overrides`` not None replace the
    weights' config. UsageError ``--weights WEIGHTS: ...`` when they cannot be read or do not fit."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    id2label = dict(enumerate(classes))
    try:  # reading the weights and building the model with the flags' options: the user's to fix
        base = load_initial_model(weights, variant, overrides)
        if base is None:
            return EfficientNetV2(variant, num_classes=len(classes), id2label=id2label, **overrides)
        model = EfficientNetV2(**{**base.config, **overrides, "num_classes": len(classes), "id2label": id2label,
                                  "label2id": None, "source": None})
        backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("head.classifier.")}
        missing = _load_fitting(model, backbone)
        if missing:
            raise ValueError(f"they do not fit EfficientNetV2-{model.variant} with these options: missing or "
                             f"reshaped {missing[:3]}")
    except (ValueError, OSError, ImportError) as err:
        raise UsageError(f"--weights {getattr(weights, 'text', weights)}: {err}") from None
    return model
