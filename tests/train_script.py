"""train.py, loaded as a module for the tests (it is a script, not part of the package), and a fresh
Accelerate state for each run: ``train.main()`` builds an Accelerator, whose state is process-wide."""
import importlib.util
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


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
