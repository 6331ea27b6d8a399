"""A server's models by name, each loaded on first use in a thread of its own (the demo's model picker)."""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, wait
from pathlib import Path

import torch

from .inference import Predictor
from .sources import load_model

IMAGENET = "torchvision:s"  # the second model, for real photos: torchvision's EfficientNetV2-S
LOAD_TIMEOUT_S = 180   # the longest wait for a load; a load that takes longer counts as failed
RETRY_AFTER_S = 60     # a failed load is remembered this long: requests meanwhile are refused without a retry
logger = logging.getLogger("effnetv2.loading")


class ModelUnavailable(Exception):
    """A model that cannot be had now, in a visitor's words (no path, no setting); ``title`` heads it."""

    def __init__(self, message: str, title: str):
        super().__init__(message)
        self.title = title


def load(source: str, backend: str = "auto") -> Predictor:
    """The predictor of ``source`` (see ``effnetv2.sources``), its inference runtime warmed up."""
    predictor = Predictor(load_model(source), backend=backend)
    size = predictor.config["image_size"]
    predictor(torch.zeros(1, 3, size, size))  # builds the runtime's session now, not on the first request
    return predictor


class Models:
    """``main`` and ``IMAGENET`` (torch backend: no export to wait for), each loaded in a thread; besides callers
    giving ``wait_s``, ``waiters`` at most wait for a load. ``titles``: shown names, ``{}`` the number of classes."""

    def __init__(self, main: str, titles: dict[str, str] | None = None, waiters: int = 1):
        self.main, self.titles, self._loaded = main, titles or {}, {}
        self._loading: dict[str, tuple[Future, float]] = {}  # name → its load, and when it started
        self._failed: dict[str, float] = {}  # name → when its last load failed
        self._lock = threading.Lock()  # two first requests at once start one load
        self._waiters = threading.BoundedSemaphore(max(0, waiters))

    def start(self, source: str, backend: str = "auto") -> None:
        """Load ``source`` now as the main model (errors propagate: the command line reports them)."""
        self.main, self._loaded = source, {source: load(source, backend)}

    def names(self) -> list[str]:
        return [self.main] + ([IMAGENET] if self.main != IMAGENET else [])

    def choices(self) -> list[tuple[str, str]]:
        """The picker's (title, name) pairs."""
        return [(self.title(name), name) for name in self.names()]

    def title(self, name: str) -> str:
        """A model's name for a visitor, e.g. "Shapes — bundled, 5 classes"; else its id or folder name."""
        if name in self._loaded:
            classes = len(self._loaded[name].id2label)
        elif name == IMAGENET:
            classes = 1000
        elif name in self.titles:  # a titled folder's config says, without loading the weights
            classes = len(json.loads((Path(name) / "config.json").read_text())["id2label"])
        else:
            classes = None
        if name in self.titles:
            return self.titles[name].format(classes)
        shown = Path(name).name if Path(name).is_dir() else name  # a folder's name, never a server path
        return f"{shown} — {classes} classes" if classes else shown

    def get(self, name: str | None, wait_s: float | None = None) -> Predictor:
        """The predictor of model ``name`` (empty: ``main``), waiting up to ``wait_s`` for its load (``None``: as one
        of the ``waiters`` if a place is free); else ``ModelUnavailable``."""
        name = name or self.main
        if name in self._loaded:
            return self._loaded[name]
        if name not in self.names():
            raise ModelUnavailable(f"Unknown model {name!r}: choose {' or '.join(map(repr, self.names()))}.",
                                   "Unknown model")
        future, started = self._start(name)
        left = max(0.0, started + LOAD_TIMEOUT_S - time.monotonic())
        if wait_s is not None:
            wait([future], timeout=min(wait_s, left))
        elif self._waiters.acquire(blocking=False):
            try:
                wait([future], timeout=left)
            finally:
                self._waiters.release()
        done = future.done()
        if done and future.exception() is None:
            return future.result()
        if not done and time.monotonic() - started < LOAD_TIMEOUT_S:
            raise ModelUnavailable(f"{self.title(name)} is loading (its weights are downloaded on first use): "
                                   f"try again in a minute.", "Model loading")
        raise self._unavailable(name)

    def _start(self, name: str) -> tuple[Future, float]:
        """The load of ``name`` under way, started now unless one runs; refused while a failure is remembered."""
        with self._lock:
            failed = self._failed.get(name)
            if failed is not None and time.monotonic() - failed < RETRY_AFTER_S:
                raise self._unavailable(name)
            if name not in self._loading:
                future = Future()
                threading.Thread(target=self._load, args=(name, future), name=f"load {name}", daemon=True).start()
                self._loading[name] = future, time.monotonic()
            return self._loading[name]

    def _load(self, name: str, future: Future) -> None:
        try:
            loaded = load(name, backend="auto" if name == self.main else "torch")
        except Exception as err:  # noqa: BLE001 -- whatever broke, the server keeps serving its main model
            logger.error("could not load model %s: %s", name, err,  # the why, for whoever runs the server
                         exc_info=not isinstance(err, (ValueError, OSError, ImportError)))  # unforeseen: where
            with self._lock:
                self._failed[name] = time.monotonic()
                del self._loading[name]
            return future.set_exception(err)
        with self._lock:
            self._loaded[name] = loaded
            del self._loading[name]
        future.set_result(loaded)

    def _unavailable(self, name: str) -> ModelUnavailable:
        return ModelUnavailable(f"{self.title(name)} could not be loaded on this server (its log says why); it is "
                                f"tried again in a minute. Meanwhile use {self.title(self.main)}.",
                                "Model not available")
