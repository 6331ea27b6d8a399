"""`python app.py` on loopback, driven through `gradio_client` like any remote user would.

Also a mixed load test (24 concurrent clients, classify and attention); its latencies are printed,
never asserted (`benchmarks/app_latency.py` measures them against a bare forward).
"""
from __future__ import annotations

import ast
import asyncio
import base64
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from app_server import mixed_load, percentile, running_app
from effnetv2 import EfficientNetV2
from effnetv2.inference import Predictor

LOAD_CLIENTS, LOAD_CALLS_EACH, LOAD_TIMEOUT_S = 24, 4, 240
TOP = 5  # README: /classify gives the top-5 labels


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
    assert set(endpoints) == {"/answer", "/classify", "/attention", "/explain", "/textbook"}


@pytest.mark.numerics
def test_classify_through_the_client(client, example):
    result = client.predict(handle_file(example), api_name="/classify")
    top = _top(result)
    assert len(top) == TOP and result["label"] == top[0][0]
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # the label the bundled model itself gives this image, in this process
    expected = Predictor(app.DEFAULT_MODEL, backend="torch").predict([example], top_k=1)[0][0][0]
    assert top[0][0] == expected


def test_attention_through_the_client(client, example, model):
    gallery, matrix, maths, grid = client.predict(handle_file(example), app.POOLED, 0, 0,
                                                  api_name="/attention")
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == model.num_heads + 1 and "mean" in captions[0]  # the summary first
    assert all(f"head {i + 1}:" in captions[i + 1] for i in range(model.num_heads))
    for item in gallery + [{"image": matrix}, {"image": grid}]:
        assert Image.open(item["image"]).size[0] > 0
    assert "the pooled query" in maths and "softmax" in maths
    *_, cell_maths, _ = client.predict(handle_file(example), app.CELL, 1, 2, api_name="/attention")
    assert "the token at cell (1, 2)" in cell_maths


def test_answer_through_the_client_in_one_call(client, example, model):
    """/answer: the top labels, one explanation picture at least 320 px wide, the sentence and the verdict."""
    scores, picture, sentence, verdict = client.predict(handle_file(example), api_name="/answer")
    expected = Predictor(app.DEFAULT_MODEL, backend="torch").predict([example], top_k=5)[0]
    assert list(scores) == [label for label, _ in expected]
    for label, prob in expected:
        assert abs(scores[label] - prob) < 1e-3  # float32 runtimes agree to far less than this
    assert Image.open(picture).size[0] >= 320
    assert sentence.startswith(f"**{expected[0][0]}, ") and "sure" in sentence
    assert "deletion test" in verdict and "random map" in verdict
    *_, square_sentence, _ = client.predict(handle_file(example), "square", api_name="/answer")
    assert square_sentence.startswith("**square, ")


def test_explain_through_the_client(client, example, model):
    """/explain with the predicted class (empty) and a chosen one: pictures per head and their sum,
    the per-head totals as a table, and the faithfulness table in words."""
    gallery, totals, faithfulness, pair = client.predict(handle_file(example), "", api_name="/explain")
    assert len(gallery) == model.num_heads + 1 and "all heads: +" in gallery[0]["caption"]  # the summary first
    assert all("towards star" in item["caption"] or "against star" in item["caption"] for item in gallery)
    assert [head for head, _ in totals["data"]] == [f"head {i + 1}" for i in range(model.num_heads)]
    for (head, total), item in zip(totals["data"], gallery[1:]):  # the chart's numbers are the captions'
        assert item["caption"].startswith(f"{head}: {total:+.2f} ")
    assert "**Why star?**" in faithfulness and "| random map |" in faithfulness
    assert all(Image.open(path).size[0] > 0 for path in [item["image"] for item in gallery] + list(pair))
    *_, square = client.predict(handle_file(example), "square", api_name="/explain")[:3]
    assert "**Why square?**" in square and "predicted: star" in square
    with pytest.raises(AppError, match="Unknown class 'dog'"):
        client.predict(handle_file(example), "dog", api_name="/explain")


