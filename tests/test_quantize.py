"""int8: static quantization calibrated on real images, through export and the Predictor.

The bundled model is quantized on shapes of one seed and measured on shapes of another (the labels
are the data set's own annotations); README: on the 1000-image eval set the int8 graph's top-1 is
within 1 point of float32 and agrees with it on >= 99% of the images.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from effnetv2.data import make_shapes_dataset
from effnetv2.export import export_onnx
from effnetv2.export.__main__ import main
from effnetv2.inference import Predictor
from effnetv2.quantize import calibration_split
from inference_models import realistic_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "model"
# data seeds used nowhere else: the model never saw them, and calibration never sees the measured images
CALIBRATION_SEED, EVAL_SEED = 888_001, 888_002


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return (make_shapes_dataset(root / "calibration", num_per_class=12, image_size=128, seed=CALIBRATION_SEED),
            make_shapes_dataset(root / "eval", num_per_class=40, image_size=128, seed=EVAL_SEED))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("graph-cache")


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="no bundled model in this checkout")
@pytest.mark.numerics
def test_int8_predictor_keeps_the_bundled_models_accuracy(shapes, cache_dir):
    """200 unseen images: int8 top-1 within 2.5 points of float32 and >= 97% top-1 agreement (the
    1000-image figures are 0.1 point and 99.2%; 200 images leave room for sampling error)."""
    calibration, evaluation = shapes
    annotations = json.loads((evaluation / "annotations.json").read_text())
    files = sorted(annotations)
    fp32 = Predictor(str(BUNDLED), backend="onnxruntime", cache_dir=cache_dir)
    labels = torch.tensor([int(fp32.config["label2id"][annotations[f]["label"]]) for f in files])
    x = fp32.preprocess([evaluation / f for f in files])
    float_logits = fp32(x)
    reference = float_logits.argmax(1)
    margins = float_logits.topk(2, 1).values @ torch.tensor([1.0, -1.0])
    fp32_accuracy = (reference == labels).float().mean().item()
    assert fp32_accuracy >= 0.9  # the measurement means something
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        int8 = Predictor(str(BUNDLED), backend=backend, precision="int8", calibration=calibration, cache_dir=cache_dir)
        assert int8.backend == backend and int8.precision == "int8" and int8.graph_path.name.endswith("-int8.onnx")
        logits = int8(x)
        # int8 logits lie on a grid of the output's quantisation step; every activation's rounding before
        # them adds a few steps (~4 here; AVX2 without VNNI saturates its int16 pair sums and adds more).
        # The bounds below hold on every CPU only where the model's float32 margins are many steps wide.
        step = float(onnx.numpy_helper.to_array(next(t for t in onnx.load(str(int8.graph_path)).graph.initializer
                                                      if t.name == "logits_scale")))
        assert (margins > 10 * step).float().mean() >= 0.95, (backend, step)
        predicted = logits.argmax(1)
        accuracy = (predicted == labels).float().mean().item()
        assert accuracy >= fp32_accuracy - 0.025, (backend, accuracy, fp32_accuracy)
        assert (predicted == reference).float().mean().item() >= 0.97, backend
        # predict() goes through the int8 graph too: its top label is the int8 logits' best class
        top = int8.predict([evaluation / f for f in files[:4]], top_k=1)
        assert [t[0][0] for t in top] == [int8.id2label[str(i)] for i in predicted[:4].tolist()]


@pytest.fixture(scope="module")
def b0_graphs(tmp_path_factory):
    """A b0 at 64 px, its float graph and its int8 graph (calibrated on 16 random images)."""
    from effnetv2.export import export_int8

    tmp = tmp_path_factory.mktemp("b0-graphs")
    model = realistic_model("b0", num_classes=5, image_size=64)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 64, 64)).astype(np.float32) for _ in range(4)]
    return model, export_onnx(model, tmp / "model.onnx"), export_int8(model, tmp / "model_int8.onnx", batches)


def test_quantized_graph_runs_convolutions_in_int8(b0_graphs):
    """The graph holds int8 weights per output channel and quantize/dequantize pairs at the convs, and is
    much smaller than the float graph. Whether it still computes the model is judged on the bundled model
    (test_int8_predictor_keeps_the_bundled_models_accuracy): this untrained b0's int8 logits are ~70%
    off its float logits, and its classes agree on 75% of images here, 69% under AVX2 (qemu -cpu Haswell)."""
    _, fp32_path, int8_path = b0_graphs
    graph = onnx.load(str(int8_path)).graph
    ops = Counter(node.op_type for node in graph.node)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(fp32_path)).graph.node)
    assert ops["Conv"] == convs and ops["QuantizeLinear"] >= convs and ops["DequantizeLinear"] >= 2 * convs
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == convs
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in int8_weights}]
    scales = {t.name: len(t.dims) and t.dims[0] for t in graph.initializer}
    assert all(scales[n.input[1]] > 1 for n in per_channel)  # one scale per output channel, not per tensor
    assert int8_path.stat().st_size < 0.35 * fp32_path.stat().st_size


def test_quantized_graph_runs_in_int8_from_input_to_logits(b0_graphs, tmp_path):
    """Under ONNX Runtime's graph optimisations every quantize/dequantize pair of the int8 graph fuses into
    an integer kernel: one QuantizeLinear at the input, one DequantizeLinear at the logits and no float
    convolution, SiLU or pooling between (a float island between two convolutions costs a dequantize and
    a quantize, and halved the speed of EfficientNetV2-S)."""
    import onnxruntime as ort

    model, _, int8_path = b0_graphs
    options = ort.SessionOptions()
    # the QDQ fusions, without the CPU-specific layout changes of the highest level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    squeeze_excitations = sum(name.endswith(".se") for name, _ in model.named_modules())
    assert ops["QLinearConv"] == convs and ops["QLinearGlobalAveragePool"] == squeeze_excitations + 1, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops
    assert not {"Conv", "Sigmoid", "Mul", "ReduceMean", "GlobalAveragePool", "Add"} & set(ops), ops


@pytest.mark.numerics
def test_spatial_means_become_global_average_pools(tmp_path):
    """The squeeze-excitation means (keepdims) and the head's mean (no keepdims) become GlobalAveragePool
    with the same logits; the attention pool's mean over tokens (axis 1) stays a ReduceMean."""
    import onnxruntime as ort
    from onnx import helper, shape_inference

    from effnetv2.export import relative_error
    from effnetv2.quantize import spatial_means_as_pools

    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    for pool in ("avg", "attention"):
        model = realistic_model("b0", num_classes=5, image_size=64, pool=pool)
        graph = shape_inference.infer_shapes(onnx.load(str(export_onnx(model, tmp_path / f"{pool}.onnx"))))
        means = sum(name.endswith(".se") for name, _ in model.named_modules()) + (pool == "avg")
        assert spatial_means_as_pools(graph.graph) == means
        ops = Counter(node.op_type for node in graph.graph.node)
        assert ops["GlobalAveragePool"] == means and ops["ReduceMean"] == (pool == "attention"), ops
        onnx.checker.check_model(graph)
        # Each pool against the float64 mean over H, W of its own input: float32 sums of n terms in any
        # order (every CPU's kernel) are within (n - 1) u sum|x| of the exact sum, the division adds u
        # (u = 2^-24), so |pool - mean| <= (n + 1) u mean|x| on every instruction set.
        pools = [node for node in graph.graph.node if node.op_type == "GlobalAveragePool"]
        probe = onnx.ModelProto()
        probe.CopyFrom(graph)
        probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                  for node in pools for name in (node.input[0], node.output[0]))
        pooled, *tensors = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"pixel_values": x})
        for inputs, output in zip(tensors[::2], tensors[1::2]):
            inputs = inputs.astype(np.float64)
            n = inputs.shape[2] * inputs.shape[3]
            exact = inputs.mean(axis=(2, 3), keepdims=True)
            assert output.shape == exact.shape
            assert (np.abs(output - exact) <= (n + 1) * 2.0 ** -24 * np.abs(inputs).mean(axis=(2, 3), keepdims=True)).all()
        # The logits: the rewrite only reorders float32 sums, so the rewritten graph is as close to the
        # float64 model as float32 gets through this network on this CPU, which the original graph and the
        # eager float32 model show (each error varies by ~2x between kernel sets: 3x the larger of the two).
        expected = ort.InferenceSession(str(tmp_path / f"{pool}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"pixel_values": x})[0]
        with torch.no_grad():
            exact = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
            eager = model(torch.from_numpy(x)).numpy()
        float32_error = max(relative_error(expected, exact), relative_error(eager, exact))
        assert relative_error(pooled, exact) <= 3 * float32_error, (pool, relative_error(pooled, exact), float32_error)


def test_calibration_split_is_seeded_and_disjoint(tmp_path):
    for i in range(30):
        (tmp_path / "a" if i % 2 else tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    calibration, held_out = calibration_split(tmp_path, 10, held_out=15, seed=3)
    assert len(calibration) == 10 and len(held_out) == 15 and not set(calibration) & set(held_out)
    assert all(p.suffix == ".png" for p in calibration + held_out)
    assert calibration_split(tmp_path, 10, held_out=15, seed=3) == (calibration, held_out)
    assert calibration_split(tmp_path, 10, seed=4)[0] != calibration
    everything, none = calibration_split(tmp_path, 100, held_out=5)  # fewer images than asked for: all of them
    assert len(everything) == 30 and none == [] and set(calibration + held_out) < set(everything)
    with pytest.raises(ValueError, match=r"calibration data .*missing: no such folder"):
        calibration_split(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        calibration_split(tmp_path / "empty")


def test_int8_needs_calibration_and_a_cpu_runtime(tmp_path):
    model = realistic_model("b0", num_classes=5, image_size=32)
    with pytest.raises(ValueError, match="needs calibration images: pass calibration=FOLDER"):
        Predictor(model, precision="int8", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="runs on backend 'onnxruntime' or 'openvino'"):
        Predictor(model, backend="torch", precision="int8", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(model, precision="int4", cache_dir=tmp_path)


def test_export_cli_int8(shapes, tmp_path, caplog, capsys):
    model = realistic_model("b0", num_classes=5, image_size=64)
    model.save_pretrained(tmp_path / "model")
    calibration, _ = shapes
    out = tmp_path / "model_int8.onnx"
    with caplog.at_level("INFO"):
        assert main(["--model", str(tmp_path / "model"), "--out", str(out), "--int8", "--calibration",
                     str(calibration), "--num-calibration", "20"]) == 0
    assert "calibrating on 20 images" in caplog.text
    # the other 40 images of the folder are held out and measured
    assert "int8 vs float graph on 40 held-out images" in caplog.text and "top-1 agreement" in caplog.text
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "model"), "--out", str(out), "--int8"])
    assert "--int8 and --calibration DATA go together" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "model"), "--out", str(out), "--int8", "--calibration",
                 str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.numerics
def test_export_cli_ships_graphs_into_the_model_folder(shapes, tmp_path, capsys):
    model = realistic_model("b0", num_classes=5, image_size=64)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    calibration, _ = shapes
    assert main(["--model", str(folder), "--ship", "--int8", "--calibration", str(calibration),
                 "--num-calibration", "20"]) == 0
    manifest = json.loads((folder / "onnx" / "graphs.json").read_text())
    assert set(manifest["graphs"]) == {"fp32", "int8"} and manifest["graphs"]["int8"]["calibration_images"] == 20
    assert manifest["graphs"]["int8"]["agreement"]["images"] == 40  # the rest of the folder, held out
    assert manifest["graphs"]["fp32"]["relative_error"] < 1e-5
    for precision, name in (("fp32", "model.onnx"), ("int8", "model_int8.onnx")):
        digest = hashlib.sha256((folder / "onnx" / name).read_bytes()).hexdigest()
        assert manifest["graphs"][precision]["sha256"] == digest
    card = (folder / "README.md").read_text()
    assert card.count("## Runtimes in this repo") == 1 and "`onnx/model_int8.onnx` | int8 | 64×64" in card
    assert main(["--model", str(folder), "--ship"]) == 0  # again, float only: the int8 graph of before is gone
    assert not (folder / "onnx" / "model_int8.onnx").exists()
    assert card.count("## Runtimes in this repo") == (folder / "README.md").read_text().count("## Runtimes in this repo")
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--ship", "--out", str(tmp_path / "x.onnx")])
    assert "either --out FILE or --ship" in capsys.readouterr().err


def input_scale(int8_path) -> float:
    """The scale of the QuantizeLinear that takes the graph's input: its calibrated range / 255."""
    graph = onnx.load(str(int8_path)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    [node] = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "pixel_values"]
    return float(constants[node.input[1]])


def test_every_calibration_batch_sets_the_ranges(b0_graphs, tmp_path):
    from effnetv2.quantize import quantize_onnx

    model, fp32_path, _ = b0_graphs
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32) for _ in range(9)]
    batches[0][0, 0, 0, :2] = [-10, 10]  # the widest input range is in the first batch only
    int8 = quantize_onnx(fp32_path, tmp_path / "int8.onnx", batches)
    # uint8 with zero in range: scale = (max - min) / 255 over every batch
    assert input_scale(int8) == pytest.approx(20 / 255, rel=1e-6)


