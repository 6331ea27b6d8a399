"""Fine-tune EfficientNetV2 on a folder of photos, one sub-folder per class, with Hugging Face Accelerate.

    python train.py --data-path flower_photos --weights torchvision:s --epochs 30
    accelerate launch train.py --data-path flower_photos --variant b0 --weights none --mixed-precision bf16
    python train.py --data-path shapes --variant b0 --weights none --image-size 64 --max-steps 20  # smoke run

The run writes a Hub-ready model folder to --output-dir (config.json, model.safetensors, a model
card with the run's metrics), plus metrics.json, class_indices.json, split.json, a confusion matrix,
TensorBoard logs and a checkpoint per epoch (--resume latest continues a killed run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from effnetv2 import transforms_for
from effnetv2.data import (DatasetError, ImageFolderDataset, check_images, report_bad_files, save_class_indices,
                           scan_folder, split_samples, write_split)
from effnetv2.ema import ModelEma
from effnetv2.progressive import Stage, progressive_plan, stage_for_epoch
from effnetv2.schedule import cosine_schedule
from effnetv2.training import (backbone_batchnorm_eval, build_model, confusion_matrix, freeze_backbone, mix_batch,
                               plot_confusion_matrix, soft_cross_entropy)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--variant", default="s", choices=["b0", "b1", "b2", "b3", "s", "m", "l", "xl"])
    p.add_argument("--weights", default="none",
                   help="initial weights: Hub id, folder, torchvision:<variant>, a .pth file, or none")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lrf", type=float, default=0.01, help="final lr = lr * lrf (cosine decay)")
    p.add_argument("--image-size", type=int, default=None,
                   help="train size (default: the variant's); with --progressive, the last stage's size")
    p.add_argument("--eval-size", type=int, default=None, help="validation size (default: the variant's)")
    p.add_argument("--freeze-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="train only the head, backbone BatchNorm statistics frozen (default: on when "
                        "--weights is given, off when training from scratch)")
    p.add_argument("--output-dir", default="outputs/run")
    p.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in --output-dir")
    p.add_argument("--progressive", action="store_true", help="EfficientNetV2 progressive learning")
    p.add_argument("--stages", type=int, default=4, help="progressive-learning stages")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights; it is evaluated and saved")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--randaugment", type=int, default=0, help="RandAugment magnitude (0: off)")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--pool", default="avg", choices=["avg", "attention"])
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--attn-dim", type=int, default=None)
    p.add_argument("--drop-path-rate", type=float, default=0.2)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--keep-checkpoints", type=int, default=2)
    return p.parse_args(argv)


def evaluate(model, loader, accelerator, num_classes):
    """Validation loss, accuracy and confusion matrix over all processes (``gather_for_metrics``)."""
    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            p, t = accelerator.gather_for_metrics((logits.argmax(-1), y))
            preds.append(p.cpu())
            labels.append(t.cpu())
    preds, labels = torch.cat(preds), torch.cat(labels)
    loss = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum").item()
    return {"val_loss": loss / max(1, len(labels)), "val_accuracy": (preds == labels).float().mean().item(),
            "num_val": len(labels)}, confusion_matrix(preds, labels, num_classes)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    say = accelerator.print
    set_seed(args.seed)

    # Data: scan, split, drop unreadable files, all before any training starts.
    try:
        samples, classes = scan_folder(args.data_path)
        train_samples, val_samples = split_samples(samples, args.val_fraction, args.seed)
        if not val_samples:
            raise DatasetError("--val-fraction 0 leaves no validation images: use at least 0.05")
    except DatasetError as err:
        say(f"error: {err}")
        return 2
    train_samples, bad_train = check_images(train_samples, args.workers)
    val_samples, bad_val = check_images(val_samples, args.workers)
    if accelerator.is_main_process:
        report_bad_files(bad_train + bad_val)
        out.mkdir(parents=True, exist_ok=True)
        save_class_indices(out / "class_indices.json", classes)
        write_split(out / "split.json", train_samples, val_samples, classes, args.data_path)
    if not train_samples or not val_samples:
        say("error: no readable training or validation images left; see the warning above")
        return 2

    # Model: weights in, head replaced for our classes.
    model_kwargs = {"pool": args.pool, "num_heads": args.num_heads, "drop_path_rate": args.drop_path_rate}
    for key, value in (("attn_dim", args.attn_dim), ("dropout", args.dropout), ("train_image_size", args.image_size),
                       ("image_size", args.eval_size or args.image_size)):
        if value is not None:
            model_kwargs[key] = value
    try:
        model = build_model(args.weights, args.variant, classes, **model_kwargs)
    except (ValueError, OSError) as err:
        say(f"error: --weights {args.weights}: {err}")
        return 2
    freeze = args.freeze_layers if args.freeze_layers is not None else args.weights.lower() != "none"
    if freeze:
        trainable = freeze_backbone(model)
        say(f"backbone frozen: training {len(trainable)} head tensors")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    eval_size = model.config["image_size"]

    # Progressive learning: image size and regularisation grow stage by stage.
    if args.progressive:
        plan = progressive_plan(args.variant, args.epochs, args.stages, max_size=model.config["train_image_size"])
    else:
        plan = [Stage(0, 0, model.config["train_image_size"], args.randaugment, args.mixup, model.dropout_rate)]
    train_set = ImageFolderDataset(train_samples, classes)
    val_set = ImageFolderDataset(val_samples, classes, transforms_for(model, image_size=eval_size))
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=len(train_set) > args.batch_size,
                              persistent_workers=False)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)

    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)  # optimizer steps, per process
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    scheduler = cosine_schedule(optimizer, total_steps, args.lrf, int(args.warmup_epochs * steps_per_epoch))
    ema = ModelEma(accelerator.unwrap_model(model), args.ema_decay) if args.ema else None
    accelerator.register_for_checkpointing(scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)

    # Resume: model, optimizer, scheduler, EMA, RNG states and where we were.
    start_epoch, step, history = 0, 0, []
    checkpoints = out / "checkpoints"
    if args.resume:
        folder = Path(args.resume)
        if args.resume == "latest":
            done = sorted(checkpoints.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1])) if checkpoints.is_dir() else []
            if not done:
                say(f"error: --resume latest: no checkpoint in {checkpoints}; start without --resume")
                return 2
            folder = done[-1]
        if not (folder / "train_state.json").is_file():
            say(f"error: --resume {folder}: not a checkpoint folder (no train_state.json)")
            return 2
        accelerator.load_state(str(folder))
        state = json.loads((folder / "train_state.json").read_text())
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        say(f"resumed from {folder}: epoch {start_epoch}, optimizer step {step}")

    hps = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("effnetv2", config=hps)
    num_classes = len(classes)
    stage = None
    metrics = {}
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        new_stage = stage_for_epoch(plan, epoch)
        if new_stage != stage:
            stage = new_stage
            train_set.set_transform(transforms_for(accelerator.unwrap_model(model), train=True,
                                                   image_size=stage.image_size, randaugment_magnitude=stage.randaugment))
            accelerator.unwrap_model(model).head.dropout.p = stage.dropout
            if args.progressive:
                say(stage.describe())
        train_loader.set_epoch(epoch)
        model.train()
        if freeze:
            backbone_batchnorm_eval(accelerator.unwrap_model(model))
        started, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process,
                   leave=False)
        for x, y in bar:
            with accelerator.accumulate(model):
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x, targets = mix_batch(x, y, num_classes, stage.mixup, args.cutmix, args.label_smoothing)
                loss = soft_cross_entropy(model(x), targets)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                if ema:
                    ema.update(accelerator.unwrap_model(model))
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step >= total_steps:
                break
        elapsed = time.time() - started
        eval_model = ema.module if ema else model
        metrics, cm = evaluate(eval_model, val_loader, accelerator, num_classes)
        metrics.update(epoch=epoch + 1, step=step, train_loss=loss_sum / max(1, seen), lr=scheduler.get_last_lr()[0],
                       seconds=round(elapsed, 2), images_per_second=round(seen * accelerator.num_processes / elapsed, 2),
                       image_size=stage.image_size)
        history.append(metrics)
        accelerator.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
        say(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
            f"val accuracy {metrics['val_accuracy']:.4f}, {elapsed:.1f}s ({metrics['images_per_second']} img/s)")

        # Checkpoint atomically: write a temporary folder, then rename it into place.
        final = checkpoints / f"epoch_{epoch + 1}"
        tmp = checkpoints / f".tmp_epoch_{epoch + 1}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "train_state.json").write_text(json.dumps({"epoch": epoch + 1, "step": step, "history": history}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted(checkpoints.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
            for old in done[:-args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    accelerator.end_training()
    if not accelerator.is_main_process:
        return 0

    # The Hub-ready model folder.
    final_model = ema.module if ema else accelerator.unwrap_model(model)
    final_model = final_model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    final_model.head.dropout.p = final_model.dropout_rate
    final = history[-1] if history else {}
    weights_note = "EMA of the weights" if ema else "the final weights"
    model_card_kwargs = dict(
        metrics={"accuracy": round(final.get("val_accuracy", float("nan")), 4), "val_loss": round(final.get("val_loss", float("nan")), 4)},
        dataset=f"`{Path(args.data_path).name}`: {len(train_samples)} training and {len(val_samples)} validation "
                f"images in {num_classes} classes (seeded stratified split, seed {args.seed})",
        base_model=args.weights if "/" in args.weights and not Path(args.weights).exists() else None,
        training={"epochs": final.get("epoch"), "optimizer steps": step, "optimizer": args.optimizer, "lr": args.lr,
                  "lrf": args.lrf, "batch size (per process)": args.batch_size, "processes": accelerator.num_processes,
                  "frozen backbone": freeze, "progressive": args.progressive, "saved weights": weights_note},
        command="python train.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    for name in ("README.md",):
        (out / name).unlink(missing_ok=True)
    to_save = final_model.half() if args.save_dtype == "float16" else final_model
    to_save.save_pretrained(out, model_card_kwargs=model_card_kwargs)
    (out / "metrics.json").write_text(json.dumps({"final": final, "history": history, "classes": classes}, indent=1))
    plot_confusion_matrix(cm, classes, out / "confusion_matrix.png",
                          f"validation accuracy {final.get('val_accuracy', 0):.3f}")
    say(f"saved the model to {out} (val accuracy {final.get('val_accuracy', float('nan')):.4f})")

    if args.push_to_hub:
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
            api.upload_folder(repo_id=args.push_to_hub, folder_path=str(out), ignore_patterns=["checkpoints/*", "logs/*"],
                              commit_message=f"train.py: val accuracy {final.get('val_accuracy', 0):.4f}")
            say(f"pushed to https://huggingface.co/{args.push_to_hub}")
        except Exception as err:  # the run is saved; a push failure must not lose it
            say(f"error: push to {args.push_to_hub} failed ({type(err).__name__}: {err}). Everything is saved in "
                f"{out}; retry with: hf upload {args.push_to_hub} {out} --exclude 'checkpoints/*' 'logs/*'")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
