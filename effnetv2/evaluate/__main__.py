"""``python -m effnetv2.evaluate``: the command line of :mod:`effnetv2.evaluate` (usage in its docstring)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from effnetv2 import evaluate as evaluation
from effnetv2.card import card_section, record_eval_result, update_card
from effnetv2.data import DatasetError
from effnetv2.evaluate import evaluate, evaluate_split
from effnetv2.hub_data import RowImages, open_hub_dataset
from effnetv2.sources import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.evaluate", description=evaluation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder, Hub id or torchvision:<variant>")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="a shapes set (with annotations.json)")
    data.add_argument("--dataset", metavar="ID", help="a Hub dataset (org/name[@revision]) or save_to_disk folder")
    parser.add_argument("--dataset-config", default=None, help="the --dataset's configuration (subset) name")
    parser.add_argument("--split", default=None, help="the --dataset's split (default: test, else validation)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--update-card", action="store_true", help="write the figures into --model's README.md")
    args = parser.parse_args(argv)
    if args.data and not (args.data / "annotations.json").is_file():
        parser.error(f"{args.data} has no annotations.json: make one with `python -m effnetv2.data shapes OUT`")
    model = load_model(args.model).float().eval()
    if args.dataset:
        try:
            hub = open_hub_dataset(args.dataset, args.dataset_config)
            split = args.split or next((s for s in ("test", "validation") if s in hub.splits), None)
            if split not in hub.splits:
                raise DatasetError(f"--split {split}: {hub.name} has the splits {', '.join(hub.splits)}")
            rows = RowImages(hub.splits[split], hub.image_column, f"{hub.name} {split}")
            result = evaluate_split(model, rows, hub.splits[split][hub.label_column], hub.classes, args.batch_size)
        except DatasetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        result = evaluate(model, args.data, args.batch_size)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.update_card:
        card = Path(args.model) / "README.md"
        if not card.is_file():
            parser.error(f"--update-card: {card} does not exist (is --model a local folder?)")
        command = "python -m effnetv2.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        update_card(card, card_section(result, args.data or f"split `{split}` of `{hub.name}`", command))
        record_eval_result(card, hub.name if args.dataset else args.data.name, split if args.dataset else "test",
                           result["accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
