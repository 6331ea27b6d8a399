"""train.py, loaded as a module for the tests (it is a script, not part of the package), and a fresh
Accelerate state for each run: ``train.main()`` builds an Accelerator, whose state is process-wide."""
import importlib.util
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)
real_cross_entropy = torch.nn.functional.cross_entropy


def reset_accelerate() -> None:
    """Forget the Accelerator state of an earlier ``train.main()`` in this process."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Autouse in every test module that imports it: each test starts and ends with a fresh state."""
    reset_accelerate()
    yield
    reset_accelerate()


def patch_training_loss(patch: pytest.MonkeyPatch, spy) -> None:
    """Route train.py's training loss, ``F.cross_entropy`` on soft targets ``[B, C]``, through
    ``spy(logits, targets)``; validation's (class indices ``[B]``) is left alone. ``spy`` may call
    ``torch.nn.functional.cross_entropy`` as it was before the patch through ``real_cross_entropy``."""
    patch.setattr(torch.nn.functional, "cross_entropy", lambda logits, targets, *args, **kwargs: (
        spy(logits, targets) if targets.ndim == 2 else real_cross_entropy(logits, targets, *args, **kwargs)))