def test_mcp_server_lists_the_tools_and_classifies_like_the_client(server, client, example):
    """`python app.py` is an MCP server too (Gradio's `mcp` extra): its tools are the named endpoints,
    described for an agent, and `classify` answers as /classify does."""
    pytest.importorskip("mcp", reason="Gradio's mcp extra is not installed (pip install 'gradio[mcp]')")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    image = "data:image/png;base64," + base64.b64encode(Path(example).read_bytes()).decode()

    async def ask():
        async with streamable_http_client(server + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return (await session.list_tools()).tools, await session.call_tool("classify", {"image": image})
    tools, answer = asyncio.run(ask())
    described = {tool.name: tool for tool in tools}
    assert set(described) == {"answer", "classify", "attention", "explain", "textbook"}  # no UI-only event
    assert described["classify"].description.startswith("Classify an image")
    assert set(described["explain"].inputSchema["properties"]) == {"image", "class_name", "model"}
    model = described["classify"].inputSchema["properties"]["model"]  # the picker: optional, its choices told
    assert "torchvision:s" in str(model) and "model" not in described["classify"].inputSchema.get("required", [])
    assert not answer.isError
    expected = client.predict(handle_file(example), api_name="/classify")
    assert ast.literal_eval(answer.content[0].text) == expected


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(client, tmp_path, example):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(text)), api_name="/classify")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (11 * 1024 * 1024))  # over the 10 MB upload limit
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(big)), api_name="/classify")
    assert len(_top(client.predict(handle_file(example), api_name="/classify"))) == TOP


def test_textbook_through_the_client(client):
    gallery, maths = client.predict(3, 768, 12, 0, api_name="/textbook")
    assert [item["caption"].split(":")[0] for item in gallery] == [f"head {i}" for i in range(1, 13)]
    assert all(Image.open(item["image"]).size[0] > 0 for item in gallery)
    # 3 tokens of width 768 in 12 heads of 768 / 12 = 64 channels; scores are 3 x 3 per head
    for shape in ("`[1, 3, 768]`", "`[1, 12, 3, 64]`", "`[1, 12, 3, 3]`"):
        assert shape in maths
    with pytest.raises(AppError, match="not divisible"):
        client.predict(3, 768, 7, 0, api_name="/textbook")
    with pytest.raises(AppError, match="seed must be a whole number"):  # an emptied field arrives as null
        client.predict(3, 768, 12, None, api_name="/textbook")


def test_mixed_load_gives_every_client_complete_answers(server, model, tmp_path, capsys):
    """24 clients x 4 calls, /classify and /attention alternating over the example images, every
    picture downloaded: no call may fail (a picture rewritten while it was being served used to end
    1-2 responses of 96 early), and each answer is the model's."""
    expected = dict(zip(app.EXAMPLES, (top[0][0] for top in
                                       Predictor(model, backend="torch").predict(app.EXAMPLES, top_k=1))))
    start = time.perf_counter()
    calls = mixed_load(server, app.EXAMPLES, LOAD_CLIENTS, LOAD_CALLS_EACH, tmp_path, timeout=LOAD_TIMEOUT_S)
    wall = time.perf_counter() - start
    errors = [f"{call.api_name} {Path(call.image).name}: {call.error}" for call in calls if call.error]
    assert not errors, f"{len(errors)} of {len(calls)} calls failed:\n" + "\n".join(errors)
    assert len(calls) == LOAD_CLIENTS * LOAD_CALLS_EACH
    for call in calls:
        if call.api_name == "/classify":
            assert call.result["label"] == expected[call.image], Path(call.image).name
        else:
            gallery, matrix, _, grid = call.result
            assert len(gallery) == model.num_heads + 1
            for path in [item["image"] for item in gallery] + [matrix, grid]:
                with Image.open(path) as picture:
                    picture.load()  # a short download fails here
    with capsys.disabled():
        print(f"\nmixed load: {LOAD_CLIENTS} clients x {LOAD_CALLS_EACH} calls = {len(calls)} requests in "
              f"{wall:.1f}s ({len(calls) / wall:.1f} req/s), 0 errors; latency p50 / p95: " + "; ".join(
                  f"{name} {percentile(times, 50) * 1e3:.0f} / {percentile(times, 95) * 1e3:.0f} ms"
                  for name in ("/classify", "/attention")
                  for times in [[call.seconds for call in calls if call.api_name == name]]))
