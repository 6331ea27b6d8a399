"""ONNX export of the BatchNorm-folded model (``pixel_values`` ``[B, 3, H, W]`` → ``logits``), checked against the
eager model with ONNX Runtime; its int8 form (``effnetv2.quantize``); the graphs shipped in a model folder."""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..card import graphs_section, update_card
from ..checkpoint import sha256_file, weights_fingerprint
from ..fuse import optimize_for_inference
from ..model import EfficientNetV2
from ..quantize import CALIBRATION_IMAGES, calibration_batches, calibration_split, quantize_onnx, top1_agreement

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
MAX_RELATIVE_ERROR = 1e-4  # of the logits (L2), above which an exported graph is refused
# Shipped graphs, at fixed places in a model folder (a manifest never names files to read).
GRAPHS_MANIFEST = "onnx/graphs.json"
SHIPPED_GRAPHS = {"fp32": "onnx/model.onnx", "int8": "onnx/model_int8.onnx"}
AGREEMENT_IMAGES = 200  # held out of the calibration folder, to measure int8's top-1 agreement with float


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def export_onnx(model: EfficientNetV2, path: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
                opset: int = DEFAULT_OPSET, dynamic_size: bool = False) -> Path:
    """Write ``model`` (unchanged) with its BatchNorms folded as ONNX to ``path`` (atomically) and return it.
    The batch is dynamic; ``H, W`` are ``image_size`` (default: the eval size), or dynamic with ``dynamic_size``."""
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
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and traced-shape warnings
            # dynamo=False: the TorchScript exporter needs no onnxscript and handles this graph fully.
            torch.onnx.export(fused, (torch.zeros(1, fused.stem.conv.in_channels, height, width),), str(tmp),
                              dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}}, opset_version=opset)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_int8(model: EfficientNetV2, path: str | os.PathLike, batches: Iterable[np.ndarray],
                image_size: int | tuple[int, int] | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write the int8 graph of ``model`` to ``path``: :func:`export_onnx`'s graph, quantized with activation
    ranges measured on ``batches`` (preprocessed ``[B, 3, H, W]`` arrays at the graph's size)."""
    with tempfile.TemporaryDirectory(prefix="effnetv2-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp, "model.onnx"), image_size, opset=opset)
        return quantize_onnx(fp32, path, batches, input_name=INPUT_NAME)


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The external data files holding some of the ONNX graph's tensors, as the graph names them (often none)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    graph = onnx.load(str(path), load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in _get_all_tensors(graph)
                   if t.data_location == onnx.TensorProto.EXTERNAL})


def graph_fingerprint(model: EfficientNetV2, *context: str) -> str:
    """SHA-256 of the weights (as float32, as ``from_pretrained`` loads them), the config and ``context``:
    the key that ties a graph (shipped or cached) to the model it came from."""
    return weights_fingerprint(copy.deepcopy(model).float(), json.dumps(model.config, sort_keys=True, default=str),
                               *context)


def run_onnx(path: str | os.PathLike, batches: Sequence[np.ndarray]) -> np.ndarray:
    """Logits ``[N, num_classes]`` of the graph at ``path`` under ONNX Runtime, for all ``batches``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: batch})[0] for batch in batches])


def export_calibrated_int8(model: EfficientNetV2, path: str | os.PathLike, calibration: str | os.PathLike,
                           num_calibration: int = CALIBRATION_IMAGES, image_size: int | tuple[int, int] | None = None,
                           opset: int = DEFAULT_OPSET, held_out: int = AGREEMENT_IMAGES,
                           fp32_path: Path | None = None) -> dict:
    """Write the int8 graph calibrated on ``num_calibration`` images of the folder ``calibration``; returns its manifest
    entry, with the ``"agreement"`` with the float graph (``fp32_path``, else exported) on ``held_out`` other images."""
    import onnxruntime as ort

    size = _size_pair(image_size or model.config["image_size"])
    files, held_out_files = calibration_split(calibration, num_calibration, held_out)
    export_int8(model, path, calibration_batches(model.config, files, image_size=size[0]), size, opset)
    graph = {"sha256": sha256_file(path), "image_size": list(size), "calibration_images": len(files)}
    if not held_out_files:
        return graph
    with tempfile.TemporaryDirectory(prefix="effnetv2-export-") as tmp:
        fp32_path = fp32_path or export_onnx(model, Path(tmp, "model.onnx"), size, opset=opset)
        runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run for p in (fp32_path, path)]
        logits = [[run(None, {INPUT_NAME: batch})[0] for run in runs]
                  for batch in calibration_batches(model.config, held_out_files, image_size=size[0])]
    fp32, int8 = (np.concatenate(column) for column in zip(*logits))
    graph["agreement"] = {"images": len(fp32), "top1_agreement": top1_agreement(int8, fp32),
                          "relative_error": relative_error(int8, fp32)}
    return graph


def ship_graphs(model: EfficientNetV2, folder: str | os.PathLike, calibration: str | os.PathLike | None = None,
                num_calibration: int = CALIBRATION_IMAGES) -> dict:
    """Write ``onnx/model.onnx`` (with ``calibration``, a folder of images, ``onnx/model_int8.onnx`` too) and the
    manifest ``onnx/graphs.json`` into the model ``folder``, described in its README.md if any; returns the manifest."""
    folder = Path(folder)
    size = _size_pair(model.config["image_size"])
    fp32_path = export_onnx(model, folder / SHIPPED_GRAPHS["fp32"], size)
    graphs = {"fp32": {"sha256": sha256_file(fp32_path), "image_size": list(size),
                       "relative_error": check_onnx(model, fp32_path, size)["relative_error"]}}
    (folder / SHIPPED_GRAPHS["int8"]).unlink(missing_ok=True)  # never leave an int8 graph of older weights
    if calibration is not None:
        graphs["int8"] = export_calibrated_int8(model, folder / SHIPPED_GRAPHS["int8"], calibration, num_calibration,
                                                size, fp32_path=fp32_path)
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
    height, width = _size_pair(image_size or model.config["image_size"])
    x = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    try:
        expected = model.eval()(x).numpy()
    finally:
        model.train(was_training)
    actual = run_onnx(path, [x.numpy()])
    return {"max_abs_diff": float(np.abs(actual - expected).max()),
            "relative_error": relative_error(actual, expected),
            "max_abs_logit": float(np.abs(expected).max())}
