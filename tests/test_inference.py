"""The inference path: BatchNorm folding and the Predictor on every installed backend."""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import effnetv2.inference as inference
from effnetv2.checkpoint import weights_fingerprint
from effnetv2.export import relative_error
from effnetv2.fuse import optimize_for_inference
from effnetv2.layers import Conv2dSame
from effnetv2.inference import Predictor
from inference_models import realistic_model

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def model():
    return realistic_model("b0", num_classes=7, image_size=64)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("graph-cache")


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.numerics
@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True), Conv2dSame(6, 10, 3, 2, bias=False)],
                         ids=["conv-bias", "same-padding"])
def test_fold_batchnorm_equals_conv_then_bn(conv):
    """torch.nn.utils.fusion, which optimize_for_inference uses, on our convs: one conv equal to conv → BN."""
    bn = nn.BatchNorm2d(10, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_(0, 0.5)
    bn.eval()
    x = torch.randn(2, 6, 9, 9)
    fused = fuse_conv_bn_eval(conv.eval(), bn)
    with torch.no_grad():
        expected = bn(conv(x))
        assert (fused(x) - expected).abs().max() < 1e-5
    assert fused is not conv and conv.weight.data_ptr() != fused.weight.data_ptr()


@pytest.mark.numerics
def test_folded_weights_are_the_float64_fold_rounded_once(model):
    """optimize_for_inference folds in float64: each weight is ``w * gamma / sqrt(var + eps)`` (and the bias
    ``(b - mean) * scale + beta``) worked out in float64 by hand, rounded to float32 once (at most 1 ulp apart:
    torch's rsqrt vs our 1 / sqrt in float64). A float32 fold is off by several ulp."""
    conv, bn = model.blocks[-1].dwconv.conv, model.blocks[-1].dwconv.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = (conv.weight.double() * scale.reshape(-1, 1, 1, 1)).float()
    bias = ((-bn.running_mean.double()) * scale + bn.bias.double()).float()
    folded = optimize_for_inference(model, channels_last=False).blocks[-1].dwconv.conv
    assert torch.allclose(folded.weight, weight, rtol=2 ** -24, atol=0)
    assert torch.allclose(folded.bias, bias, rtol=2 ** -24, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"padding": "same", "pool": "attention", "num_heads": 4}],
                         ids=["symmetric-avg", "same-attention"])
@pytest.mark.numerics
def test_fused_model_equals_eager(kwargs):
    model = realistic_model("b0", image_size=64, **kwargs)
    x = torch.randn(2, 3, 70, 66)  # odd grid sizes: SAME padding and the position embedding resample
    fused = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fused.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        feats, logits = model.forward_features(x), model(x)
        xc = x.contiguous(memory_format=torch.channels_last)
        fused_feats, fused_logits = fused.forward_features(xc), fused(xc)
    assert logits.abs().max() > 0.3 and logits.std(dim=0).mean() > 0.05  # a scale where errors show
    # Features reach ~30 here and folding reorders float32 sums (~1e-5 of the scale); a wrong fold
    # gives errors of the features' own order.
    assert (fused_feats - feats).abs().max() < 1e-4 * feats.abs().max()
    # logits reach ~15 here: 2e-4 absolute is ~1e-5 of their scale
    assert (fused_logits - logits).abs().max() < 2e-4
    assert relative_error(fused_logits, logits) < 2e-5


def test_fusing_never_changes_the_model(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = optimize_for_inference(model)
    assert model.training and not fused.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(
        [k for k in before if k.endswith("running_mean")])
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in fused.parameters())
    assert model.stem.conv.bias is None and fused.stem.conv.bias is not None
    assert model.stem.conv.weight.is_contiguous()


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnxruntime not installed")),
    pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")),
])
@pytest.mark.numerics
def test_predictor_equals_eager(model, batch, cache_dir, backend):
    predictor = Predictor(model, backend=backend, cache_dir=cache_dir)
    assert predictor.backend == backend
    with torch.no_grad():
        expected = model(batch)
    logits = predictor(batch)
    assert logits.shape == (3, 7)
    assert (logits - expected).abs().max() < 1e-4
    assert relative_error(logits, expected) < 1e-5
    single = predictor(batch[:1])  # the batch size is dynamic
    assert (single - expected[:1]).abs().max() < 1e-4


