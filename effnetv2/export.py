"""ONNX export of the BatchNorm-folded model, checked against the eager model with ONNX Runtime;
its int8 form (``effnetv2.quantize``); and the graphs shipped inside a model folder for the Hub.

    python -m effnetv2.export --model SOURCE --out model.onnx [--image-size S] [--dynamic-size] [--opset N]
    python -m effnetv2.export --model SOURCE --out model_int8.onnx --int8 --calibration DATA
    python -m effnetv2.export --model FOLDER --ship [--int8 --calibration DATA] [--push-to-hub ORG/NAME]

The graph takes ``pixel_values`` ``[B, 3, H, W]`` (already preprocessed, see
``effnetv2.transforms_for``) and returns ``logits`` ``[B, num_classes]``. The batch is always
dynamic; H and W are fixed to the model's eval size (or ``--image-size``) unless ``--dynamic-size``.

``--ship`` writes ``onnx/model.onnx`` (and ``onnx/model_int8.onnx``) into a folder written by
``save_pretrained``, with ``onnx/graphs.json``: the fingerprint of the weights they were exported
from, each graph's SHA-256 and its measured parity with the eager model. ``Predictor`` loading that
folder or its Hub repo runs a shipped graph only when both match, so a Space needs no export on start.
``--push-to-hub`` then uploads the folder in one commit (``effnetv2.card.upload_model_folder``).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .checkpoint import sha256_file, weights_fingerprint
from .fuse import optimize_for_inference
from .quantize import CALIBRATION_IMAGES, calibration_batches, calibration_split, quantize_onnx, top1_agreement

if TYPE_CHECKING:
    from .model import EfficientNetV2

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
# Relative L2 error of the logits above which an exported graph is refused.
MAX_RELATIVE_ERROR = 1e-4
# Shipped graphs, at fixed places in a model folder (a manifest never names files to read).
GRAPHS_MANIFEST = "onnx/graphs.json"
SHIPPED_GRAPHS = {"fp32": "onnx/model.onnx", "int8": "onnx/model_int8.onnx"}
# Held-out images of the calibration folder on which --int8 measures top-1 agreement with the float graph.
AGREEMENT_IMAGES = 200


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def export_onnx(model: EfficientNetV2, path: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
                opset: int = DEFAULT_OPSET, dynamic_size: bool = False) -> Path:
    """Write ``model`` with its BatchNorms folded as ONNX to ``path`` (atomically) and return it.

    Input ``pixel_values`` ``[B, 3, H, W]`` with a dynamic batch; ``H, W`` are ``image_size``
    (default: the config's eval size), or dynamic with ``dynamic_size``. Output ``logits``
    ``[B, num_classes]``. ``model`` is not changed.
    """
    if dynamic_size and (model.padding == "same" or model.pool_type == "attention"):
        what = "TensorFlow SAME padding" if model.padding == "same" else "the attention pool's position embedding"
        raise ValueError(f"--dynamic-size is not supported for this model: {what} depends on the input "
                         f"size, which the ONNX graph would freeze at the export size. Export one graph "
                         f"per size with --image-size instead.")
    height, width = _size_pair(image_size or model.config["image_size"])
    fused = optimize_for_inference(model, channels_last=False, device="cpu", dtype=torch.float32)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns about its own deprecation and about traced shapes.
            warnings.simplefilter("ignore")
            # dynamo=False: the TorchScript exporter needs no onnxscript and handles this graph fully.
            torch.onnx.export(fused, (torch.zeros(1, fused.stem.conv.in_channels, height, width),), str(tmp),
                              dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}}, opset_version=opset)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_int8(model: EfficientNetV2, path: str | os.PathLike, batches: Sequence[np.ndarray],
                image_size: int | tuple[int, int] | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write the int8 graph of ``model`` to ``path``: the float graph of :func:`export_onnx`,
    statically quantized with activation ranges measured on ``batches`` (preprocessed
    ``[B, 3, H, W]`` arrays at the graph's size, see ``effnetv2.quantize``)."""
    with tempfile.TemporaryDirectory(prefix="effnetv2-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp, "model.onnx"), image_size, opset=opset)
        return quantize_onnx(fp32, path, batches, input_name=INPUT_NAME)


def graph_fingerprint(model: EfficientNetV2, *context: str) -> str:
    """SHA-256 of the weights (as float32, the way ``from_pretrained`` loads them, whatever dtype they
    were saved in), the config and the ``context`` strings: the key that ties a graph (shipped or
    cached) to the model it came from."""
    return weights_fingerprint(copy.deepcopy(model).float(), json.dumps(model.config, sort_keys=True, default=str),
                               *context)


def run_onnx(path: str | os.PathLike, batches: Sequence[np.ndarray]) -> np.ndarray:
    """Logits ``[N, num_classes]`` of the graph at ``path`` under ONNX Runtime, for all ``batches``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: batch})[0] for batch in batches])


def int8_agreement(config: dict, fp32_path: Path, int8_path: Path, files: Sequence[Path]) -> dict:
    """``{"images", "top1_agreement", "relative_error"}`` of the int8 graph against the float graph on
    ``files`` (images held out from calibration), preprocessed with the model's ``config``."""
    batches = calibration_batches(config, files, image_size=_size_pair(config["image_size"])[0])
    fp32, int8 = run_onnx(fp32_path, batches), run_onnx(int8_path, batches)
    return {"images": len(files), "top1_agreement": top1_agreement(int8, fp32), "relative_error": relative_error(int8, fp32)}


def ship_graphs(model: EfficientNetV2, folder: str | os.PathLike, calibration: str | os.PathLike | None = None,
                num_calibration: int = CALIBRATION_IMAGES, seed: int = 0) -> dict:
    """Write ``onnx/model.onnx`` (and, with ``calibration``, a folder of images, ``onnx/model_int8.onnx``)
    into the model folder ``folder`` with the manifest ``onnx/graphs.json``, and describe them in
    its card (README.md) when it has one. Returns the manifest.

    The manifest holds :func:`graph_fingerprint` of ``model``, each graph's SHA-256 and input size,
    the float graph's relative error against the eager model (random batch) and the int8 graph's
    top-1 agreement with the float one on images of ``calibration`` it was not calibrated on.
    """
    from .card import graphs_section, update_card

    folder = Path(folder)
    size = _size_pair(model.config["image_size"])
    fp32_path = export_onnx(model, folder / SHIPPED_GRAPHS["fp32"], size)
    graphs = {"fp32": {"sha256": sha256_file(fp32_path), "image_size": list(size),
                       "relative_error": check_onnx(model, fp32_path, size)["relative_error"]}}
    (folder / SHIPPED_GRAPHS["int8"]).unlink(missing_ok=True)  # never leave an int8 graph of older weights
    if calibration is not None:
        files, held_out = calibration_split(calibration, num_calibration, AGREEMENT_IMAGES, seed)
        int8_path = export_int8(model, folder / SHIPPED_GRAPHS["int8"],
                                calibration_batches(model.config, files, image_size=size[0]), size)
        graphs["int8"] = {"sha256": sha256_file(int8_path), "image_size": list(size), "calibration_images": len(files),
                          **({"agreement": int8_agreement(model.config, fp32_path, int8_path, held_out)} if held_out else {})}
    manifest = {"fingerprint": graph_fingerprint(model), "exporter": f"torch {torch.__version__}", "graphs": graphs}
    (folder / GRAPHS_MANIFEST).write_text(json.dumps(manifest, indent=1))
    card = folder / "README.md"
    if card.is_file():
        update_card(card, graphs_section(manifest, SHIPPED_GRAPHS))
    return manifest


def relative_error(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (L2 over all elements), in float64."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


@torch.no_grad()
def check_onnx(model: EfficientNetV2, path: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
               batch_size: int = 2, seed: int = 0) -> dict[str, float]:
    """Run the graph at ``path`` with ONNX Runtime and the eager ``model`` on the same random batch
    ``[batch_size, 3, H, W]``; return ``{"max_abs_diff", "relative_error", "max_abs_logit"}``."""
    import onnxruntime as ort

    height, width = _size_pair(image_size or model.config["image_size"])
    x = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    try:
        expected = model.eval()(x).numpy()
    finally:
        model.train(was_training)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {INPUT_NAME: x.numpy()})[0]
    return {"max_abs_diff": float(np.abs(actual - expected).max()),
            "relative_error": relative_error(actual, expected),
            "max_abs_logit": float(np.abs(expected).max())}


def _int8_main(args: argparse.Namespace, model: EfficientNetV2) -> int:
    """``--int8 --out``: the int8 graph, and its top-1 agreement with the float graph on held-out images."""
    files, held_out = calibration_split(args.calibration, args.num_calibration, AGREEMENT_IMAGES)
    size = args.image_size or model.config["image_size"]
    logger.info("calibrating on %d images of %s", len(files), args.calibration)
    path = export_int8(model, args.out, calibration_batches(model.config, files, image_size=size), size,
                       opset=args.opset)
    logger.info("wrote %s (%.1f MB): EfficientNetV2-%s int8, input [B, 3, %d, %d]", path, path.stat().st_size / 1e6,
                model.variant, size, size)
    if held_out and not args.no_check:
        with tempfile.TemporaryDirectory(prefix="effnetv2-export-") as tmp:
            fp32 = export_onnx(model, Path(tmp, "model.onnx"), size, opset=args.opset)
            stats = int8_agreement({**model.config, "image_size": size}, fp32, path, held_out)
        logger.info("int8 vs float graph on %d held-out images of %s: top-1 agreement %.1f%%, relative error %.2e",
                    stats["images"], args.calibration, 100 * stats["top1_agreement"], stats["relative_error"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.export", description=__doc__.split("\n\n")[0])
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

    from .sources import load_model, parse_source

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
                from .card import upload_model_folder

                logger.info("pushed to %s", upload_model_folder(source.path, args.push_to_hub,
                                                                commit_message="effnetv2.export --ship"))
            return 0
        if args.int8:
            return _int8_main(args, model)
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
    # A dynamic graph is also checked at a second size, where a frozen shape would show.
    sizes = [size, size + 32] if args.dynamic_size else [size]
    worst = 0.0
    for check_size in sizes:
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
