"""Fine-tune EfficientNetV2 on a folder of photos (one sub-folder per class) or a Hub dataset with Hugging Face Accelerate.

    python train.py --data-path flower_photos --weights torchvision:s --epochs 30
    accelerate launch train.py --dataset beans --weights torchvision:s --report-to trackio
    python train.py --data-path shapes --variant b0 --image-size 64 --max-steps 20     # smoke run

--output-dir receives a Hub-ready model folder (the card filled with the run), metrics.json, the split,
tracker logs and checkpoints/epoch_N, so a killed run continues with --resume latest. The flags' help is
the reference; the README's "Fine-tuning on your own photos" section says why the defaults are what they are.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from effnetv2 import transforms_for
from effnetv2.card import upload_model_folder
from effnetv2.checkpoint import weights_fingerprint
from effnetv2.configs import VARIANTS
from effnetv2.data import DatasetError
from effnetv2.ema import ema_model
from effnetv2.hub_data import TrainingData, load_training_data
from effnetv2.finetune import build_model
from effnetv2.model import EfficientNetV2
from effnetv2.progressive import Stage, progressive_plan, stage_for_epoch
from effnetv2.schedule import cosine_schedule, optimizer_steps_per_epoch
from effnetv2.run_folder import (OutputDirError, WriteError, atomic_path, check_output_dir, clear_output_dir,
                                 find_resume_checkpoint, list_checkpoints, load_checkpoint,
                                 prune_checkpoints, public_argv, resume_mismatches, save_checkpoint, save_model)
from effnetv2.sources import Source, parse_source
from effnetv2.training import (HEAD_PREFIX, average_buffers, backbone_batchnorm_eval, confusion_matrix, epoch_coverage,
                               freeze_backbone, mix_batch, recalibrate_batchnorm)
from effnetv2.tracking import REPORT_TO, trackers
from effnetv2.viz import confusion_matrix_png

RESUME_MUST_MATCH = ("variant", "weights", "pool", "batch_size", "grad_accum", "optimizer", "lr", "lrf", "epochs",
                     "seed", "val_fraction", "ema", "ema_decay", "progressive", "stages")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", help="folder with one sub-folder of images per class")
    data.add_argument("--dataset", metavar="ID", help="Hub dataset (org/name[@revision]) or a datasets.save_to_disk "
                                                      "folder, read with the datasets library")
    p.add_argument("--dataset-config", default=None, help="the --dataset's configuration (subset) name")
    p.add_argument("--image-column", default=None, help="--dataset's image column (default: its Image feature)")
    p.add_argument("--label-column", default=None, help="--dataset's label column (default: its ClassLabel feature)")
    p.add_argument("--streaming", action="store_true", help="stream --dataset from the Hub instead of downloading "
                                                            "it, each process reading its own shards")
    p.add_argument("--report-to", default="tensorboard", choices=REPORT_TO, help="experiment tracker(s)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="model variant (default: the --weights' variant, or s)")
    p.add_argument("--weights", default="none",
                   help="initial weights: Hub id (org/name[@revision]), folder, torchvision:<variant>, .pth, or none")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lrf", type=float, default=0.01, help="final lr = lr * lrf (cosine decay)")
    p.add_argument("--image-size", type=int, default=None,
                   help="train size (default: the weights' or variant's); with --progressive, the last stage's")
    p.add_argument("--eval-size", type=int, default=None, help="validation size (default: --image-size, else "
                                                                  "the weights' or variant's eval size)")
    p.add_argument("--freeze-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="train only the head, backbone BatchNorm statistics frozen (default: on with --weights, "
                        "off from scratch)")
    p.add_argument("--output-dir", default="outputs/run", help="a new or empty folder, or this run's (--resume)")
    p.add_argument("--resume", default=None, metavar="{PATH,latest}",
                   help="a checkpoint folder, or 'latest' in --output-dir/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what --output-dir holds (an earlier train.py run) before this run starts")
    p.add_argument("--progressive", action="store_true", help="EfficientNetV2 progressive learning")
    p.add_argument("--stages", type=int, default=4, help="progressive-learning stages (M)")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="push the model folder at the end")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--overwrite-card", action="store_true",
                   help="replace the Hub repo's README.md even if it was edited there (default: keep it)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share of each class")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warmup, in epochs")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear lr warmup, in optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the gradients' global L2 norm to NORM before each optimizer step (default: 1.0 "
                        "for an attention pool, off for avg; 0: off)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights; it is evaluated and saved")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--randaugment", type=int, default=0, help="RandAugment magnitude (0: off)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="area share of the random resized crop (torchvision's default 0.08 1; raise MIN when "
                        "crops must keep the object)")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   choices=[b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO],
                   help="torch.compile the model through Accelerate, with BACKEND (default inductor; aot_eager needs "
                        "no C++ compiler); the same as `accelerate launch --dynamo_backend BACKEND`")
    p.add_argument("--pool", default=None, choices=["avg", "attention"], help="default: the weights' pool, or avg")
    p.add_argument("--num-heads", type=int, default=None, help="attention-pool heads (default 8)")
    p.add_argument("--attn-dim", type=int, default=None, help="attention-pool width (default: num_features)")
    p.add_argument("--drop-path-rate", type=float, default=None, help="stochastic depth (default 0.2)")
    p.add_argument("--dropout", type=float, default=None, help="dropout before the classifier (default: variant's)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--precise-bn", type=int, default=256, metavar="N",
                   help="before every evaluation, recompute BatchNorm statistics on N training images (eval "
                        "transform) with the weights being evaluated; 0: off")
    p.add_argument("--check-images", action=argparse.BooleanOptionalAction, default=True,
                   help="decode every image once before training and skip unreadable ones")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"], help="dtype of the saved weights")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many epoch checkpoints to keep")
    args = p.parse_args(argv)
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        p.error(f"--crop-scale {low} {high}: give MIN MAX with 0 < MIN <= MAX <= 1, e.g. --crop-scale 0.5 1")
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        p.error(f"--clip-grad {args.clip_grad}: give a positive max gradient norm (e.g. 1.0), or 0 to turn clipping off")
    if not args.dataset and (args.dataset_config or args.image_column or args.label_column or args.streaming):
        p.error("--dataset-config, --image-column, --label-column and --streaming go with --dataset")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output-dir and --overwrite deletes it: give one of them")
    return args


def make_accelerator(args: argparse.Namespace, out: Path) -> Accelerator:
    return Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        dynamo_backend=args.compile,  # None: `accelerate launch --dynamo_backend` (or its config) decides
        log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # a seeded sampler gives every epoch the same order after a resume (set_epoch below)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


class RunError(Exception):
    """A run that cannot start or go on: one line for the user (no traceback) and the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def check_setup(args: argparse.Namespace, accelerator: Accelerator, out: Path) -> None:
    """RunError for fp16 on the CPU and for an output folder that is a file, read-only or another run's."""
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate autocasts to fp16 only on accelerators: on the CPU the run would be float32, silently
        raise RunError("--mixed-precision fp16 needs a GPU; on the CPU it would train in float32. Use "
                       "--mixed-precision bf16 (CPUs autocast to bfloat16) or leave it off")
    try:
        check_output_dir(out, resume=bool(args.resume), overwrite=args.overwrite)
    except OutputDirError as err:
        raise RunError(str(err)) from None
    accelerator.wait_for_everyone()  # every process has looked before the main one writes there