def test_calibration_streams_one_batch_at_a_time(b0_graphs, tmp_path, monkeypatch):
    import weakref

    from PIL import Image

    from effnetv2 import quantize

    model, fp32_path, _ = b0_graphs
    rng = np.random.default_rng(0)
    files = []
    for i in range(12):
        files.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files[-1])
    files.insert(5, tmp_path / "broken.jpg")
    files[5].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    opened, live, most_alive, seen = [], set(), [0], []
    open_image = quantize.open_image
    monkeypatch.setattr(quantize, "open_image", lambda path: opened.append(path) or open_image(path))

    def tracked(batches):
        for batch in batches:
            # when a batch is asked for, no more images were read than the batches taken so far hold
            assert len(opened) <= 2 * (len(seen) + 1) + 1
            seen.append(batch.shape[0])
            live.add(id(batch))
            weakref.finalize(batch, live.discard, id(batch))
            most_alive[0] = max(most_alive[0], len(live))
            yield batch
            del batch

    batches = quantize.calibration_batches(model.config, files, batch_size=2)
    assert not isinstance(batches, (list, tuple))  # nothing is read before the quantizer asks
    assert opened == []
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image file\(s\)[^$]*broken\.jpg: "):
        quantize.quantize_onnx(fp32_path, tmp_path / "int8.onnx", tracked(batches))
    assert seen == [2] * 6 and len(opened) == 13  # every readable image, in 6 batches, the bad one skipped
    assert most_alive[0] <= 2  # the batch being calibrated on, at most one more: never the whole set


def test_calibration_on_unreadable_images_only_says_so(b0_graphs, tmp_path):
    from effnetv2.quantize import calibration_batches, quantize_onnx

    model, fp32_path, _ = b0_graphs
    (tmp_path / "a.png").write_text("not an image")
    with pytest.warns(UserWarning, match="a.png: not an image file"), \
            pytest.raises(ValueError, match="no calibration image could be read"):
        quantize_onnx(fp32_path, tmp_path / "int8.onnx", calibration_batches(model.config, [tmp_path / "a.png"]))
    assert not (tmp_path / "int8.onnx").exists()
