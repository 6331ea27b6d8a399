"""The fast inference path: BatchNorm folded into the convolutions, channels_last, and optional
ONNX Runtime / OpenVINO backends, behind one :class:`Predictor`.

``Predictor(model)(x)`` gives the eager model's logits for a preprocessed batch ``[B, 3, H, W]``;
``Predictor(model).predict(images, top_k=5)`` takes PIL images or paths and returns labelled top-k.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .images import open_image
from .layers import ConvBNAct
from .model import EfficientNetV2
from .transforms import transforms_for

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino", "onnxruntime")
# "auto" takes the first installed one: OpenVINO was the fastest on the CPUs we measured
# (benchmarks/inference.py), then ONNX Runtime, then the fused PyTorch model.
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
CACHE_DIR = Path(os.environ.get("EFFNETV2_CACHE", Path.home() / ".cache" / "effnetv2"))


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` whose weight and bias absorb the eval-mode ``bn`` that follows it."""
    fused = copy.deepcopy(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach())
    fused.bias = nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).detach())
    return fused


@torch.no_grad()
def optimize_for_inference(model: EfficientNetV2, channels_last: bool = True) -> EfficientNetV2:
    """An eval-mode copy of ``model`` with every BatchNorm folded into its conv; ``model`` is untouched.

    Same logits as the eager model (to float rounding), fewer kernels and memory passes.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fold_batchnorm(module.conv, module.bn)
            module.bn = nn.Identity()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last) if channels_last else fused


def available_backends() -> list[str]:
    """The backends whose runtime is installed, in ``auto`` order."""
    return [b for b in AUTO_ORDER if b == "torch" or importlib.util.find_spec(b) is not None]


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def export_onnx(model: EfficientNetV2, path: str | Path, image_size: int | tuple[int, int] | None = None,
                opset: int = 17, dynamic_size: bool = False) -> Path:
    """Write the BatchNorm-folded ``model`` as ONNX: input ``pixel_values`` ``[B, 3, H, W]`` (dynamic
    batch; H, W fixed to ``image_size`` unless ``dynamic_size``), output ``logits``."""
    size = image_size or model.config["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    fused = optimize_for_inference(model, channels_last=False)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
        torch.onnx.export(fused, (torch.zeros(1, 3, height, width),), str(tmp), dynamo=False,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": axes, "logits": {0: "batch"}}, opset_version=opset)
    os.replace(tmp, path)
    return path


class Predictor:
    """Fast inference for an ``EfficientNetV2`` (or a source string, see ``effnetv2.sources``).

    Args:
        model_or_source: the model, or a folder / Hub id / ``torchvision:<variant>``.
        backend: "auto" (fastest installed), "torch", "onnxruntime" or "openvino".
        num_threads: CPU threads for the runtime (None: the runtime's default).
    """

    def __init__(self, model_or_source: EfficientNetV2 | str, backend: str = "auto",
                 num_threads: int | None = None, cache_dir: str | Path | None = None):
        if isinstance(model_or_source, EfficientNetV2):
            self.model = model_or_source.eval()
        else:
            from .sources import load_model

            self.model = load_model(model_or_source)
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if backend != "auto" and backend not in available_backends():
            raise ImportError(f"backend {backend!r} is not installed: pip install {backend}, or use backend='auto'")
        self.backend = available_backends()[0] if backend == "auto" else backend
        self.num_threads = num_threads
        self.cache_dir = Path(cache_dir) if cache_dir else CACHE_DIR / "onnx"
        self.config = self.model.config
        self.id2label = self.model.id2label
        self.transform = transforms_for(self.model)
        self._fused = optimize_for_inference(self.model)
        self._sessions: dict[tuple[int, int], object] = {}
        self._fingerprint = weights_fingerprint(self.model) if self.backend != "torch" else ""

    def _session(self, height: int, width: int):
        key = (height, width)
        if key not in self._sessions:
            path = self.cache_dir / f"{self._fingerprint}-{height}x{width}.onnx"
            if not path.exists():
                export_onnx(self.model, path, (height, width))
            self._sessions[key] = self._open(path)
        return self._sessions[key]

    def _open(self, path: Path):
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.num_threads:
                options.intra_op_num_threads = self.num_threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return lambda x: session.run(None, {"pixel_values": x})[0]
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.num_threads:
            config["INFERENCE_NUM_THREADS"] = self.num_threads
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        return lambda x: request.infer({0: x})[compiled.output(0)].copy()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for a preprocessed float batch ``x`` ``[B, 3, H, W]``."""
        if self.backend == "torch":
            return self._fused(x.to(memory_format=torch.channels_last)).contiguous()
        run = self._session(*x.shape[-2:])
        return torch.from_numpy(np.asarray(run(x.detach().cpu().float().contiguous().numpy())))

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images or paths → the model's input batch ``[B, 3, S, S]``."""
        return torch.stack([self.transform(open_image(image)) for image in images])

    def predict(self, images: Sequence, top_k: int = 5, batch_size: int = 16) -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` ``(label, probability)`` pairs, best first."""
        results = []
        k = min(top_k, self.model.num_classes)
        for start in range(0, len(images), batch_size):
            probs = self(self.preprocess(images[start:start + batch_size])).softmax(dim=-1)
            values, indices = probs.topk(k, dim=-1)
            results += [[(self.id2label[str(i)], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
                        for row_p, row_i in zip(values, indices)]
        return results