def test_auto_prefers_the_fastest_installed_runtime(model, cache_dir, monkeypatch):
    documented = ("onnxruntime", "openvino", "torch")  # the README: onnxruntime > openvino > torch
    installed = [b for b in documented if b == "torch" or importlib.util.find_spec(b)]
    assert Predictor(model, cache_dir=cache_dir).backend == installed[0]
    if HAS_ONNXRUNTIME and HAS_OPENVINO:  # without ONNX Runtime, OpenVINO comes next
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
        assert Predictor(model, cache_dir=cache_dir).backend == "openvino"


@pytest.mark.numerics
def test_auto_falls_back_to_torch_without_runtimes(model, batch, monkeypatch, tmp_path):
    for name in ("openvino", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    predictor = Predictor(model, backend="auto", cache_dir=tmp_path)
    assert predictor.backend == "torch"
    with torch.no_grad():
        assert (predictor(batch) - model(batch)).abs().max() < 1e-4
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        Predictor(model, backend="onnxruntime", cache_dir=tmp_path)


def test_auto_falls_back_when_a_runtime_fails(model, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(Predictor, "_openvino_runner", broken)
    monkeypatch.setattr(Predictor, "_onnxruntime_runner", broken)
    def fake_export(model, path, *args, **kwargs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path

    monkeypatch.setattr(inference, "export_onnx", fake_export)
    assert Predictor(model, cache_dir=tmp_path).backend == "torch"
    with pytest.raises(RuntimeError, match="cannot compile"):
        Predictor(model, backend="onnxruntime", cache_dir=tmp_path)


@pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnxruntime not installed")
@pytest.mark.numerics
def test_exported_graphs_are_cached_by_weights(model, batch, cache_dir, monkeypatch):
    Predictor(model, backend="onnxruntime", cache_dir=cache_dir)
    exports = []
    real_export = inference.export_onnx
    monkeypatch.setattr(inference, "export_onnx", lambda *a, **k: exports.append(a) or real_export(*a, **k))
    Predictor(model, backend="onnxruntime", cache_dir=cache_dir)
    assert exports == []  # same weights: the cached graph is reused
    other = realistic_model("b0", num_classes=7, image_size=64, seed=1)
    assert weights_fingerprint(other) != weights_fingerprint(model)
    with torch.no_grad():
        expected = other(batch)
    assert relative_error(Predictor(other, backend="onnxruntime", cache_dir=cache_dir)(batch), expected) < 1e-5
    assert len(exports) == 1


@pytest.mark.numerics
def test_predict_top_k(model, cache_dir, tmp_path):
    predictor = Predictor(model, backend="torch", cache_dir=cache_dir)
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    images = [Image.fromarray(rng.integers(0, 256, (80, 50), dtype=np.uint8)), str(path),
              Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")]
    results = predictor.predict(images, top_k=3, batch_size=2)
    assert len(results) == 3
    probs = torch.softmax(model(predictor.preprocess(images)).detach(), dim=-1)
    for row, top in zip(probs, results):
        assert len(top) == 3
        values = [p for _, p in top]
        assert values == sorted(values, reverse=True) and sum(values) <= 1 + 1e-6
        best = row.argsort(descending=True)[:3].tolist()
        assert top[0][0] == model.id2label[str(best[0])]  # lower ranks may tie at ~1e-6
        label2id = {v: int(k) for k, v in model.id2label.items()}
        assert values == pytest.approx([row[label2id[label]].item() for label, _ in top], abs=1e-5)
        assert values == pytest.approx(row[best].tolist(), abs=1e-5)
    assert len(predictor.predict(images[:1], top_k=50)[0]) == 7  # capped at the number of classes
    with pytest.raises(ValueError, match="top_k"):
        predictor.predict(images, top_k=0)


def test_predictor_from_source_exposes_model_config_labels(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    predictor = Predictor(str(tmp_path / "model"), backend="torch")
    assert predictor.config == model.config
    assert predictor.id2label == model.id2label
    assert predictor.model.num_classes == 7
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        predictor(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="backend must be"):
        Predictor(model, backend="tensorrt")


@pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnxruntime not installed")
@pytest.mark.numerics
def test_a_replaced_or_damaged_cached_graph_is_exported_again(model, batch, tmp_path, caplog):
    other = realistic_model("b0", num_classes=7, image_size=64, seed=1)
    with torch.no_grad():
        expected, others = model(batch), other(batch)
    assert not torch.equal(expected.argmax(1), others.argmax(1))  # a swapped graph would show in the top class
    Predictor(model, backend="onnxruntime", cache_dir=tmp_path)
    [graph] = (tmp_path / "onnx").glob("*.onnx")
    Predictor(other, backend="onnxruntime", cache_dir=tmp_path)
    [other_graph] = set((tmp_path / "onnx").glob("*.onnx")) - {graph}
    damages = {"overwritten with another model's graph": other_graph.read_bytes(),
               "truncated": graph.read_bytes()[:1000]}
    for damage, content in damages.items():
        graph.write_bytes(content)
        caplog.clear()
        with caplog.at_level("WARNING", logger="effnetv2.inference"):
            predictor = Predictor(model, backend="auto", cache_dir=tmp_path)
        assert predictor.backend == "onnxruntime", damage
        assert f"cached graph {graph} is not the one exported for this model" in caplog.text, damage
        logits = predictor(batch)
        assert torch.equal(logits.argmax(1), expected.argmax(1)) and relative_error(logits, expected) < 1e-5, damage
        caplog.clear()
        Predictor(model, backend="onnxruntime", cache_dir=tmp_path)  # healed: no second warning
        assert "not the one exported" not in caplog.text


def test_graph_cache_folders_are_private(model, tmp_path, monkeypatch):
    def mode(path):
        return path.stat().st_mode & 0o777

    Predictor(model, backend="onnxruntime" if HAS_ONNXRUNTIME else "torch", cache_dir=tmp_path / "cache")
    if HAS_ONNXRUNTIME:
        assert mode(tmp_path / "cache") == 0o700 and mode(tmp_path / "cache" / "onnx") == 0o700
    # An unusable cache folder falls back to a per-user folder in the temp dir, never a shared one.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "not-a-folder").write_text("")
    folder = inference._cache_subdir(tmp_path / "not-a-folder", "onnx")
    assert folder == tmp_path / "tmp" / f"effnetv2-cache-{os.getuid()}" / "onnx"
    assert mode(folder) == 0o700 and mode(folder.parent) == 0o700
    folder.parent.chmod(0o777)  # loosened by someone: tightened again before use
    assert inference._cache_subdir(tmp_path / "not-a-folder", "onnx") == folder and mode(folder.parent) == 0o700
    if os.getuid() == 0:  # a folder of that name owned by another user is not used
        os.chown(folder.parent, 12345, 12345)
        taken = inference._cache_subdir(tmp_path / "not-a-folder", "onnx")
        assert taken.parent == tmp_path / "tmp" and taken.name.startswith("effnetv2-cache-") and taken != folder.parent
        assert mode(taken) == 0o700


HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown where CUDA is absent")
def test_cuda_without_cuda_says_so(model):
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available here .* use device='cpu'"):
        Predictor(model, device="cuda")


def test_precision_backend_and_device_combinations_are_checked(model, cache_dir):
    with pytest.raises(ValueError, match="precision='bf16' runs on backend='torch'"):
        Predictor(model, backend="onnxruntime", precision="bf16", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="compile=True applies to backend='torch'"):
        Predictor(model, backend="openvino", compile=True, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="not supported: use 'cpu' or 'cuda'"):
        Predictor(model, device="meta")
    predictor = Predictor(model, backend="auto", precision="bf16", cache_dir=cache_dir)
    assert predictor.backend == "torch" and not predictor.compile  # compiling is the CUDA default only
    assert Predictor(model, backend="auto", cache_dir=cache_dir).precision == "fp32"


def test_compile_mode_records_cuda_graphs_for_single_images_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert inference.compile_mode(cuda, 1) == "reduce-overhead"
    assert inference.compile_mode(cuda, 128) is None and inference.compile_mode(cpu, 1) is None


@pytest.mark.numerics
def test_bf16_torch_path_is_channels_last_and_close_to_fp32(model, monkeypatch):
    """The path CUDA takes (bf16, channels_last, compiled), run on the CPU: every convolution sees an
    NHWC bf16 input and the logits come back float32. bf16 kernels differ by instruction set, so the
    logits are judged against the eager model run in bf16 on this machine (how far bf16 rounding moves
    this network here), and their classes against float32; torch.compile is called once per mode on the
    fused model (stood in by the identity: compiling is CUDA's cost)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: compiled.append((module, mode)) or module)
    predictor = Predictor(model, backend="torch", precision="bf16", compile=True)
    batch = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, i[0].is_contiguous(
        memory_format=torch.channels_last) or i[0].shape[-1] == 1))) for m in predictor._fused.modules()
        if isinstance(m, nn.Conv2d)]
    logits = predictor(batch)  # NCHW float32 in, as a user would pass it
    predictor(batch[:1])
    for hook in hooks:
        hook.remove()
    assert seen and all(dtype == torch.bfloat16 and channels_last for dtype, channels_last in seen)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        expected = model(batch)
        eager_bf16 = copy.deepcopy(model).to(torch.bfloat16)(batch.to(torch.bfloat16)).float()
    bf16_error = relative_error(eager_bf16, expected)  # bf16 rounding through this network, on this CPU
    # Folding BatchNorm rounds less than eager bf16 (one weight rounding instead of a conv and a BN
    # output rounding), so the fused path's error is at most about bf16_error; two such independent errors
    # are at most 2 x apart by the triangle inequality, 3 x leaves room for the spread over 16 images.
    assert 1e-4 < relative_error(logits, expected)  # really bf16, not float32
    assert relative_error(logits, eager_bf16) < 3 * bf16_error, (relative_error(logits, eager_bf16), bf16_error)
    # the class: one float32 ranks within bf16's rounding of its best (two logits, each off by at most
    # ~1.5 x eager bf16's largest error)
    noise = (eager_bf16 - expected).abs().max()
    assert (expected.max(1).values - expected.gather(1, logits.argmax(1, keepdim=True))[:, 0] <= 3 * noise).all()
    assert [mode for _, mode in compiled] == [None] and compiled[0][0] is predictor._fused  # CPU: default mode
    assert predictor._fused.stem.conv.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.numerics
def test_cuda_predictor_is_bf16_compiled_and_matches_eager(model, batch):
    predictor = Predictor(model, device="cuda")
    assert (predictor.backend, predictor.precision, predictor.compile) == ("torch", "bf16", True)
    with torch.no_grad():
        expected = model(batch)
    for x in (batch, batch[:1], batch[:1]):  # batch 1 twice: the CUDA graph's replay, copied out
        logits = predictor(x)
        assert logits.device.type == "cuda" and logits.dtype == torch.float32
        assert torch.equal(logits.argmax(1).cpu(), expected[:len(x)].argmax(1))
        assert relative_error(logits.cpu(), expected[:len(x)]) < 0.05
    first = predictor(batch[:1])
    predictor(batch[1:2])
    assert torch.equal(first.argmax(1).cpu(), expected[:1].argmax(1))  # not overwritten by the next replay
    assert predictor._fused.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


RUNTIMES = [
    pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnxruntime not installed")),
    pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")),
]


def shipped_folder(model, folder):
    """``model`` saved in ``folder`` with its float graph shipped (``onnx/model.onnx``, ``onnx/graphs.json``)."""
    from effnetv2.export import ship_graphs

    model.save_pretrained(folder)
    ship_graphs(model, folder)
    return folder


def rewrite_shipped_graph(folder, edit, **save_options):
    """``edit(graph)`` applied to the shipped float graph, saved in place, its new SHA-256 written into
    graphs.json: a replaced graph whose hash checks out."""
    import hashlib
    import json

    import onnx

    path = folder / "onnx" / "model.onnx"
    graph = onnx.load(str(path))
    edit(graph)
    onnx.save_model(graph, str(path), **save_options)
    manifest = json.loads((folder / "onnx" / "graphs.json").read_text())
    manifest["graphs"]["fp32"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "onnx" / "graphs.json").write_text(json.dumps(manifest))


def raise_classifier_bias(graph, target: int = 2, by: float = 100.0):  # graph: an onnx.ModelProto
    """The classifier's bias (the last Gemm's third input) raised by ``by`` for class ``target``."""
    from onnx import numpy_helper

    [gemm] = [n for n in graph.graph.node if n.op_type == "Gemm"][-1:]
    [bias] = [t for t in graph.graph.initializer if t.name == gemm.input[2]]
    values = numpy_helper.to_array(bias).copy()
    values[target] += by
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))


@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_shipped_graph_that_is_not_the_weights_graph_is_not_used(model, batch, tmp_path, caplog, backend):
    folder = shipped_folder(model, tmp_path / "model")
    rewrite_shipped_graph(folder, raise_classifier_bias)
    with caplog.at_level("WARNING", logger="effnetv2.inference"):
        predictor = Predictor(str(folder), backend=backend, cache_dir=tmp_path / "cache")
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"shipped graph onnx/model.onnx of {folder} is not used: its logits differ from the "
                              f"weights' (relative error ")
    assert warning.endswith("exporting it here instead")
    assert predictor.graph_path.parent == tmp_path / "cache" / "onnx"  # exported here
    with torch.no_grad():
        expected = model(batch)
    assert relative_error(predictor(batch), expected) < 1e-5
    assert (predictor(batch).argmax(1) != 2).any()  # not every image answers the raised class


@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_shipped_graph_with_external_data_is_not_used(model, batch, tmp_path, caplog, backend):
    folder = shipped_folder(model, tmp_path / "model")
    # the weights moved to onnx/model.onnx.data, which graphs.json's hash does not cover
    rewrite_shipped_graph(folder, lambda graph: None, save_as_external_data=True, all_tensors_to_one_file=True,
                          location="model.onnx.data", size_threshold=0)
    assert (folder / "onnx" / "model.onnx.data").is_file()
    with caplog.at_level("WARNING", logger="effnetv2.inference"):
        predictor = Predictor(str(folder), backend=backend, cache_dir=tmp_path / "cache")
    assert [r.getMessage() for r in caplog.records] == [
        f"shipped graph onnx/model.onnx of {folder} is not used: it keeps weights in other files (model.onnx.data), "
        f"which its SHA-256 does not cover; ship a graph that holds its weights (python -m effnetv2.export --ship); "
        f"exporting it here instead"]
    assert predictor.graph_path.parent == tmp_path / "cache" / "onnx"
    with torch.no_grad():
        assert relative_error(predictor(batch), model(batch)) < 1e-5


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_never_serves_the_compiled_graph_of_an_earlier_file_at_the_same_path(model, batch, tmp_path):
    cache = tmp_path / "cache"
    folder = shipped_folder(model, tmp_path / "model")
    with torch.no_grad():
        assert relative_error(Predictor(str(folder), backend="openvino", cache_dir=cache)(batch), model(batch)) < 1e-5
        other = realistic_model("b0", num_classes=7, image_size=64, seed=1)
        graph = folder / "onnx" / "model.onnx"
        stamp = graph.stat()
        shipped_folder(other, folder)  # new weights and their graph, at the same paths
        assert graph.stat().st_size == stamp.st_size
        os.utime(graph, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as a copy that keeps times leaves it
        predictor = Predictor(str(folder), backend="openvino", cache_dir=cache)
        assert predictor.graph_path == folder / "onnx" / "model.onnx"  # the shipped graph, compiled anew
        assert relative_error(predictor(batch), other(batch)) < 1e-5
