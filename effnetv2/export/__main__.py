"""``python -m effnetv2.export``: an ONNX graph (``--out``, ``--int8``), or the graphs shipped in a model folder
(``--ship``), each checked against the eager model."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from effnetv2 import export
from effnetv2.card import upload_model_folder
from effnetv2.export import (AGREEMENT_IMAGES, DEFAULT_OPSET, MAX_RELATIVE_ERROR, SHIPPED_GRAPHS, GRAPHS_MANIFEST,
                             check_onnx, export_calibrated_int8, export_onnx, ship_graphs)
from effnetv2.quantize import CALIBRATION_IMAGES
from effnetv2.sources import load_model, parse_source

logger = logging.getLogger("effnetv2.export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.export", description=export.__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder, Hub id org/name[@revision], or torchvision:<variant>")
    parser.add_argument("--out", type=Path, help="the .onnx file to write")
    parser.add_argument("--ship", action="store_true",
                        help=f"write the graphs into the model folder ({', '.join(SHIPPED_GRAPHS.values())}, "
                             f"{GRAPHS_MANIFEST}) for its Hub repo")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="with --ship: upload the folder, graphs included "
                        "(a card edited on the Hub is kept)")
    parser.add_argument("--image-size", type=int, default=None, help="H = W of the graph (default: the model's eval size)")
    parser.add_argument("--dynamic-size", action="store_true", help="leave H and W dynamic (symmetric padding, avg pool only)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--int8", action="store_true", help="post-training static int8 quantization (needs --calibration)")
    parser.add_argument("--calibration", type=Path, help="folder of images to calibrate int8 on (searched recursively)")
    parser.add_argument("--num-calibration", type=int, default=CALIBRATION_IMAGES,
                        help=f"calibration images drawn from --calibration (default {CALIBRATION_IMAGES})")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime equality check")
    args = parser.parse_args(argv)
    if bool(args.out) == args.ship:
        parser.error("give either --out FILE or --ship (into the --model folder)")
    if args.push_to_hub and not args.ship:
        parser.error("--push-to-hub uploads a model folder: use it with --ship")
    if args.int8 != bool(args.calibration):
        parser.error("--int8 and --calibration DATA go together: int8 ranges are measured on real images")
    if args.int8 and args.dynamic_size:
        parser.error("--int8 graphs have a fixed size: drop --dynamic-size")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        model = load_model(args.model)
        if args.ship:
            source = parse_source(args.model)
            if source.kind != "folder":
                raise ValueError(f"--ship writes into a model folder, and {args.model!r} is not one: save the model "
                                 f"with save_pretrained first (or download the repo), then ship into that folder")
            manifest = ship_graphs(model, source.path, args.calibration, args.num_calibration)
            for precision, graph in manifest["graphs"].items():
                logger.info("wrote %s (%s): %s", source.path / SHIPPED_GRAPHS[precision], precision,
                            {k: v for k, v in graph.items() if k != "sha256"})
            if args.push_to_hub:
                logger.info("pushed to %s", upload_model_folder(source.path, args.push_to_hub,
                                                                commit_message="effnetv2.export --ship"))
            return 0
        if args.int8:
            graph = export_calibrated_int8(model, args.out, args.calibration, args.num_calibration, args.image_size,
                                           args.opset, held_out=0 if args.no_check else AGREEMENT_IMAGES)
            logger.info("wrote %s (%.1f MB): EfficientNetV2-%s int8, input [B, 3, %d, %d], after calibrating on %d "
                        "images of %s", args.out, args.out.stat().st_size / 1e6, model.variant, *graph["image_size"],
                        graph["calibration_images"], args.calibration)
            if "agreement" in graph:
                logger.info("int8 vs float graph on {images} held-out images: top-1 agreement {top1_agreement:.1%}, "
                            "relative error {relative_error:.2e}".format(**graph["agreement"]))
            return 0
        path = export_onnx(model, args.out, args.image_size, opset=args.opset, dynamic_size=args.dynamic_size)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = args.image_size or model.config["image_size"]
    logger.info("wrote %s (%.1f MB): EfficientNetV2-%s, input [B, 3, %s, %s], opset %d", path,
                path.stat().st_size / 1e6, model.variant, "H" if args.dynamic_size else size,
                "W" if args.dynamic_size else size, args.opset)
    if args.no_check:
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning("onnxruntime is not installed: the graph was not checked (pip install onnxruntime)")
        return 0
    worst = 0.0
    for check_size in [size, size + 32] if args.dynamic_size else [size]:  # a frozen shape shows at a second size
        stats = check_onnx(model, path, check_size)
        worst = max(worst, stats["relative_error"])
        logger.info("ONNX Runtime vs eager at %dx%d: max |Δlogit| %.2e (max |logit| %.2f), relative error %.2e",
                    check_size, check_size, stats["max_abs_diff"], stats["max_abs_logit"], stats["relative_error"])
    if worst > MAX_RELATIVE_ERROR:
        print(f"error: the exported graph's logits differ from the eager model's (relative error {worst:.2e} > "
              f"{MAX_RELATIVE_ERROR:.0e}); {path} should not be used. Please report this with the model source.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