def load_data(args: argparse.Namespace, accelerator: Accelerator) -> TrainingData:
    """The run's data (--data-path or --dataset): unreadable images reported and skipped, split; every
    data error is a RunError before any training starts."""
    try:
        return load_training_data(
            data_path=args.data_path, dataset=args.dataset, config=args.dataset_config, image_column=args.image_column,
            label_column=args.label_column, streaming=args.streaming, val_fraction=args.val_fraction, seed=args.seed,
            check_images=args.check_images, workers=max(1, args.workers), report=accelerator.is_main_process)
    except DatasetError as err:
        raise RunError(str(err)) from None


def find_resume(args: argparse.Namespace, settings: dict, checkpoints: Path, data: dict) -> tuple[Path | None, dict]:
    """The checkpoint --resume names and its train_state (None, {} without --resume); it must be this
    run's: the same ``settings`` (those in RESUME_MUST_MATCH) and the same ``data``."""
    if not args.resume:
        return None, {}
    try:
        folder, state = find_resume_checkpoint(args.resume, checkpoints)
    except ValueError as err:
        raise RunError(str(err)) from None
    mismatches = resume_mismatches(state, settings, RESUME_MUST_MATCH, data)
    if mismatches:
        raise RunError(f"--resume {folder}: the checkpoint was made with different " + ", ".join(mismatches)
                       + "; resume with the original settings and data, or start a new run (--overwrite, or "
                         "another --output-dir)")
    return folder, state


