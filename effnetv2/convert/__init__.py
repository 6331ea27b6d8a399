"""Weight converters: torchvision ``efficientnet_v2_{s,m,l}`` and timm ``tf_efficientnetv2_*`` → ``EfficientNetV2``,
and back (``to_timm``, ``to_torchvision``), through one key map; every key and shape is checked before loading."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Union

import torch
import torchvision.models as tvm
from safetensors.torch import save_file
from torch import nn

from ..configs import VARIANTS
from ..checkpoint import WEIGHT_SUFFIXES, read_state_dict, sha256_file
from ..hub import ModelDownloadError, is_offline
from ..layers import ConvBNAct, MBConv
from ..model import EfficientNetV2

logger = logging.getLogger(__name__)

Weights = Union[nn.Module, dict, str, os.PathLike]  # what the converters read: a model, its state dict, a file, a name
TIMM_PREFIX = "tf_efficientnetv2_"
TORCHVISION_VARIANTS = ("s", "m", "l")
DOWNLOAD_TIMEOUT_S = 30  # the longest wait for a connection or for each read: a server that stops answering fails


def _names_published_weights(source: Weights) -> bool:
    """True when ``source`` names published weights ("s", "tf_efficientnetv2_b0"), not a model, state dict or file."""
    return isinstance(source, str) and not Path(source).exists() and not source.lower().endswith(WEIGHT_SUFFIXES)


def torchvision_variant(name: str) -> str | None:
    """``"s"``, ``"m"`` or ``"l"`` for a torchvision variant name (``"S"``, ``"efficientnet_v2_s"``), else None."""
    variant = name.strip().lower().removeprefix("efficientnet_v2_")
    return variant if variant in TORCHVISION_VARIANTS else None


# --------------------------------------------------------------------------- key mapping

# Where each of our modules takes its tensors from in the source, by block kind: MBConv "M",
# Fused-MBConv "F", Fused-MBConv with expansion 1 "F1" (its single conv is our project_conv).
_BLOCK_MODULES = {
    "torchvision": {  # Conv2dNormActivation children (.0 conv, .1 BN), SE fc1/fc2
        "M": {"expand_conv.conv": "block.0.0", "expand_conv.bn": "block.0.1", "dwconv.conv": "block.1.0",
              "dwconv.bn": "block.1.1", "se.conv_reduce": "block.2.fc1", "se.conv_expand": "block.2.fc2",
              "project_conv.conv": "block.3.0", "project_conv.bn": "block.3.1"},
        "F": {"expand_conv.conv": "block.0.0", "expand_conv.bn": "block.0.1",
              "project_conv.conv": "block.1.0", "project_conv.bn": "block.1.1"},
        "F1": {"project_conv.conv": "block.0.0", "project_conv.bn": "block.0.1"},
    },
    "timm": {  # InvertedResidual, EdgeResidual, ConvBnAct
        "M": {"expand_conv.conv": "conv_pw", "expand_conv.bn": "bn1", "dwconv.conv": "conv_dw", "dwconv.bn": "bn2",
              "se.conv_reduce": "se.conv_reduce", "se.conv_expand": "se.conv_expand",
              "project_conv.conv": "conv_pwl", "project_conv.bn": "bn3"},
        "F": {"expand_conv.conv": "conv_exp", "expand_conv.bn": "bn1",
              "project_conv.conv": "conv_pwl", "project_conv.bn": "bn2"},
        "F1": {"project_conv.conv": "conv", "project_conv.bn": "bn1"},
    },
}
# Outside the blocks; torchvision's head conv is the stage after the last block's ({head}).
_OUTER_MODULES = {
    "torchvision": {"stem.conv": "features.0.0", "stem.bn": "features.0.1",
                    "head.project_conv.conv": "features.{head}.0", "head.project_conv.bn": "features.{head}.1",
                    "head.classifier": "classifier.1"},
    "timm": {"stem.conv": "conv_stem", "stem.bn": "bn1", "head.project_conv.conv": "conv_head",
             "head.project_conv.bn": "bn2", "head.classifier": "classifier"},
}
# Block prefixes: torchvision keys are features.{stage}.{j}.block..., timm's blocks.{stage}.{j}...
_BLOCK_KEYS = {"torchvision": ("features", "block."), "timm": ("blocks", "")}


def source_blocks(kind: str, state: dict[str, torch.Tensor]) -> list[str]:
    """The block prefixes (``{base}.{stage}.{j}``) of a ``kind`` ("torchvision"/"timm") state dict, in network order."""
    base, inner = _BLOCK_KEYS[kind]
    pattern = re.compile(rf"^{base}\.(\d+)\.(\d+)\.{re.escape(inner)}")
    found = {(int(m[1]), int(m[2])) for m in map(pattern.match, state) if m}
    return [f"{base}.{s}.{j}" for s, j in sorted(found)]


def key_map(model: EfficientNetV2, kind: str, state: dict[str, torch.Tensor], where: str) -> dict[str, str]:
    """Our state-dict key → the key it comes from in a ``kind`` ("torchvision"/"timm") ``state``."""
    blocks = source_blocks(kind, state)
    if len(blocks) != len(model.blocks):
        raise ValueError(f"{where} has {len(blocks)} blocks but EfficientNetV2-{model.variant} has "
                         f"{len(model.blocks)}: check the variant")
    head = int(blocks[-1].split(".")[1]) + 1
    modules = {ours: theirs.format(head=head) for ours, theirs in _OUTER_MODULES[kind].items()}
    for i, (block, prefix) in enumerate(zip(model.blocks, blocks)):
        shape = "M" if isinstance(block, MBConv) else "F" if isinstance(block.expand_conv, ConvBNAct) else "F1"
        modules.update({f"blocks.{i}.{ours}": f"{prefix}.{theirs}"
                        for ours, theirs in _BLOCK_MODULES[kind][shape].items()})
    keys = (key.rsplit(".", 1) for key in model.state_dict())
    return {f"{module}.{tensor}": f"{modules[module]}.{tensor}" for module, tensor in keys if module in modules}


def map_state_dict(model: EfficientNetV2, kind: str, state: dict[str, torch.Tensor],
                   where: str) -> dict[str, torch.Tensor]:
    """Our state dict from a ``kind`` source ``state``: every key found with its shape and every source key
    used, else a ``ValueError`` naming the first offending keys and ``where`` the weights came from."""
    mapping = key_map(model, kind, state, where)
    mapped, problems = {}, []
    for key, target in model.state_dict().items():
        src_key = mapping.get(key)
        if src_key is None:
            problems.append(f"no source for our key {key}")
        elif src_key not in state:
            problems.append(f"{src_key} (for our {key}) is missing")
        elif tuple(state[src_key].shape) != tuple(target.shape):
            problems.append(f"{src_key} has shape {tuple(state[src_key].shape)} but our {key} needs "
                            f"{tuple(target.shape)}")
        else:
            mapped[key] = state[src_key]
    used = set(mapping.values())
    problems += [f"unexpected key {k}" for k in state if k not in used]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"the weights from {where} do not fit EfficientNetV2-{model.variant}: {shown}. "
                         f"Check the variant and that the file is a checkpoint of that architecture.")
    return mapped


# --------------------------------------------------------------------------- shared helpers

def _read_source(kind: str, source: Weights, variant: str | None, provenance: dict,
                 choices: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict, where it came from, variant) of a ``kind`` model, state dict or weights file; a file's
    name and SHA-256 go into ``provenance``. The variant is inferred from the blocks when None."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, dict):
        state = source
    else:
        path = Path(source).expanduser()
        state = read_state_dict(path)
        provenance.update(file=path.name, sha256=sha256_file(path))
    where = provenance.get("file") or f"the {kind} weights"
    blocks, stem = source_blocks(kind, state), _OUTER_MODULES[kind]["stem.conv"] + ".weight"
    if not blocks or stem not in state:
        raise ValueError(f"{where} is not a {kind} EfficientNetV2 state dict (no {stem} / "
                         f"{_BLOCK_KEYS[kind][0]}.N.M keys)")
    if variant:
        return state, where, variant.lower()
    stem_chs = state[stem].shape[0]
    for name in choices:
        cfg = VARIANTS[name]
        if sum(s.repeats for s in cfg.scaled_stages()) == len(blocks) and cfg.stem_chs == stem_chs:
            return state, where, name
    raise ValueError(f"cannot tell which EfficientNetV2 variant {where} is ({len(blocks)} blocks, stem width "
                     f"{stem_chs}); none of {', '.join(choices)} fits. Pass variant=... if you know it.")


def _num_classes(kind: str, state: dict[str, torch.Tensor]) -> int:
    key = _OUTER_MODULES[kind]["head.classifier"] + ".weight"
    return int(state[key].shape[0]) if key in state else 0


def _build(kind: str, variant: str, state: dict[str, torch.Tensor], where: str, **config: Any) -> EfficientNetV2:
    num_classes = _num_classes(kind, state)
    # ImageNet-1k's class names (torchvision's weights' meta) for a 1000-way classifier
    labels = dict(enumerate(_torchvision_weights("s").meta["categories"])) if num_classes == 1000 else None
    # Built on the meta device (no memory, no init): every tensor is then assigned from the source.
    with torch.device("meta"):
        model = EfficientNetV2(variant, num_classes=num_classes, id2label=labels, **config)
    mapped = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
              for k, v in map_state_dict(model, kind, state, where).items()}
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- torchvision

def _torchvision_weights(variant: str):  # torchvision's EfficientNet_V2_{S,M,L}_Weights.IMAGENET1K_V1
    return getattr(tvm, f"EfficientNet_V2_{variant.upper()}_Weights").IMAGENET1K_V1


def download_file(url: str, path: Path, sha256_prefix: str | None = None, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """``url`` saved at ``path`` (atomically), its SHA-256 checked to start with ``sha256_prefix``; each network wait
    lasts at most ``timeout`` s (``torch.hub.download_url_to_file`` waits forever on a server that never answers)."""
    logger.info("downloading %s to %s", url, path)
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "effnetv2"})
        # a new opener reads the proxy settings now (urlopen's is built once, at a process's first call)
        with os.fdopen(fd, "wb") as file, urllib.request.build_opener().open(request, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                file.write(chunk)
        if sha256_prefix and not digest.hexdigest().startswith(sha256_prefix):
            raise OSError(f"{url} gave a file whose SHA-256 {digest.hexdigest()} does not start with {sha256_prefix}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _official_torchvision_file(variant: str) -> Path:
    """The official checkpoint in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded
    there first when missing, its SHA-256 prefix checked as torchvision names it."""
    weights = _torchvision_weights(variant)
    filename = os.path.basename(weights.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)  # where the message asks to put the file
        what = f"the official torchvision EfficientNetV2-{variant.upper()} weights"
        remedy = f"put that file at {path} (or set TORCH_HOME), or pass the path of a local .pth instead."
        if is_offline():  # known offline: fail now rather than after the network times out
            raise ModelDownloadError(f"{what} are not in torch's cache and this machine is offline (HF_HUB_OFFLINE=1 "
                                     f"is set), so they cannot be downloaded from {weights.url}: {remedy}",
                                     f"torchvision:{variant}")
        match = re.search(r"-([a-f0-9]+)\.", filename)
        try:
            download_file(weights.url, path, match[1] if match else None, timeout=DOWNLOAD_TIMEOUT_S)
        except Exception as err:  # network errors come in many types (URLError, OSError, RuntimeError)
            raise ModelDownloadError(f"could not download {what} from {weights.url} ({err}). Without internet, "
                                     f"{remedy}", f"torchvision:{variant}") from None
    return path


def from_torchvision(source: Weights, variant: str | None = None) -> EfficientNetV2:
    """``EfficientNetV2`` (eval mode, padding "symmetric") whose logits equal the torchvision model's.

    ``source``: a ``torchvision.models.efficientnet_v2_{s,m,l}`` model, its state dict, the path of its
    ``.pth``/``.safetensors``, or "s", "m", "l" for the official ImageNet weights (cached in ``$TORCH_HOME``).
    ``variant`` is inferred when None. The model carries torchvision's eval preprocessing, the ImageNet
    labels for 1000 classes, and where the weights came from (``config["source"]``)."""
    provenance: dict[str, Any] = {"source": "torchvision"}
    if _names_published_weights(source):
        name = torchvision_variant(source)
        if name is None:
            raise ValueError(f"{source!r} is neither a weights file nor a torchvision variant: give 's', 'm', "
                             f"'l' (official ImageNet weights) or the path of a .pth/.safetensors file")
        variant = variant or name
        source = _official_torchvision_file(name)
        provenance["weights"] = f"EfficientNet_V2_{name.upper()}_Weights.IMAGENET1K_V1"
    state, where, variant = _read_source("torchvision", source, variant, provenance, TORCHVISION_VARIANTS)
    preprocessing = {}
    if variant in TORCHVISION_VARIANTS:
        preset = _torchvision_weights(variant).transforms()
        preprocessing = {"image_size": preset.crop_size[0], "crop_pct": preset.crop_size[0] / preset.resize_size[0],
                         "mean": list(preset.mean), "std": list(preset.std),
                         "interpolation": preset.interpolation.value}
    return _build("torchvision", variant, state, where, padding="symmetric", source=provenance, **preprocessing)


# --------------------------------------------------------------------------- timm

def _timm_pretrained_cfg(variant: str, num_classes: int) -> dict | None:
    """timm's pretrained config for ``tf_efficientnetv2_{variant}`` with ``num_classes`` outputs
    (the default tag first), or None without timm."""
    try:
        import timm
    except ImportError:
        logger.warning("timm is not installed: using EfficientNetV2-%s's default preprocessing", variant)
        return None
    arch = TIMM_PREFIX + variant
    names = [arch] + timm.list_pretrained(arch + ".*")
    cfgs = [cfg.to_dict() for cfg in map(timm.models.get_pretrained_cfg, names) if cfg is not None]
    return next((cfg for cfg in cfgs if cfg.get("num_classes") == num_classes), cfgs[0] if cfgs else None)


def _timm_model(name: str) -> nn.Module:  # a pretrained timm model (from the Hugging Face cache, or downloaded)
    try:
        import timm
    except ImportError:
        raise RuntimeError(f"converting the timm model {name!r} by name needs timm (pip install timm); "
                           f"or pass a local .pth/.safetensors file") from None
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # timm surfaces hub, network and name errors with different types
        raise RuntimeError(f"could not get the timm weights {name!r} ({err}). Check the name "
                           f"(tf_efficientnetv2_b0..b3, s, m, l, xl, optionally .tag); offline, they must "
                           f"already be in the Hugging Face cache, or pass a local .pth/.safetensors") from None


def from_timm(source: Weights, variant: str | None = None) -> EfficientNetV2:
    """``EfficientNetV2`` (eval mode, padding "same") whose logits equal the timm ``tf_efficientnetv2_*`` model's.

    ``source``: a timm model, its state dict, the path of a ``.pth``/``.safetensors``, or a timm model name
    such as "tf_efficientnetv2_s.in21k_ft_in1k" (needs timm; offline only when cached). Preprocessing comes
    from its ``pretrained_cfg`` (timm's default for the variant when only weights are given)."""
    provenance: dict[str, Any] = {"source": "timm"}
    if _names_published_weights(source):
        provenance["weights"] = source if source.startswith(TIMM_PREFIX) else TIMM_PREFIX + source
        source = _timm_model(provenance["weights"])
    pretrained_cfg = dict(getattr(source, "pretrained_cfg", None) or {}) if isinstance(source, nn.Module) else None
    if pretrained_cfg and pretrained_cfg.get("architecture", "").startswith(TIMM_PREFIX):
        variant = variant or pretrained_cfg["architecture"]
        if "weights" in provenance and pretrained_cfg.get("hf_hub_id"):
            provenance["hf_hub_id"] = pretrained_cfg["hf_hub_id"]
    variant = variant and variant.split(".")[0].lower().removeprefix(TIMM_PREFIX)  # tf_efficientnetv2_b0.tag → b0
    state, where, variant = _read_source("timm", source, variant, provenance, tuple(VARIANTS))
    cfg = pretrained_cfg or _timm_pretrained_cfg(variant, _num_classes("timm", state))
    preprocessing = {
        "image_size": int((cfg.get("test_input_size") or cfg["input_size"])[-1]),
        "train_image_size": int(cfg["input_size"][-1]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg.get("test_crop_pct") or cfg.get("crop_pct", 1.0)),
    } if cfg else {}
    return _build("timm", variant, state, where, padding="same", source=provenance, **preprocessing)


# --------------------------------------------------------------------------- export (the inverse)

def export_state_dict(model: EfficientNetV2, kind: str) -> dict[str, torch.Tensor]:
    """``model``'s weights (float32) under the key names of ``kind``'s ("timm"/"torchvision") model of the
    same variant and classes, every one of its keys filled; a ``ValueError`` says what ``kind`` cannot hold."""
    if model.pool_type != "avg":
        raise ValueError(f"EfficientNetV2-{model.variant} has an attention-pooling head, which {kind}'s "
                         f"EfficientNetV2 does not have: only average-pooled models can be exported to {kind}")
    if not model.num_classes:
        raise ValueError(f"the model has no classifier (num_classes=0): {kind} needs one; reset_classifier(N) first")
    if kind == "torchvision" and model.variant not in TORCHVISION_VARIANTS:
        raise ValueError(f"torchvision has EfficientNetV2 {', '.join(TORCHVISION_VARIANTS)} only, not "
                         f"{model.variant}: export it to timm instead (--to timm)")
    if kind == "torchvision" and model.padding != "symmetric":
        raise ValueError("torchvision's EfficientNetV2 pads symmetrically, this model pads like TensorFlow "
                         "(padding 'same', e.g. converted from timm's tf_ weights): export it to timm instead")
    with torch.device("meta"):
        reference = reference_model(kind, model)
    if reference is None:
        raise ValueError(f"exporting to {kind} needs {kind} installed (pip install {kind})")
    theirs = reference.state_dict()
    mapping = key_map(model, kind, theirs, f"the {kind} model")
    ours = model.state_dict()
    state = {src: ours[key].detach().to("cpu", torch.float32 if ours[key].is_floating_point() else ours[key].dtype)
             .contiguous() for key, src in mapping.items()}
    wrong = [k for k in theirs if k not in state or tuple(state[k].shape) != tuple(theirs[k].shape)]
    if wrong:
        raise ValueError(f"cannot fill {kind}'s keys {wrong[:3]} from EfficientNetV2-{model.variant}")
    return state


def to_timm(model: EfficientNetV2, out: str | os.PathLike) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` so that
    ``timm.create_model("local-dir:OUT", pretrained=True)`` is this model (equal logits), with its labels
    (``pretrained_cfg.label_names``) and preprocessing; symmetric padding stays through ``pad_type = ""``."""
    state = export_state_dict(model, "timm")
    cfg = model.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": TIMM_PREFIX + model.variant, "num_classes": model.num_classes,
        "num_features": model.num_features, "pretrained_cfg": {
            "input_size": [3, cfg["train_image_size"], cfg["train_image_size"]],
            "test_input_size": [3, cfg["image_size"], cfg["image_size"]],
            "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "crop_pct": cfg["crop_pct"], "crop_mode": "center", "num_classes": model.num_classes,
            "first_conv": "conv_stem", "classifier": "classifier", "label_names": list(model.id2label.values()),
        },
    }
    if model.padding == "symmetric":
        config["model_args"] = {"pad_type": ""}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def to_torchvision(model: EfficientNetV2, path: str | os.PathLike) -> Path:
    """Write a safetensors state dict that ``torchvision.models.efficientnet_v2_{s,m,l}(num_classes=N)``
    loads strictly, with equal logits; labels and preprocessing go in its metadata (JSON strings)."""
    state = export_state_dict(model, "torchvision")
    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "architecture": f"torchvision.models.efficientnet_v2_{model.variant}",
                "num_classes": str(model.num_classes), "id2label": json.dumps(model.id2label),
                "preprocessing": json.dumps({k: cfg[k] for k in ("image_size", "train_image_size", "mean", "std",
                                                                  "interpolation", "crop_pct")})}
    save_file(state, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------- parity check

def reference_model(kind: str, model: EfficientNetV2) -> nn.Module | None:
    """The source library's own model of ``model``'s variant and classes (random weights), or None without it."""
    try:
        if kind == "torchvision":
            build = getattr(tvm, f"efficientnet_v2_{model.variant}", None)
            return build(num_classes=model.num_classes) if build else None
        import timm

        return timm.create_model(TIMM_PREFIX + model.variant, num_classes=model.num_classes)
    except ImportError:
        return None


@torch.no_grad()
def max_logit_difference(model: EfficientNetV2, reference: nn.Module, size: int = 96) -> float:
    """max |Δlogit| between ``model`` and ``reference`` (given ``model``'s weights) on random
    ``[2, 3, size, size]`` inputs."""
    kind = model.config["source"]["source"]
    ours = model.state_dict()
    mapping = key_map(model, kind, reference.state_dict(), f"the {kind} model")
    reference.load_state_dict({src: ours[key] for key, src in mapping.items()}, strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return (reference.eval()(x) - model(x)).abs().max().item()
