"""`python -m effnetv2.predict`: files and folders, batching, bad files kept as rows with their error and
reported, order kept."""
from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from effnetv2 import predict
from effnetv2.inference import Predictor
from effnetv2.predict import OUTPUT_FORMATS, Prediction, find_images, write_results
from effnetv2.predict.__main__ import main
from inference_models import realistic_model

ROOT = Path(__file__).resolve().parents[1]


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

def wait_for_bytes(proc: subprocess.Popen, folder: Path, size: int, seconds: float) -> None:
    """Return once the files in ``folder`` hold ``size`` bytes, failing if ``proc`` ends or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while sum(p.stat().st_size for p in folder.iterdir()) < size:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)



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
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="broken symbolic link"):
        (tmp_path / "empty" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
        assert main(["--model", str(model_dir), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), str(root), "--output", str(tmp_path / "preds.txt")])
    assert main(["--model", str(tmp_path / "weights.pth"), str(root)]) == 2
    assert "not a full model" in capsys.readouterr().err


def test_an_input_that_does_not_exist_stops_the_command_with_one_line(model_dir, images, tmp_path, capfd):
    root, _ = images
    out = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "effnetv2.predict", "--model", str(model_dir), str(root),
                           str(tmp_path / "photos2"), "--output", str(out)], capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: no such file or folder: {tmp_path / 'photos2'}"]
    assert not out.exists()


def deny_listing(monkeypatch, folder):
    """``folder`` made unreadable: mode 0, and for root, whom modes do not stop, ``os.scandir`` refusing it
    as the kernel refuses anyone else."""
    folder.chmod(0)
    if os.geteuid() == 0:
        scandir = os.scandir

        def refusing(path="."):
            if Path(path) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return scandir(path)
        monkeypatch.setattr(os, "scandir", refusing)


def test_what_a_folder_holds_that_cannot_be_read_is_a_row_each(images, tmp_path, monkeypatch):
    root, expected = images
    os.mkfifo(root / "stream.jpg")  # opening it would wait for a writer forever
    (root / "b" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "b" / "loop.jpg").symlink_to(root / "b" / "loop.jpg")  # a link to itself
    (root / "b" / "up").symlink_to(root)  # a link to a folder above: a loop
    (root / "linked").symlink_to(root / "b" / "deeper")  # a link to a folder: followed
    (root / "locked").mkdir()
    Image.new("RGB", (8, 8)).save(root / "locked" / "hidden.jpg")
    deny_listing(monkeypatch, root / "locked")
    try:
        files, problems = find_images([root])
    finally:
        (root / "locked").chmod(0o755)
    assert files == sorted(expected + [str(root / "linked" / "d.webp")])
    reasons = dict(problems)
    assert [path for path, _ in problems] == sorted(reasons)
    assert reasons.keys() == {str(root / n) for n in ("stream.jpg", "b/gone.png", "b/loop.jpg", "b/up", "locked")}
    assert reasons[str(root / "stream.jpg")] == "a FIFO (named pipe), not an image file: not read"
    target = root / "nowhere.png"
    assert reasons[str(root / "b" / "gone.png")] == f"broken symbolic link: its target {target} does not exist"
    assert reasons[str(root / "b" / "loop.jpg")].startswith("symbolic link loop")
    assert reasons[str(root / "b" / "up")].startswith("symbolic link loop: it leads back to a folder above it")
    assert reasons[str(root / "locked")].startswith("folder could not be listed (Permission denied)")


def test_inputs_on_the_command_line_are_named_for_what_they_are(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "self").symlink_to(tmp_path / "self")
    files, problems = find_images([tmp_path / "pipe", tmp_path / "gone.jpg", tmp_path / "self", tmp_path / "nope"])
    assert files == []
    assert [(Path(path).name, reason.split(":")[0]) for path, reason in problems] == [
        ("pipe", "a FIFO (named pipe), not an image file"), ("gone.jpg", "broken symbolic link"),
        ("self", "symbolic link loop"), ("nope", "no such file or folder")]


def test_fifos_in_a_folder_are_rows_and_the_run_ends(model_dir, images, tmp_path):
    root, files = images
    os.mkfifo(root / "b" / "live.png")
    out = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "effnetv2.predict", "--model", str(model_dir), str(root), "--backend",
                           "torch", "--quiet", "--output", str(out)], capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=120)  # a FIFO opened for reading would block forever
    assert proc.returncode == 0, proc.stderr
    rows = read_results(out)
    assert [path for path, _, _ in rows] == files + [str(root / "b" / "live.png")]
    assert rows[-1][2] == "a FIFO (named pipe), not an image file: not read"


@pytest.mark.parametrize("case", ["folder", "under a file", "unwritable"])
def test_an_output_that_cannot_be_written_stops_the_command_before_any_image_is_read(model_dir, images, tmp_path,
                                                                                    monkeypatch, capsys, case):
    root, _ = images
    out = {"folder": tmp_path / "results.jsonl", "under a file": tmp_path / "notes.txt" / "preds.jsonl",
           "unwritable": tmp_path / "locked" / "preds.jsonl"}[case]
    (tmp_path / "results.jsonl").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "locked").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: the folder refuses as it would refuse anyone else
        temporary_file = tempfile.TemporaryFile

        def refusing(*args, dir=None, **kwargs):
            if Path(dir) == tmp_path / "locked":
                raise PermissionError(errno.EACCES, "Permission denied")
            return temporary_file(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "TemporaryFile", refusing)
    opened = []
    monkeypatch.setattr(predict, "open_image", lambda path: opened.append(path))
    assert main(["--model", str(model_dir), str(root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --output {out} ")
    assert {"folder": "is a folder", "under a file": f"{tmp_path / 'notes.txt'} is a file",
            "unwritable": "Permission denied"}[case] in err
    assert opened == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "notes.txt", "photos", "results.jsonl"]
    assert list((tmp_path / "results.jsonl").iterdir()) == list((tmp_path / "locked").iterdir()) == []


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("suffix", OUTPUT_FORMATS)
def test_a_failed_write_leaves_the_previous_output_and_no_partial_file(tmp_path, suffix):
    out = tmp_path / f"preds{suffix}"
    previous = [Prediction("old.jpg", [("a", 0.5)])]
    write_results(previous, out)
    before = out.read_bytes()

    def rows():
        for i in range(5000):  # more than a Parquet row group and a file buffer
            yield Prediction(f"{i}.jpg", [("b", 0.25)])
        raise Interrupted

    with pytest.raises(Interrupted):
        write_results(rows(), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    write_results(rows_of(3), out)
    assert [path for path, _, _ in read_results(out)] == ["0.jpg", "1.jpg", "2.jpg"]


def rows_of(n):
    return [Prediction(f"{i}.jpg", [("b", 0.25)]) for i in range(n)]


def cli_env(tmp_path):
    """The environment of a CLI subprocess: this checkout's effnetv2, its own graph cache, no network."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "EFFNETV2_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def test_a_killed_run_leaves_the_previous_results_whole(model_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    out = tmp_path / "out" / "preds.jsonl"
    write_results(rows_of(3), out)
    before = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "effnetv2.predict", "--model", str(model_dir), str(folder),
                             "--backend", "torch", "--batch-size", "4", "--workers", "1", "--quiet", "--output",
                             str(out)], env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # mid-run: some rows are written (somewhere in the output's folder), not all of them
        wait_for_bytes(proc, out.parent, len(before) + 4000, seconds=120)
    finally:
        proc.kill()
        proc.wait()
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["preds.jsonl"]