class Resolved(NamedTuple):
    """What the command line leaves to the weights, decided once they are loaded (``args`` stays as parsed)."""

    source: Source
    variant: str
    clip_grad: float  # 0: off
    freeze: bool

    def settings(self, args: argparse.Namespace) -> dict:
        """The run's settings: the command line with the resolved values (checkpoints, trackers)."""
        return {**vars(args), "variant": self.variant, "clip_grad": self.clip_grad}


def make_model(args: argparse.Namespace, classes: list[str]) -> tuple[EfficientNetV2, Resolved]:
    """The model to fine-tune (initial weights in, classifier for ``classes``) and what it resolves."""
    overrides = {"pool": args.pool, "num_heads": args.num_heads, "attn_dim": args.attn_dim,
                 "drop_path_rate": args.drop_path_rate, "dropout": args.dropout,
                 "train_image_size": args.image_size, "image_size": args.eval_size or args.image_size}
    try:
        source = parse_source(args.weights)
        model = build_model(source, args.variant or "s", classes, **{k: v for k, v in overrides.items() if v is not None})
    except (ValueError, OSError, ImportError) as err:
        raise RunError(f"--weights {args.weights}: {err}") from None
    if args.variant and model.variant != args.variant:
        raise RunError(f"--variant {args.variant} but --weights {args.weights} is EfficientNetV2-{model.variant}: "
                       f"drop --variant or pick weights of that variant")
    # attention heads fine-tuned with SGD at the classic lr diverge without clipping
    clip_grad = args.clip_grad if args.clip_grad is not None else 1.0 if model.pool_type == "attention" else 0.0
    freeze = args.freeze_layers if args.freeze_layers is not None else source.kind != "none"
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, Resolved(source, model.variant, clip_grad, freeze)


def stage_plan(args: argparse.Namespace, model: EfficientNetV2) -> list[Stage]:
    """Progressive learning's stages (image size and regularisation grow), or one stage."""
    train_size = model.config["train_image_size"]
    if not args.progressive:
        return [Stage(0, 0, train_size, args.randaugment, args.mixup, model.dropout_rate)]
    try:
        return progressive_plan(model.variant, args.epochs, args.stages, max_size=train_size)
    except ValueError as err:
        raise RunError(str(err)) from None


def start_output_dir(out: Path, args: argparse.Namespace, data: TrainingData) -> None:
    """The output folder (emptied first with --overwrite) with the run's class indices and split."""
    if args.overwrite:
        clear_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    data.save(out)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, lrf: float, warmup_steps: int):
    try:
        return cosine_schedule(optimizer, total_steps, lrf, warmup_steps)
    except ValueError as err:
        raise RunError(f"{err} (--warmup-epochs/--warmup-steps/--lrf)") from None


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


@torch.no_grad()
def validate(model, loader, accelerator, num_classes: int, channels_last: bool):
    """Validation loss, accuracy and confusion matrix over all processes (``gather_for_metrics``
    drops the samples Accelerate repeats to even out the last batch)."""
    model.eval()
    preds, labels, losses = [], [], []
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x).float()
        p, t, loss = accelerator.gather_for_metrics((logits.argmax(-1), y, F.cross_entropy(logits, y, reduction="none")))
        preds.append(p.cpu())
        labels.append(t.cpu())
        losses.append(loss.cpu())
    preds, labels, losses = torch.cat(preds), torch.cat(labels), torch.cat(losses)
    metrics = {"val_loss": losses.mean().item(), "val_accuracy": (preds == labels).float().mean().item(),
               "val_images": len(labels)}
    return metrics, confusion_matrix(preds, labels, num_classes)


