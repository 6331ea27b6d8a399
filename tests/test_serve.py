"""`python -m effnetv2.serve`: Ray Serve on loopback, asked over HTTP like any client would.

One Ray instance for the module (its own temp folder, free ports, 80 MB object store), one replica of the
bundled model; every answer is checked against the Predictor run in this process on the same file.
"""
from __future__ import annotations

import io
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from app_server import free_port
from effnetv2.inference import Predictor
from effnetv2.serve import build_app, image_payload, main, serving

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "assets" / "model")
EXAMPLES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.png"))
STAR = str(ROOT / "assets" / "examples" / "star.png")
MAX_BATCH = 6  # below the 8 concurrent requests: the limit shows, and a made-up size fails the count


@pytest.fixture(scope="module")
def url():
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="ray-")  # Ray's socket paths must stay under 108 characters
    app = build_app(MODEL, max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.1)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_GCS_SERVER_PORT", str(free_port()))  # never 6379: another Ray may run beside us
            with serving(app, port=free_port(), num_cpus=2, object_store_memory=80 * 1024 * 1024,
                         include_dashboard=False, _temp_dir=temp_dir) as url:  # Ray on loopback only
                yield url
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def predictor():
    return Predictor(MODEL)


def classify(url: str, data: bytes, **kwargs) -> requests.Response:
    return requests.post(url + "classify", data=data, timeout=120, **kwargs)


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
    """The stdlib parser against a body built by ``requests`` (PNG bytes hold CR LF and LF on purpose)."""
    star = Path(STAR).read_bytes()
    prepared = requests.Request("POST", "http://127.0.0.1/", data={"note": "x"},
                                files={"image": ("my star.png", star, "image/png")}).prepare()
    assert image_payload(prepared.body, prepared.headers["Content-Type"]) == (star, "my star.png")
    assert image_payload(star, "image/png") == (star, "the request body")


def test_the_command_line_says_what_is_wrong(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    assert main(["--model", missing]) == 2
    assert f"error: --model {missing}: {missing}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", MODEL, "--replicas", "2", "--max-replicas", "1"])
    assert "--max-replicas 1 is below --replicas 2" in capsys.readouterr().err


def test_the_ray_it_starts_talks_over_loopback_only(url):
    """Ray would swap 127.0.0.1 for the host's network address; the node is at a loopback address."""
    import ipaddress

    import ray

    [node] = ray.nodes()
    assert ipaddress.ip_address(node["NodeManagerAddress"]).is_loopback
    assert ipaddress.ip_address(ray.get_runtime_context().gcs_address.rpartition(":")[0]).is_loopback
