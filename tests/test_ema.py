import pytest
import torch

from effnetv2.ema import ema_model
from effnetv2.errors import UsageError

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md


def linear(value: float) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    torch.nn.init.constant_(model[0].weight, value)
    return model


def test_ema_math_without_warmup():
    model = linear(0.0)
    ema = ema_model(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 0.1))  # 0.9 * 0 + 0.1 * 1
    ema.update_parameters(model)
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 0.19))  # 0.9 * 0.1 + 0.1 * 1
    assert model[0].weight.requires_grad and not ema.module[0].weight.requires_grad


def test_warmup_decay_follows_the_number_of_updates():
    model = linear(0.0)
    ema = ema_model(model, decay=0.99)
    expected = 0.0
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    for n in range(1, 6):
        decay = min(0.99, (1 + n) / (10 + n))
        ema.update_parameters(model)
        expected = decay * expected + (1 - decay)
        assert ema.module[0].weight[0, 0].item() == pytest.approx(expected)
    ema.n_averaged.fill_(10_000)  # warmed up: the decay is capped at 0.99
    before = ema.module[0].weight[0, 0].item()
    ema.update_parameters(model)
    assert ema.module[0].weight[0, 0].item() == pytest.approx(0.99 * before + 0.01)


def test_a_long_run_equals_the_lerp_by_hand_bit_for_bit():
    """The formula applied tensor by tensor with ``lerp_`` (what effnetv2 did before AveragedModel)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    ema, by_hand = ema_model(model, decay=0.97), [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(1, 31):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        ema.update_parameters(model)
        for mine, p in zip(by_hand, model.parameters()):
            mine.lerp_(p.detach(), 1 - min(0.97, (1 + n) / (10 + n)))
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), by_hand, strict=True))


def test_buffers_are_copied_not_averaged():
    model = linear(0.5)
    ema = ema_model(model, decay=0.9)
    model.train()
    model(torch.randn(8, 2) + 3)  # moves BatchNorm's running mean
    ema.update_parameters(model)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)


def test_bad_decay():
    with pytest.raises(UsageError, match="decay"):
        ema_model(linear(0.0), decay=1.0)
