"""train.py and effnetv2.evaluate on Hub datasets, downloaded (and streamed) through the test Hub's HTTP
API with the real ``datasets`` client; save_to_disk folders; bad rows; columns; --report-to trackio."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effnetv2 import EfficientNetV2, transforms_for
from effnetv2.data import DatasetError
from effnetv2.hub_data import load_training_data, open_hub_dataset
from effnetv2.images import open_image
from hub_datasets import CLASSES, features, hub_files, shapes_rows
from hubserver import hub_server, point_datasets_at  # noqa: F401  (hub_server: fixture)
from pngs import png_claiming
from test_train import SMOKE, launch_two_processes as launch, metrics_of
from train_script import fresh_accelerate, train  # noqa: F401  (fresh_accelerate: autouse)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Training rows (6 per class, 18 in all) and validation rows (2 per class) of rendered shapes."""
    root = tmp_path_factory.mktemp("shapes")
    return shapes_rows(root / "train", 6, seed=0), shapes_rows(root / "val", 2, seed=1)


@pytest.fixture
def hub(hub_server, rows, monkeypatch, tmp_path):
    """The test Hub serving ``org/shapes`` (train and validation splits, 2 parquet shards each); the
    datasets cache is this test's own."""
    point_datasets_at(monkeypatch, hub_server.url, tmp_path / "datasets-cache")
    hub_server.add_dataset("org/shapes", hub_files({"train": rows[0], "validation": rows[1]}))
    return hub_server


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def launch_two_processes(*args: str, env: dict | None = None) -> str:
    """``accelerate launch`` of train.py on 2 CPU processes (gloo; see test_train's two-process test);
    returns the log."""
    result = launch(*args, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def test_two_processes_download_a_hub_dataset_and_train_with_its_validation_split(hub, tmp_path, capsys):
    out = tmp_path / "run"
    launch_two_processes("--dataset", "org/shapes", "--output-dir", str(out), *SMOKE, "--epochs", "1")
    sha = hub.head("datasets/org/shapes")
    assert any(path == f"/api/datasets/org/shapes/revision/{sha}" for _, path in hub.requests)
    m = metrics_of(out)
    assert m["train_images"] == 18 and m["final"]["val_images"] == 6  # the validation split, not 20% of train
    assert m["classes"] == CLASSES and m["processes"] == 2 and m["replicas_in_sync"]
    split = json.loads((out / "split.json").read_text())
    assert split["dataset"] == "org/shapes" and split["revision"] == sha and split["val"]["split"] == "validation"
    assert sorted(split["train"]["rows"]) == list(range(18))
    card = (out / "README.md").read_text()
    assert "datasets:\n- org/shapes\n" in card
    assert f"name: org/shapes\n      type: org/shapes\n      split: validation\n      revision: {sha}" in card
    assert "--dataset org/shapes" in card and str(tmp_path) not in card and "datasets-cache" not in card

    # the resume check knows the data: another revision of the dataset is refused
    hub.add_dataset("org/shapes", {"extra.txt": b"a new commit"})
    capsys.readouterr()
    assert train.main(["--dataset", "org/shapes", "--output-dir", str(out), *SMOKE, "--epochs", "2",
                       "--resume", "latest"]) == 2
    assert f"the dataset's revision ({sha} vs {hub.head('datasets/org/shapes')})" in capsys.readouterr().out


def test_a_save_to_disk_folder_with_bad_rows_is_split_like_a_folder(rows, tmp_path, capsys):
    import datasets

    train_rows = {key: list(values) for key, values in rows[0].items()}
    good = train_rows["image"][0]["bytes"]
    sixteen = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # a 16-bit grey PNG
    bad = {1: good[: len(good) // 2], 4: b"not an image" * 9,  # truncated, garbage
           7: png_claiming(20000, 20000, colour_type=0)}  # over the pixel limit
    for index, data in bad.items():
        train_rows["image"][index] = {"bytes": data, "path": None}
    train_rows["image"][2] = {"bytes": png(sixteen), "path": None}
    folder = tmp_path / "my_shapes"
    datasets.Dataset.from_dict(train_rows, features=features()).save_to_disk(str(folder))

    with pytest.warns(UserWarning, match="3 unreadable") as record:
        data = load_training_data(dataset=str(folder), val_fraction=0.2, seed=0, workers=2)
    text = "\n".join(str(w.message) for w in record)
    assert all(f"my_shapes train row {i}:" in text for i in bad)
    assert "20000x20000 pixels is more than the 200,000,000 allowed" in text
    # the folders' seeded stratified split of the 15 good rows: per class round(n * 0.2), at least one
    labels = [train_rows["label"][i] for i in range(18) if i not in bad]
    assert len(data.val) == sum(max(1, int(labels.count(c) * 0.2 + 0.5)) for c in range(3))
    assert sorted(i for i, _ in data.train.samples + data.val.samples) == sorted(set(range(18)) - set(bad))
    assert data.classes == CLASSES and data.card["dataset_name"] == "my_shapes" and "datasets" not in data.card
    # the 16-bit row decodes as effnetv2.images decodes the same file (its high byte)
    assert np.array_equal(np.array(data.train.read(2)), np.array(open_image(png(sixteen))))
    assert np.array(data.train.read(2))[0, 1, 0] == (64 >> 8) and np.array(data.train.read(2))[10, 0, 0] == (320 * 64) >> 8

    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="3 unreadable"):
        assert train.main(["--dataset", str(folder), "--output-dir", str(out), *SMOKE, "--max-steps", "1",
                           "--epochs", "1"]) == 0
    card = (out / "README.md").read_text()
    assert "datasets:" not in card and "name: my_shapes" in card and str(tmp_path) not in card
    assert "--dataset my_shapes" in card  # the published command names the folder, not its path
    assert "--max-steps 1: stopping 1 of 3 optimizer steps into epoch 1" in capsys.readouterr().out


def test_wrong_column_names_are_one_error_naming_the_columns(rows, tmp_path):
    import datasets

    folder = tmp_path / "ds"
    table = {"picture": rows[1]["image"], "kind": rows[1]["label"], "note": ["x"] * 6}
    datasets.Dataset.from_dict(table, features=datasets.Features(
        {"picture": datasets.Image(), "kind": datasets.ClassLabel(names=CLASSES), "note": datasets.Value("string")}
    )).save_to_disk(str(folder))
    listing = "picture (Image), kind (ClassLabel), note (Value(string))"
    with pytest.raises(DatasetError, match=r"--image-column image: the dataset has no such column; its columns are "
                                           + listing.replace("(", r"\(").replace(")", r"\)")):
        open_hub_dataset(str(folder), image_column="image")
    with pytest.raises(DatasetError, match=r"--label-column note is a Value\(string\) column, not ClassLabel"):
        open_hub_dataset(str(folder), label_column="note")
    hub = open_hub_dataset(str(folder))  # found from the features
    assert (hub.image_column, hub.label_column, hub.classes) == ("picture", "kind", CLASSES)


class _Process:
    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")


def test_streaming_shards_are_disjoint_across_processes(hub, rows):
    """Each of 2 processes streams its own parquet shard of the training split: their images are
    disjoint, and together they are the whole split."""
    seen = []
    for rank in range(2):
        data = load_training_data(dataset="org/shapes", streaming=True, seed=0)
        assert len(data.train) == 18 and len(data.val) == 6 and data.classes == CLASSES
        loader, _, _ = data.loaders(_Process(rank, 2), 1, 0, transforms_for(EfficientNetV2("b0", num_classes=3,
                                                                                            image_size=32)), 0, 0)
        data.train.set_transform(None)  # the decoded pixels, to compare
        assert len(loader) == 9  # 18 // (batch 1 * 2 processes)
        seen.append({x.numpy().tobytes(): int(y) for x, y in loader})
    assert len(seen[0]) == len(seen[1]) == 9 and not set(seen[0]) & set(seen[1])
    expected = {torch.from_numpy(np.array(open_image(cell["bytes"]))).permute(2, 0, 1).float().div(255).numpy()
                .tobytes(): label for cell, label in zip(rows[0]["image"], rows[0]["label"])}
    assert {**seen[0], **seen[1]} == expected


def test_two_processes_stream_a_hub_dataset_and_report_to_trackio(hub, tmp_path):
    out, env = tmp_path / "run", {"TRACKIO_DIR": str(tmp_path / "trackio")}
    log = launch_two_processes("--dataset", "org/shapes", "--streaming", "--output-dir", str(out), *SMOKE,
                               "--batch-size", "3", "--epochs", "2", "--report-to", "trackio", env=env)
    assert "process 0 of 2: streaming shards [0] of 2" in log and "process 1 of 2: streaming shards [1] of 2" in log
    m = metrics_of(out)
    assert m["processes"] == 2 and m["replicas_in_sync"]
    assert m["steps_per_epoch"] == 3 and [h["train_images"] for h in m["history"]] == [18, 18]  # 3 steps of 3 x 2
    assert m["final"]["val_images"] == 6  # the validation split, read once by the main process, counted once
    card = (out / "README.md").read_text()
    assert "datasets:\n- org/shapes\n" in card and "--dataset org/shapes --streaming" in card

    # the series the run logged, read back through trackio's own API
    reader = ("import json, trackio; run = trackio.Api().runs('effnetv2')[0]; print(json.dumps({k: "
              "[v['value'] for v in trackio.SQLiteStorage.get_metric_values('effnetv2', run.name, k)] "
              "for k in ('train/loss', 'train/lr', 'val/accuracy')}))")
    series = json.loads(subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True,
                                       env={**os.environ, **env}, check=True).stdout.splitlines()[-1])
    assert len(series["train/loss"]) == len(series["train/lr"]) == 6 and len(series["val/accuracy"]) == 2
    assert series["val/accuracy"][-1] == pytest.approx(m["final"]["val_accuracy"])
    assert series["train/lr"][-1] == pytest.approx(m["final"]["lr"]) and series["train/lr"][0] > series["train/lr"][-1]


