"""ONNX export of the BatchNorm-folded model, checked against the eager model with ONNX Runtime.

    python -m effnetv2.export --model SOURCE --out model.onnx [--image-size S] [--dynamic-size] [--opset N]

The graph takes ``pixel_values`` ``[B, 3, H, W]`` (already preprocessed, see
``effnetv2.transforms_for``) and returns ``logits`` ``[B, num_classes]``. The batch is always
dynamic; H and W are fixed to the model's eval size (or ``--image-size``) unless ``--dynamic-size``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .fuse import optimize_for_inference
from .model import EfficientNetV2

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
# Relative L2 error of the logits above which an exported graph is refused.
MAX_RELATIVE_ERROR = 1e-4


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder, Hub id org/name[@revision], or torchvision:<variant>")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--image-size", type=int, default=None, help="H = W of the graph (default: the model's eval size)")
    parser.add_argument("--dynamic-size", action="store_true", help="leave H and W dynamic (symmetric padding, avg pool only)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime equality check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from .sources import load_model

    try:
        model = load_model(args.model)
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
