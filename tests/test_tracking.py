"""--report-to: which of Accelerate's trackers a run logs to (the trackio round trip is in test_hub_data)."""
import pytest
from accelerate.tracking import get_available_trackers

from effnetv2.errors import UsageError
from effnetv2.tracking import trackers


def test_report_to_names_accelerates_trackers():
    installed = {str(t) for t in get_available_trackers()}
    assert {"tensorboard", "trackio"} <= installed  # both are in requirements.txt
    assert trackers("tensorboard") == ["tensorboard"] and trackers("trackio") == ["trackio"]
    assert trackers("all") == "all" and trackers("none") is None


def test_a_tracker_that_is_not_installed_is_an_error_saying_what_to_install(monkeypatch):
    # Accelerate itself skips a missing tracker with a debug message: the run would log nowhere
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    with pytest.raises(UsageError, match=r"--report-to wandb: the wandb package is not installed; `pip install wandb`"):
        trackers("wandb")
    with pytest.raises(UsageError, match="choose one of tensorboard, trackio, wandb, mlflow, all, none"):
        trackers("comet")
