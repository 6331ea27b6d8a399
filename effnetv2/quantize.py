"""Post-training static int8 (QDQ) quantization of the exported ONNX graph with ONNX Runtime, calibrated on real
images (never those accuracy is measured on); why every operation, asymmetric activations: benchmarks/README.md."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from .data import is_image_file, report_bad_files
from .images import ImageLoadError, open_image
from .transforms import transforms_for

if TYPE_CHECKING:  # onnx is imported where it is used: the package runs without it
    import onnx

CALIBRATION_IMAGES = 300
QUANTIZED_OPS = ("Conv", "Sigmoid", "Mul", "Add", "GlobalAveragePool", "Gemm", "MatMul")


def calibration_split(data: str | os.PathLike, count: int = CALIBRATION_IMAGES, held_out: int = 0,
                      seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``(calibration, held_out)``: ``count`` image files drawn (seeded) from the folder ``data`` (recursively)
    and up to ``held_out`` others; ``ValueError`` naming ``data`` when it is not a folder of images."""
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
                        image_size: int | None = None) -> Iterator[np.ndarray]:
    """``files`` through the model's eval transform (``config``) as arrays ``[batch_size, 3, S, S]``, read
    lazily (one batch in memory); unreadable files are skipped and named in one warning at the end."""
    transform = transforms_for(config, image_size=image_size)
    images, bad = [], []
    for path in files:
        try:
            images.append(transform(open_image(path)).numpy())
        except ImageLoadError as err:
            bad.append((str(path), err.reason))
        except (OSError, ValueError, RuntimeError) as err:  # e.g. a decoder failing inside the transform
            bad.append((str(path), f"{type(err).__name__}: {err}"))
        if len(images) == batch_size:
            yield np.stack(images)
            images = []
    if images:
        yield np.stack(images)
    report_bad_files(bad)


class _Batches:
    """ONNX Runtime's ``CalibrationDataReader`` of ``batches``, the first read at once (``first``: None if empty)."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name, self.batches = input_name, iter(batches)
        self.first = next(self.batches, None)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self.first = (self.first if self.first is not None else next(self.batches, None)), None
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def spatial_means_as_pools(graph: onnx.GraphProto) -> int:
    """Rewrite in place each ``ReduceMean`` over axes (2, 3) of a 4-d tensor as ``GlobalAveragePool`` (then
    ``Flatten`` when it drops those axes): the same values, with an int8 kernel. Returns how many."""
    from onnx import helper, numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.value_info) + list(graph.input)
             if v.type.tensor_type.HasField("shape")}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # opset < 18: axes is an attribute; from 18 on, a second (constant) input
        axes = attrs.get("axes") if len(node.input) < 2 else constants.get(node.input[1])
        if (node.op_type != "ReduceMean" or axes is None or sorted(int(a) for a in axes) != [2, 3]
                or ranks.get(node.input[0]) != 4):
            nodes.append(node)
            continue
        rewritten += 1
        if attrs.get("keepdims", 1):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
        else:
            pooled = f"{node.output[0]}/pooled"
            nodes += [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name),
                      helper.make_node("Flatten", [pooled], list(node.output), name=f"{node.name}/flatten", axis=1)]
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches: Iterable[np.ndarray],
                  input_name: str = "pixel_values") -> Path:
    """Write the int8 (QDQ) form of the float graph at ``fp32_path`` to ``out_path`` (atomically) and return
    it, with activation ranges measured on ``batches`` (preprocessed ``[B, 3, H, W]`` arrays, read once)."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    reader = _Batches(input_name, batches)
    if reader.first is None:
        raise ValueError("int8 quantization needs at least one calibration batch (no calibration image could be "
                         "read): give a folder of readable images like the ones the model will see")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="effnetv2-quantize-") as tmp:
        prepared, quantized = Path(tmp, "prepared.onnx"), Path(tmp, "int8.onnx")
        # shape inference and constant folding first, as ONNX Runtime recommends before quantizing
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        spatial_means_as_pools(graph.graph)
        onnx.save(graph, str(prepared))
        # No CalibMaxIntermediateOutputs: ONNX Runtime 1.32 drops the kept batches unreduced at that count.
        quantize_static(str(prepared), str(quantized), reader,
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        calibrate_method=CalibrationMethod.MinMax)
        os.replace(quantized, out_path)
    return out_path


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows of ``logits`` ``[N, C]`` whose best class is ``reference``'s best class."""
    return float((np.asarray(logits).argmax(1) == np.asarray(reference).argmax(1)).mean())
