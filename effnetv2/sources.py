"""One resolver for every "where does the model come from" string used by the app, train.py and
the CLIs: a local folder, a Hub id ``org/name[@revision]``, or ``torchvision:<variant>``."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .model import EfficientNetV2

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def describe_sources() -> str:
    return ("a folder written by save_pretrained, a Hub id 'org/name' (optionally 'org/name@revision'), "
            "or 'torchvision:s' / 'torchvision:m' / 'torchvision:l' (official ImageNet weights)")


def load_model(source: str | os.PathLike, **kwargs) -> EfficientNetV2:
    """The ``EfficientNetV2`` (eval mode) that ``source`` names; ``kwargs`` go to ``from_pretrained``."""
    text = str(source).strip()
    if text.startswith("torchvision:"):
        from .convert import from_torchvision

        return from_torchvision(text.split(":", 1)[1])
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: point at a folder written by save_pretrained or train.py")
        return EfficientNetV2.from_pretrained(path, **kwargs)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") and path.exists():
        raise ValueError(f"{path} is a weights file without its config: use the folder that holds it with "
                         f"config.json, or convert it with `python -m effnetv2.convert`")
    repo, _, revision = text.partition("@")
    if _HUB_ID.match(repo) and not path.exists():
        return EfficientNetV2.from_pretrained(repo, revision=revision or None, **kwargs)
    raise ValueError(f"model source {text!r} not understood: give {describe_sources()}")
