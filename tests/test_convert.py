"""Converters from torchvision and timm: exact parity on random weights, key/shape mapping for every
variant, safe file reading, the official-weights cache path and the command line."""
import hashlib
import http.server
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import effnetv2.convert.__main__ as convert_cli
from effnetv2 import EfficientNetV2, convert
from effnetv2.configs import VARIANTS

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

try:
    import timm
except ImportError:  # timm is a test-only reference implementation (requirements-dev.txt)
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")

SIZES = (64, 67)  # even and odd: TF SAME padding differs from symmetric only on some sizes


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters, BN statistics measured on random images (so the signal neither
    dies nor explodes and every layer matters), and a classifier with realistic-scale weights."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.2, 0.6, generator=g)
            m.bias.normal_(0, 0.2, generator=g)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        model.train()(torch.randn(4, 3, 64, 64, generator=g))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert ref.std() > 1e-3 * scale, f"{what}: degenerate reference output, the test would prove nothing"
    assert diff <= 1e-4 * scale, f"{what}: max |Δ| {diff:.3g} vs scale {scale:.3g}"
    return diff


def check_parity(model: EfficientNetV2, ref: nn.Module, size: int, kind: str) -> float:
    """Pooled features and logits of ``model`` and the source model ``ref`` on two random images."""
    x = torch.randn(2, 3, size, size)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    if kind == "torchvision":
        ref_pooled = ref.avgpool(ref.features(x)).flatten(1)
    else:
        ref_pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert_close(pooled, ref_pooled, f"pooled features at {size}px")
    ref_logits = ref.classifier(ref_pooled)
    # The input reaches the logits: a wrong mapping anywhere would show above the tolerance.
    assert (ref_logits[0] - ref_logits[1]).abs().max() > 0.05 * ref_logits.abs().max()
    return assert_close(model.head.classifier(pooled), ref_logits, f"logits at {size}px")


@pytest.fixture(scope="module")
def tv_s():
    torch.manual_seed(0)
    return randomise(torchvision.models.efficientnet_v2_s())


@pytest.fixture(scope="module")
def tv_s_pth(tv_s, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "efficientnet_v2_s-dd5fe13b.pth"
    torch.save(tv_s.state_dict(), path)
    return path


@torch.no_grad()
def test_torchvision_s_parity(tv_s):
    model = convert.from_torchvision(tv_s)
    assert model.variant == "s" and model.padding == "symmetric" and not model.training
    assert model.id2label["0"] == "tench" and model.num_classes == 1000
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # the private list the weights' meta replaced

    assert list(model.id2label.values()) == _IMAGENET_CATEGORIES and model.id2label["999"] == "toilet tissue"
    for size in SIZES:
        check_parity(model, tv_s, size, "torchvision")
    # The CLI's own check maps our weights back into a fresh torchvision model.
    assert convert.max_logit_difference(model, torchvision.models.efficientnet_v2_s(), size=64) == 0
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())


@pytest.mark.parametrize("variant", ["m", "l"])
def test_torchvision_mapping_m_l(variant):
    with torch.device("meta"):
        source = getattr(torchvision.models, f"efficientnet_v2_{variant}")()
    model = convert.from_torchvision(source.state_dict())
    assert model.variant == variant
    with torch.device("meta"):
        expected = EfficientNetV2(variant)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    preset = getattr(torchvision.models, f"EfficientNet_V2_{variant.upper()}_Weights").IMAGENET1K_V1.transforms()
    assert model.config["image_size"] == preset.crop_size[0]
    assert model.config["interpolation"] == preset.interpolation.value
    assert model.config["mean"] == list(preset.mean)


def test_mapping_errors_name_the_key(tv_s):
    state = dict(tv_s.state_dict())
    missing = dict(state)
    del missing["features.3.1.block.0.1.running_var"]
    with pytest.raises(ValueError, match=r"features\.3\.1\.block\.0\.1\.running_var .*missing"):
        convert.from_torchvision(missing)
    reshaped = {**state, "features.7.0.weight": torch.zeros(1280, 256, 3, 3)}
    with pytest.raises(ValueError, match=r"features\.7\.0\.weight has shape \(1280, 256, 3, 3\)"):
        convert.from_torchvision(reshaped)
    with pytest.raises(ValueError, match="has 40 blocks but EfficientNetV2-m has 57"):
        convert.from_torchvision(state, variant="m")
    with pytest.raises(ValueError, match="not a torchvision EfficientNetV2"):
        convert.from_torchvision({"conv.weight": torch.zeros(1)})


class Exploit:
    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = Exploit()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "payload": evil}, path)
    with pytest.raises(ValueError, match="weights-only"):
        convert.from_torchvision(path)
    assert not marker.exists()


