"""Post-training static int8 quantization of the exported ONNX graph, calibrated on real images.

ONNX Runtime's quantizer measures each activation's range on the calibration batches (min/max) and
writes a QDQ graph: int8 weights per output channel, uint8 activations, around the convolutions,
the residual additions and the matrix products (SiLU, sigmoid and the SE product stay float: every
one quantized adds a quantize/dequantize pair and made the graph slower, not faster). The same
``.onnx`` file runs under ONNX Runtime and OpenVINO, which turns each pair into its own int8 kernels.

The calibration images should come from the data the model will see, never from the images its
accuracy is then measured on.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data import is_image_file
from .images import open_image
from .transforms import transforms_for

CALIBRATION_IMAGES = 300
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add")


def calibration_split(data: str | os.PathLike, count: int = CALIBRATION_IMAGES, held_out: int = 0,
                      seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``(calibration, held_out)``: ``count`` image files drawn at random (seeded) from the folder
    ``data`` (searched recursively), and up to ``held_out`` others to check the quantized graph on.
    ``ValueError`` naming ``data`` when it is not a folder of images."""
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"calibration data {root}: no such folder; give a folder of images like the ones the model "
                         f"will see (e.g. part of its training data)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise ValueError(f"calibration data {root} holds no image files: give a folder of images like the ones the "
                         f"model will see")
    if count < 1:
        raise ValueError(f"the number of calibration images must be at least 1, got {count}")
    shuffled = random.Random(seed).sample(files, len(files))
    return sorted(shuffled[:count]), sorted(shuffled[count:count + held_out])


def calibration_batches(config: dict, files: Sequence[str | os.PathLike], batch_size: int = 16,
                        image_size: int | None = None) -> list[np.ndarray]:
    """``files`` through the model's eval transform (``config``, see ``transforms_for``), as float
    arrays ``[batch_size, 3, S, S]`` (the last one may be smaller)."""
    transform = transforms_for(config, image_size=image_size)
    images = [transform(open_image(path)).numpy() for path in files]
    return [np.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


class _Batches:
    """ONNX Runtime's ``CalibrationDataReader``: one ``{input name: batch}`` per call, then None."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._feeds = ({input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches: Sequence[np.ndarray],
                  input_name: str = "pixel_values") -> Path:
    """Write the int8 (QDQ) form of the float graph at ``fp32_path`` to ``out_path`` (atomically) and
    return it, with activation ranges measured on ``batches`` (preprocessed ``[B, 3, H, W]`` arrays)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    if not batches:
        raise ValueError("int8 quantization needs at least one calibration batch")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="effnetv2-quantize-") as tmp:
        prepared, quantized = Path(tmp, "prepared.onnx"), Path(tmp, "int8.onnx")
        # shape inference and constant folding first, as ONNX Runtime recommends before quantizing
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _Batches(input_name, batches),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        calibrate_method=CalibrationMethod.MinMax,
                        # ranges are reduced every 8 batches: memory stays flat however many images
                        extra_options={"CalibMaxIntermediateOutputs": 8})
        os.replace(quantized, out_path)
    return out_path


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows of ``logits`` ``[N, C]`` whose best class is ``reference``'s best class."""
    return float((np.asarray(logits).argmax(1) == np.asarray(reference).argmax(1)).mean())
