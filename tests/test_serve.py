"""`python -m effnetv2.serve`: Ray Serve on loopback, asked over HTTP like any client would.

One Ray instance for the module (its own temp folder, free ports, 80 MB object store), one replica of the
bundled model; every answer is checked against the Predictor run in this process on the same file.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from PIL import Image

from app_server import free_port
from effnetv2.inference import Predictor
from effnetv2.ray_cluster import require_token_auth
from effnetv2.serve import BODY_TIMEOUT_S, build_app, image_payload, serving
from effnetv2.serve.__main__ import main
from ray_processes import is_loopback, listeners, ray_processes

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "assets" / "model")
EXAMPLES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.png"))
STAR = str(ROOT / "assets" / "examples" / "star.png")
MAX_BATCH = 6  # below the 8 concurrent requests: the limit shows, and a made-up size fails the count
SLOW_CLIENTS = 16  # more than the 2 x MAX_BATCH requests a replica used to hold at once


@pytest.fixture(scope="module")
def temp_dir():
    path = tempfile.mkdtemp(dir="/tmp", prefix="ray-")  # Ray's socket paths must stay under 108 characters
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def url(temp_dir):
    """Serving the bundled model on a Ray started as `python -m effnetv2.serve` starts it."""
    require_token_auth()
    app = build_app(MODEL, max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_GCS_SERVER_PORT", str(free_port()))  # never 6379: another Ray may run beside us
        with serving(app, port=free_port(), num_cpus=2, object_store_memory=80 * 1024 * 1024,
                     _temp_dir=temp_dir) as url:
            yield url


@pytest.fixture(scope="module")
def predictor():
    return Predictor(MODEL)


def classify(url: str, data: bytes, timeout: float = 120, **kwargs) -> requests.Response:
    return requests.post(url + "classify", data=data, timeout=timeout, **kwargs)


def assert_same_top(answer: dict, expected: list[tuple[str, float]]) -> None:
    got = [(p["label"], p["probability"]) for p in answer["predictions"]]
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_health_says_what_is_served(url):
    answer = requests.get(url + "health", timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "model": MODEL, "backend": "onnxruntime", "classes": 5,
                             "max_batch_size": MAX_BATCH}


def test_examples_get_the_labels_of_the_predictor(url, predictor):
    """Raw bytes for every example; a multipart upload and ``top_k`` for one."""
    assert len(EXAMPLES) >= 5
    for path in EXAMPLES:
        answer = classify(url, Path(path).read_bytes(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        assert_same_top(answer.json(), predictor.predict([path], top_k=5)[0])
    with open(STAR, "rb") as file:
        answer = requests.post(url + "classify?top_k=2", files={"image": ("star.png", file, "image/png")}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert_same_top(answer.json(), predictor.predict([STAR], top_k=2)[0])


def picture(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(url, predictor):
    star = Path(STAR).read_bytes()
    bad = [  # (request, status, words the message must hold)
        (dict(data=b"not a picture"), 400, ["Could not read the request body", "not an image", "Try a PNG"]),
        (dict(data=star[:len(star) // 2]), 400, ["truncated", "Try a PNG"]),
        (dict(files={"image": ("notes.png", b"hello", "image/png")}), 400, ["Could not read notes.png"]),
        (dict(data=b""), 400, ["no body", "--data-binary @photo.jpg", "-F image=@photo.jpg"]),
        (dict(files={"caption": (None, "a star")}), 400, ["no file part", "-F image=@photo.jpg"]),
        (dict(data=b"\0" * (11 << 20)), 413, ["is 11,534,336 bytes, more than the 10,485,760 allowed", "smaller"]),
        (dict(data=iter([b"\0" * (1 << 20)] * 11)), 413, ["more than the 10,485,760 bytes allowed"]),  # chunked
        (dict(data=picture(400, 10)), 400, ["400x10 pixels", "more elongated than 20:1", "crop it"]),
        (dict(data=star, params={"top_k": "0"}), 400, ["top_k must be a whole number from 1 to 5, got '0'"]),
        (dict(data=star, params={"top_k": "many"}), 400, ["top_k", "got 'many'"]),
        (dict(data=star, params={"top_k": "\u00b2"}), 400, ["top_k must be a whole number", "got '\u00b2'"]),
        (dict(data=star, params={"top_k": "9" * 5000}), 400, ["top_k must be a whole number", "got '9999"]),
        (dict(files={"image": ("photo." + "x" * 300, star, "image/png")}), 400,
         ["file name is 306 characters long, more than the 255 allowed", "rename"]),
        (dict(files=[("image", ("a.png", star)), ("other", ("b.png", star))]), 400,
         ["Too many files", "Send one image file"]),
    ]
    for request, status, words in bad:
        answer = requests.post(url + "classify", timeout=120, **request)
        assert answer.status_code == status, (request, answer.text)
        assert all(word in answer.json()["error"] for word in words), answer.json()
    wrong_method = requests.get(url + "classify", timeout=30)
    assert wrong_method.status_code == 405 and "takes POST, not GET" in wrong_method.json()["error"]
    no_route = requests.post(url + "predict", data=star, timeout=30)
    assert no_route.status_code == 404 and "POST the image to /classify" in no_route.json()["error"]
    tiny = classify(url, picture(8, 8))  # answered, with the app's warning
    assert tiny.status_code == 200 and "only 8x8 pixels" in tiny.json()["warning"]
    answer = classify(url, star)
    assert answer.status_code == 200 and "warning" not in answer.json()
    assert_same_top(answer.json(), predictor.predict([STAR], top_k=5)[0])


def test_concurrent_requests_are_served_in_batches(url, predictor):
    """8 requests at once: some share a forward, and each batch size n is reported by exactly a multiple of n
    answers (a batch of n answers n requests)."""
    paths = [EXAMPLES[i % len(EXAMPLES)] for i in range(8)]
    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda path: classify(url, Path(path).read_bytes()), paths))
    assert [answer.status_code for answer in answers] == [200] * len(paths)
    sizes = [answer.json()["batch_size"] for answer in answers]
    assert max(sizes) > 1 and all(1 <= size <= MAX_BATCH for size in sizes), sizes
    assert all(sizes.count(size) % size == 0 for size in sizes), sizes
    for path, answer in zip(paths, answers):
        assert_same_top(answer.json(), predictor.predict([path], top_k=5)[0])


def test_multipart_uploads_give_back_the_exact_file_bytes():
    """Starlette's parser against a body built by ``requests`` (PNG bytes hold CR LF and LF on purpose)."""
    star = Path(STAR).read_bytes()
    prepared = requests.Request("POST", "http://127.0.0.1/", data={"note": "x"},
                                files={"image": ("my star.png", star, "image/png")}).prepare()
    assert asyncio.run(image_payload(prepared.body, prepared.headers["Content-Type"])) == (star, "my star.png")
    assert asyncio.run(image_payload(star, "image/png")) == (star, "the request body")


