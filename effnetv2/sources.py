"""One resolver for every "where do the weights come from" string (the app, train.py, the CLIs): a folder
written by ``save_pretrained`` or train.py, a Hub id ``org/name[@revision]``, ``torchvision:<variant>``, a
weights file (only train.py's ``--weights`` takes one) or ``none``. :func:`parse_source` reads it once."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checkpoint import WEIGHT_SUFFIXES
from .convert import TORCHVISION_VARIANTS, torchvision_variant
from .model import EfficientNetV2

TORCHVISION_PREFIX = "torchvision:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
SOURCE_HELP = ("a folder written by save_pretrained or train.py, a Hub id 'org/name' (optionally 'org/name@revision'), "
           "or 'torchvision:s' / 'torchvision:m' / 'torchvision:l' (official ImageNet weights)")  # for messages


@dataclass(frozen=True)
class Source:
    """A parsed model source. ``kind`` says which fields are set: ``folder``/``weights``: ``path``;
    ``hub``: ``repo_id`` and ``revision`` (None: the default branch); ``torchvision``: ``variant``."""

    kind: Literal["folder", "hub", "torchvision", "weights", "none"]
    text: str  # as the user gave it, for messages
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    variant: str | None = None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text or ":" in text


def parse_source(text: str | os.PathLike | Source) -> Source:
    """The :class:`Source` that ``text`` names (a ``Source`` as is): an existing path wins over a Hub id, and text
    that looks like a path (``./x``, ``a/b/c``, ``C:\\x``) is a folder; else ``ValueError`` saying what to give."""
    if isinstance(text, Source):
        return text
    text = str(text).strip()
    if not text:
        raise ValueError(f"the model source is empty: give {SOURCE_HELP}")
    if text.lower() == "none":
        return Source("none", text)
    if text.lower().startswith(TORCHVISION_PREFIX):
        variant = torchvision_variant(text[len(TORCHVISION_PREFIX):])
        if variant is None:
            raise ValueError(f"{text!r}: torchvision has EfficientNetV2 weights for variants {TORCHVISION_VARIANTS} "
                             f"only: use e.g. 'torchvision:s'")
        return Source("torchvision", text, variant=variant)
    path = Path(text).expanduser()
    if path.is_dir():
        return Source("folder", text, path=path)
    if path.is_file() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return Source("weights", text, path=path)
    repo, at, revision = text.partition("@")
    if _HUB_ID.match(repo) and not _looks_like_path(repo):
        if at and not revision:
            raise ValueError(f"{text!r}: nothing after '@': give a branch, tag or commit, or drop the '@'")
        return Source("hub", text, repo_id=repo, revision=revision or None)
    if _looks_like_path(text):
        return Source("folder", text, path=path)
    raise ValueError(f"model source {text!r} not understood: give {SOURCE_HELP}")


def load_model(source: str | os.PathLike | Source, **kwargs) -> EfficientNetV2:
    """The ``EfficientNetV2`` (eval mode) that ``source`` names (see :func:`parse_source`); ``kwargs`` go to
    ``from_pretrained`` for folders and Hub ids. Raises ``ValueError`` with what to do for a weights file
    (no config), ``none`` or a folder without ``config.json``."""
    source = parse_source(source)
    text, path = source.text, source.path
    if source.kind == "none":
        raise ValueError(f"{text!r} names no model ('none' is train.py --weights' way to train from scratch): "
                         f"give {SOURCE_HELP}")
    if source.kind == "torchvision":
        if kwargs:
            raise ValueError(f"{text!r}: options {sorted(kwargs)} apply to folders and Hub ids only")
        from .convert import from_torchvision  # looked up at call time: tests stand in a fake converter

        return from_torchvision(source.variant).eval()
    if source.kind == "hub":
        return EfficientNetV2.from_pretrained(source.repo_id, revision=source.revision, **kwargs)
    if source.kind == "weights":
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ValueError(f"{text} is a file, not a model: give {SOURCE_HELP}")
        where = "is a weights file" if path.is_file() else "looks like a weights file (and does not exist)"
        raise ValueError(f"{text} {where}, not a full model: weights alone do not say which variant, classes "
                         f"and preprocessing they belong to. Use the folder that holds them with their "
                         f"config.json, convert them with `python -m effnetv2.convert`, or pass them to "
                         f"train.py --weights.")
    if not path.is_dir():
        raise ValueError(f"{text}: no such folder. Give {SOURCE_HELP}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is a folder without config.json: point at a folder written by "
                         f"save_pretrained or train.py")
    return EfficientNetV2.from_pretrained(str(path), **kwargs)
