"""Experiment trackers for train.py (``--report-to``), through Accelerate's trackers."""
from __future__ import annotations

from .errors import UsageError

REPORT_TO = ("tensorboard", "trackio", "wandb", "mlflow", "all", "none")


def trackers(report_to: str) -> list[str] | str | None:
    """Accelerate's ``log_with`` for ``--report-to``; UsageError for a tracker not installed (Accelerate skips it)."""
    from accelerate.tracking import get_available_trackers  # the [train] extra

    if report_to not in REPORT_TO:
        raise UsageError(f"--report-to {report_to}: choose one of {', '.join(REPORT_TO)}")
    if report_to in ("all", "none"):
        return None if report_to == "none" else "all"
    if report_to not in {str(t) for t in get_available_trackers()}:
        raise UsageError(f"--report-to {report_to}: the {report_to} package is not installed; "
                         f"`pip install {report_to}`, or choose another tracker")
    return [report_to]
