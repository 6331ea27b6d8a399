"""The EfficientNetV2 model: one class for the whole family, configured by ``configs.VARIANTS``."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from . import card, checkpoint, hub
from .attention import AttentionPool2d, check_cell, self_attention_maps
from .configs import IMAGENET_MEAN, IMAGENET_STD, get_variant, normalise_labels
from .layers import BLOCKS, PADDINGS, ConvBNAct

POOLS = ("avg", "attention")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# Bounds that keep a hostile config.json from allocating gigabytes (ImageNet-21k: 21,843 classes).
MAX_CLASSES = 50_000
MAX_ATTN_DIM = 2048
MAX_HEADS = 128


class Head(nn.Module):
    """1x1 conv to ``num_features`` → BN → SiLU → pooling → dropout → linear classifier."""

    def __init__(self, in_chs: int, num_features: int, num_classes: int, dropout: float,
                 pool: str, num_heads: int, attn_dim: int | None, padding: str):
        super().__init__()
        self.project_conv = ConvBNAct(in_chs, num_features, 1, padding=padding)
        self.attn_pool = (AttentionPool2d(num_features, attn_dim or num_features, num_heads)
                          if pool == "attention" else None)
        self.pooled_features = self.attn_pool.dim if self.attn_pool is not None else num_features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.pooled_features, num_classes) if num_classes else nn.Identity()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(name: str, value, low: int, high: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{name} must be an integer between {low} and {high}, got {value!r}")


class EfficientNetV2(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="effnetv2",
    license="apache-2.0",
    pipeline_tag="image-classification",
    tags=["image-classification", "efficientnetv2", "vision"],
    paper_url="https://arxiv.org/abs/2104.00298",
    model_card_template=card.MODEL_CARD_TEMPLATE,
):
    """EfficientNetV2 (Tan & Le, 2021) image classifier: ``[B, 3, H, W]`` → logits ``[B, num_classes]``.

    Every argument is JSON-serialisable; ``save_pretrained`` writes them to ``config.json``, labels and
    preprocessing included.

    Args:
        variant: "b0", "b1", "b2", "b3", "s", "m", "l" or "xl".
        num_classes: classifier outputs; 0 gives pooled features from ``forward``.
        id2label, label2id: class index (int or string) → name, and back (derived when omitted).
        drop_path_rate: stochastic-depth rate of the last block (block b uses rate * b / N).
        dropout: dropout before the classifier; None uses the variant's.
        pool: "avg" (global average pooling) or "attention" (multi-head attention pooling).
        num_heads: heads of the attention pool and of ``attention_maps``.
        attn_dim: width of the attention pool (None: ``num_features``).
        padding: "symmetric" (PyTorch ports) or "same" (TensorFlow SAME, for TF-ported weights).
        image_size / train_image_size: eval and train resolution (None: the variant's).
        mean, std, interpolation, crop_pct: eval preprocessing (see ``effnetv2.transforms_for``).
        source: where converted weights came from (``{"source", "file", "sha256", ...}``).
    """

    def __init__(
        self,
        variant: str = "s",
        num_classes: int = 1000,
        id2label: dict | None = None,
        label2id: dict | None = None,
        drop_path_rate: float = 0.2,
        dropout: float | None = None,
        pool: str = "avg",
        num_heads: int = 8,
        attn_dim: int | None = None,
        padding: str = "symmetric",
        in_chans: int = 3,
        image_size: int | None = None,
        train_image_size: int | None = None,
        mean: list | None = None,
        std: list | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        source: dict | None = None,
    ):
        super().__init__()
        # Every size is checked before anything is allocated: config.json may come from a stranger.
        cfg = get_variant(variant)
        _check_int("num_classes", num_classes, 0, MAX_CLASSES)
        _check(isinstance(drop_path_rate, (int, float)) and 0 <= drop_path_rate < 1,
               f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        _check(dropout is None or (isinstance(dropout, (int, float)) and 0 <= dropout < 1),
               f"dropout must be None or in [0, 1), got {dropout!r}")
        _check(pool in POOLS, f"pool must be one of {POOLS}, got {pool!r}")
        _check(padding in PADDINGS, f"padding must be one of {PADDINGS}, got {padding!r}")
        _check_int("in_chans", in_chans, 1, 64)
        _check_int("num_heads", num_heads, 1, MAX_HEADS)
        if attn_dim is not None:
            _check_int("attn_dim", attn_dim, num_heads, MAX_ATTN_DIM)
            _check(attn_dim % num_heads == 0, f"attn_dim must be a multiple of num_heads={num_heads}, got {attn_dim}")
        _check(pool != "attention" or attn_dim or cfg.head_chs % num_heads == 0,
               f"num_heads={num_heads} must divide the attention width {cfg.head_chs} (num_features): "
               f"set attn_dim to a multiple of num_heads")
        for name, size in (("image_size", image_size), ("train_image_size", train_image_size)):
            if size is not None:
                _check_int(name, size, 32, 4096)
        for name, stats in (("mean", mean), ("std", std)):
            _check(stats is None or (isinstance(stats, (list, tuple)) and len(stats) == in_chans
                                     and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and math.isfinite(v) for v in stats)),
                   f"{name} must be a list of {in_chans} finite numbers, got {stats!r}")
        _check(std is None or all(v > 0 for v in std), f"std values must be positive, got {std!r}")
        _check(interpolation is None or interpolation in INTERPOLATIONS,
               f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        _check(crop_pct is None or (isinstance(crop_pct, (int, float)) and 0.1 <= crop_pct <= 1.0),
               f"crop_pct must be in [0.1, 1], got {crop_pct!r}")
        _check(source is None or isinstance(source, dict), f"source must be a dict, got {source!r}")
        id2label, label2id = normalise_labels(id2label, label2id, num_classes)

        self.variant = str(variant).lower()
        self.num_classes = num_classes
        self.id2label, self.label2id = id2label, label2id
        self.drop_path_rate = float(drop_path_rate)
        self.dropout_rate = float(cfg.dropout if dropout is None else dropout)
        self.pool_type = pool
        self.num_heads = num_heads
        self.padding = padding
        self.num_features = cfg.head_chs
        self.pretrained_cfg = {
            "image_size": image_size or cfg.eval_size,
            "train_image_size": train_image_size or cfg.train_size,
            "mean": list(mean or IMAGENET_MEAN),
            "std": list(std or IMAGENET_STD),
            "interpolation": interpolation or "bicubic",
            "crop_pct": float(crop_pct or 1.0),
        }

        stages = cfg.scaled_stages()
        self.stem = ConvBNAct(in_chans, cfg.stem_chs, 3, stride=2, padding=padding)
        total = sum(stage.repeats for stage in stages)
        blocks = []
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(BLOCKS[stage.block](
                    stage.in_chs if i == 0 else stage.out_chs, stage.out_chs, stage.kernel,
                    stage.stride if i == 0 else 1, stage.exp_ratio, stage.se_ratio,
                    drop_path_rate=drop_path_rate * len(blocks) / total, padding=padding))
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(stages[-1].out_chs, self.num_features, num_classes, self.dropout_rate,
                         pool, num_heads, attn_dim, padding)
        self._init_weights()

        self._hub_mixin_config = {
            "variant": self.variant, "num_classes": num_classes, "id2label": id2label,
            "label2id": label2id, "drop_path_rate": self.drop_path_rate, "dropout": self.dropout_rate,
            "pool": pool, "num_heads": num_heads, "attn_dim": attn_dim, "padding": padding,
            "in_chans": in_chans, **self.pretrained_cfg, "source": source,
        }

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init over fan-out per group, as the TF reference: kaiming_normal_(mode="fan_out")
                # ignores groups, leaving depthwise kernels far too small (training from scratch stalls).
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if self.head.attn_pool is not None:  # its own scale-preserving init (see AttentionPool2d)
            self.head.attn_pool.reset_parameters()

    @property
    def config(self) -> dict:
        """The JSON config that ``save_pretrained`` writes (a copy)."""
        return dict(self._hub_mixin_config)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → ``[B, num_features, ceil(H/32), ceil(W/32)]``."""
        return self.head.project_conv(self.blocks(self.stem(x)))

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, num_features, h, w]`` → logits ``[B, num_classes]`` (pooled ``[B, D]`` if pre_logits)."""
        pool = self.head.attn_pool
        pooled = self.head.dropout(pool(feats) if pool is not None else feats.mean((2, 3)))
        return pooled if pre_logits else self.head.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, id2label: dict | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` outputs (labels
        default to "0", "1", ...); the backbone and attention pool are kept."""
        id2label, label2id = normalise_labels(id2label, None, num_classes)
        classifier = nn.Linear(self.head.pooled_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.normal_(classifier.weight, 0, 0.01)
            nn.init.zeros_(classifier.bias)
        like = self.head.project_conv.conv.weight  # the new head lives where the model does
        self.head.classifier = classifier.to(device=like.device, dtype=like.dtype)
        self.num_classes, self.id2label, self.label2id = num_classes, id2label, label2id
        self._hub_mixin_config.update(num_classes=num_classes, id2label=id2label, label2id=label2id)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, query: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-head attention ``[B, num_heads, h, w]`` over the feature grid of ``x`` ``[B, 3, H, W]``, each map summing
        to 1: the attention pool's query (or the grid cell ``query = (row, col)``'s through its projections); for
        average-pooled models, ``attention.self_attention_maps`` from ``query`` or the most attended cell."""
        feats = self.forward_features(x)
        pool = self.head.attn_pool
        if pool is None:
            return self_attention_maps(feats, self.num_heads, query)
        if query is None:
            return pool(feats, return_attention=True)[1]
        cell = check_cell(query, feats.shape[-2:])
        tokens = pool.tokens(feats)
        _, weights = pool.attn.attend(tokens[:, cell].unsqueeze(1), tokens)
        return weights[:, :, 0].unflatten(-1, feats.shape[-2:])

    def _save_pretrained(self, save_directory: Path) -> None:
        checkpoint.save_weights(self, Path(save_directory))
        # the mixin writes a card only where there is no README.md yet: it must describe these weights
        (Path(save_directory) / card.CARD_NAME).unlink(missing_ok=True)

    def generate_model_card(self, *args, **kwargs):
        return card.generate_model_card(self, **kwargs)

    def push_to_hub(self, repo_id: str, *, config: dict | None = None, model_card_kwargs: dict | None = None,
                    commit_message: str = "Push model using huggingface_hub.", **upload_kwargs):
        """Upload config.json, model.safetensors and the card to ``repo_id`` in one commit; returns the commit URL.
        Arguments as ``PyTorchModelHubMixin.push_to_hub`` (``private``, ``token``, ``branch``, ``*_patterns``...);
        a README.md already in the repo (perhaps edited on the Hub) is kept unless ``overwrite_card=True``."""
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        with tempfile.TemporaryDirectory(prefix="effnetv2-push-") as tmp:
            self.save_pretrained(tmp, config=config, model_card_kwargs=card_kwargs)
            return card.upload_model_folder(tmp, repo_id, commit_message=commit_message, **upload_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "EfficientNetV2":
        """``PyTorchModelHubMixin.from_pretrained`` (a folder or a Hub id, ``revision=``, ``token=``,
        ``cache_dir=``, model overrides such as ``num_classes=``), in eval mode, with errors that say
        which repo or file failed and what to do (``hub.ModelDownloadError`` for download problems)."""
        model_id = str(pretrained_model_name_or_path)
        hub.check_revision(kwargs.get("revision"))
        hub.check_config_size(model_id)
        if hub.is_offline():  # HF_HUB_OFFLINE set after huggingface_hub read it: still no network
            kwargs["local_files_only"] = True
        with hub.explained_download_errors(model_id, hub.CONFIG_NAME, kwargs.get("revision"), kwargs.get("token"),
                                           kwargs.get("local_files_only", False)):
            try:
                return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            except AttributeError:  # huggingface_hub calls config.items() on whatever JSON it read
                hub.check_config_is_an_object(model_id, kwargs.get("revision"), kwargs.get("cache_dir"))
                raise

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config: dict | None = None, map_location: str = "cpu", **kwargs):
        return hub.load_pretrained(cls, model_id=model_id, config=config, map_location=map_location, **kwargs)