def check_finite(metrics: dict, epoch: int, args: argparse.Namespace, checkpoints: Path) -> None:
    """A RunError when the epoch's training loss is NaN or infinite: the bad epoch is not saved."""
    if not math.isfinite(metrics["train_loss"]):
        last = list_checkpoints(checkpoints)
        raise RunError(f"training diverged in epoch {epoch + 1}: the training loss became {metrics['train_loss']} "
                       f"(peak lr {args.lr:g}, {args.optimizer}). Nothing of this epoch was saved"
                       + (f"; the last checkpoint written is {last[-1]}" if last else "")
                       + ". Run again with a lower --lr or with --clip-grad 1.0.", status=1)


def save_epoch(accelerator, out: Path, train_state: dict, model, optimizer, ema, keep: int, classes: list[str]) -> None:
    """Checkpoint the epoch atomically (checkpoints/epoch_N), prune this run's older checkpoints and
    rewrite metrics.json; a failed write is a RunError that names the intact checkpoint."""
    checkpoints, epoch = out / "checkpoints", train_state["epoch"]
    try:
        save_checkpoint(accelerator, checkpoints / f"epoch_{epoch}", train_state, model, optimizer, ema)
        if accelerator.is_main_process:
            prune_checkpoints(checkpoints, train_state["run_id"], keep)
            with atomic_path(out / "metrics.json") as tmp:
                tmp.write_text(json.dumps({"history": train_state["history"], "classes": classes}, indent=1))
    except WriteError as err:
        last = list_checkpoints(checkpoints)
        raise RunError(f"{err}. Nothing of epoch {epoch} was saved"
                       + (f"; the last checkpoint, {last[-1]}, is intact" if last else "")
                       + ". Free some space, then continue with --resume latest.", status=1) from None


def published_command(argv: list[str] | None, processes: int) -> str:
    """The command line for the model card, local paths reduced to their last name."""
    launcher = f"accelerate launch --num_processes {processes} train.py" if processes > 1 else "python train.py"
    return f"{launcher} {shlex.join(public_argv(sys.argv[1:] if argv is None else argv))}"


def initial_weights_text(source: Source) -> str:
    """The card's "initial weights": Hub ids and torchvision names as given; a local folder or file,
    which a reader of the card cannot open, by its last name and what it is."""
    if source.kind == "none":
        return "none (from scratch)"
    if source.kind in ("folder", "weights"):
        return f"local {'folder' if source.kind == 'folder' else 'file'} `{source.path.name}` (not published)"
    return source.text


def card_fields(args: argparse.Namespace, resolved: Resolved, data: TrainingData, run: dict) -> dict:
    """The model card's fields (``model_card_kwargs``) for the run summarised by ``run``."""
    final, source = run["final"], resolved.source
    return dict(
        metrics={"accuracy": round(final["val_accuracy"], 4), "val_loss": round(final["val_loss"], 4)},
        **data.card,  # the dataset's name, revision and description; the model-index shows the validation accuracy
        base_model=source.repo_id if source.kind == "hub" else None,
        training={"initial weights": initial_weights_text(source),
                  "epochs": f"{final.get('epoch', run['start_epoch'])} of {args.epochs}",
                  "optimizer steps": run["optimizer_steps"], "optimizer": args.optimizer,
                  "lr (cosine decay to lr*lrf)": args.lr, "lrf": args.lrf, "warmup steps": run["warmup_steps"],
                  "weight decay": args.weight_decay, "batch size per process": args.batch_size,
                  "processes": run["processes"], "gradient accumulation": args.grad_accum,
                  "mixed precision": args.mixed_precision, "frozen backbone": resolved.freeze,
                  "label smoothing": args.label_smoothing, "gradient clipping (max L2 norm)": resolved.clip_grad or "off",
                  "progressive learning": f"{args.stages} stages" if args.progressive else "off",
                  "train image size": run["train_image_size"], "saved weights": run["saved_weights"]},
        command=run["command"],
    )


