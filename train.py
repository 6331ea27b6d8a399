"""Fine-tune EfficientNetV2 with Hugging Face Accelerate on a folder of photos (one sub-folder per class) or a
Hub dataset. The flags' help is the reference; the README's "Fine-tuning on your own photos" is the guide.

    python train.py --data-path flower_photos --weights torchvision:s --epochs 30
    accelerate launch train.py --dataset beans --weights torchvision:s --report-to trackio
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from effnetv2 import transforms_for
from effnetv2.configs import VARIANTS
from effnetv2.data import DatasetError
from effnetv2.ema import ema_model
from effnetv2.errors import UsageError
from effnetv2.finetune import build_model
from effnetv2.hub_data import load_training_data
from effnetv2.progressive import Stage, progressive_plan, stage_for_epoch
from effnetv2.publish import card_fields, published_command, push
from effnetv2.run_folder import (RunError, check_finite, check_output_dir, find_resume_checkpoint, load_checkpoint,
                                 replica_fingerprints, save_epoch, save_run, start_output_dir)
from effnetv2.schedule import cosine_schedule, optimizer_steps_per_epoch
from effnetv2.sources import parse_source
from effnetv2.training import (HEAD_PREFIX, average_buffers, backbone_batchnorm_eval, epoch_coverage, evaluate,
                               freeze_backbone, mix_batch, recalibrate_batchnorm)
from effnetv2.tracking import REPORT_TO, trackers


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", help="folder with one sub-folder of images per class")
    data.add_argument("--dataset", metavar="ID", help="Hub dataset (org/name[@revision]) or a save_to_disk folder")
    add("--dataset-config", help="the --dataset's configuration (subset) name")
    add("--image-column", help="--dataset's image column (default: its Image feature)")
    add("--label-column", help="--dataset's label column (default: its ClassLabel feature)")
    add("--streaming", action="store_true", help="stream --dataset from the Hub, each process its own shards")
    add("--report-to", default="tensorboard", choices=REPORT_TO, help="experiment tracker(s)")
    add("--variant", choices=list(VARIANTS), help="model variant (default: the --weights' variant, or s)")
    add("--weights", default="none", help="Hub id (org/name[@revision]), folder, torchvision:<variant>, .pth, or none")
    add("--epochs", type=int, default=30)
    add("--batch-size", type=int, default=8, help="per process")
    add("--lr", type=float, default=0.01)
    add("--lrf", type=float, default=0.01, help="final lr = lr * lrf (cosine decay)")
    add("--image-size", type=int, help="train size (default: the weights' or variant's); --progressive: the last")
    add("--eval-size", type=int, help="validation size (default: --image-size, else the weights' or variant's)")
    add("--freeze-layers", action=argparse.BooleanOptionalAction,
        help="train only the head, backbone BatchNorm frozen too (default: on with --weights, off from scratch)")
    add("--output-dir", default="outputs/run", help="a new or empty folder, or this run's (--resume)")
    add("--resume", metavar="{PATH,latest}", help="a checkpoint folder, or 'latest' in --output-dir/checkpoints")
    add("--overwrite", action="store_true", help="first delete the earlier train.py run that --output-dir holds")
    add("--progressive", action="store_true", help="EfficientNetV2 progressive learning")
    add("--stages", type=int, default=4, help="progressive-learning stages (M)")
    add("--push-to-hub", metavar="ORG/NAME", help="push the model folder at the end")
    add("--private", action="store_true", help="create the Hub repo private")
    add("--overwrite-card", action="store_true", help="replace the Hub repo's README.md even if edited there")
    add("--max-steps", type=int, help="stop after this many optimizer steps in all")
    add("--seed", type=int, default=0)
    add("--cpu", action="store_true", help="train on the CPU, also under `accelerate launch` (whose --cpu: 1 process)")
    add("--val-fraction", type=float, default=0.2, help="validation share of each class")
    add("--optimizer", default="sgd", choices=["sgd", "adamw"])
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--weight-decay", type=float, default=1e-4)
    add("--warmup-epochs", type=float, default=0.0, help="linear lr warmup, in epochs")
    add("--warmup-steps", type=int, help="linear lr warmup, in optimizer steps")
    add("--grad-accum", type=int, default=1, help="batches per optimizer step")
    add("--clip-grad", type=float, metavar="NORM",
        help="clip the global gradient L2 norm (default: 1.0 for an attention pool, else 0: off)")
    add("--mixed-precision", choices=["no", "fp16", "bf16"],
        help="as `accelerate launch --mixed_precision` (which decides when left out), for `python train.py` alone")
    add("--label-smoothing", type=float, default=0.0)
    add("--ema", action="store_true", help="keep an EMA of the weights; it is evaluated and saved")
    add("--ema-decay", type=float, default=0.999)
    add("--randaugment", type=int, default=0, help="RandAugment magnitude (0: off)")
    add("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
        help="area share of the random resized crop (raise MIN when crops must keep the object)")
    add("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    add("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    add("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    add("--compile", nargs="?", const="inductor", metavar="BACKEND",
        choices=[b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO],
        help="torch.compile with BACKEND (inductor; aot_eager needs no C++ compiler), as `accelerate launch "
             "--dynamo_backend BACKEND`")
    add("--pool", choices=["avg", "attention"], help="default: the weights' pool, or avg")
    add("--num-heads", type=int, help="attention-pool heads (default 8)")
    add("--attn-dim", type=int, help="attention-pool width (default: num_features)")
    add("--drop-path-rate", type=float, help="stochastic depth (default 0.2)")
    add("--dropout", type=float, help="dropout before the classifier (default: variant's)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    add("--precise-bn", type=int, default=256, metavar="N",
        help="before each evaluation, recompute BatchNorm statistics on N training images; 0: off")
    add("--check-images", action=argparse.BooleanOptionalAction, default=True,
        help="decode every image once before training and skip unreadable ones")
    add("--save-dtype", default="float32", choices=["float32", "float16"], help="dtype of the saved weights")
    add("--keep-checkpoints", type=int, default=2, help="how many epoch checkpoints to keep")
    args = p.parse_args(argv)
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        p.error(f"--crop-scale {low} {high}: give MIN MAX with 0 < MIN <= MAX <= 1, e.g. --crop-scale 0.5 1")
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        p.error(f"--clip-grad {args.clip_grad}: give a positive max gradient norm (e.g. 1.0), or 0 to turn "
                "clipping off")
    if not args.dataset and (args.dataset_config or args.image_column or args.label_column or args.streaming):
        p.error("--dataset-config, --image-column, --label-column and --streaming go with --dataset")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output-dir and --overwrite deletes it: give one of them")
    return args


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    out = Path(args.output_dir)
    return Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        dynamo_backend=args.compile,  # None: `accelerate launch --dynamo_backend` (or its config) decides
        log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # a seeded sampler gives every epoch the same order after a resume (set_epoch below)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def training_function(args: argparse.Namespace, accelerator: Accelerator, argv: list[str]) -> int:
    out, say = Path(args.output_dir), accelerator.print
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate autocasts to fp16 only on accelerators: on the CPU the run would be float32, silently
        raise RunError("--mixed-precision fp16 needs a GPU; on the CPU it would train in float32. Use "
                       "--mixed-precision bf16 (CPUs autocast to bfloat16) or leave it off")
    check_output_dir(out, resume=bool(args.resume), overwrite=args.overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main one writes there
    set_seed(args.seed)

    # 1. Data: scan, drop unreadable files, split.
    data = load_training_data(
        data_path=args.data_path, dataset=args.dataset, config=args.dataset_config, image_column=args.image_column,
        label_column=args.label_column, streaming=args.streaming, val_fraction=args.val_fraction, seed=args.seed,
        check_images=args.check_images, workers=max(1, args.workers), report=accelerator.is_main_process)
    classes, num_classes = data.classes, len(data.classes)
    say(f"data: {len(data.train)} training and {len(data.val)} validation images in {num_classes} "
        f"classes ({', '.join(classes)})")

    # 2. Model: initial weights in, classifier replaced for our classes; what the weights leave open is decided.
    model = build_model(args.weights, args.variant or "s", classes, pool=args.pool, num_heads=args.num_heads,
                        attn_dim=args.attn_dim, drop_path_rate=args.drop_path_rate, dropout=args.dropout,
                        train_image_size=args.image_size, image_size=args.eval_size or args.image_size)
    if args.variant and model.variant != args.variant:
        raise RunError(f"--variant {args.variant} but --weights {args.weights} is EfficientNetV2-{model.variant}: "
                       f"drop --variant or pick weights of that variant")
    source = parse_source(args.weights)
    # attention heads fine-tuned with SGD at the classic lr diverge without clipping
    clip_grad = args.clip_grad if args.clip_grad is not None else 1.0 if model.pool_type == "attention" else 0.0
    freeze = args.freeze_layers if args.freeze_layers is not None else source.kind != "none"
    settings = {**vars(args), "variant": model.variant, "clip_grad": clip_grad}  # for checkpoints and trackers
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if freeze:
        trainable = freeze_backbone(model)
        say(f"backbone frozen: training {sum(model.get_parameter(n).numel() for n in trainable):,} head parameters")

    # The checkpoint to resume must be this run's: same settings, same data (it is loaded after prepare()).
    checkpoints = out / "checkpoints"
    resume_from, state = None, {}
    if args.resume:
        resume_from, state = find_resume_checkpoint(args.resume, checkpoints, settings, data.fingerprint)
    run_id = state.get("run_id") or uuid.uuid4().hex
    if accelerator.is_main_process:
        start_output_dir(out, data, args.overwrite)

    # 3. Data loaders, optimizer, and progressive learning: image size and regularisation grow stage by stage.
    train_size = model.config["train_image_size"]
    plan = (progressive_plan(model.variant, args.epochs, args.stages, max_size=train_size) if args.progressive
            else [Stage(0, 0, train_size, args.randaugment, args.mixup, model.dropout_rate)])
    train_loader, val_loader, calib_loader = data.loaders(
        accelerator, args.batch_size, args.workers, transforms_for(model, train=False), args.precise_bn, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
                 if args.optimizer == "sgd" else torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    # 4. The lr schedule, stepped by hand once per optimizer step (prepared, it would step once per process).
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), args.grad_accum)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    scheduler = cosine_schedule(optimizer, total_steps, args.lrf, warmup_steps)
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
    say(f"training EfficientNetV2-{unwrapped.variant} for {args.epochs} epochs: {steps_per_epoch} optimizer steps per "
        f"epoch, {total_steps} in all, on {accelerator.num_processes} process(es) ({accelerator.device})"
        + ("" if dynamo is DynamoBackend.NO else f", torch.compile backend {dynamo.value.lower()}"))
    coverage = epoch_coverage(len(data.train), args.batch_size, accelerator.num_processes)
    if note := coverage.describe(args.batch_size, accelerator.num_processes):
        say(note)

    # 6. Train: one epoch at a time, validating and checkpointing after each.
    stage, cm = None, None
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        if (new_stage := stage_for_epoch(plan, epoch)) != stage:
            stage = new_stage
            data.train.set_transform(transforms_for(unwrapped, train=True, image_size=stage.image_size,
                                                   randaugment_magnitude=stage.randaugment, scale=args.crop_scale))
            unwrapped.head.dropout.p = stage.dropout
            if args.progressive:
                say(stage.describe())
                accelerator.log({f"stage/{k}": v for k, v in asdict(stage).items()}, step=step)
        train_loader.set_epoch(epoch)
        model.train()
        if freeze:
            backbone_batchnorm_eval(unwrapped)
        # the loss is summed where it is (an .item() per batch would wait for the GPU every batch)
        started, seen, loss_sum = time.time(), 0, torch.zeros((), dtype=torch.float64, device=accelerator.device)
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
            loss_sum += loss.detach().double() * len(y)
            if accelerator.sync_gradients:  # an optimizer step was taken
                scheduler.step()
                step += 1
                if ema:
                    ema.update_parameters(unwrapped)
                value, lr = loss.item(), scheduler.get_last_lr()[0]
                accelerator.log({"train/loss": value, "train/lr": lr}, step=step)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}")
                if step >= total_steps:
                    if step < steps_per_epoch * (epoch + 1):
                        say(f"--max-steps {args.max_steps}: stopping {step - steps_per_epoch * epoch} of "
                            f"{steps_per_epoch} optimizer steps into epoch {epoch + 1} (it counts as done)")
                    break
        train_seconds = time.time() - started
        totals = accelerator.reduce(torch.stack([loss_sum.new_tensor(seen), loss_sum]), "sum")
        evaluated = ema.module if ema else unwrapped
        if calib_loader is not None:  # a frozen backbone keeps its statistics: only the head's are redone
            recalibrate_batchnorm(evaluated, (x.to(accelerator.device) for x, _ in calib_loader),
                                  prefix=HEAD_PREFIX if freeze else "")
        for replica in {id(unwrapped): unwrapped, id(evaluated): evaluated}.values():
            average_buffers(replica, accelerator)  # BatchNorm statistics: the same on every process
        metrics, cm = evaluate(ema.module if ema else model, val_loader, accelerator, num_classes, args.channels_last)
        metrics.update(epoch=epoch + 1, step=step, lr=scheduler.get_last_lr()[0],
                       train_loss=totals[1].item() / max(1.0, totals[0].item()), train_images=int(totals[0].item()),
                       train_seconds=round(train_seconds, 2), epoch_seconds=round(time.time() - started, 2),
                       images_per_second=round(totals[0].item() / train_seconds, 2), image_size=stage.image_size)
        # every process sees the same loss: all stop together, before the bad epoch is saved
        check_finite(metrics["train_loss"], epoch + 1, args.lr, args.optimizer, checkpoints)
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
        metrics, cm = evaluate(final_model, val_loader, accelerator, num_classes, args.channels_last)
    fingerprints = replica_fingerprints(final_model, accelerator)  # DDP keeps the replicas equal: check it
    if not accelerator.is_main_process:
        return 0
    in_sync = len(set(fingerprints)) == 1
    if not in_sync:
        say(f"warning: the {len(fingerprints)} processes ended with different weights; saving process 0's")

    # 7. The Hub-ready model folder (card filled with the run), metrics and confusion matrix; the push.
    summary = {"final": history[-1] if history else metrics, "history": history, "classes": classes,
               "train_images": len(data.train), "val_images": len(data.val), "optimizer_steps": step,
               "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "train_coverage": coverage._asdict(),
               "processes": accelerator.num_processes, "replicas_in_sync": in_sync, "fingerprint": fingerprints[0],
               "saved_weights": f"EMA of the weights (decay {args.ema_decay})" if ema else "the final weights",
               "command": published_command(argv, accelerator.num_processes)}
    card = card_fields(args, source, freeze, clip_grad, data.card, {
        **summary, "start_epoch": start_epoch, "warmup_steps": warmup_steps,
        "train_image_size": (stage or plan[-1]).image_size, "mixed_precision": accelerator.mixed_precision})
    save_run(final_model, out, card, summary, cm, getattr(torch, args.save_dtype))
    accuracy = summary["final"]["val_accuracy"]
    say(f"saved the model to {out} (val accuracy {accuracy:.4f})")
    if args.push_to_hub:
        say(f"pushed to {push(out, args.push_to_hub, args.private, args.overwrite_card, accuracy)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    accelerator = None
    try:
        accelerator = make_accelerator(args)
        return training_function(args, accelerator, argv)
    except (RunError, UsageError, DatasetError) as err:  # the user's to fix: one line says what to do, no traceback
        PartialState().print(f"error: {err}")
        return getattr(err, "status", 2)
    finally:
        if accelerator is not None:
            accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
