"""The fast inference path: one :class:`Predictor` over the BatchNorm-folded model run by PyTorch,
ONNX Runtime or OpenVINO.

``Predictor(model)(x)`` gives the eager model's logits for a preprocessed batch ``[B, 3, H, W]``;
``Predictor(model).predict(images, top_k=5)`` takes PIL images or paths and returns labelled top-k.
Exported graphs are cached on disk in a private (0700) folder, keyed by a hash of the weights and
config and checked against their own SHA-256 on every load, so creating a Predictor for the same
model again is fast and a damaged or replaced graph is exported again.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import weights_fingerprint
from .export import DEFAULT_OPSET, INPUT_NAME, export_onnx
from .fuse import optimize_for_inference
from .images import open_image
from .model import EfficientNetV2
from .transforms import transforms_for

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
# "auto" takes the first that works. Measured on a 2-core x86 CPU (benchmarks/inference.py, batch 1):
# EfficientNetV2-S at 384 px, ONNX Runtime 63 ms, OpenVINO 80 ms, the fused PyTorch model 89 ms,
# torchvision eager 113 ms; b0 at 224 px in the same order.
AUTO_ORDER = ("onnxruntime", "openvino", "torch")
# Bump when the exported graph changes for the same weights, so stale cached graphs are not reused.
GRAPH_VERSION = 1

ImageInput = str | os.PathLike | Image.Image


def default_cache_dir() -> Path:
    """``$EFFNETV2_CACHE``, else ``$XDG_CACHE_HOME/effnetv2``, else ``~/.cache/effnetv2``."""
    if os.environ.get("EFFNETV2_CACHE"):
        return Path(os.environ["EFFNETV2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effnetv2"


def _import_runtime(name: str):
    """The runtime's module, or ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"backend {name!r} needs the {name} package, which is not installed ({err}): "
                          f"pip install {name}, or use backend='torch'") from err