def slow_upload(url: str) -> socket.socket:
    """A connection that has sent the headers of a 100,000-byte upload to /classify, and no body yet."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port), timeout=BODY_TIMEOUT_S + 30)
    sock.sendall(f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                 f"Content-Length: 100000\r\n\r\n".encode())
    return sock


def test_slow_uploads_hold_neither_classify_nor_health(url, predictor):
    """16 uploads that send a byte a second: meanwhile /health and /classify answer at once, and each slow
    upload gets a 408 once its body deadline has passed."""
    slow = [slow_upload(url) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            for sock in slow:
                with contextlib.suppress(OSError):  # closed by the server after its 408
                    sock.send(b"\0")

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    started = time.monotonic()
    try:
        time.sleep(2)  # every slow upload has reached the replica before the requests below
        asked = time.monotonic()
        health = requests.get(url + "health", timeout=10)
        answer = classify(url, Path(STAR).read_bytes(), timeout=10)
        answered = time.monotonic() - asked
        statuses = []
        for sock in slow:
            response = http.client.HTTPResponse(sock)
            response.begin()
            statuses.append((response.status, response.read().decode()))
        cut_after = time.monotonic() - started
    finally:
        stop.set()
        sender.join()
        for sock in slow:
            sock.close()
    assert health.status_code == 200 and answer.status_code == 200, (health.text, answer.text)
    assert answered < 10
    assert_same_top(answer.json(), predictor.predict([STAR], top_k=5)[0])
    assert all(status == 408 and "the upload was too slow" in text for status, text in statuses), statuses
    assert BODY_TIMEOUT_S - 1 <= cut_after < BODY_TIMEOUT_S + 20


def test_an_upload_of_many_parts_is_refused_at_once_while_others_are_served(url, predictor):
    """60,000 multipart fields (3.3 MB; the stdlib's parser took 30 s on the event loop): a 400 at the
    fifth field, and a request sent meanwhile is answered within seconds."""
    boundary = "many-parts"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode()
                    for i in range(60_000)) + f"--{boundary}--\r\n".encode()
    with ThreadPoolExecutor(1) as pool:
        many = pool.submit(requests.post, url + "classify", data=body, timeout=60,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        time.sleep(0.5)
        asked = time.monotonic()
        answer = classify(url, Path(STAR).read_bytes(), timeout=10)
        answered = time.monotonic() - asked
        refused = many.result()
    assert answer.status_code == 200 and answered < 10, answered
    assert refused.status_code == 400 and "Too many fields. Maximum number of fields is 4." in refused.json()["error"]
    assert_same_top(answer.json(), predictor.predict([STAR], top_k=5)[0])


def test_the_command_line_says_what_is_wrong(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    assert main(["--model", missing]) == 2
    assert f"error: --model {missing}: {missing}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", MODEL, "--replicas", "2", "--max-replicas", "1"])
    assert "--max-replicas 1 is below --replicas 2" in capsys.readouterr().err


def grpc_status(port: int, method: str, token: str | None = None):
    """The status of an empty gRPC call to ``method`` at 127.0.0.1:``port``, with Ray's token or without."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=30, metadata=[("authorization", f"Bearer {token}")] if token else None)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_the_ray_it_starts_is_closed_to_the_network(url, temp_dir):
    """Every listening socket of the Serve Ray's processes (this driver's too), as the kernel lists them, is on
    loopback, except each replica's inter-deployment gRPC server, which Ray 2.58 binds to every interface
    (``[::]:0`` in ray/serve/_private/replica.py): that one, and the GCS, refuse a call without Ray's token."""
    import grpc
    import ray

    sockets = listeners([psutil.Process(), *ray_processes(temp_dir)])
    names = {s.process.split(".")[0] for s in sockets}  # an actor's title names the method it runs too
    assert {"gcs_server", "raylet", "ray::ProxyActor", "ray::ServeController"} <= names, names
    open_ = [s for s in sockets if not is_loopback(s.ip)]
    assert all(s.process.startswith("ray::ServeReplica") for s in open_), open_
    [node] = ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"
    token = os.environ["RAY_AUTH_TOKEN"]  # from require_token_auth, or conftest.py for the test session
    for s in open_:
        assert grpc_status(s.port, "/ray.serve.ASGIService/HandleRequest") == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_status(s.port, "/ray.serve.ASGIService/HandleRequest", token) != grpc.StatusCode.UNAUTHENTICATED
    gcs_port = int(ray.get_runtime_context().gcs_address.rpartition(":")[2])
    kv_keys = "/ray.rpc.InternalKVGcsService/InternalKVKeys"
    assert grpc_status(gcs_port, kv_keys) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(gcs_port, kv_keys, token) == grpc.StatusCode.OK


def test_a_sender_just_above_the_minimum_rate_is_cut_off_at_the_cap(monkeypatch):
    """Each chunk extends the body's deadline, so without a cap a sender that keeps just above
    ``MIN_BODY_RATE`` holds a replica's slot until the size limit; with it, 408 at ``MAX_BODY_S``."""
    from effnetv2 import serve

    monkeypatch.setattr(serve, "MAX_BODY_S", 1.0)

    class Trickle:
        headers: dict = {}

        async def stream(self):
            while True:  # 64 KiB every 0.1 s: 40x the minimum rate, forever
                await asyncio.sleep(0.1)
                yield b"x" * 65536

    start = time.monotonic()
    with pytest.raises(serve.RequestError) as refused:
        asyncio.run(serve.read_body(Trickle(), limit=4 * 2**20, timeout_s=0.5))
    assert refused.value.status == 408 and "1 s at most" in refused.value.message
    assert time.monotonic() - start < 3
