"""``python -m effnetv2.convert``: torchvision/timm weights into a Hub-ready folder, or ``--to`` back out."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from effnetv2.card import upload_model_folder
from effnetv2.convert import from_timm, from_torchvision, max_logit_difference, reference_model, to_timm, to_torchvision
from effnetv2.sources import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m effnetv2.convert",
        description="Convert torchvision or timm EfficientNetV2 weights into a Hub-ready effnetv2 model folder, "
                    "or (--to) export an effnetv2 model to timm or torchvision.")
    parser.add_argument("library", nargs="?", choices=("torchvision", "timm"), help="where the weights come from")
    parser.add_argument("source", nargs="?", help="variant or model name for the official weights (torchvision: "
                                                  "s, m, l; timm: tf_efficientnetv2_b0 ... xl; needs the internet "
                                                  "unless cached), or a local .pth/.safetensors file")
    parser.add_argument("--out", type=Path, help="folder to write config.json, model.safetensors, README.md")
    parser.add_argument("--variant", help="architecture variant, when it cannot be inferred from the weights")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="also upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--to", nargs=2, metavar=("{timm,torchvision}", "OUT"),
                        help="export --model instead: to a timm folder, or a torchvision .safetensors state dict")
    parser.add_argument("--model", help="with --to: the effnetv2 model to export (folder, Hub id, ...)")
    args = parser.parse_args(argv)
    if args.to and args.to[0] not in ("timm", "torchvision"):
        parser.error(f"--to {args.to[0]}: choose timm or torchvision")
    if args.to and not args.model:
        parser.error("--to needs --model: the effnetv2 model folder or Hub id to export")
    if not args.to and not (args.library and args.source and args.out):
        parser.error("give LIBRARY SOURCE --out DIR to convert, or --to {timm,torchvision} OUT --model MODEL to export")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _export(*args.to, args.model) if args.to else _convert(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace) -> int:
    model = (from_torchvision if args.library == "torchvision" else from_timm)(args.source, variant=args.variant)
    reference = reference_model(args.library, model)
    notes = None
    if reference is not None:
        diff = max_logit_difference(model, reference)
        notes = (f"Conversion check: on random 96x96 inputs the logits equal {args.library}'s own "
                 f"model with these weights to max |Δlogit| = {diff:.2e}.")
        print(f"parity with {args.library}: max |Δlogit| = {diff:.3g}")
    card = {"notes": notes, "command": f"python -m effnetv2.convert {args.library} {args.source} --out {args.out}",
            "datasets": ["imagenet-1k"] if model.num_classes == 1000 else None,
            "base_model": model.config["source"].get("hf_hub_id"), "repo_id": args.push_to_hub}
    model.save_pretrained(args.out, model_card_kwargs=card)
    print(f"wrote {args.out}/ (config.json, model.safetensors, README.md): EfficientNetV2-{model.variant}, "
          f"{model.num_classes} classes")
    if args.push_to_hub:
        try:
            url = upload_model_folder(args.out, args.push_to_hub, private=args.private or None,
                                      commit_message="effnetv2.convert")
        except Exception as err:  # network, auth and permission errors come in many types
            print(f"error: pushing to {args.push_to_hub} failed ({err}). The converted model is kept in "
                  f"{args.out}/. Log in with `hf auth login` and retry with: hf upload {args.push_to_hub} "
                  f"{args.out} .{' --private' if args.private else ''}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


def _export(kind: str, out: str, source: str) -> int:
    model = load_model(source).float().eval()
    written = to_timm(model, out) if kind == "timm" else to_torchvision(model, out)
    how = (f'timm.create_model("local-dir:{written}", pretrained=True)' if kind == "timm" else
           f"torchvision.models.efficientnet_v2_{model.variant}(num_classes={model.num_classes})"
           f".load_state_dict(safetensors.torch.load_file('{written}'))")
    print(f"wrote {written}: load it with {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
