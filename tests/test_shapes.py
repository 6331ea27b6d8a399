"""effnetv2.shapes: the synthetic set is deterministic, boxed exactly, not given away by colour; its CLI."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from effnetv2.data import scan_folder
from effnetv2.data.__main__ import main
from effnetv2.shapes import MIN_CONTRAST, SHAPES, background, draw_shape, make_shapes_dataset


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "a", num_per_class=24, image_size=48, seed=7)


def test_same_seed_same_bytes_other_seed_other_images(shapes_set, tmp_path):
    again = make_shapes_dataset(tmp_path / "b", num_per_class=3, image_size=48, seed=7)
    other = make_shapes_dataset(tmp_path / "c", num_per_class=3, image_size=48, seed=8)
    names = sorted(json.loads((again / "annotations.json").read_text()))
    assert len(names) == 15
    for name in names:
        assert (again / name).read_bytes() == (shapes_set / name).read_bytes()
        assert (other / name).read_bytes() != (again / name).read_bytes()
    first = json.loads((shapes_set / "annotations.json").read_text())
    assert json.loads((again / "annotations.json").read_text()) == {n: first[n] for n in names}


def test_annotations_cover_every_image_with_a_box_inside_it(shapes_set):
    annotations = json.loads((shapes_set / "annotations.json").read_text())
    samples, classes = scan_folder(shapes_set)
    assert classes == sorted(SHAPES) and len(samples) == len(annotations) == 5 * 24
    for name, entry in annotations.items():
        x0, y0, x1, y1 = entry["box"]
        assert entry["label"] == name.split("/")[0]
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        assert (x1 - x0) * (y1 - y0) >= 0.06 * 48 * 48  # an object, not a speck
        with Image.open(shapes_set / name) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)


@pytest.mark.parametrize("kind", SHAPES)
def test_box_is_exactly_the_drawn_object(kind):
    for seed in range(4):
        rng = random.Random(seed)
        scene = background(rng, 64)
        before = np.asarray(scene).astype(int)
        box = draw_shape(scene, kind, rng)
        changed = np.abs(np.asarray(scene).astype(int) - before).sum(-1) > 0
        ys, xs = np.nonzero(changed)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box
        x0, y0, x1, y1 = box
        assert changed[y0:y1, x0:x1].mean() > 0.3  # the object fills its box, whatever its rotation
        fill = np.asarray(scene)[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)  # every class covers its centre
        under = before[y0:y1, x0:x1][changed[y0:y1, x0:x1]].mean(0)
        assert np.linalg.norm(fill - under) >= MIN_CONTRAST * 0.8  # stands out from what it covers


def test_colour_does_not_give_away_the_class(shapes_set):
    """A nearest-class-mean classifier on the object's mean colour is no better than chance."""
    annotations = json.loads((shapes_set / "annotations.json").read_text())
    features, labels = [], []
    for name, entry in sorted(annotations.items()):
        x0, y0, x1, y1 = entry["box"]
        features.append(np.asarray(Image.open(shapes_set / name))[y0:y1, x0:x1].reshape(-1, 3).mean(0))
        labels.append(SHAPES.index(entry["label"]))
    features, labels = np.array(features), np.array(labels)
    train = np.arange(len(labels)) % 2 == 0
    means = np.stack([features[train & (labels == c)].mean(0) for c in range(5)])
    predicted = np.linalg.norm(features[~train, None] - means[None], axis=-1).argmin(-1)
    assert (predicted == labels[~train]).mean() < 0.4  # chance is 0.2


def test_writing_again_replaces_only_its_own_files(tmp_path):
    root = make_shapes_dataset(tmp_path, num_per_class=3, image_size=32, seed=1)
    (root / "circle" / "mine.png").write_bytes(b"user file")
    (root / "notes.txt").write_text("keep me")
    make_shapes_dataset(root, num_per_class=2, image_size=32, seed=1, classes=("circle", "star"))
    assert sorted(p.name for p in (root / "circle").iterdir()) == ["circle_0000.png", "circle_0001.png", "mine.png"]
    assert not list((root / "square").iterdir()) and (root / "notes.txt").read_text() == "keep me"
    assert sorted(json.loads((root / "annotations.json").read_text())) == [
        "circle/circle_0000.png", "circle/circle_0001.png", "star/star_0000.png", "star/star_0001.png"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown shape classes \\['oval'\\]"):
        make_shapes_dataset(tmp_path, classes=("circle", "oval"))
    with pytest.raises(ValueError, match="at least two"):
        make_shapes_dataset(tmp_path, classes=("circle", "circle"))
    with pytest.raises(ValueError, match="image_size >= 16"):
        make_shapes_dataset(tmp_path, image_size=8)
    with pytest.raises(SystemExit) as exit_info:
        main(["shapes", str(tmp_path), "--num-per-class", "0"])
    assert exit_info.value.code == 2 and not list(tmp_path.iterdir())


def test_shapes_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "effnetv2.data", "shapes", str(tmp_path / "s"),
                          "--num-per-class", "2", "--image-size", "32", "--seed", "3"],
                         capture_output=True, text=True, check=True)
    assert "wrote 10 images of 32x32 px in 5 classes" in out.stdout and "annotations.json" in out.stdout
    samples, classes = scan_folder(tmp_path / "s")
    assert len(samples) == 10 and len(classes) == 5
    made = make_shapes_dataset(tmp_path / "t", num_per_class=2, image_size=32, seed=3)
    assert (made / "star" / "star_0001.png").read_bytes() == (tmp_path / "s" / "star" / "star_0001.png").read_bytes()


def test_without_clutter_the_background_is_plain(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    root = make_shapes_dataset(tmp_path / "plain", num_per_class=2, image_size=64, seed=3, clutter=False)
    cluttered = make_shapes_dataset(tmp_path / "busy", num_per_class=2, image_size=64, seed=3)
    boxes = json.loads((root / "annotations.json").read_text())

    def outside_spread(folder, name):
        pixels = np.asarray(Image.open(folder / name), dtype=float)
        x0, y0, x1, y1 = boxes[name]["box"]
        mask = np.ones(pixels.shape[:2], bool)
        mask[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False
        return pixels[mask].std(0).max()

    assert all(outside_spread(root, name) < 15 for name in boxes)  # one colour and mild noise
    assert np.mean([outside_spread(cluttered, name) for name in boxes]) > 25  # gradients and distractors