def test_official_weights_offline_from_cache(tv_s, tv_s_pth, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(convert, "download_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    with pytest.raises(OSError, match=f"put that file at {cached}"):
        convert.from_torchvision("s")
    cached.write_bytes(tv_s_pth.read_bytes())
    model = convert.from_torchvision("s")
    assert model.config["source"] == {
        "source": "torchvision", "weights": "EfficientNet_V2_S_Weights.IMAGENET1K_V1",
        "file": cached.name, "sha256": hashlib.sha256(cached.read_bytes()).hexdigest()}
    assert torch.equal(model.blocks[39].se.conv_reduce.bias, tv_s.features[6][14].block[2].fc1.bias)
    assert torch.equal(model.head.classifier.weight, tv_s.classifier[1].weight)


@needs_timm
@torch.no_grad()
@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_timm_parity(variant):
    torch.manual_seed(0)
    ref = randomise(timm.create_model(f"tf_efficientnetv2_{variant}"))
    model = convert.from_timm(ref)
    cfg = ref.pretrained_cfg
    assert model.variant == variant and model.padding == "same"
    assert model.config["image_size"] == cfg["test_input_size"][-1]
    assert model.config["train_image_size"] == cfg["input_size"][-1]
    assert model.config["crop_pct"] == cfg["crop_pct"] and model.config["interpolation"] == cfg["interpolation"]
    for size in SIZES:
        check_parity(model, ref, size, "timm")
    if variant == "b0":
        # The test can fail: symmetric padding on TF weights changes the even-size output.
        wrong = EfficientNetV2(**{**model.config, "padding": "symmetric"}).eval()
        wrong.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 64, 64)
        assert (wrong(x) - ref(x)).abs().max() > 1e-2 * ref(x).abs().max()


@needs_timm
@pytest.mark.parametrize("variant", ["b1", "b3", "s", "xl"])
def test_timm_mapping(variant):
    with torch.device("meta"):
        source = timm.create_model(f"tf_efficientnetv2_{variant}")
        expected = EfficientNetV2(variant)
    model = convert.from_timm(source.state_dict())
    assert model.variant == variant and model.padding == "same"
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    assert sum(s.repeats for s in VARIANTS[variant].scaled_stages()) == len(model.blocks)


@pytest.fixture(scope="module")
def timm_b0_7():
    torch.manual_seed(0)
    return randomise(timm.create_model("tf_efficientnetv2_b0", num_classes=7))


@needs_timm
def test_timm_from_safetensors(timm_b0_7, tmp_path):
    path = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in timm_b0_7.state_dict().items()}, str(path))
    model = convert.from_timm(path)
    assert model.num_classes == 7 and model.id2label["6"] == "6"
    assert model.config["source"] == {"source": "timm", "file": "b0.safetensors",
                                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert model.config["image_size"] == 224 and model.config["crop_pct"] == 0.875  # timm's b0 defaults
    assert torch.equal(model.blocks[20].se.conv_expand.weight, timm_b0_7.blocks[5][7].se.conv_expand.weight)
    assert torch.equal(model.head.project_conv.bn.running_var, timm_b0_7.bn2.running_var)


@needs_timm
@torch.no_grad()
def test_cli_writes_hub_folder(timm_b0_7, tmp_path, monkeypatch, capsys):
    path = tmp_path / "b0.pth"
    torch.save(timm_b0_7.state_dict(), path)
    pushed = {}
    monkeypatch.setattr(convert_cli, "upload_model_folder", lambda folder, repo, **kw: pushed.update(folder=folder, repo=repo, **kw))
    out = tmp_path / "converted"
    assert convert_cli.main(["timm", str(path), "--out", str(out), "--push-to-hub", "org/b0", "--private"]) == 0
    assert pushed["repo"] == "org/b0" and pushed["private"] is True and Path(pushed["folder"]) == out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["variant"] == "b0" and config["num_classes"] == 7 and config["padding"] == "same"
    assert config["source"]["file"] == "b0.pth"
    assert "parity with timm: max |Δlogit| = 0\n" in capsys.readouterr().out
    assert "Weights converted from timm (`b0.pth`" in (out / "README.md").read_text()
    check_parity(EfficientNetV2.from_pretrained(out), timm_b0_7, 67, "timm")

    def failing_push(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(convert_cli, "upload_model_folder", failing_push)
    again = tmp_path / "again"
    assert convert_cli.main(["timm", str(path), "--out", str(again), "--push-to-hub", "org/b0"]) == 1
    assert "hf upload org/b0" in capsys.readouterr().err
    assert (again / "model.safetensors").is_file()
    assert convert_cli.main(["torchvision", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x")]) == 1
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert convert_cli.main(["torchvision", "xs", "--out", str(tmp_path / "x")]) == 1
    assert "neither a weights file nor a torchvision variant" in capsys.readouterr().err


@needs_timm
def test_timm_by_name_offline_needs_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: never the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RuntimeError, match="Hugging Face cache"):
        convert.from_timm("tf_efficientnetv2_b0")


# --------------------------------------------------------------------------- export: the inverse

def fine_tuned(variant: str, padding: str = "symmetric") -> EfficientNetV2:
    """A model as train.py leaves it: random backbone statistics, a new 3-class head with labels."""
    model = EfficientNetV2(variant, num_classes=3, padding=padding, image_size=64, drop_path_rate=0.0,
                           id2label={0: "daisy", 1: "roses", 2: "tulips"})
    return randomise(model, seed=1)


def assert_logits_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert (theirs[0] - theirs[1]).abs().max() > 0.05 * theirs.abs().max()  # the input matters
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@needs_timm
@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_export_to_timm_loads_as_a_timm_model_with_equal_logits(padding, tmp_path):
    model = fine_tuned("b0", padding)
    out = convert.to_timm(model, tmp_path / "timm-b0")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert theirs.pretrained_cfg["label_names"] == ["daisy", "roses", "tulips"]
    assert tuple(theirs.pretrained_cfg["test_input_size"]) == (3, 64, 64)
    x = torch.randn(2, 3, 67, 67)  # odd size: TF SAME and symmetric padding differ here
    with torch.no_grad():
        assert_logits_equal(model(x), theirs(x))
    # and timm's own transform is ours
    data_cfg = timm.data.resolve_data_config({}, model=theirs, use_test_size=True)
    assert tuple(data_cfg["mean"]) == tuple(model.config["mean"]) and data_cfg["crop_pct"] == model.config["crop_pct"]


def test_export_to_torchvision_loads_strictly_with_equal_logits(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = fine_tuned("s")
    path = convert.to_torchvision(model, tmp_path / "s.safetensors")
    theirs = torchvision.models.efficientnet_v2_s(num_classes=3).eval()
    theirs.load_state_dict(load_file(path), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_logits_equal(model(x), theirs(x))
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["id2label"]) == {"0": "daisy", "1": "roses", "2": "tulips"}
    # back again: the torchvision converter reads the export to the same weights
    back = convert.from_torchvision(str(path))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("kind, model, message", [
    ("timm", lambda: EfficientNetV2("b0", num_classes=3, pool="attention", num_heads=2, attn_dim=32),
     "attention-pooling head"),
    ("torchvision", lambda: EfficientNetV2("b0", num_classes=3), "not b0: export it to timm"),
    ("torchvision", lambda: EfficientNetV2("s", num_classes=3, padding="same"), "pads like TensorFlow"),
])
def test_export_refuses_what_the_library_cannot_hold(kind, model, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        (convert.to_timm if kind == "timm" else convert.to_torchvision)(model(), tmp_path / "out")


@needs_timm
def test_cli_exports_a_saved_model_to_timm(tmp_path, capsys):
    fine_tuned("b0").save_pretrained(tmp_path / "mine")
    assert convert_cli.main(["--to", "timm", str(tmp_path / "timm"), "--model", str(tmp_path / "mine")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"] == "tf_efficientnetv2_b0"
    with pytest.raises(SystemExit):
        convert_cli.main(["--to", "timm", str(tmp_path / "x")])
    assert "--to needs --model" in capsys.readouterr().err


def test_download_gives_up_on_a_server_that_never_answers(silent_proxy, tmp_path, monkeypatch):
    # urlopen's opener built earlier in the process, before the proxy was set, must not decide the route
    monkeypatch.setattr(urllib.request, "_opener", urllib.request.build_opener(urllib.request.ProxyHandler({})))
    start = time.monotonic()
    with pytest.raises(OSError, match="timed out"):
        convert.download_file("http://weights.invalid/w.pth", tmp_path / "w.pth", timeout=0.5)
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_checks_the_hash_and_writes_only_a_whole_file(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    data = b"weights" * 1000
    digest = hashlib.sha256(data).hexdigest()

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
        try:
            with pytest.raises(OSError, match="does not start with 0000"):
                convert.download_file(url, tmp_path / "w.pth", "0000")
            assert list(tmp_path.iterdir()) == []
            convert.download_file(url, tmp_path / "w.pth", digest[:8])
        finally:
            server.shutdown()
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"] and (tmp_path / "w.pth").read_bytes() == data


def test_official_weights_through_a_proxy_that_never_answers_fail_in_time(silent_proxy, tmp_path, monkeypatch):
    """The torchvision download through a proxy that accepts and never answers: a ModelDownloadError
    after the download timeout, not a wait forever."""
    from effnetv2.hub import ModelDownloadError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(convert, "is_offline", lambda: False)
    monkeypatch.setattr(convert, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(ModelDownloadError, match="could not download"):
        convert.from_torchvision("s")
    assert time.monotonic() - start < 5
    assert [p.name for p in (tmp_path / "hub" / "checkpoints").iterdir()] == []
