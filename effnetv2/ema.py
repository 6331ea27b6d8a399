"""Exponential moving average (EMA) of a model's weights, evaluated and saved in place of the raw weights."""
from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_model(model: nn.Module, decay: float = 0.9998, warmup: bool = True) -> AveragedModel:
    """torch's ``AveragedModel`` of ``model``: each ``update_parameters(model)`` (once per optimizer step)
    does ``ema = d * ema + (1 - d) * weights``; buffers (BatchNorm statistics) are copied as they are
    (``use_buffers=False``). ``.module`` is a full model, used for evaluation and saving.

    With ``warmup`` the decay of update ``n`` (1-based) is ``min(decay, (1 + n) / (10 + n))``, as in
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``: kept because a short fine-tune would
    otherwise end with an average dominated by the initial weights.
    """
    if not 0 < decay < 1:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

    def update(ema_params, params, num_averaged):  # num_averaged counts the priming copy: update n sees n
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)) if warmup else decay)(ema_params, params, num_averaged)

    ema = AveragedModel(model, multi_avg_fn=update)
    ema.update_parameters(model)  # AveragedModel's first update copies: the EMA then starts from these weights
    return ema.eval().requires_grad_(False)
