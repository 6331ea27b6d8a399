"""The training loop's pieces (train.py): freezing the backbone, mixup/CutMix targets, precise BatchNorm,
replicas kept equal, how an epoch's images spread over processes, the validation confusion matrix."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import EfficientNetV2

HEAD_PREFIX = "head."


def freeze_backbone(model: EfficientNetV2) -> list[str]:
    """Train only the head (1x1 head conv + BN, attention pool, classifier); returns the trainable parameters' names."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEAD_PREFIX))
    return [name for name, p in model.named_parameters() if p.requires_grad]


def backbone_batchnorm_eval(model: EfficientNetV2) -> None:
    """Put the backbone's BatchNorm layers in eval mode (call after every ``model.train()``): their statistics stay."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(HEAD_PREFIX):
            m.eval()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
              label_smoothing: float = 0.0, generator: torch.Generator | None = None):
    """Mixup or CutMix (each half the time when both alphas are > 0) and label smoothing: (images, targets
    ``[B, num_classes]`` summing to 1). Not torchvision's v2.MixUp/CutMix: they pair neighbours, on the global RNG.
    """
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
        cy = int(torch.randint(0, height, (), generator=generator))
        cx = int(torch.randint(0, width, (), generator=generator))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually kept
    else:
        x = x * lam + x[perm] * (1 - lam)
    return x, targets * lam + targets[perm] * (1 - lam)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, prefix: str = "") -> int:
    """Precise BatchNorm: the running statistics of the BatchNorm layers named ``prefix...`` become their exact
    average over ``batches``; returns the batches used. Not ``swa_utils.update_bn``: it runs the model in training
    mode (drop-path shifts the statistics) and resets every BatchNorm, where a frozen backbone keeps its own."""
    layers = [m for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and name.startswith(prefix)]
    if not layers:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    count = 0
    for x in batches:
        if len(x) < 2 and count:  # a lone image gives no batch statistics at a 1x1 grid: skip a last one
            continue
        model(x)
        count += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)
    return count


@torch.no_grad()
def average_buffers(model: nn.Module, accelerator) -> None:
    """Average the floating-point buffers (BatchNorm statistics) over all processes: every replica the same."""
    if accelerator.num_processes == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = accelerator.reduce(torch.cat([b.reshape(-1).float() for b in buffers]), "mean")
    for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(value.view_as(b))


class EpochCoverage(NamedTuple):
    """What one training epoch does with ``num_images`` when every process takes whole batches."""

    trained: int  # image slots trained per epoch: steps x batch size x processes
    left_out: int  # images no process trains on this epoch (a different random set each epoch)
    repeated: int  # slots filled by repeating images (fewer images than one batch per process)

    def describe(self, batch_size: int, num_processes: int) -> str | None:
        if self.left_out:
            return (f"each epoch trains on {self.trained} of the {self.trained + self.left_out} training images (whole "
                    f"batches of {batch_size} on each of {num_processes} process(es)); the other {self.left_out}, "
                    f"a different random {self.left_out} each epoch, are left out")
        if self.repeated:
            return (f"{self.trained - self.repeated} training images are less than a batch of {batch_size} for each "
                    f"of {num_processes} processes: {self.repeated} are repeated each epoch")
        return None


def epoch_coverage(num_images: int, batch_size: int, num_processes: int) -> EpochCoverage:
    """How an epoch covers ``num_images``: what fills no whole step is left out (``drop_last``); a set smaller
    than one step is one short batch on one process, padded with repeats on several (``even_batches``)."""
    per_step = batch_size * num_processes
    if num_images >= per_step:
        trained = num_images // per_step * per_step
        return EpochCoverage(trained, num_images - trained, 0)
    if num_processes == 1:  # one short batch: Accelerate pads only so that every process has a batch
        return EpochCoverage(num_images, 0, 0)
    return EpochCoverage(per_step, 0, per_step - num_images)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts from predictions and labels ``[N]``: row = true class, column = predicted."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, num_classes: int, channels_last: bool = False):
    """``({"val_loss", "val_accuracy", "val_images"}, [C, C] confusion matrix)`` over all processes' ``loader``."""
    model.eval()
    parts = []
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        parts.append([t.cpu() for t in accelerator.gather_for_metrics((logits.argmax(-1), y, loss))])
    preds, labels, losses = (torch.cat(part) for part in zip(*parts))
    metrics = {"val_loss": losses.mean().item(), "val_accuracy": (preds == labels).float().mean().item(),
               "val_images": len(labels)}
    return metrics, confusion_matrix(preds, labels, num_classes)
