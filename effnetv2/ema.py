"""Exponential moving average of a model's weights, evaluated and saved in place of the raw weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; buffers (BatchNorm
    statistics) are copied. ``module`` is a full model usable for evaluation and saving."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0 < decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.module.load_state_dict(state["module"])
