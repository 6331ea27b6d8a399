"""``python -m effnetv2.data``: make the synthetic ``shapes`` set, or check a folder-per-class data set."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from effnetv2 import data
from effnetv2.data import DatasetError, check_images, make_shapes_dataset, report_bad_files, scan_folder, split_samples
from effnetv2.shapes import SHAPES


def _check_command(args: argparse.Namespace) -> int:
    try:
        samples, classes = scan_folder(args.root)
        train, val = split_samples(samples, args.val_fraction, args.seed, classes)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, bad = check_images(samples)
    report_bad_files(bad)
    counts = Counter(label for _, label in samples)
    split = Counter((label, part) for part, items in (("train", train), ("val", val)) for _, label in items)
    print(f"{args.root}: {len(samples)} images in {len(classes)} classes, {len(bad)} unreadable")
    for i, name in enumerate(classes):
        print(f"  {name}: {counts[i]} ({split[i, 'train']} train / {split[i, 'val']} val)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.data", description=data.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="write the synthetic shapes data set with box annotations")
    shapes.add_argument("out", type=Path, help="output folder (one sub-folder per class)")
    shapes.add_argument("--num-per-class", type=int, default=60)
    shapes.add_argument("--image-size", type=int, default=96)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--classes", nargs="+", default=list(SHAPES), choices=SHAPES)
    shapes.add_argument("--no-clutter", dest="clutter", action="store_false",
                        help="plain noisy backgrounds, no distractors (an easy first curriculum stage)")
    check = sub.add_parser("check", help="scan a folder-per-class data set, split it and list unreadable files")
    check.add_argument("root", type=Path)
    check.add_argument("--val-fraction", type=float, default=0.2)
    check.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check_command(args)
    try:
        root = make_shapes_dataset(args.out, args.num_per_class, args.image_size, args.seed, tuple(args.classes),
                                   clutter=args.clutter, progress=True)
    except ValueError as err:
        parser.error(str(err))
    classes = list(dict.fromkeys(args.classes))
    print(f"wrote {args.num_per_class * len(classes)} images of {args.image_size}x{args.image_size} px in "
          f"{len(classes)} classes ({', '.join(classes)}) to {root}; object boxes in {root / 'annotations.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
