"""The fast inference path: one :class:`Predictor` over the BatchNorm-folded model run by PyTorch,
ONNX Runtime or OpenVINO, in float32, int8 (CPU runtimes) or bfloat16 (PyTorch, the CUDA default).

Exported graphs are cached in a private (0700) folder, keyed by a hash of the weights and checked against
their SHA-256 on every load; graphs a model ships (``python -m effnetv2.export --ship``) are used once their
hash, their weights' fingerprint and (float) their logits on a probe batch check out.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import sha256_file
from .export import (DEFAULT_OPSET, GRAPHS_MANIFEST, INPUT_NAME, MAX_RELATIVE_ERROR, SHIPPED_GRAPHS, export_int8,
                     export_onnx, external_data_files, graph_fingerprint, relative_error)
from .fuse import optimize_for_inference
from .images import open_image
from .model import EfficientNetV2
from .quantize import calibration_batches, calibration_split
from .transforms import transforms_for

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
# "auto" takes the first that works, fastest first on CPUs (benchmarks/README.md); int8 runs on CPU runtimes only
AUTO_ORDER = ("onnxruntime", "openvino", "torch")
INT8_AUTO_ORDER = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Bump when the exported graph changes for the same weights, so stale cached graphs are not reused.
GRAPH_VERSION = 2

ImageInput = str | os.PathLike | Image.Image


def default_cache_dir() -> Path:
    """``$EFFNETV2_CACHE``, else ``$XDG_CACHE_HOME/effnetv2``, else ``~/.cache/effnetv2``."""
    if os.environ.get("EFFNETV2_CACHE"):
        return Path(os.environ["EFFNETV2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effnetv2"


def import_optional(module: str, needed_by: str, install: str):
    """``module`` imported, or ImportError saying that ``needed_by`` needs it and how to ``install`` it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{needed_by} needs {module}, which is not installed ({err}): {install}") from err


