"""effnetv2.run_folder: a run's checkpoints, its data record and the output folder's rules."""
import json
import shutil

import pytest

from effnetv2.run_folder import (OutputDirError, RunError, check_finite, check_output_dir, data_changes,
                                 data_fingerprint, find_resume_checkpoint, list_checkpoints, prune_checkpoints,
                                 start_output_dir)


def test_list_checkpoints_is_complete_ones_in_epoch_order(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    for name in ("epoch_10", "epoch_2", "epoch_9", ".tmp_epoch_11", "epoch_3", "epoch_x", "other_4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.json").write_text("{}")
    (tmp_path / "epoch_3" / "train_state.json").unlink()  # interrupted before it was complete
    (tmp_path / "epoch_12").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_2", "epoch_9", "epoch_10"]


def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    owners = {1: "me", 2: "other", 3: "me", 4: None, 5: "me"}  # None: a checkpoint from before run ids
    for epoch, owner in owners.items():
        (tmp_path / f"epoch_{epoch}").mkdir()
        (tmp_path / f"epoch_{epoch}" / "train_state.json").write_text(json.dumps({"run_id": owner} if owner else {}))
    assert prune_checkpoints(tmp_path, "me", keep=2) == [tmp_path / "epoch_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2", "epoch_3", "epoch_4", "epoch_5"]


def test_the_data_fingerprint_names_what_changed(tmp_path):
    data = tmp_path / "data"
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"12345")
    train_set = [(str(data / "a" / "1.png"), 0), (str(data / "b" / "3.png"), 1)]
    val_set = [(str(data / "a" / "2.png"), 0)]
    saved = data_fingerprint(data, train_set, val_set)
    assert data_changes(saved, data_fingerprint(data, train_set, val_set)) == []
    (data / "b" / "3.png").write_bytes(b"123456")  # same names, one file one byte longer
    changed = data_changes(saved, data_fingerprint(data, train_set, val_set))
    assert len(changed) == 1 and changed[0].startswith("image files (same counts, other names, classes or sizes")
    swapped = [(str(data / "a" / "1.png"), 1), (str(data / "b" / "3.png"), 0)]  # same files, other labels
    assert data_changes(data_fingerprint(data, train_set, val_set), data_fingerprint(data, swapped, val_set))
    moved = shutil.copytree(data, tmp_path / "moved")
    assert data_changes(saved, data_fingerprint(moved, [(str(moved / "a" / "1.png"), 0)], [])) == [
        f"--data-path ({data.resolve()} vs {moved.resolve()})", "training images (2 vs 1)",
        "validation images (1 vs 0)"]
    assert data_changes(None, saved) == ["data (the checkpoint records none: it was written by an older train.py)"]


def test_an_output_dir_of_other_files_is_never_cleared(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="holds no train.py run: choose a new or empty folder"):
            check_output_dir(folder, overwrite=overwrite)
    (folder / "holiday.jpg").unlink()
    (folder / ".gitkeep").write_text("")
    check_output_dir(folder)  # hidden files aside, it is empty


def checkpoint(folder, epoch, run_id="me", **args):
    (folder / f"epoch_{epoch}").mkdir(parents=True)
    state = {"run_id": run_id, "args": {"lr": 0.1, **args}, "data": {"path": "/d", "train_images": 4,
                                                                      "val_images": 2, "sha256": "ab" * 32}}
    (folder / f"epoch_{epoch}" / "train_state.json").write_text(json.dumps(state))
    return folder / f"epoch_{epoch}"


def test_find_resume_checkpoint_takes_only_this_runs(tmp_path):
    folder = tmp_path / "checkpoints"
    with pytest.raises(RunError, match=f"--resume latest: no complete checkpoint in {folder}; start without") as info:
        find_resume_checkpoint("latest", folder, {}, {})
    assert info.value.status == 2
    checkpoint(folder, 1)
    latest = checkpoint(folder, 2)
    data = {"path": "/d", "train_images": 4, "val_images": 2, "sha256": "ab" * 32}
    path, state = find_resume_checkpoint("latest", folder, {"lr": 0.1}, data)
    assert path == latest and state["run_id"] == "me"
    assert find_resume_checkpoint(str(folder / "epoch_1"), folder, {"lr": 0.1}, data)[0] == folder / "epoch_1"
    with pytest.raises(RunError, match=r"--resume .*epoch_2: the checkpoint was made with different --lr \(0.1 vs 0.2\), "
                                       r"training images \(4 vs 5\); resume with the original settings"):
        find_resume_checkpoint("latest", folder, {"lr": 0.2}, {**data, "train_images": 5})
    # settings outside the compared keys may change (e.g. --workers, --max-steps)
    assert find_resume_checkpoint("latest", folder, {"lr": 0.1, "workers": 9}, data)[0] == latest


def test_check_finite_names_the_epoch_lr_and_last_checkpoint(tmp_path):
    check_finite(0.5, 3, 0.05, "sgd", tmp_path)  # finite: nothing happens
    for loss in (float("nan"), float("inf")):
        with pytest.raises(RunError, match=f"training diverged in epoch 3: the training loss became {loss} "
                                           r"\(peak lr 0.05, sgd\). Nothing of this epoch was saved. Run again") as info:
            check_finite(loss, 3, 0.05, "sgd", tmp_path)
        assert info.value.status == 1
    last = checkpoint(tmp_path, 2)
    with pytest.raises(RunError, match=f"the last checkpoint written is {last}"):
        check_finite(float("nan"), 3, 0.05, "sgd", tmp_path)


def test_start_output_dir_clears_only_with_overwrite(tmp_path):
    class Data:
        def save(self, out):
            (out / "split.json").write_text("{}")

    out = tmp_path / "run"
    start_output_dir(out, Data(), overwrite=False)
    (out / "model.safetensors").write_text("an earlier run's")
    start_output_dir(out, Data(), overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "split.json"]
    (out / "checkpoints" / "epoch_1").mkdir(parents=True)
    start_output_dir(out, Data(), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["split.json"]
