"""Hugging Face Hub plumbing for ``EfficientNetV2``: labels, safetensors I/O, the model card.

Weights are only ever read from safetensors (or a ``.bin``/``.pth`` through
``torch.load(weights_only=True)``): loading a model never unpickles arbitrary objects.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

if TYPE_CHECKING:
    from .model import EfficientNetV2

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
MODEL_CARD_TEMPLATE = (Path(__file__).parent / "model_card.md").read_text(encoding="utf-8")
CLASSIFIER_KEYS = ("head.classifier.weight", "head.classifier.bias")


def normalise_labels(id2label: dict | None, label2id: dict | None,
                     num_classes: int) -> tuple[dict[str, str], dict[str, int]]:
    """Labels as stored in ``config.json``: ``{"0": name}`` and ``{name: 0}``, checked against
    ``num_classes``. Missing labels default to the class index."""
    if id2label is None:
        id2label = {i: str(i) for i in range(num_classes)}
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict of class index → name, got {type(id2label).__name__}")
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"id2label keys must be class indices (0..{num_classes - 1})") from None
    if sorted(labels) != list(range(num_classes)):
        raise ValueError(f"id2label has {len(labels)} labels with indices {sorted(labels)[:5]}..., but "
                         f"num_classes={num_classes}: give one label for each index 0..{num_classes - 1}")
    id2label = {str(i): labels[i] for i in range(num_classes)}
    derived = {name: int(i) for i, name in id2label.items()}
    if len(derived) != num_classes:
        raise ValueError("id2label has duplicate class names: every class needs its own name")
    if label2id is not None and {str(k): v for k, v in label2id.items()} != derived:
        raise ValueError("label2id does not match id2label: drop label2id, it is derived from id2label")
    return id2label, derived


def save_weights(model: "EfficientNetV2", directory: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "effnetv2"})


def read_state_dict(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.bin``/``.pth`` read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except Exception as err:  # safetensors raises its own error type and OSError variants
            raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be corrupt or "
                             f"truncated: download or save it again") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint ({err}). "
                         f"Only plain state dicts are accepted; pickled objects are never loaded.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_state_dict_checked(model: "EfficientNetV2", state: dict[str, torch.Tensor], path: str,
                            reinit_classifier: bool = False) -> None:
    """Load strictly; when only the classifier's size differs, re-initialise it if allowed, else say
    how to. Every error names ``path``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or (mismatched and set(mismatched) - set(CLASSIFIER_KEYS)):
        lines = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                lines.append(f"{what}: {shown}")
        raise ValueError(f"the weights in {path} do not fit EfficientNetV2-{model.variant} "
                         f"(pool={model.pool_type!r}, num_classes={model.num_classes}): " + "; ".join(lines)
                         + ". Check that config.json belongs to these weights.")
    if mismatched:
        stored = state["head.classifier.weight"].shape[0]
        if not reinit_classifier:
            raise ValueError(
                f"only the classifier differs: {path} has {stored} classes but the model was built "
                f"for {model.num_classes}. To fine-tune on new classes, load with "
                f"EfficientNetV2.from_pretrained(..., num_classes={model.num_classes}) (optionally "
                f"id2label=...): the backbone is loaded and the classifier re-initialised.")
        state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
        logger.warning("classifier re-initialised for %d classes (%s has %d)", model.num_classes, path, stored)
        model.load_state_dict(state, strict=False)
        return
    model.load_state_dict(state, strict=True)


def resolve_file(model_id: str, filename: str, **download_kwargs: Any) -> str:
    """Path of ``filename`` in a local folder or a Hub repo (downloaded into the cache)."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise EntryNotFoundError(f"{path} does not exist")
        return path
    return hf_hub_download(repo_id=model_id, filename=filename, **download_kwargs)


def load_pretrained(cls: type["EfficientNetV2"], *, model_id: str, config: dict | None, map_location: str,
                    model_kwargs: dict, **download_kwargs: Any) -> "EfficientNetV2":
    """Build the model from its config (plus the caller's overrides) and load its weights strictly."""
    if config is None:
        raise FileNotFoundError(f"no config.json found for {model_id!r}: is this an effnetv2 model folder or repo?")
    config_path = os.path.join(model_id, "config.json") if os.path.isdir(model_id) else f"config.json of {model_id}"
    unknown = sorted(set(config) - set(cls._hub_mixin_init_parameters) - {"self"})
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}; it was not written by this version of effnetv2")
    kwargs = dict(model_kwargs)
    new_head = "num_classes" in kwargs and kwargs["num_classes"] != config.get("num_classes")
    if new_head and kwargs.get("id2label") is config.get("id2label"):
        kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
    elif "id2label" in kwargs and kwargs.get("label2id") is config.get("label2id"):
        kwargs.pop("label2id", None)
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path} does not describe a valid model: {err}") from None
    download_kwargs = {k: v for k, v in download_kwargs.items() if k != "token" or v is not None}
    download_kwargs["token"] = download_kwargs.get("token")
    try:
        weights = resolve_file(model_id, WEIGHTS_NAME, **download_kwargs)
    except EntryNotFoundError:
        weights = resolve_file(model_id, PICKLE_WEIGHTS_NAME, **download_kwargs)
    load_state_dict_checked(model, read_state_dict(weights, map_location), weights, reinit_classifier=new_head)
    return model.to(map_location).eval()


def _labels_text(id2label: dict[str, str], limit: int = 20) -> str:
    names = list(id2label.values())
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f", … ({len(names)} in all; see `config.json`)" if len(names) > limit else "")


def generate_model_card(model: "EfficientNetV2", repo_id: str | None = None, metrics: dict | None = None,
                        dataset: str | None = None, datasets: list | None = None,
                        base_model: str | None = None, training: dict | None = None,
                        command: str | None = None, notes: str | None = None, **extra: Any) -> ModelCard:
    """The model card (README.md) rendered from ``model_card.md`` with the model's real metadata.

    ``metrics`` ({name: value}), ``dataset``/``datasets``, ``base_model``, ``training`` (settings)
    and ``command`` (to reproduce) fill the optional sections and the YAML front matter.
    """
    cfg = model.config
    info = model._hub_mixin_info
    card_data = ModelCardData(
        library_name=info.model_card_data.library_name,
        license=info.model_card_data.license,
        pipeline_tag=info.model_card_data.pipeline_tag,
        tags=list(info.model_card_data.tags or []) + [f"efficientnetv2-{model.variant}"],
        datasets=datasets,
        base_model=base_model,
        metrics=sorted(metrics) if metrics else None,
    )
    size = cfg["image_size"]
    return ModelCard.from_template(
        card_data, template_str=info.model_card_template,
        title=extra.pop("title", None) or f"EfficientNetV2-{model.variant.upper()}"
        + (f" — {repo_id}" if repo_id else ""),
        repo_id=repo_id or "ORG/NAME", variant=model.variant,
        num_params=sum(p.numel() for p in model.parameters()), num_classes=model.num_classes,
        pool_text="attention pooling" if model.pool_type == "attention" else "average pooling",
        base_model=base_model, source=cfg.get("source"), image_size=size,
        resize_size=int(size / cfg["crop_pct"]), train_image_size=cfg["train_image_size"],
        interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        labels_text=_labels_text(model.id2label), metrics=metrics, dataset=dataset, training=training,
        command=command, notes=notes, drop_path_rate=cfg["drop_path_rate"], dropout=cfg["dropout"],
        padding=cfg["padding"], repo_url=info.repo_url, **extra,
    )