def _private_dir(path: Path) -> Path:
    """``path``, created if needed, writable and only this user's (mode 0700); OSError otherwise."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    tempfile.NamedTemporaryFile(dir=path).close()
    return path


def _cache_subdir(cache_dir: Path, name: str) -> Path:
    """The private folder ``cache_dir / name``, else a private per-user one under the temp folder (never a
    shared one: graphs found there are run)."""
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


def compile_mode(device: torch.device, batch_size: int) -> str | None:
    """``torch.compile``'s mode: CUDA graphs ("reduce-overhead") for one image on CUDA, where launching the
    kernels costs more than running them; the default otherwise (no graph recorded per batch size)."""
    return "reduce-overhead" if device.type == "cuda" and batch_size == 1 else None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` saying what to do when it cannot run here."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available here (no GPU found, or a CPU-only build of "
                         f"PyTorch): use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    return device


class Predictor:
    """Fast inference for an ``EfficientNetV2`` or a model source (see ``effnetv2.sources``).

    Args:
        model_or_source: the model, or a folder / Hub id ``org/name[@rev]`` / ``torchvision:<variant>``.
        backend: "auto" (the fastest installed runtime, else "torch"), "torch", "onnxruntime" or "openvino".
        num_threads: CPU threads for ONNX Runtime / OpenVINO (None: the runtime's default).
        cache_dir: where exported graphs are kept (default :func:`default_cache_dir`).
        device: "cpu" (default) or a CUDA device (the "torch" backend).
        precision: "fp32" (the eager model's logits), "int8" (CPU runtimes; a shipped int8 graph or one
            calibrated on the image folder ``calibration``) or "bf16" (torch). Default: "bf16" on CUDA, else "fp32".
        compile: ``torch.compile`` the torch backend (:func:`compile_mode`). Default: on for CUDA only.

    Attributes: ``model`` (the eager model, untouched), ``config``, ``id2label``, ``backend`` (the one in
    use), ``precision``, ``transform`` (PIL image → ``[3, S, S]``), ``graph_path`` (the last graph loaded).
    """

    def __init__(self, model_or_source: EfficientNetV2 | str | os.PathLike, backend: str = "auto", *,
                 num_threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", precision: str | None = None,
                 calibration: str | os.PathLike | None = None, compile: bool | None = None):
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.device = check_device(device)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        candidates = self._candidates(backend)
        self._source = None
        if isinstance(model_or_source, EfficientNetV2):
            self.model = model_or_source
        else:
            from .sources import load_model, parse_source

            self._source = parse_source(model_or_source)
            self.model = load_model(self._source)
        self.config = self.model.config
        self.id2label = self.model.id2label
        self.num_threads = num_threads
        self.transform = transforms_for(self.model)
        self.graph_path: Path | None = None
        self._calibration = calibration_split(calibration)[0] if calibration is not None else None
        self._cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._runners: dict[tuple[int, int], Callable[[np.ndarray], np.ndarray]] = {}
        self._lock = threading.Lock()
        size = self.config["image_size"]
        for name in candidates:
            self.backend = name
            try:
                self._runner(size, size)  # fails now, not on the first request
                break
            except Exception as err:  # ImportError, or a runtime that installs but cannot run this graph
                if backend != "auto" or name == candidates[-1] or isinstance(err, ValueError):
                    raise  # a ValueError is the caller's to fix (e.g. int8 without calibration images)
                level = logging.INFO if isinstance(err, ImportError) else logging.WARNING
                logger.log(level, "backend %s unavailable (%s); trying %s", name, err,
                           candidates[candidates.index(name) + 1])
                self._runners.clear()

    def _candidates(self, backend: str) -> list[str]:
        """The backends to try, in order (``ValueError`` for combinations that cannot run, saying which can)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device.type == "cuda":
            if backend not in ("auto", "torch") or self.precision == "int8":
                raise ValueError(f"on {self.device} only backend='torch' runs, in precision 'fp32' or 'bf16' (got "
                                 f"backend={backend!r}, precision={self.precision!r}); int8 runs on the CPU")
            return ["torch"]
        if self.compile and backend not in ("auto", "torch"):
            raise ValueError(f"compile=True applies to backend='torch', not {backend!r}")
        if self.precision == "int8":
            if backend == "torch" or self.compile:
                raise ValueError("precision='int8' runs on backend 'onnxruntime' or 'openvino' (or 'auto'), not on torch")
            return list(INT8_AUTO_ORDER) if backend == "auto" else [backend]
        if self.precision == "bf16":
            if backend not in ("auto", "torch"):
                raise ValueError(f"precision='bf16' runs on backend='torch', not {backend!r}")
            return ["torch"]
        return ["torch"] if self.compile else list(AUTO_ORDER) if backend == "auto" else [backend]

    def _runner(self, height: int, width: int) -> Callable:
        """The callable that runs the backend on ``[B, 3, height, width]`` inputs (built once per size)."""
        key = (height, width)
        with self._lock:
            if key not in self._runners:
                if self.backend == "torch":
                    self._runners[key] = self._torch_runner()
                else:
                    module = import_optional(self.backend, f"backend {self.backend!r}",
                                             f"pip install {self.backend}, or use backend='torch'")
                    build = self._onnxruntime_runner if self.backend == "onnxruntime" else self._openvino_runner
                    path = self._shipped_graph(height, width)
                    runner = build(module, path) if path else None
                    if runner and (problem := self._probe_mismatch(runner, height, width)):
                        self._not_shipped(problem)
                        runner = None
                    if runner is None:
                        path = self._onnx_path(height, width)
                        runner = build(module, path)
                    self._runners[key] = runner
                    self.graph_path = path
            return self._runners[key]

    @cached_property
    def _fused(self) -> EfficientNetV2:
        """The BatchNorm-folded model in ``precision``, channels_last (cuDNN's and oneDNN's fastest layout)."""
        return optimize_for_inference(self.model, channels_last=True, device=self.device,
                                      dtype=TORCH_DTYPES[self.precision])

    def _torch_runner(self) -> Callable:
        """The fused model, optionally compiled; logits come back as float32."""
        dtype, fused = TORCH_DTYPES[self.precision], self._fused
        compiled: dict[str | None, Callable] = {}

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device, dtype).contiguous(memory_format=torch.channels_last)
            module = fused
            if self.compile:
                mode = compile_mode(self.device, x.shape[0])
                if mode not in compiled:
                    compiled[mode] = torch.compile(fused, mode=mode)
                module = compiled[mode]
            with torch.inference_mode():
                # a copy: a CUDA graph's output buffer is overwritten by its next replay
                return module(x).to(torch.float32, copy=True)
        return run

    @cached_property
    def _weights_key(self) -> str:
        """``export.graph_fingerprint`` of the model (a hash of every weight)."""
        return graph_fingerprint(self.model)

    @cached_property
    def _fingerprint(self) -> str:
        """The cache key of this model's graphs: the weights, the exporter (torch, GRAPH_VERSION) and, for int8,
        the calibration images."""
        calibration = [sha256_file(p) for p in self._calibration] if self.precision == "int8" else []
        key = "/".join([self._weights_key, torch.__version__, str(GRAPH_VERSION), *calibration])
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    @cached_property
    def _graph_dir(self) -> Path:
        return _cache_subdir(self._cache_dir, "onnx")

    @torch.no_grad()
    def _probe_mismatch(self, runner: Callable, height: int, width: int) -> str | None:
        """Why the float graph behind ``runner`` does not give the eager model's logits on a fixed random batch
        (relative error above ``MAX_RELATIVE_ERROR``), or None. int8 graphs differ by design: not probed."""
        if self.precision != "fp32":
            return None
        x = torch.randn(2, self.config["in_chans"], height, width, generator=torch.Generator().manual_seed(0))
        error = relative_error(runner(x.numpy()), self.model(x))  # a source loaded here: in eval mode
        if error <= MAX_RELATIVE_ERROR:
            return None
        return (f"its logits differ from the weights' (relative error {error:.2g} > {MAX_RELATIVE_ERROR:g} on a "
                f"probe batch): it is not the graph of these weights")

    def _not_shipped(self, problem: str) -> None:
        logger.warning("shipped graph %s of %s is not used: %s; exporting it here instead",
                       SHIPPED_GRAPHS[self.precision], self._source.text, problem)

    def _shipped_graph(self, height: int, width: int) -> Path | None:
        """The ``precision`` graph shipped with the model when its manifest says it was exported from these
        weights at this size, it has the recorded SHA-256 and holds all its weights (no external ``.data``
        file that the hash would not cover); else None, with a warning saying why when one is shipped."""
        source = self._source
        if source is None or source.kind not in ("folder", "hub"):
            return None
        from .hub import ModelDownloadError, resolve_file

        model_id = str(source.path) if source.kind == "folder" else source.repo_id
        name = SHIPPED_GRAPHS[self.precision]
        try:
            manifest_path = resolve_file(model_id, GRAPHS_MANIFEST, source.revision)
            if manifest_path is None:
                return None
            manifest = json.loads(Path(manifest_path).read_text())
            graph = manifest["graphs"].get(self.precision)
            if graph is None or graph["image_size"] != [height, width]:
                return None
            problem = None
            if manifest["fingerprint"] != self._weights_key:
                problem = "it was exported from other weights (its fingerprint in onnx/graphs.json differs)"
            elif (path := resolve_file(model_id, name, source.revision)) is None:
                problem = "the file is missing"
            elif sha256_file(path) != graph["sha256"]:
                problem = "its SHA-256 differs from the one in onnx/graphs.json (damaged or replaced)"
            elif external := external_data_files(path):
                problem = (f"it keeps weights in other files ({', '.join(external)}), which its SHA-256 does not "
                           f"cover; ship a graph that holds its weights (python -m effnetv2.export --ship)")
        except ImportError as err:
            problem = f"it cannot be checked without the onnx package ({err}): pip install onnx"
        except (ModelDownloadError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problem = f"it could not be read ({type(err).__name__}: {err})"
        if problem:
            self._not_shipped(problem)
            return None
        logger.info("using the graph shipped with %s: %s", source.text, name)
        return Path(path)

    def _onnx_path(self, height: int, width: int) -> Path:
        """The cached ONNX graph at ``height x width`` in ``precision``, exported on first use and again (with a
        warning) when it does not match the record beside it (fingerprint, size, SHA-256)."""
        int8 = self.precision == "int8"
        if int8 and self._calibration is None:
            raise ValueError("precision='int8' needs calibration images: pass calibration=FOLDER (images like the ones "
                             "the model will see), or load a model folder or Hub repo that ships onnx/model_int8.onnx")
        if int8 and height != width:
            raise ValueError(f"int8 graphs are calibrated on square images; got a {height}x{width} batch")
        suffix = "-int8" if int8 else ""
        path = self._graph_dir / f"effnetv2-{self.model.variant}-{self._fingerprint}-{height}x{width}{suffix}.onnx"
        record_path = path.with_suffix(".json")
        expected = {"fingerprint": self._fingerprint, "size": [height, width]}
        if path.exists() or record_path.exists():
            try:
                record = json.loads(record_path.read_text())
                if {k: record.get(k) for k in expected} == expected and record.get("sha256") == sha256_file(path):
                    return path
                problem = "it does not match its record (overwritten or truncated?)"
            except (OSError, ValueError) as err:
                problem = f"it or its record is unreadable ({err})"
            logger.warning("cached graph %s is not the one exported for this model: %s; exporting it again",
                           path, problem)
        else:
            logger.info("exporting EfficientNetV2-%s at %dx%d%s to %s", self.model.variant, height, width,
                        " (int8)" if int8 else "", path)
        if int8:
            export_int8(self.model, path, calibration_batches(self.config, self._calibration, image_size=height),
                        (height, width))
        else:
            export_onnx(self.model, path, (height, width), opset=DEFAULT_OPSET)
        tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**expected, "sha256": sha256_file(path)}))
        os.replace(tmp, record_path)
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
        # OpenVINO's compile cache is keyed by the graph's path: one folder per graph content, so that a graph
        # replaced at the same path is compiled anew.
        cache = _cache_subdir(_cache_subdir(self._cache_dir, "openvino"), sha256_file(path)[:24])
        core.set_property({"CACHE_DIR": str(cache)})
        # f32: on CPUs with bf16 units OpenVINO would run in bf16, and the logits would differ from the eager model's
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, num_classes]`` for a preprocessed batch ``x`` ``[B, 3, H, W]``: the eager model's
        (to float rounding) in fp32, close to them in int8 and bf16; on ``device`` for the torch backend."""
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
                f"backend={self.backend!r}, precision={self.precision!r}, image_size={self.config['image_size']})")
