"""Batch prediction on Ray Data (``python -m effnetv2.predict --engine ray``): images decoded in Ray tasks,
the model run by a pool of actors, the rows those of the local engine (``effnetv2.predict``).

The model reaches the actors through Ray's object store; images are opened by path wherever they are decoded,
so on a cluster they must be on storage every node mounts at that path. Needs ``pip install 'effnetv2[scale]'``.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from .inference import Predictor, import_optional
from .model import EfficientNetV2
from .predict import Prediction, find_images, load_input, missing_rows, predict_batch
from .ray_cluster import init_ray
from .sources import load_model
from .transforms import transforms_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """How the model runs: ``num_actors`` actors, one ``Predictor`` each (``backend``), each reserving
    ``cpus_per_actor`` CPUs (also its ONNX Runtime threads) and ``gpus_per_actor`` GPUs (> 0: the torch
    backend on CUDA)."""

    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    backend: str = "auto"


def import_ray():
    """The ``ray`` module with Ray Data (which ray installed without its extra lacks), or ImportError."""
    ray = import_optional("ray", "--engine ray", "pip install 'effnetv2[scale]'")
    import_optional("ray.data", "--engine ray", "pip install 'effnetv2[scale]'")
    return ray


@contextmanager
def ray_session(address: str | None = None, **init_options) -> Iterator[None]:
    """Ray connected for the block: the caller's, left running, or ``effnetv2.ray_cluster.init_ray(address,
    **init_options)`` (a new Ray on loopback when no address) and ``ray.shutdown()`` at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    init_ray(address, logging_level=logging.WARNING, **init_options)
    try:
        yield
    finally:
        ray.shutdown()


def _decode(batch: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """A Ray task: ``path`` [B] → ``image`` [B, 3, S, S] float32 (zeros for a bad file) and ``error`` [B]
    ("" or why the file could not be read)."""
    transform, size = transforms_for(config), config["image_size"]
    items = [load_input(transform, str(path)) for path in batch["path"]]
    blank = np.zeros((config["in_chans"], size, size), np.float32)
    return {"path": batch["path"], "image": np.stack([blank if isinstance(x, str) else x.numpy() for x in items]),
            "error": np.array([x if isinstance(x, str) else "" for x in items], dtype=object)}


class _PredictorActor:
    """A Ray actor holding one ``Predictor``: decoded batches in, top-k rows out (the local engine's)."""

    def __init__(self, model: EfficientNetV2, top_k: int, options: RayOptions):
        on_gpu = options.gpus_per_actor > 0
        self.predictor = Predictor(model, backend="torch" if on_gpu else options.backend,
                                   num_threads=max(1, round(options.cpus_per_actor)),
                                   device="cuda" if on_gpu else "cpu")
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> "pa.Table":
        """``path``, ``image`` [B, 3, S, S], ``error`` → ``path``, ``labels`` and ``probabilities`` (best first,
        empty for an error), ``error`` ("" when the file was read)."""
        import pyarrow as pa

        decoded = [(str(path), error or torch.tensor(image))
                   for path, image, error in zip(batch["path"], batch["image"], batch["error"])]
        tops = [row.top for row in predict_batch(self.predictor, decoded, self.top_k)]
        return pa.table({"path": pa.array(batch["path"].tolist(), pa.string()),
                         "labels": pa.array([[label for label, _ in top] for top in tops], pa.list_(pa.string())),
                         "probabilities": pa.array([[p for _, p in top] for top in tops], pa.list_(pa.float64())),
                         "error": pa.array(batch["error"].tolist(), pa.string())})


def predictions_on_ray(model: EfficientNetV2, files: list[str], top_k: int = 5, batch_size: int = 16,
                       options: RayOptions = RayOptions(), progress: bool = True) -> Iterator[Prediction]:
    """One :class:`~effnetv2.predict.Prediction` per file, in order, streamed as Ray Data produces them
    (inside a :func:`ray_session`)."""
    ray = import_ray()
    cpus = ray.cluster_resources().get("CPU", 0)
    if options.num_actors * options.cpus_per_actor > cpus - 1:  # an autoscaling cluster may still grow
        logger.warning("%d actor(s) x %g CPU(s) leave no CPU for decoding among the cluster's %g: lower "
                       "--num-actors or --cpus-per-actor, or the run waits for CPUs", options.num_actors,
                       options.cpus_per_actor, cpus)
    dataset = ray.data.from_items([{"path": path} for path in files],
                                  override_num_blocks=max(1, math.ceil(len(files) / batch_size)))
    dataset = dataset.map_batches(_decode, fn_kwargs={"config": model.config}, batch_size=batch_size,
                                  num_cpus=1, batch_format="numpy")
    # max_restarts=-1 is Ray Data's default; given, it keeps Ray Data from fusing the decoding into the actors
    # (their remote args differ): decoding stays in tasks on every free CPU, the actors only run the model
    dataset = dataset.map_batches(
        _PredictorActor, fn_constructor_kwargs={"model": model, "top_k": top_k, "options": options},
        compute=ray.data.ActorPoolStrategy(size=options.num_actors), batch_size=batch_size,
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None, batch_format="numpy",
        max_restarts=-1)
    dataset.context.execution_options.preserve_order = True  # this dataset's own copy of the context
    dataset.context.enable_progress_bars = progress
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            yield Prediction(row["path"], list(zip(row["labels"], row["probabilities"])), row["error"] or None)


def predict_with_ray(source: EfficientNetV2 | str | os.PathLike, paths: Iterable[str | os.PathLike], *,
                     top_k: int = 5, batch_size: int = 16, options: RayOptions = RayOptions()) -> list[Prediction]:
    """The rows ``python -m effnetv2.predict`` writes for the image files and folders ``paths``, computed on
    Ray Data (inside your :func:`ray_session`, else in one of its own); ``source``: a model or a source."""
    model = source if isinstance(source, EfficientNetV2) else load_model(source)
    files, problems = find_images(paths)
    with ray_session():
        rows = list(predictions_on_ray(model, files, top_k, batch_size, options, progress=False)) if files else []
    return rows + missing_rows(problems)
