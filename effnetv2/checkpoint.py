"""State-dict I/O: write a model's weights, read a weights file safely (safetensors, or ``torch.load`` with
``weights_only=True``: never arbitrary pickles), check its shapes against a model."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
import safetensors.torch  # its functions looked up at each call: a replaced one (in tests) is the one used
from safetensors import safe_open
from torch import nn

WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
CLASSIFIER_KEYS = ("head.classifier.weight", "head.classifier.bias")
MAX_HEADER_BYTES = 8 * 2**20  # ~100 bytes per tensor: EfficientNetV2-XL's header is 0.2 MB


def save_weights(model: nn.Module, directory: Path) -> None:
    """``model``'s state dict as ``directory/model.safetensors`` (contiguous CPU copies)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "effnetv2"})


def _unpickling_reason(err: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice to allow-list it or turn the check off."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).replace("WeightsUnpickler error:", "").strip()
             for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Weights only load failed")]
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(err).__name__)
    return reason.split(" Please use")[0]


def _unreadable_safetensors(name: str, reason: object) -> ValueError:
    return ValueError(f"{name} is not a readable safetensors file ({reason}); it may be corrupt or truncated: save "
                      f"or upload it again (for a damaged download, retry with force_download=True)")


def safetensors_shapes(path: str | os.PathLike, name: str | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a ``.safetensors`` header alone; a header above ``MAX_HEADER_BYTES`` (safetensors
    takes 100 MB) is refused from its 8-byte length first. ``name`` is for messages."""
    name = name or str(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise _unreadable_safetensors(name, f"its header claims {length:,} bytes; at most "
                                            f"{MAX_HEADER_BYTES:,} are accepted" if length > 0 else "no header")
    try:
        with safe_open(path, "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error type
        raise _unreadable_safetensors(name, err) from None


def read_state_dict(path: str | os.PathLike, map_location: str = "cpu", name: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.bin``/``.pth`` read with ``weights_only=True``; ``name``
    says where the file comes from in error messages (default: its path)."""
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {name} does not exist")
    if path.suffix.lower() == ".safetensors":
        safetensors_shapes(path, name)  # refuses an oversized header before safetensors parses it
        try:
            return safetensors.torch.load_file(str(path), device=map_location)
        except Exception as err:  # safetensors raises its own error type and OSError variants
            raise _unreadable_safetensors(name, err) from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{name} could not be read as a weights-only PyTorch checkpoint ({_unpickling_reason(err)}). "
                         f"Only plain state dicts of tensors are accepted: pickled objects are never loaded, since "
                         f"unpickling can run code. Prefer safetensors (save_pretrained writes "
                         f"model.safetensors).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name} does not hold a state dict of tensors")
    return state


def check_weight_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: str,
                        reinit_classifier: bool = False) -> bool:
    """True when only the classifier's size differs from ``model``'s and ``reinit_classifier`` allows a new
    one; any other mismatch raises a ``ValueError`` naming ``path`` (and for the classifier, the way out)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    mismatched = [k for k in own if k in shapes and tuple(shapes[k]) != own[k]]
    if missing or unexpected or (mismatched and set(mismatched) - set(CLASSIFIER_KEYS)):
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        lines = [f"{what}: " + ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                 for what, keys in found if keys]
        raise ValueError(f"the weights in {path} do not fit EfficientNetV2-{model.variant} "
                         f"(pool={model.pool_type!r}, num_classes={model.num_classes}): " + "; ".join(lines)
                         + ". Check that config.json belongs to these weights.")
    if mismatched and not reinit_classifier:
        raise ValueError(
            f"only the classifier differs: {path} has {shapes[CLASSIFIER_KEYS[0]][0]} classes but the model was "
            f"built for {model.num_classes}. To fine-tune on new classes, load with "
            f"EfficientNetV2.from_pretrained(..., num_classes={model.num_classes}) (optionally "
            f"id2label=...): the backbone is loaded and the classifier re-initialised.")
    return bool(mismatched)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module, *context: str) -> str:
    """SHA-256 (hex) of the ``context`` strings and every tensor of ``model`` (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for text in context:
        digest.update(text.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
