"""The training loop's pieces (train.py): freezing the backbone, mixup/CutMix targets,
precise BatchNorm, replicas kept equal, how an epoch's images spread over processes, and the
validation confusion matrix."""
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
    """Train only the head (1x1 head conv + BN, attention pool, classifier): every other parameter
    gets ``requires_grad=False``. Returns the names of the trainable parameters."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEAD_PREFIX))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def backbone_batchnorm_eval(model: EfficientNetV2) -> None:
    """Put the backbone's BatchNorm layers in eval mode so their running statistics stay as they
    are (call after every ``model.train()``); the head's BatchNorm keeps training."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(HEAD_PREFIX):
            m.eval()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
              label_smoothing: float = 0.0, generator: torch.Generator | None = None):
    """Soft targets for a batch, with mixup (Beta(``mixup``, ``mixup``)) or CutMix (Beta(``cutmix``,
    ``cutmix``); chosen half the time when both are on) and label smoothing.

    ``x`` ``[B, 3, H, W]``, ``y`` ``[B]`` class indices → (images ``[B, 3, H, W]``, targets
    ``[B, num_classes]``, rows summing to 1). Alphas of 0 turn a method off. Not torchvision's
    ``v2.MixUp``/``CutMix``: same blend and box, but they pair each image with its neighbour (``roll``), not
    a random partner, and draw on the global RNG only, so the same seed gives other batches.
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
    """Precise BatchNorm: replace the running statistics of the BatchNorm layers whose names start
    with ``prefix`` by their exact average over ``batches`` (an iterable of ``[B, 3, H, W]`` tensors),
    computed with the current weights. Returns the number of batches used.

    Running statistics are an exponential average (momentum 0.1) over past weights; early in training
    from scratch they lag far behind (the first steps even start from mean 0 / var 1), and an EMA of
    the weights never matches the statistics it copies. Only BatchNorm runs in training mode here:
    dropout and drop-path stay off, so no random numbers are drawn. Not ``swa_utils.update_bn``: it runs
    the whole model in training mode (drop-path would shift the statistics) and resets every BatchNorm,
    where a frozen backbone must keep its own (``prefix="head."``).
    """
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
    """Average the floating-point buffers (BatchNorm running mean/var) over all processes.

    Under DDP the parameters stay identical on every process, but each process updates BatchNorm
    statistics from its own shard; averaging them makes every replica, and the saved model, the same.
    """
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


def epoch_coverage(num_images: int, batch_size: int, num_processes: int) -> EpochCoverage:
    """How a training epoch covers ``num_images``: each step takes ``batch_size`` images on each of
    ``num_processes`` processes. The remainder that fills no whole step is left out (train.py's
    ``drop_last``: a small last batch would give noisy BatchNorm statistics, and padding it would
    count some images twice); a set smaller than one step is one short batch on one process, and is
    padded with repeats on several (Accelerate's ``even_batches``)."""
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
