"""Publishing a train.py run: the command and card fields shown on the Hub (no local path in them), and
the push that, when it fails, keeps the run and says how to retry."""
from __future__ import annotations

import os
import shlex
from argparse import Namespace
from pathlib import Path

from .card import upload_model_folder
from .run_folder import RunError
from .sources import Source

PATH_FLAGS = ("--data-path", "--dataset", "--output-dir", "--weights", "--resume")  # flags that may name local paths
NOT_PUSHED = ["checkpoints/*", "logs/*"]


def public_argv(argv: list[str]) -> list[str]:
    """``argv`` with each absolute, ``~`` or ``..`` path given to :data:`PATH_FLAGS` shown by its last name
    (``/home/me/flowers`` → ``flowers``); the rest as given."""
    def is_path_flag(arg: str) -> bool:
        return len(arg) > 2 and arg.startswith("--") and any(flag.startswith(arg) for flag in PATH_FLAGS)

    shown, takes_path = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if takes_path:
            shown.append(_public_path(arg))
        elif eq and is_path_flag(flag):
            shown.append(f"{flag}={_public_path(value)}")
        else:
            shown.append(arg)
        takes_path = not eq and is_path_flag(arg)
    return shown


def _public_path(value: str) -> str:
    if os.path.isabs(value) or value.startswith("~") or ".." in Path(value).parts:
        return Path(os.path.abspath(os.path.expanduser(value))).name or value
    return value


def published_command(argv: list[str], processes: int) -> str:
    """The train.py command line ``argv`` for the model card, local paths reduced to their last name."""
    launcher = f"accelerate launch --num_processes {processes} train.py" if processes > 1 else "python train.py"
    return f"{launcher} {shlex.join(public_argv(argv))}"


def initial_weights_text(source: Source) -> str:
    """The card's "initial weights": Hub ids and torchvision names as given, a local folder or file by its name."""
    if source.kind == "none":
        return "none (from scratch)"
    if source.kind in ("folder", "weights"):
        return f"local {'folder' if source.kind == 'folder' else 'file'} `{source.path.name}` (not published)"
    return source.text


def card_fields(args: Namespace, source: Source, freeze: bool, clip_grad: float, data_card: dict, run: dict) -> dict:
    """The model card's fields (``model_card_kwargs``) for train.py's ``args`` and the run summarised by ``run``."""
    final = run["final"]
    return dict(
        metrics={"accuracy": round(final["val_accuracy"], 4), "val_loss": round(final["val_loss"], 4)},
        **data_card,  # the dataset's name, revision and description; the model-index shows the validation accuracy
        base_model=source.repo_id if source.kind == "hub" else None,
        training={"initial weights": initial_weights_text(source),
                  "epochs": f"{final.get('epoch', run['start_epoch'])} of {args.epochs}",
                  "optimizer steps": run["optimizer_steps"], "optimizer": args.optimizer,
                  "lr (cosine decay to lr*lrf)": args.lr, "lrf": args.lrf, "warmup steps": run["warmup_steps"],
                  "weight decay": args.weight_decay, "batch size per process": args.batch_size,
                  "processes": run["processes"], "gradient accumulation": args.grad_accum,
                  "mixed precision": run["mixed_precision"], "frozen backbone": freeze,
                  "label smoothing": args.label_smoothing, "gradient clipping (max L2 norm)": clip_grad or "off",
                  "progressive learning": f"{args.stages} stages" if args.progressive else "off",
                  "train image size": run["train_image_size"], "saved weights": run["saved_weights"]},
        command=run["command"],
    )


def push(out: Path, repo_id: str, private: bool, overwrite_card: bool, val_accuracy: float) -> str:
    """Upload the model folder ``out`` (not its checkpoints and logs) to ``repo_id``; returns its URL. A
    failure is a RunError (status 1) with the commands to retry: the run stays saved in ``out``."""
    try:
        # a copy: HfApi.upload_folder appends its own patterns to the list it is given
        commit = upload_model_folder(out, repo_id, private=private, ignore_patterns=list(NOT_PUSHED),
                                     overwrite_card=overwrite_card,
                                     commit_message=f"train.py: val accuracy {val_accuracy:.4f}")
    except Exception as err:  # the run is saved locally; a failed push must not lose it
        retry = (f"python -c \"from huggingface_hub import HfApi; HfApi().upload_folder(repo_id='{repo_id}', "
                 f"folder_path='{out}', ignore_patterns={NOT_PUSHED})\"")
        first_line = str(err).splitlines()[0] if str(err) else ""
        excludes = " ".join(f"--exclude '{pattern}'" for pattern in NOT_PUSHED)
        raise RunError(f"pushing to {repo_id} failed ({type(err).__name__}: {first_line}).\nEverything is saved in "
                       f"{out}. Log in (`hf auth login` or HF_TOKEN) if needed, then retry with:\n"
                       f"  hf upload {repo_id} {out} . {excludes}\nor\n  {retry}",
                       status=1) from None
    return commit.repo_url
