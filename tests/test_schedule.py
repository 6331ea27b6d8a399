import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

from effnetv2.errors import UsageError
from effnetv2.schedule import cosine_schedule, optimizer_steps_per_epoch

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md


def lr_formula(t, total, lr, lrf):
    return lr * (((1 + math.cos(math.pi * t / total)) / 2) * (1 - lrf) + lrf)


def factors(total: int, lrf: float, warmup: int = 0, steps: int | None = None) -> list[float]:
    """The multiplier of the base lr at each optimizer step 0, 1, ... of ``cosine_schedule``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, seen = cosine_schedule(opt, total, lrf, warmup), []
    for _ in range(total + 1 if steps is None else steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_cosine_values_start_middle_end():
    f = factors(100, 0.01, steps=251)
    assert (f[0], f[50], f[100]) == pytest.approx((1.0, 0.5 * 0.99 + 0.01, 0.01))
    assert factors(100, 0.1)[25] == pytest.approx(((1 + math.cos(math.pi / 4)) / 2) * 0.9 + 0.1)
    assert f[250] == pytest.approx(0.01)  # past the end it stays at lrf


def test_warmup_is_linear_then_cosine_over_the_rest():
    f = factors(20, 0.01, warmup=4)
    assert f[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert f[12] == pytest.approx(0.505)  # half-way through the 16 decay steps
    assert f[20] == pytest.approx(0.01)
    assert factors(20, 0.01, warmup=1)[:2] == pytest.approx([1.0, 1.0])


def test_scheduler_follows_the_formula_once_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = cosine_schedule(opt, total_steps=10, lrf=0.01)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([lr_formula(t, 10, 0.1, 0.01) for t in range(10)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_scheduler_state_is_plain_json_and_restores():
    import json

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = cosine_schedule(opt, total_steps=10, lrf=0.01)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = json.loads(json.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    restored = cosine_schedule(opt2, total_steps=10, lrf=0.01)
    restored.load_state_dict(saved)
    opt2.step()
    restored.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_formula(4, 10, 0.1, 0.01))


def test_bad_arguments_are_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UsageError, match="total_steps"):
        cosine_schedule(opt, 0)
    with pytest.raises(UsageError, match="warmup_steps"):
        cosine_schedule(opt, 5, warmup_steps=5)
    with pytest.raises(UsageError, match="lrf"):
        cosine_schedule(opt, 5, lrf=2.0)


@pytest.mark.parametrize("num_batches, grad_accum", [(7, 1), (7, 2), (7, 3), (6, 3), (1, 4)])
def test_steps_per_epoch_match_accelerate(num_batches, grad_accum):
    """The T of the schedule is the number of optimizer steps Accelerate really takes per epoch,
    including the step it forces at the end of the data loader."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(TensorDataset(torch.randn(num_batches * 2, 2)), batch_size=2)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        steps = 0
        for _ in range(2):  # two epochs: the accumulation counter restarts each epoch
            for (x,) in loader:
                with accelerator.accumulate(model):
                    accelerator.backward(model(x).sum())
                    opt.step()
                    opt.zero_grad()
                steps += accelerator.sync_gradients
        assert steps == 2 * optimizer_steps_per_epoch(len(loader), grad_accum)
        assert optimizer_steps_per_epoch(num_batches, grad_accum) == math.ceil(num_batches / grad_accum)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