def save_run(model: EfficientNetV2, out: Path, args: argparse.Namespace, card: dict, summary: dict, cm) -> None:
    """The Hub-ready model folder, metrics.json and confusion_matrix.png, every file through a
    temporary name: a full disk leaves the previous ones intact (a RunError says so)."""
    final = summary["final"]
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    model.head.dropout.p = model.dropout_rate  # the last stage's dropout was set on the module
    try:
        save_model(model.half() if args.save_dtype == "float16" else model, out, card)
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        png = confusion_matrix_png(cm, summary["classes"], f"validation accuracy {final['val_accuracy']:.3f}")
        with atomic_path(out / "confusion_matrix.png") as tmp:
            tmp.write_bytes(png)
    except WriteError as err:
        raise RunError(f"{err}. The files already in {out} are unchanged. Free some space, then run the same "
                       f"command with --resume latest to evaluate and save the last checkpoint again.", status=1) from None


def push(out: Path, repo_id: str, private: bool, overwrite_card: bool, val_accuracy: float) -> str:
    """Upload the model folder (not its checkpoints and logs) to ``repo_id``; returns its URL. A
    failure is a RunError with the commands to retry: the run is saved locally either way."""
    ignore = ["checkpoints/*", "logs/*"]
    try:
        commit = upload_model_folder(out, repo_id, private=private, ignore_patterns=list(ignore), overwrite_card=overwrite_card,
                                     commit_message=f"train.py: val accuracy {val_accuracy:.4f}")
    except Exception as err:  # the run is saved locally; a failed push must not lose it
        retry = (f"python -c \"from huggingface_hub import HfApi; HfApi().upload_folder(repo_id='{repo_id}', "
                 f"folder_path='{out}', ignore_patterns={ignore})\"")
        raise RunError(f"pushing to {repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
                       f"\nEverything is saved in {out}. Log in (`hf auth login` or HF_TOKEN) if needed, then retry with:\n"
                       f"  hf upload {repo_id} {out} . --exclude 'checkpoints/*' --exclude 'logs/*'\nor\n  {retry}",
                       status=1) from None
    return commit.repo_url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    try:
        accelerator = make_accelerator(args, out)
    except (ValueError, RuntimeError) as err:
        print(f"error: cannot set up training (--mixed-precision {args.mixed_precision}, --report-to {args.report_to}): "
              f"{err}", file=sys.stderr)
        return 2
    say = accelerator.print
    try:
        check_setup(args, accelerator, out)  # before any work: a setting that cannot work, an unusable --output-dir
        set_seed(args.seed)

        # 1. Data: scan, drop unreadable files, split.
        data = load_data(args, accelerator)
        classes, num_classes = data.classes, len(data.classes)
        say(f"data: {len(data.train)} training and {len(data.val)} validation images in {num_classes} "
            f"classes ({', '.join(classes)})")

        # 2. Model: initial weights in, classifier replaced for our classes; what the weights decide
        # (variant, clipping default, freezing) is kept apart from the command line's args.
        model, resolved = make_model(args, classes)
        settings, freeze, clip_grad = resolved.settings(args), resolved.freeze, resolved.clip_grad
        if freeze:
            trainable = freeze_backbone(model)
            say(f"backbone frozen: training {sum(model.get_parameter(n).numel() for n in trainable):,} head parameters")

        # The checkpoint to resume must be this run's: same settings, same data (it is loaded after prepare()).
        checkpoints = out / "checkpoints"
        resume_from, state = find_resume(args, settings, checkpoints, data.fingerprint)
        run_id = state.get("run_id") or uuid.uuid4().hex
        if accelerator.is_main_process:
            start_output_dir(out, args, data)

        # 3. Data loaders and progressive learning: image size and regularisation grow stage by stage.
        plan = stage_plan(args, model)
        train_loader, val_loader, calib_loader = data.loaders(accelerator, args.batch_size, args.workers,
                                                              transforms_for(model, train=False), args.precise_bn, args.seed)
        optimizer = make_optimizer(model, args)
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

        # 4. The lr schedule counts optimizer steps; it is stepped by hand once per optimizer step (a
        # scheduler passed to prepare() would step once per process).
        steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), args.grad_accum)
        total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
        warmup_steps = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
        scheduler = make_scheduler(optimizer, total_steps, args.lrf, warmup_steps)
        # the plain module (not its torch.compile wrapper) is what EMA copies and train.py saves
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        ema = ema_model(unwrapped, args.ema_decay) if args.ema else None

        # 5. Resume: model, optimizer, RNG states and sampler, then scheduler, EMA, history.
        start_epoch, step, history = 0, 0, []
        if resume_from:
            load_checkpoint(accelerator, resume_from, state, scheduler, ema)
            start_epoch, step, history = state["epoch"], state["step"], state["history"]
            say(f"resumed from {resume_from}: {start_epoch} epoch(s) and {step} optimizer steps done")

        accelerator.init_trackers("effnetv2", config={k: v for k, v in settings.items()
                                                      if isinstance(v, (int, float, str, bool))})
        dynamo = accelerator.state.dynamo_plugin.backend  # --compile, or accelerate launch --dynamo_backend
        say(f"training EfficientNetV2-{resolved.variant} for {args.epochs} "
            f"epochs: {steps_per_epoch} optimizer steps per epoch, {total_steps} in all, on "
            f"{accelerator.num_processes} process(es) ({accelerator.device})"
            + ("" if dynamo is DynamoBackend.NO else f", torch.compile backend {dynamo.value.lower()}"))
        coverage = epoch_coverage(len(data.train), args.batch_size, accelerator.num_processes)
        if coverage.left_out:
            say(f"each epoch trains on {coverage.trained} of the {len(data.train)} training images (whole batches of "
                f"{args.batch_size} on each of {accelerator.num_processes} process(es)); the other {coverage.left_out}, "
                f"a different random {coverage.left_out} each epoch, are left out")
        elif coverage.repeated:
            say(f"{len(data.train)} training images are less than a batch of {args.batch_size} for each of "
                f"{accelerator.num_processes} processes: {coverage.repeated} are repeated each epoch")

        # 6. Train: one epoch at a time, validating and checkpointing after each.
        stage, cm = None, None
        for epoch in range(start_epoch, args.epochs):
            if step >= total_steps:
                break
            if stage_for_epoch(plan, epoch) != stage:
                stage = stage_for_epoch(plan, epoch)
                data.train.set_transform(transforms_for(unwrapped, train=True, image_size=stage.image_size,
                                                       randaugment_magnitude=stage.randaugment, scale=args.crop_scale))
                unwrapped.head.dropout.p = stage.dropout
                if args.progressive:
                    say(stage.describe())
                    accelerator.log({f"stage/{k}": v for k, v in stage.as_dict().items()}, step=step)
            train_loader.set_epoch(epoch)
            model.train()
            if freeze:
                backbone_batchnorm_eval(unwrapped)
            started, seen, loss_sum = time.time(), 0, 0.0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_main_process,
                       leave=False, dynamic_ncols=True)
            for x, y in bar:
                with accelerator.accumulate(model):
                    if args.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    x, targets = mix_batch(x, y, num_classes, stage.mixup, args.cutmix, args.label_smoothing)
                    loss = F.cross_entropy(model(x).float(), targets)
                    accelerator.backward(loss)
                    if clip_grad and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                if accelerator.sync_gradients:  # an optimizer step was taken
                    scheduler.step()
                    step += 1
                    if ema:
                        ema.update_parameters(unwrapped)
                    accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=step)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    if step >= total_steps:
                        if step < steps_per_epoch * (epoch + 1):
                            say(f"--max-steps {args.max_steps}: stopping {step - steps_per_epoch * epoch} of "
                                f"{steps_per_epoch} optimizer steps into epoch {epoch + 1} (it counts as done)")
                        break
            train_seconds = time.time() - started
            totals = accelerator.reduce(torch.tensor([seen, loss_sum], device=accelerator.device, dtype=torch.float64),
                                        "sum")
            evaluated = ema.module if ema else unwrapped
            if calib_loader is not None:  # a frozen backbone keeps its statistics: only the head's are redone
                recalibrate_batchnorm(evaluated, (x.to(accelerator.device) for x, _ in calib_loader),
                                      prefix=HEAD_PREFIX if freeze else "")
            for replica in {id(unwrapped): unwrapped, id(evaluated): evaluated}.values():
                average_buffers(replica, accelerator)  # BatchNorm statistics: the same on every process
            metrics, cm = validate(ema.module if ema else model, val_loader, accelerator, num_classes, args.channels_last)
            metrics.update(epoch=epoch + 1, step=step, lr=scheduler.get_last_lr()[0],
                           train_loss=totals[1].item() / max(1.0, totals[0].item()), train_images=int(totals[0].item()),
                           train_seconds=round(train_seconds, 2), epoch_seconds=round(time.time() - started, 2),
                           images_per_second=round(totals[0].item() / train_seconds, 2), image_size=stage.image_size)
            check_finite(metrics, epoch, args, checkpoints)  # every process sees the same loss: all stop together
            history.append(metrics)
            accelerator.log({f"val/{k[4:]}" if k.startswith("val_") else f"epoch/{k}": v for k, v in metrics.items()},
                            step=step)
            say(f"epoch {epoch + 1}/{args.epochs}: train loss {metrics['train_loss']:.4f}, val loss "
                f"{metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.4f} ({metrics['train_seconds']:.1f}s "
                f"training, {metrics['images_per_second']} images/s, lr {metrics['lr']:.2e})")
            save_epoch(accelerator, out, {"run_id": run_id, "data": data.fingerprint, "epoch": epoch + 1, "step": step,
                                          "history": history, "scheduler": scheduler.state_dict(), "args": settings},
                       model, optimizer, ema, args.keep_checkpoints, classes)

        final_model = ema.module if ema else unwrapped
        if cm is None:  # nothing left to train after a resume: validate what the checkpoint holds
            metrics, cm = validate(final_model, val_loader, accelerator, num_classes, args.channels_last)
        # DDP keeps the replicas' weights identical: check it, so that the saved model is "the" model.
        # Each process also prints its own, so every machine's log shows it.
        fingerprint = weights_fingerprint(final_model)
        if accelerator.num_processes > 1:
            print(f"process {accelerator.process_index} of {accelerator.num_processes}: final weights fingerprint "
                  f"{fingerprint}", flush=True)
        fingerprints = gather_object([fingerprint])
        accelerator.end_training()
        if not accelerator.is_main_process:
            return 0
        in_sync = len(set(fingerprints)) == 1
        if not in_sync:
            say(f"warning: the {len(fingerprints)} processes ended with different weights; saving process 0's")

        # 7. The Hub-ready model folder (card filled with the run), metrics and confusion matrix; the push.
        command = published_command(argv, accelerator.num_processes)
        summary = {"final": history[-1] if history else metrics, "history": history, "classes": classes,
                   "train_images": len(data.train), "val_images": len(data.val), "optimizer_steps": step,
                   "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "train_coverage": coverage._asdict(),
                   "processes": accelerator.num_processes, "replicas_in_sync": in_sync, "fingerprint": fingerprints[0],
                   "saved_weights": f"EMA of the weights (decay {args.ema_decay})" if ema else "the final weights",
                   "command": command}
        card = card_fields(args, resolved, data, {**summary, "start_epoch": start_epoch, "warmup_steps": warmup_steps,
                                            "train_image_size": (stage or plan[-1]).image_size})
        save_run(final_model, out, args, card, summary, cm)
        say(f"saved the model to {out} (val accuracy {summary['final']['val_accuracy']:.4f})")
        if args.push_to_hub:
            say(f"pushed to {push(out, args.push_to_hub, args.private, args.overwrite_card, summary['final']['val_accuracy'])}")
        return 0
    except RunError as err:
        say(f"error: {err}")
        accelerator.end_training()
        return err.status


if __name__ == "__main__":
    sys.exit(main())
