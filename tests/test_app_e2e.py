"""`python app.py` on loopback, driven through `gradio_client` like any remote user would.

Also a load test (16 concurrent clients) and the classify latency through the client against a bare
forward of the same model on the same image; the figures are printed, never asserted.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from app_server import running_app
from effnetv2 import EfficientNetV2
from effnetv2.inference import Predictor

CLIENTS, CALLS_EACH, LOAD_TIMEOUT_S = 16, 3, 180


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


EXAMPLE = str(Path(app.__file__).parent / "assets" / "examples" / "star.png")  # a star the model never saw


@pytest.fixture(scope="module")
def model():
    return EfficientNetV2.from_pretrained(app.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def example():
    assert EXAMPLE in app.EXAMPLES
    return EXAMPLE


def _top(result: dict) -> list[tuple[str, float]]:
    return [(c["label"], c["confidence"]) for c in result["confidences"]]


def test_api_lists_the_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/classify", "/attention"} <= set(endpoints)


def test_classify_through_the_client(client, example):
    result = client.predict(handle_file(example), api_name="/classify")
    top = _top(result)
    assert len(top) == app.TOP_K and result["label"] == top[0][0]
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # the label the bundled model itself gives this image, in this process
    from effnetv2.inference import Predictor

    expected = Predictor(app.DEFAULT_MODEL, backend="torch").predict([example], top_k=1)[0][0][0]
    assert top[0][0] == expected


def test_attention_through_the_client(client, example, model):
    gallery, matrix, maths, grid = client.predict(handle_file(example), app.POOLED, 0, 0,
                                                  api_name="/attention")
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == model.num_heads + 1 and "mean" in captions[-1]
    assert all(f"head {i + 1}:" in captions[i] for i in range(model.num_heads))
    for item in gallery + [{"image": matrix}, {"image": grid}]:
        assert Image.open(item["image"]).size[0] > 0
    assert "the pooled query" in maths and "softmax" in maths
    *_, cell_maths, _ = client.predict(handle_file(example), app.CELL, 1, 2, api_name="/attention")
    assert "the token at cell (1, 2)" in cell_maths


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(client, tmp_path, example):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(text)), api_name="/classify")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (11 * 1024 * 1024))  # over the 10 MB upload limit
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(big)), api_name="/classify")
    assert len(_top(client.predict(handle_file(example), api_name="/classify"))) == app.TOP_K


def test_sixteen_concurrent_clients(server, example, capsys):
    def one_user(_):
        user = Client(server, verbose=False)
        latencies, labels = [], []
        for _ in range(CALLS_EACH):
            start = time.perf_counter()
            labels.append(user.predict(handle_file(example), api_name="/classify")["label"])
            latencies.append(time.perf_counter() - start)
        return latencies, labels

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one_user, i) for i in range(CLIENTS)]
        done, not_done = wait(futures, timeout=LOAD_TIMEOUT_S)
    wall = time.perf_counter() - start
    assert not not_done, f"{len(not_done)} of {CLIENTS} clients did not finish in {LOAD_TIMEOUT_S}s"
    results = [f.result() for f in futures]  # re-raises any client's error
    labels = {label for _, user_labels in results for label in user_labels}
    assert len(labels) == 1  # every request gave the same answer for the same image
    latencies = sorted(t for user_latencies, _ in results for t in user_latencies)
    with capsys.disabled():
        print(f"\nload test: {CLIENTS} clients x {CALLS_EACH} classify calls = {len(latencies)} requests "
              f"in {wall:.1f}s ({len(latencies) / wall:.1f} req/s), latency p50 "
              f"{_percentile(latencies, 50) * 1e3:.0f} ms, p95 {_percentile(latencies, 95) * 1e3:.0f} ms, "
              f"0 errors")


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_latency_client_vs_bare_forward(client, example, model, capsys):
    """Classify through gradio_client (upload, queue, model, answer) against the model alone on the
    same preprocessed image: eager PyTorch, and the app's inference backend."""
    repeats = 20
    client_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.predict(handle_file(example), api_name="/classify")
        client_times.append(time.perf_counter() - start)
    predictor = Predictor(model)
    x = predictor.preprocess([example])
    forward_times = {"eager PyTorch": [], f"Predictor ({predictor.backend})": []}
    with torch.inference_mode():
        for name, run in zip(forward_times, (model, predictor)):
            run(x)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                run(x)
                forward_times[name].append(time.perf_counter() - start)
    assert all(len(times) == repeats for times in [client_times, *forward_times.values()])
    with capsys.disabled():
        print(f"\nclassify latency over {repeats} calls, p50 / p95: through gradio_client "
              f"{_ms(client_times, 50)} / {_ms(client_times, 95)} ms; "
              + "; ".join(f"bare forward, {name}: {_ms(t, 50)} / {_ms(t, 95)} ms" for name, t in forward_times.items()))


def _ms(values: list[float], q: float) -> str:
    return f"{_percentile(values, q) * 1e3:.1f}"