def _private_dir(path: Path) -> Path:
    """``path``, created if needed, as a folder that only this user can enter (mode 0700), and
    writable; OSError otherwise (e.g. a folder of the same name made by another user)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    tempfile.NamedTemporaryFile(dir=path).close()
    return path


def _cache_subdir(cache_dir: Path, name: str) -> Path:
    """The private folder ``cache_dir / name``; when that is not usable, a private per-user folder
    under the system temp folder (never a shared one: graphs found there are run)."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _private_dir(cache_dir / name)
    except OSError as err:
        uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
        fallback = Path(tempfile.gettempdir()) / f"effnetv2-cache-{uid}" / name
        logger.warning("cache folder %s is not usable (%s); using %s", cache_dir / name, err, fallback)
        try:
            _private_dir(fallback.parent)
            return _private_dir(fallback)
        except OSError:  # taken by another user: a fresh folder with an unpredictable name
            return Path(tempfile.mkdtemp(prefix="effnetv2-cache-"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


class Predictor:
    """Fast inference for an ``EfficientNetV2`` or a model source (see ``effnetv2.sources``).

    Args:
        model_or_source: the model, or a folder / Hub id ``org/name[@rev]`` / ``torchvision:<variant>``.
        backend: "auto" (the fastest installed runtime, falling back to "torch"), "torch" (the
            BatchNorm-folded, channels_last PyTorch model), "onnxruntime" or "openvino".
        num_threads: CPU threads for ONNX Runtime / OpenVINO (None: the runtime's default, all cores).
        cache_dir: where exported graphs are kept (default :func:`default_cache_dir`).
        device: "cpu" (default) or a CUDA device; CUDA runs the "torch" backend.

    Attributes: ``model`` (the eager model, untouched), ``config``, ``id2label``, ``backend``
    (the one in use), ``transform`` (PIL image → ``[3, S, S]``).
    """

    def __init__(self, model_or_source: EfficientNetV2 | str | os.PathLike, backend: str = "auto", *,
                 num_threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu"):
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if isinstance(model_or_source, EfficientNetV2):
            self.model = model_or_source
        else:
            from .sources import load_model

            self.model = load_model(model_or_source)
        self.device = torch.device(device)
        if self.device.type != "cpu" and backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r} runs on the CPU; use backend='torch' for device {device!r}")
        self.config = self.model.config
        self.id2label = self.model.id2label
        self.num_threads = num_threads
        self.transform = transforms_for(self.model)
        self._cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._runners: dict[tuple[int, int], Callable[[np.ndarray], np.ndarray]] = {}
        self._lock = threading.Lock()
        self._fused: EfficientNetV2 | None = None
        self._fingerprint = ""
        self._graph_dir: Path | None = None
        candidates = ["torch"] if self.device.type != "cpu" else list(AUTO_ORDER) if backend == "auto" else [backend]
        size = self.config["image_size"]
        for name in candidates:
            self.backend = name
            try:
                self._runner(size, size)  # fails now, not on the first request
                break
            except Exception as err:  # ImportError, or a runtime that installs but cannot run this graph
                if backend != "auto" or name == candidates[-1]:
                    raise
                level = logging.INFO if isinstance(err, ImportError) else logging.WARNING
                logger.log(level, "backend %s unavailable (%s); trying %s", name, err,
                           candidates[candidates.index(name) + 1])
                self._runners.clear()

    # ---- backends ---------------------------------------------------------------------------------

    def _runner(self, height: int, width: int) -> Callable:
        """The callable that runs the backend on ``[B, 3, height, width]`` inputs (built once per size)."""
        key = (height, width)
        with self._lock:
            if key not in self._runners:
                if self.backend == "torch":
                    self._runners[key] = self._torch_runner()
                else:
                    module = _import_runtime(self.backend)
                    path = self._onnx_path(height, width)
                    build = self._onnxruntime_runner if self.backend == "onnxruntime" else self._openvino_runner
                    self._runners[key] = build(module, path)
            return self._runners[key]

    def _torch_runner(self) -> Callable:
        if self._fused is None:
            self._fused = optimize_for_inference(self.model, channels_last=True, device=self.device)
        fused = self._fused

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return fused(x.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last))
        return run

    def _onnx_path(self, height: int, width: int) -> Path:
        """The cached ONNX graph for this model at ``height x width``, exported on first use.

        Beside each graph a record holds the model fingerprint, the size and the graph's SHA-256;
        a graph that does not match its record (overwritten, truncated, unreadable) is exported
        again with a warning, so a cached graph always computes this model's logits.
        """
        if not self._fingerprint:
            # the graph depends on the weights, the config and the exporter (torch, GRAPH_VERSION)
            self._fingerprint = weights_fingerprint(self.model, json.dumps(self.model.config, sort_keys=True, default=str),
                                                    f"{torch.__version__}/{GRAPH_VERSION}")[:24]
        if self._graph_dir is None:
            self._graph_dir = _cache_subdir(self._cache_dir, "onnx")
        path = self._graph_dir / f"effnetv2-{self.model.variant}-{self._fingerprint}-{height}x{width}.onnx"
        record_path = path.with_suffix(".json")
        expected = {"fingerprint": self._fingerprint, "size": [height, width]}
        if path.exists() or record_path.exists():
            try:
                record = json.loads(record_path.read_text())
                if {k: record.get(k) for k in expected} == expected and record.get("sha256") == _sha256(path):
                    return path
                problem = "it does not match its record (overwritten or truncated?)"
            except (OSError, ValueError) as err:
                problem = f"it or its record is unreadable ({err})"
            logger.warning("cached graph %s is not the one exported for this model: %s; exporting it again",
                           path, problem)
        else:
            logger.info("exporting EfficientNetV2-%s at %dx%d to %s", self.model.variant, height, width, path)
        export_onnx(self.model, path, (height, width), opset=DEFAULT_OPSET)
        _write_json_atomically(record_path, {**expected, "sha256": _sha256(path)})
        return path

    def _onnxruntime_runner(self, ort, path: Path) -> Callable:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.num_threads:
            options.intra_op_num_threads = self.num_threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {INPUT_NAME: x})[0]

    def _openvino_runner(self, ov, path: Path) -> Callable:
        core = ov.Core()
        # OpenVINO keeps the compiled graph here too, which makes the next compile of it fast.
        core.set_property({"CACHE_DIR": str(_cache_subdir(self._cache_dir, "openvino"))})
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise run in bf16 and the
        # logits would no longer equal the eager model's.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if self.num_threads:
            config["INFERENCE_NUM_THREADS"] = self.num_threads
        compiled = core.compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        output = compiled.output(0)
        lock = threading.Lock()  # one infer request: calls from several threads take turns

        def run(x: np.ndarray) -> np.ndarray:
            with lock:
                return request.infer({0: x})[output].copy()
        return run

    # ---- inference --------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for a preprocessed float batch ``x`` ``[B, 3, H, W]``.

        Equal to ``model(x)`` of the eager model (to float rounding). Runtimes return CPU tensors;
        the torch backend returns them on ``device``.
        """
        in_chans = self.config["in_chans"]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a preprocessed batch [B, {in_chans}, H, W], got {shape}: "
                             f"use predictor.predict(images) for PIL images or paths")
        run = self._runner(*x.shape[-2:])
        if self.backend == "torch":
            return run(x)
        return torch.from_numpy(run(x.detach().to("cpu", torch.float32).contiguous().numpy()))

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """PIL images or paths → the model's input batch ``[B, 3, S, S]`` (``ImageLoadError`` on a bad file)."""
        return torch.stack([self.transform(open_image(image)) for image in images])

    def topk(self, logits: torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Logits ``[B, num_classes]`` → per row the ``top_k`` ``(label, probability)`` pairs, best first."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probs = logits.float().softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.id2label[str(i)], p) for p, i in zip(row_p, row_i)]
                for row_p, row_i in zip(values.tolist(), indices.tolist())]

    def predict(self, images: Sequence[ImageInput], top_k: int = 5,
                batch_size: int = 16) -> list[list[tuple[str, float]]]:
        """Per image (PIL image or path), the ``top_k`` ``(label, probability)`` pairs, best first."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            raise TypeError("predict takes a list of images or paths; wrap a single one in a list")
        results: list[list[tuple[str, float]]] = []
        for start in range(0, len(images), batch_size):
            results += self.topk(self(self.preprocess(images[start:start + batch_size])), top_k)
        return results

    def __repr__(self) -> str:
        return (f"Predictor(EfficientNetV2-{self.model.variant}, {self.model.num_classes} classes, "
                f"backend={self.backend!r}, image_size={self.config['image_size']})")
