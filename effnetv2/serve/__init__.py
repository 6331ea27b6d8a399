"""Online serving on Ray Serve: an HTTP JSON API over :class:`~effnetv2.inference.Predictor`, with
dynamic batching (``python -m effnetv2.serve --model SOURCE``).

- ``POST /classify[?top_k=K]``: the image as the body or a ``multipart/form-data`` upload →
  ``{"predictions": [{"label", "probability"}, ...best first], "batch_size": n}`` (the requests run
  together with this one), plus ``"warning"`` for a tiny image.
- ``GET /health`` → ``{"status": "ok", "model", "backend", "classes", "max_batch_size"}``.

Bad input gets a 4xx JSON ``{"error": "..."}`` saying what was wrong and what to send, as in the app.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image

from ..images import MAX_UPLOAD_BYTES, UnusableImageError, open_request_image
from ..inference import Predictor
from ..ray_cluster import init_ray
from ..sources import Source, load_model, parse_source

APP_NAME = "effnetv2"
DECODE_WORKERS = 2           # images decoded at once per replica: memory stays bounded, as in the app
# requests a replica holds at once, most receiving their upload (Serve hands a request over once its headers
# arrive): far more than the model computes, so that slow senders cannot take every slot
MAX_ONGOING_REQUESTS = 64
BODY_TIMEOUT_S = 10.0
MIN_BODY_RATE = 16 * 1024    # bytes/s: each 16 KiB received adds a second to the body's deadline
MAX_BODY_S = 60.0            # ... up to this: one slow sender holds a slot for a minute at most
MAX_FORM_FIELDS = 4          # multipart parts besides the file: a few, so a body of many parts is refused early
MAX_FILENAME_CHARS = 255     # NAME_MAX of common file systems
SEND_IMAGE = ("send the image file as the request body (curl --data-binary @photo.jpg) or as a "
              "multipart upload (curl -F image=@photo.jpg)")


class RequestError(Exception):
    """A request the server refuses: ``status`` (HTTP 4xx) and ``message`` (what was wrong, what to send)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request: Any, limit: int = MAX_UPLOAD_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body of a Starlette ``request``: 413 as soon as it is over ``limit`` bytes, 408 when it has not
    all arrived after ``timeout_s`` plus a second per ``MIN_BODY_RATE`` bytes received, or after
    ``MAX_BODY_S`` whatever arrived (stops reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the upload is {int(declared):,} bytes, more than the {limit:,} allowed: "
                                f"send a smaller image")
    chunks, size = [], 0
    start = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"the upload is more than the {limit:,} bytes allowed: send a smaller image")
                chunks.append(chunk)
                deadline.reschedule(start + min(timeout_s + size / MIN_BODY_RATE, max(timeout_s, MAX_BODY_S)))
    except TimeoutError:
        raise RequestError(408, f"the upload was too slow: {size:,} bytes arrived in "
                                f"{asyncio.get_running_loop().time() - start:.0f} s (allowed: {timeout_s:g} s plus "
                                f"1 s per {MIN_BODY_RATE // 1024} KiB, {max(timeout_s, MAX_BODY_S):g} s at most): send it again") from None
    return b"".join(chunks)