def test_evaluate_on_a_hub_split_gives_the_accuracy_table(hub, tmp_path, capsys):
    from effnetv2.evaluate.__main__ import main as evaluate_main

    model = EfficientNetV2("b0", num_classes=3, id2label=dict(enumerate(CLASSES)), image_size=32).eval()
    model.head.classifier.bias.data = torch.tensor([0.0, 0.3, 0.0])  # mostly "square": some right, some wrong
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert evaluate_main(["--model", str(folder), "--dataset", "org/shapes", "--json", str(tmp_path / "r.json"),
                          "--update-card"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    # the same figures computed here, row by row, from the split's bytes
    import datasets

    split = datasets.load_dataset("org/shapes", split="validation").cast_column("image", datasets.Image(decode=False))
    transform = transforms_for(model)
    with torch.no_grad():
        predicted = [CLASSES[int(model(transform(open_image(row["image"]["bytes"]))[None]).argmax())] for row in split]
    truth = [CLASSES[label] for label in split["label"]]
    hits = [p == t for p, t in zip(predicted, truth)]
    assert result["images"] == 6 and result["accuracy"] == pytest.approx(sum(hits) / 6)
    assert result["per_class_accuracy"] == pytest.approx(
        {c: sum(h for h, t in zip(hits, truth) if t == c) / truth.count(c) for c in CLASSES})
    card = (folder / "README.md").read_text()
    assert f"| accuracy | {sum(hits) / 6:.4f} |" in card and "6 images of split `validation` of `org/shapes`" in card
    assert "name: org/shapes" in card and "split: validation" in card
    assert evaluate_main(["--model", str(folder), "--dataset", "org/shapes", "--split", "test"]) == 2
    assert "--split test: org/shapes has the splits train, validation" in capsys.readouterr().err
