"""Fine-tuning's starting point: the model a run begins from, built for the user's classes.

The initial weights are any source :mod:`effnetv2.sources` parses; a bare weights file (an effnetv2
or torchvision state dict) is accepted here too, since the run supplies the variant and the classes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_state_dict
from .model import EfficientNetV2
from .sources import Source, load_model, parse_source

# Parts a fine-tune may create afresh: the classifier always, the attention pool when the initial
# weights have none (e.g. ImageNet weights with average pooling, fine-tuned with --pool attention).
NEW_HEAD_KEYS = ("head.classifier.", "head.attn_pool.")


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
