"""Exponential moving average (EMA) of a model's weights, evaluated and saved in place of the raw weights."""
from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .errors import UsageError


def ema_model(model: nn.Module, decay: float = 0.9998, warmup: bool = True) -> AveragedModel:
    """torch's ``AveragedModel`` of ``model`` (``ema = d * ema + (1 - d) * weights``, buffers copied). With ``warmup``,
    ``d = min(decay, (1 + n) / (10 + n))`` at update ``n`` (TensorFlow's; ``get_ema_multi_avg_fn`` lacks it)."""
    if not 0 < decay < 1:
        raise UsageError(f"EMA decay (--ema-decay) must be in (0, 1), got {decay}")

    def update(ema_params, params, num_averaged):  # num_averaged counts the priming copy: update n sees n
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)) if warmup else decay)(ema_params, params, num_averaged)

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.update_parameters(model)  # AveragedModel's first update copies: the EMA then starts from these weights
    return ema.eval().requires_grad_(False)
