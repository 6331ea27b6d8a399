"""The model-source resolver shared by the app, train.py and the CLIs."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from effnetv2 import EfficientNetV2, convert
from effnetv2.hub import ModelDownloadError
from effnetv2.sources import Source, load_model, parse_source


def test_folder_loads_the_saved_model(tmp_path):
    model = EfficientNetV2("b0", num_classes=3, image_size=64).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert not loaded.training and loaded.config == model.config
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_hub_ids_and_revisions_go_to_from_pretrained(monkeypatch):
    calls = []
    monkeypatch.setattr(EfficientNetV2, "from_pretrained",
                        classmethod(lambda cls, repo, **kw: calls.append((repo, kw)) or "model"))
    assert load_model("org/name") == "model"
    assert load_model("org/name@v1.0", num_classes=3) == "model"
    assert calls == [("org/name", {"revision": None}), ("org/name", {"revision": "v1.0", "num_classes": 3})]


def test_torchvision_variants_go_to_the_converter(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("effnetv2.convert")
    fake.from_torchvision = lambda variant: EfficientNetV2("b0", num_classes=2).train() if variant == "s" else None
    monkeypatch.setitem(sys.modules, "effnetv2.convert", fake)
    assert not load_model("torchvision:s").training
    assert not load_model("torchvision:efficientnet_v2_s").training


@pytest.mark.parametrize("source, message", [
    ("", "empty"),
    ("torchvision:b0", "variants"),
    ("org/name@", "nothing after '@'"),
    ("./no/such/folder", "no such folder"),
    ("just-a-name", "not understood"),
    ("model.safetensors", "not a full model"),
])
def test_bad_sources_say_what_to_do(source, message):
    with pytest.raises(ValueError, match=message):
        load_model(source)


def test_weights_file_and_folder_without_config(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="not a full model.*config.json"):
        load_model(str(weights))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is a file, not a model"):
        load_model(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("offline", ["env and constants", "env set after import"])
def test_torchvision_weights_offline_fail_at_once_with_one_clear_error(offline, tmp_path, monkeypatch):
    from huggingface_hub import constants

    downloads = []
    monkeypatch.setattr(convert, "download_file", lambda *args, **kwargs: downloads.append(args))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline == "env and constants")
    with pytest.raises(ModelDownloadError) as caught:
        load_model("torchvision:s")
    message = str(caught.value)
    assert isinstance(caught.value, OSError)  # what train.py and app.py catch and print
    assert "EfficientNetV2-S weights are not in torch's cache and this machine is offline" in message
    assert message.endswith(f"put that file at {tmp_path / 'hub' / 'checkpoints' / 'efficientnet_v2_s-dd5fe13b.pth'} "
                            f"(or set TORCH_HOME), or pass the path of a local .pth instead.")
    assert downloads == []  # not even tried


def test_torchvision_download_failure_is_an_oserror(tmp_path, monkeypatch):
    from huggingface_hub import constants

    def unreachable(url, *args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(convert, "download_file", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelDownloadError, match=r"could not download the official torchvision EfficientNetV2-S "
                                                 r"weights from https://.*Name or service not known.*local \.pth"):
        load_model("torchvision:s")


@pytest.mark.parametrize("revision", ["../../etc", "a b", "-x", "main/", "v1..2", "x\ny"])
def test_revisions_are_checked_before_use(revision, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    with pytest.raises(ValueError, match=r"revision .* is not a branch, tag or commit id"):
        load_model(f"org/name@{revision}")
    with pytest.raises(ValueError, match=r"revision .* is not a branch, tag or commit id"):
        EfficientNetV2.from_pretrained("org/name", revision=revision)


# Expected values written by hand from the module docstring's grammar, not computed by the parser.
# None of these paths exist, so only their spelling decides.
@pytest.mark.parametrize("text, expected", [
    ("org/name", Source("hub", "org/name", repo_id="org/name")),
    ("org/name@v1.0", Source("hub", "org/name@v1.0", repo_id="org/name", revision="v1.0")),
    ("  my-org/effnet.v2_s@0123abc  ", Source("hub", "my-org/effnet.v2_s@0123abc", repo_id="my-org/effnet.v2_s",
                                              revision="0123abc")),
    ("org/name@refs/pr/1", Source("hub", "org/name@refs/pr/1", repo_id="org/name", revision="refs/pr/1")),
    ("./dir", Source("folder", "./dir", path=Path("dir"))),
    ("/abs/run", Source("folder", "/abs/run", path=Path("/abs/run"))),
    ("runs/a/b", Source("folder", "runs/a/b", path=Path("runs/a/b"))),
    ("C:\\models\\run", Source("folder", "C:\\models\\run", path=Path("C:\\models\\run"))),
    ("torchvision:s", Source("torchvision", "torchvision:s", variant="s")),
    ("torchvision:S", Source("torchvision", "torchvision:S", variant="s")),
    ("TorchVision:efficientnet_v2_l", Source("torchvision", "TorchVision:efficientnet_v2_l", variant="l")),
    ("x.safetensors", Source("weights", "x.safetensors", path=Path("x.safetensors"))),
    ("org/model.pth", Source("weights", "org/model.pth", path=Path("org/model.pth"))),
    ("run/last.CKPT", Source("weights", "run/last.CKPT", path=Path("run/last.CKPT"))),
    ("C:\\w\\tv.pt", Source("weights", "C:\\w\\tv.pt", path=Path("C:\\w\\tv.pt"))),
    ("none", Source("none", "none")),
    ("None", Source("none", "None")),
])
def test_parse_table(text, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of these names exists here
    assert parse_source(text) == expected
    assert parse_source(expected) is expected  # a parsed source goes through as it is


def test_an_existing_local_folder_or_file_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "weights").write_bytes(b"")
    assert parse_source("org/name") == Source("folder", "org/name", path=Path("org/name"))
    assert parse_source("org/weights") == Source("weights", "org/weights", path=Path("org/weights"))


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   ", "empty"), ("torchvision:b0", "variants"), ("torchvision:", "variants"),
    ("org/name@", "nothing after '@'"), ("just-a-name", "not understood"),
])
def test_parse_refuses_what_is_no_source(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        parse_source(text)


def test_load_model_refuses_none_and_takes_a_parsed_source(monkeypatch):
    with pytest.raises(ValueError, match="names no model"):
        load_model("none")
    calls = []
    monkeypatch.setattr(EfficientNetV2, "from_pretrained",
                        classmethod(lambda cls, repo, **kw: calls.append((repo, kw)) or "model"))
    assert load_model(Source("hub", "org/name@dev", repo_id="org/name", revision="dev")) == "model"
    assert calls == [("org/name", {"revision": "dev"})]


def test_weight_suffixes_and_torchvision_names_are_shared_with_the_converter():
    from effnetv2 import checkpoint, convert, sources

    assert sources.WEIGHT_SUFFIXES is convert.WEIGHT_SUFFIXES is checkpoint.WEIGHT_SUFFIXES  # read_state_dict's
    assert convert.TORCHVISION_VARIANTS is sources.TORCHVISION_VARIANTS
    assert set(sources.WEIGHT_SUFFIXES) == {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}
