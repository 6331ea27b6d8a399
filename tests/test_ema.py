import pytest
import torch

from effnetv2.ema import ModelEma

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md


def linear(value: float) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    torch.nn.init.constant_(model[0].weight, value)
    return model


def test_ema_math_without_warmup():
    model = linear(0.0)
    ema = ModelEma(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 0.1))  # 0.9 * 0 + 0.1 * 1
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 0.19))  # 0.9 * 0.1 + 0.1 * 1
    assert model[0].weight.requires_grad and not ema.module[0].weight.requires_grad


def test_warmup_decay_follows_num_updates():
    model = linear(0.0)
    ema = ModelEma(model, decay=0.99)
    expected = 0.0
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    for n in range(1, 6):
        decay = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        ema.update(model)
        expected = decay * expected + (1 - decay)
        assert ema.module[0].weight[0, 0].item() == pytest.approx(expected)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99  # capped at decay once warmed up


def test_buffers_are_copied_not_averaged():
    model = linear(0.5)
    ema = ModelEma(model, decay=0.9)
    model.train()
    model(torch.randn(8, 2) + 3)  # moves BatchNorm's running mean
    ema.update(model)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)


def test_state_round_trip_and_bad_decay():
    model = linear(0.0)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    ema.update(model)
    ema.update(model)
    restored = ModelEma(linear(5.0), decay=0.5, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.9, True, 2)
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.0)
