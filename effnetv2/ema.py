"""Exponential moving average (EMA) of a model's weights, evaluated and saved in place of the raw weights."""
from __future__ import annotations

import copy

import torch
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


class ModelEma:
    """After every optimizer step: ``ema = d * ema + (1 - d) * weights``; buffers (BatchNorm
    statistics) are copied as they are. ``module`` is a full model, used for evaluation and saving.

    With ``warmup=True`` the decay of update ``n`` (1-based) is ``min(decay, (1 + n) / (10 + n))``,
    as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``: early updates follow the
    weights closely, so a short fine-tune does not end with an average dominated by the initial
    weights. ``warmup=False`` uses ``decay`` from the first update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (call once per optimizer step)."""
        decay = self.current_decay()
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.warmup = state.get("warmup", True)
        self.num_updates = state.get("num_updates", 0)
        self.module.load_state_dict(state["module"])
