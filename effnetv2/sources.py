"""One resolver for every "where does the model come from" string (the app, train.py, the CLIs).

A source is one of:

- a local folder written by ``save_pretrained`` or train.py (it holds ``config.json``);
- a Hub id ``org/name``, optionally pinned as ``org/name@revision`` (branch, tag or commit);
- ``torchvision:<variant>`` (``s``, ``m``, ``l``): torchvision's official ImageNet weights.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .model import EfficientNetV2

TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_VARIANTS = ("s", "m", "l")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def describe_sources() -> str:
    """What a model source may be, for error and help messages."""
    return ("a folder written by save_pretrained or train.py, a Hub id 'org/name' (optionally "
            "'org/name@revision'), or 'torchvision:s' / 'torchvision:m' / 'torchvision:l' (official ImageNet weights)")


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text or ":" in text


def load_model(source: str | os.PathLike, **kwargs) -> EfficientNetV2:
    """The ``EfficientNetV2`` (eval mode) that ``source`` names (see the module docstring).

    ``kwargs`` (``num_classes``, ``map_location``, ...) go to ``EfficientNetV2.from_pretrained``
    for folders and Hub ids. Raises ``ValueError`` with what to do for anything else, including a
    bare weights file (``.pth``/``.safetensors`` carry no config).
    """
    text = str(source).strip()
    if not text:
        raise ValueError(f"the model source is empty: give {describe_sources()}")
    if text.lower().startswith(TORCHVISION_PREFIX):
        variant = text[len(TORCHVISION_PREFIX):].strip().lower().removeprefix("efficientnet_v2_")
        if variant not in TORCHVISION_VARIANTS:
            raise ValueError(f"{text!r}: torchvision has EfficientNetV2 weights for variants {TORCHVISION_VARIANTS} "
                             f"only: use e.g. 'torchvision:s'")
        if kwargs:
            raise ValueError(f"{text!r}: options {sorted(kwargs)} apply to folders and Hub ids only")
        try:
            from .convert import from_torchvision
        except ImportError as err:
            raise ValueError(f"{text!r} needs effnetv2.convert, which could not be imported ({err})") from None
        return from_torchvision(variant).eval()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json: point at a folder written by "
                             f"save_pretrained or train.py")
        return EfficientNetV2.from_pretrained(str(path), **kwargs)
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        where = "is a weights file" if path.is_file() else "looks like a weights file (and does not exist)"
        raise ValueError(f"{text} {where}, not a full model: weights alone do not say which variant, classes "
                         f"and preprocessing they belong to. Use the folder that holds them with their "
                         f"config.json, convert them with `python -m effnetv2.convert`, or pass them to "
                         f"train.py --weights.")
    if path.is_file():
        raise ValueError(f"{text} is a file, not a model: give {describe_sources()}")
    repo, at, revision = text.partition("@")
    if _HUB_ID.match(repo) and not _looks_like_path(repo):
        if at and not revision:
            raise ValueError(f"{text!r}: nothing after '@': give a branch, tag or commit, or drop the '@'")
        return EfficientNetV2.from_pretrained(repo, revision=revision or None, **kwargs)
    if _looks_like_path(text):
        raise ValueError(f"{text}: no such folder. Give {describe_sources()}")
    raise ValueError(f"model source {text!r} not understood: give {describe_sources()}")