async def image_payload(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The image bytes of a request and a name for messages: the body, or a multipart upload's one file part.
    400 without an image, or for more than one file or ``MAX_FORM_FIELDS`` other parts (parsing stops there)."""
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    if not body:
        raise RequestError(400, f"the request has no body: {SEND_IMAGE}")
    if not content_type.lower().startswith("multipart/"):
        return body, "the request body"

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "headers": [(b"content-type", content_type.encode("latin-1", "replace"))]},
                      receive)
    try:
        async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
            upload = next((value for _, value in form.multi_items() if not isinstance(value, str)), None)
            if upload is None:
                raise RequestError(400, f"the multipart upload has no file part: {SEND_IMAGE}")
            if len(upload.filename or "") > MAX_FILENAME_CHARS:
                raise RequestError(400, f"the file name is {len(upload.filename):,} characters long, more than "
                                        f"the {MAX_FILENAME_CHARS} allowed: rename the file and send it again")
            return await upload.read(), Path(upload.filename or "").name or "the upload"
    except MultiPartException as err:
        raise RequestError(400, f"the multipart upload was refused: {err.message} Send one image file "
                                f"(curl -F image=@photo.jpg) and at most {MAX_FORM_FIELDS} other fields") from None


def decode(data: bytes, name: str,
           transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, str | None]:
    """Image bytes → the model input ``[3, S, S]`` and a warning or None, by the app's rules
    (``effnetv2.images.open_request_image``); 400 naming ``name`` when unusable."""
    try:
        image, warning = open_request_image(data, name)
    except UnusableImageError as err:
        raise RequestError(400, str(err)) from None
    return transform(image), warning


def parse_top_k(text: str | None, default: int, classes: int) -> int:
    """The ``top_k`` query parameter as a number from 1 to ``classes`` (``default`` when absent); else 400."""
    if text is None:
        return min(default, classes)
    digits = text.strip()
    # ASCII digits only, and few: int() refuses "²" and numbers of over 4,300 digits with a ValueError
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 9) or not 1 <= int(digits) <= classes:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise RequestError(400, f"top_k must be a whole number from 1 to {classes}, got {shown!r}")
    return int(digits)


class ImageClassifier:
    """The Serve deployment's replica: one :class:`Predictor` behind ``/classify`` and ``/health``
    (``source``: a local folder must exist on every node; ``top_k``: when the request does not say)."""

    def __init__(self, source: str | Source, top_k: int = 5, backend: str = "auto", num_threads: int | None = None,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, body_timeout_s: float = BODY_TIMEOUT_S):
        from ray import serve

        self.predictor = Predictor(load_model(source), backend=backend, num_threads=num_threads)
        self.source = parse_source(source).text
        self.top_k = top_k
        self.max_batch_size = max_batch_size
        self.body_timeout_s = body_timeout_s
        self._decoder = ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode")
        # applied here, not as a decorator, so that importing this module needs no Ray
        self._classify = serve.batch(max_batch_size=max_batch_size,
                                     batch_wait_timeout_s=batch_wait_timeout_s)(self._classify_batch)

    async def _classify_batch(self, items: list[tuple[torch.Tensor, int]]) -> list[tuple[list, int]]:
        """``[(input [3, S, S], top_k), ...]`` → per item its top-k pairs and the batch size, in one forward."""
        x = torch.stack([tensor for tensor, _ in items])  # [B, 3, S, S]
        logits = await asyncio.to_thread(self.predictor, x)  # the event loop keeps taking requests meanwhile
        return [(self.predictor.topk(logits[i:i + 1], top_k)[0], len(items)) for i, (_, top_k) in enumerate(items)]

    async def health(self, request: Any) -> dict:
        """The answer to ``GET /health`` (it awaits nothing, so it answers while the model is busy)."""
        return {"status": "ok", "model": self.source, "backend": self.predictor.backend,
                "classes": len(self.predictor.id2label), "max_batch_size": self.max_batch_size}

    async def classify(self, request: Any) -> dict:
        """The answer to ``POST /classify`` (see the module docstring); :class:`RequestError` for bad input."""
        top_k = parse_top_k(request.query_params.get("top_k"), self.top_k, len(self.predictor.id2label))
        body = await read_body(request, timeout_s=self.body_timeout_s)
        data, name = await image_payload(body, request.headers.get("content-type", ""))
        x, warning = await asyncio.get_running_loop().run_in_executor(
            self._decoder, decode, data, name, self.predictor.transform)
        top, batch_size = await self._classify((x, top_k))
        answer = {"predictions": [{"label": label, "probability": p} for label, p in top], "batch_size": batch_size}
        return answer | ({"warning": warning} if warning else {})

    async def __call__(self, request: Any):
        """Every HTTP request (a Starlette ``Request``) → a JSON response."""
        from starlette.responses import JSONResponse

        routes = {"/classify": ("POST", self.classify), "/health": ("GET", self.health)}
        path = request.url.path.rstrip("/") or "/"
        try:
            if path not in routes:
                raise RequestError(404, f"no route {path}: POST the image to /classify, or GET /health")
            method, handler = routes[path]
            if request.method != method:
                raise RequestError(405, f"{path} takes {method}, not {request.method}"
                                        + (f": {SEND_IMAGE}" if path == "/classify" else ""))
            return JSONResponse(await handler(request))
        except RequestError as err:
            return JSONResponse({"error": err.message}, status_code=err.status)


def build_app(source: str | Source, *, replicas: int = 1, max_replicas: int | None = None,
              max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, top_k: int = 5,
              backend: str = "auto", cpus_per_replica: float = 1.0, body_timeout_s: float = BODY_TIMEOUT_S):
    """The Serve application for ``serve.run``: :class:`ImageClassifier` on ``replicas`` replicas, or autoscaled
    up to ``max_replicas`` (aiming at a full batch in flight per replica). Each replica reserves
    ``cpus_per_replica`` of Ray's CPUs and runs its model on as many threads."""
    from ray import serve

    if max_replicas is not None and max_replicas > replicas:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "initial_replicas": replicas,
                                          "max_replicas": max_replicas, "target_ongoing_requests": max_batch_size}}
    else:
        scaling = {"num_replicas": replicas}
    deployment = serve.deployment(ImageClassifier, name="EfficientNetV2", max_ongoing_requests=MAX_ONGOING_REQUESTS,
                                  ray_actor_options={"num_cpus": cpus_per_replica}, **scaling)
    return deployment.bind(source, top_k=top_k, backend=backend, num_threads=max(1, round(cpus_per_replica)),
                           max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                           body_timeout_s=body_timeout_s)


@contextmanager
def serving(app, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
            **ray_options) -> Iterator[str]:
    """Run ``app`` (from :func:`build_app`) over HTTP on ``host:port`` until the block ends; yield its URL.

    ``address`` None starts a Ray here, on loopback with token authentication (call
    ``effnetv2.ray_cluster.require_token_auth()`` before :func:`build_app` imports ray; ``ray_options`` go to
    ``ray.init``), stopped at the end; otherwise this joins that cluster and removes only this application.
    """
    import ray
    from ray import serve

    joined = init_ray(address, token_auth=True, **ray_options)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://{host}:{port}/"
    finally:
        if joined:  # another's cluster: take away only this application
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
