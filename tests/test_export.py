"""ONNX export of the fused model, checked with ONNX Runtime against the eager model."""
from __future__ import annotations

import pytest
import torch

from effnetv2.export import check_onnx, export_onnx, relative_error
from effnetv2.export.__main__ import main
from inference_models import realistic_model

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    return realistic_model("b0", num_classes=5, image_size=64)


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])


@pytest.mark.numerics
def test_export_fixed_size_dynamic_batch(model, tmp_path):
    path = export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [graph_input] = session.get_inputs()
    assert graph_input.name == "pixel_values" and graph_input.shape[1:] == [3, 64, 64]
    assert isinstance(graph_input.shape[0], str)  # dynamic batch
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
        actual = run_onnx(path, x)
        assert actual.shape == (batch, 5)
        assert (actual - expected).abs().max() < 1e-4
        assert relative_error(actual, expected) < 1e-5
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model is untouched


def assert_graph_equals_eager(model, path, size: int) -> None:
    """ONNX Runtime on the graph vs the eager PyTorch model on the same random batch at ``size``."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = model(x)
    actual = run_onnx(path, x)
    assert actual.shape == expected.shape
    assert expected.abs().max() > 0.5  # logits large enough for a wrong graph to show
    # Calibrated at 64 px, the model's logits reach ~170 at 96 px: compare relative to their scale.
    assert (actual - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())
    assert torch.equal(actual.argmax(1), expected.argmax(1))


@pytest.mark.numerics
def test_export_dynamic_size(model, tmp_path):
    path = export_onnx(model, tmp_path / "dynamic.onnx", dynamic_size=True)
    assert [type(d) for d in ort.InferenceSession(str(path)).get_inputs()[0].shape] == [str, int, str, str]
    for size in (64, 96, 70):
        assert_graph_equals_eager(model, path, size)


@pytest.mark.numerics
def test_dynamic_size_refused_where_the_graph_would_freeze_shapes(tmp_path):
    for kwargs in ({"padding": "same"}, {"pool": "attention", "num_heads": 4}):
        model = realistic_model("b0", num_classes=5, image_size=64, **kwargs)
        with pytest.raises(ValueError, match="--image-size"):
            export_onnx(model, tmp_path / "m.onnx", dynamic_size=True)
        assert not (tmp_path / "m.onnx").exists()
    model = realistic_model("b0", num_classes=5, image_size=64, padding="same")
    path = export_onnx(model, tmp_path / "m.onnx", image_size=66)  # SAME padding at a fixed odd size
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape[2:] == [66, 66]
    assert_graph_equals_eager(model, path, 66)


@pytest.mark.numerics
def test_check_onnx_reports_what_onnx_runtime_and_the_eager_model_give(model, tmp_path):
    path = export_onnx(model, tmp_path / "model.onnx")
    stats = check_onnx(model, path, 64, batch_size=2, seed=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    actual = run_onnx(path, x)
    assert stats["max_abs_logit"] == pytest.approx(expected.abs().max().item(), rel=1e-6)
    assert stats["max_abs_diff"] == pytest.approx((actual - expected).abs().max().item(), rel=1e-3, abs=1e-6)
    other = realistic_model("b0", num_classes=5, image_size=64, seed=1)
    assert check_onnx(other, path, 64)["relative_error"] > 0.1  # another model's graph is caught


def test_export_cli(model, tmp_path, capsys, caplog):
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "out" / "model.onnx"
    with caplog.at_level("INFO"):
        assert main(["--model", str(tmp_path / "model"), "--out", str(out), "--image-size", "72"]) == 0
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[2:] == [72, 72]
    assert "relative error" in caplog.text
    assert main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
