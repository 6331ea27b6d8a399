import math

import pytest
import torch

from effnetv2.ema import ModelEma
from effnetv2.progressive import progressive_plan, stage_for_epoch
from effnetv2.schedule import cosine_factor, cosine_schedule


def test_cosine_values():
    # lr(t) = lr * (((1 + cos(pi t / T)) / 2) * (1 - lrf) + lrf)
    assert cosine_factor(0, 100, 0.01) == pytest.approx(1.0)
    assert cosine_factor(50, 100, 0.01) == pytest.approx(0.5 * 0.99 + 0.01)
    assert cosine_factor(100, 100, 0.01) == pytest.approx(0.01)
    assert cosine_factor(25, 100, 0.1) == pytest.approx(((1 + math.cos(math.pi / 4)) / 2) * 0.9 + 0.1)


def test_warmup_then_cosine():
    assert [cosine_factor(s, 20, 0.01, warmup_steps=4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine_factor(4, 20, 0.01, warmup_steps=4) == pytest.approx(1.0)
    assert cosine_factor(12, 20, 0.01, warmup_steps=4) == pytest.approx(0.505)


def test_scheduler_steps_once_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = cosine_schedule(opt, total_steps=10, lrf=0.01)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.1 * (0.5 * 0.99 + 0.01))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("variant, sizes, magnitudes, mixups, dropouts", [
    ("s", [128, 185, 243, 300], [5, 8, 12, 15], [0, 0, 0, 0], [0.1, 0.1667, 0.2333, 0.3]),
    ("m", [128, 212, 296, 380], [5, 10, 15, 20], [0, 0.0667, 0.1333, 0.2], [0.1, 0.2, 0.3, 0.4]),
    ("l", [128, 212, 296, 380], [5, 12, 18, 25], [0, 0.1333, 0.2667, 0.4], [0.1, 0.2333, 0.3667, 0.5]),
])
def test_paper_progressive_plan(variant, sizes, magnitudes, mixups, dropouts):
    plan = progressive_plan(variant, epochs=8, num_stages=4)
    assert [s.start_epoch for s in plan] == [0, 2, 4, 6]
    assert [s.image_size for s in plan] == sizes
    assert [s.randaugment for s in plan] == magnitudes
    assert [s.mixup for s in plan] == pytest.approx(mixups, abs=1e-4)
    assert [s.dropout for s in plan] == pytest.approx(dropouts, abs=1e-4)
    assert stage_for_epoch(plan, 5).index == 2


def test_progressive_plan_capped_for_small_runs_and_errors():
    plan = progressive_plan("b0", epochs=4, num_stages=2, max_size=64)
    assert [s.image_size for s in plan] == [32, 64]
    with pytest.raises(ValueError, match="at least as many epochs"):
        progressive_plan("s", epochs=2, num_stages=4)


def test_ema_math():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.1))
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.19))
    restored = ModelEma(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and torch.equal(restored.module.weight, ema.module.weight)
