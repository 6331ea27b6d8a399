"""effnetv2.loading: models loaded on first use in threads of their own, hung or failed loads kept apart."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from effnetv2 import EfficientNetV2, loading
from effnetv2.loading import IMAGENET, Models, ModelUnavailable

LABELS = ["circle", "square", "star"]
IMAGENET_TITLE = "ImageNet — EfficientNetV2-S, 1000 classes"
TITLES = {IMAGENET: "ImageNet — EfficientNetV2-S, {} classes"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = EfficientNetV2("b0", num_classes=len(LABELS), id2label=dict(enumerate(LABELS)), image_size=32,
                           train_image_size=32)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return path


@pytest.fixture()
def models(model_dir):
    """Models on the tiny model, loaded (nothing else loaded, no failure remembered)."""
    models = Models(str(model_dir), TITLES)
    models.start(models.main, backend="torch")
    return models


def test_titles_name_the_classes_without_loading_and_never_a_server_path(model_dir):
    models = Models(str(model_dir), {str(model_dir): "Shapes — bundled, {} classes", **TITLES})
    assert models.choices() == [("Shapes — bundled, 3 classes", str(model_dir)), (IMAGENET_TITLE, IMAGENET)]
    assert not models._loaded and not models._loading  # its config said
    assert Models(str(model_dir)).title(str(model_dir)) == model_dir.name
    assert Models(IMAGENET).names() == [IMAGENET]


def test_the_main_model_loads_on_first_use_once(model_dir):
    models = Models(str(model_dir))
    first = models.get("")
    assert list(first.id2label.values()) == LABELS and models.get(str(model_dir)) is first
    assert models.title(str(model_dir)) == f"{model_dir.name} — 3 classes"  # loaded: its classes are known
    with pytest.raises(ModelUnavailable, match=r"Unknown model 'resnet'") as caught:
        models.get("resnet")
    assert caught.value.title == "Unknown model"


def test_offline_without_the_weights_the_message_names_no_path(models, tmp_path, monkeypatch, caplog):
    """The visitor reads that the model cannot be had; the developer's detail is in the server log."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as caught:
        models.get(IMAGENET)
    message = str(caught.value)
    assert message.startswith(f"{IMAGENET_TITLE} could not be loaded on this server") and caught.value.title == (
        "Model not available")
    assert "/" not in message.replace(" — ", "") and not re.search(r"[A-Z]{2,}_[A-Z_]+", message)
    assert "HF_HUB_OFFLINE" in caplog.text or "offline" in caplog.text  # the log keeps the detail


def test_a_hung_load_keeps_one_waiter_and_turns_the_others_away(models, hung_load):
    """Of four callers of a hung load one waits (``waiters=1``), three are told at once it is loading; the
    main model answers meanwhile; one load serves them all."""
    release, calls = hung_load
    with ThreadPoolExecutor(4) as pool:
        requests = [pool.submit(models.get, IMAGENET) for _ in range(4)]
        turned_away, waiting = [], []
        for request in requests:
            try:
                request.result(timeout=0.5)
            except ModelUnavailable as err:
                turned_away.append(str(err))
            except TimeoutError:
                waiting.append(request)
        assert len(waiting) == 1 and models.get("") is models._loaded[models.main]
        release.set()
        with pytest.raises(ModelUnavailable, match="could not be loaded") as failed:
            waiting[0].result(timeout=10)
    assert turned_away == [f"{IMAGENET_TITLE} is loading (its weights are downloaded on first use): try again "
                           f"in a minute."] * 3, turned_away
    assert failed.value.title == "Model not available" and calls == [IMAGENET]


def test_a_download_that_never_answers_fails_in_time_and_names_no_path(models, silent_proxy, tmp_path,
                                                                       monkeypatch, caplog):
    """The real loader, TORCH_HOME empty, online, behind a proxy that never answers: "not available"
    within the download timeout; the log gets the why with the paths."""
    import urllib.request

    from effnetv2 import convert

    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener, built on the proxy here, goes after
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(convert, "is_offline", lambda: False)
    monkeypatch.setattr(convert, "DOWNLOAD_TIMEOUT_S", 1)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match="could not be loaded on this server") as caught:
        models.get(IMAGENET, wait_s=loading.LOAD_TIMEOUT_S)
    assert time.monotonic() - start < 10
    assert not any(text in str(caught.value) for text in ("/", "TORCH_HOME", "HF_HUB_OFFLINE"))
    assert "could not download" in caplog.text and str(tmp_path) in caplog.text


def test_a_failed_model_load_is_remembered_for_a_while(models, hung_load, monkeypatch):
    """A load that failed (or outlived LOAD_TIMEOUT_S) is not retried on every request, only after
    RETRY_AFTER_S, and its message names no server path or setting."""
    release, calls = hung_load
    monkeypatch.setattr(loading, "LOAD_TIMEOUT_S", 0.5)  # a load that takes longer is given up ...
    start = time.monotonic()
    for _ in range(2):  # ... without starting another while it runs
        with pytest.raises(ModelUnavailable, match="could not be loaded"):
            models.get(IMAGENET, wait_s=30)
    assert time.monotonic() - start < 5 and calls == [IMAGENET]
    release.set()
    monkeypatch.setattr(loading, "LOAD_TIMEOUT_S", 30)
    deadline = time.monotonic() + 10
    while IMAGENET in models._loading and time.monotonic() < deadline:  # the hung load ends, failed
        time.sleep(0.05)
    for _ in range(3):
        with pytest.raises(ModelUnavailable) as caught:
            models.get(IMAGENET, wait_s=5)
        message = str(caught.value)
        assert "could not be loaded" in message
        assert not any(text in message for text in ("/", "TORCH_HOME", "HF_HUB_OFFLINE")), message
    assert calls == [IMAGENET]  # remembered: not tried again
    monkeypatch.setattr(loading, "RETRY_AFTER_S", 0)  # the window has passed
    with pytest.raises(ModelUnavailable, match="could not be loaded"):
        models.get(IMAGENET, wait_s=5)
    assert calls == [IMAGENET] * 2


def test_load_warms_the_runtime_up(model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(loading.Predictor, "__call__", lambda self, x: calls.append(tuple(x.shape)))
    predictor = loading.load(str(model_dir), backend="torch")
    assert calls == [(1, 3, 32, 32)] and predictor.config["image_size"] == 32
    torch.testing.assert_close(predictor.model.head.classifier.weight,
                               EfficientNetV2.from_pretrained(str(model_dir)).head.classifier.weight)
