"""`python -m effnetv2.predict`: files and folders, batching, bad files kept as rows with their error and
reported, order kept."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from effnetv2.inference import Predictor
from effnetv2.predict import find_images, main
from inference_models import realistic_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model = realistic_model("b0", num_classes=4, image_size=64)
    model.save_pretrained(path)
    return path


@pytest.fixture()
def images(tmp_path):
    """A folder tree with 5 readable images (mixed case extensions, nested), a corrupt one, a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "b" / "deeper").mkdir(parents=True)
    names = ["a.jpg", "b/c.PNG", "b/deeper/d.webp", "b/e.JpEg", "z.bmp"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)).save(root / name)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root, sorted(str(root / n) for n in names + ["b/broken.jpg"])


def test_find_images(images, tmp_path):
    root, expected = images
    single = tmp_path / "single.gif"
    Image.new("P", (20, 20)).save(single)
    files, missing = find_images([single, root, tmp_path / "nope.jpg"])
    assert files == [str(single)] + expected  # given files first, then the folder sorted
    assert missing == [(str(tmp_path / "nope.jpg"), "no such file or folder")]


def read_results(path):
    """``[(path, [(label, probability), ...], error or None), ...]`` from a .jsonl, .csv or .parquet file
    written by the CLI (Parquet read by pyarrow itself)."""
    if path.suffix == ".csv":
        with path.open() as f:
            table = list(csv.DictReader(f))
        rows = []
        for name in dict.fromkeys(r["path"] for r in table):
            mine = [r for r in table if r["path"] == name]
            ranked = [r for r in mine if r["rank"]]
            assert [int(r["rank"]) for r in ranked] == list(range(1, len(ranked) + 1))
            rows.append((name, [(r["label"], float(r["probability"])) for r in ranked], mine[0]["error"] or None))
        return rows
    if path.suffix == ".parquet":
        records = pq.read_table(path).to_pylist()
    else:
        records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["path"], [(p["label"], p["probability"]) for p in r["predictions"]], r["error"]) for r in records]


@pytest.mark.numerics
def test_predict_cli_writes_results_in_order_and_keeps_bad_files_as_rows(model_dir, images, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("EFFNETV2_CACHE", str(tmp_path / "cache"))
    root, files = images
    good = [f for f in files if not f.endswith("broken.jpg")]
    expected = dict(zip(good, Predictor(str(model_dir), backend="torch").predict(good, top_k=3)))
    for suffix in (".jsonl", ".csv", ".parquet"):
        out = tmp_path / f"preds{suffix}"
        with pytest.warns(UserWarning) as record:  # data.report_bad_files: one warning for all bad files
            code = main(["--model", str(model_dir), str(root), "--top-k", "3", "--batch-size", "2", "--workers", "3",
                         "--backend", "torch", "--output", str(out)])
        assert code == 0
        [warning] = [str(r.message) for r in record if "unreadable" in str(r.message)]
        assert warning.startswith("skipping 1 unreadable image file(s)") and "broken.jpg: " in warning
        rows = read_results(out)
        assert [path for path, _, _ in rows] == files  # input order, the bad file in its place
        for path, top, error in rows:
            if path not in expected:
                assert top == [] and error.startswith("unreadable or truncated image")
                continue
            want = expected[path]
            assert error is None
            assert [label for label, _ in top] == [label for label, _ in want]
            assert [p for _, p in top] == pytest.approx([p for _, p in want], abs=1e-5)
            assert all(label.startswith("class_") for label, _ in top)


def test_predict_cli_table_and_errors(model_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EFFNETV2_CACHE", str(tmp_path / "cache"))
    root, files = images
    assert main(["--model", str(model_dir), files[0], "--backend", "torch", "--quiet", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(files[0]) and lines[0].count("class_") == 2
    with pytest.warns(UserWarning, match="empty: no such file or folder"):
        assert main(["--model", str(model_dir), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), str(root), "--output", str(tmp_path / "preds.txt")])
    assert main(["--model", str(tmp_path / "weights.pth"), str(root)]) == 2
    assert "not a full model" in capsys.readouterr().err
