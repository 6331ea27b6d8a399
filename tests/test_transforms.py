"""``transforms_for`` builds exactly the preprocessing the converted weights expect."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from effnetv2 import EfficientNetV2, convert, transforms_for
from effnetv2.model import INTERPOLATIONS


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A non-square RGB image with detail at every scale (so resampling differences show)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (331, 500, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 500, dtype=np.float32)[None, :, None]
    return Image.fromarray(((noise.astype(np.float32) + ramp) / 2).astype(np.uint8))


def converted(variant: str) -> EfficientNetV2:
    with torch.device("meta"):  # only the config matters here
        source = getattr(torchvision.models, f"efficientnet_v2_{variant}")()
    return convert.from_torchvision(source.state_dict())


def test_every_interpolation_name_is_torchvisions_mode():  # transforms_for maps names by InterpolationMode(name)
    old = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC"}  # the table it replaced
    assert {name: T.InterpolationMode(name) for name in INTERPOLATIONS} == {
        name: getattr(T.InterpolationMode, member) for name, member in old.items()}


@pytest.mark.parametrize("variant", ["s", "l"])  # s: bilinear, ImageNet stats; l: bicubic, 0.5 stats
def test_eval_transform_equals_torchvision(variant, photo):
    model = converted(variant)
    weights = getattr(torchvision.models, f"EfficientNet_V2_{variant.upper()}_Weights").IMAGENET1K_V1
    ours, theirs = transforms_for(model)(photo), weights.transforms()(photo)
    assert ours.shape == theirs.shape == (3, model.config["image_size"], model.config["image_size"])
    assert torch.equal(ours, theirs)
    # The check is sharp: the wrong interpolation gives a different tensor.
    other = "bicubic" if model.config["interpolation"] == "bilinear" else "bilinear"
    assert not torch.equal(transforms_for({**model.config, "interpolation": other})(photo), theirs)


@pytest.mark.numerics
def test_eval_transform_equals_timm(photo):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        source = timm.create_model("tf_efficientnetv2_b0")
    model = convert.from_timm(source)
    config = timm.data.resolve_data_config({}, model=source, use_test_size=True)
    theirs = timm.data.create_transform(**config)(photo)
    assert theirs.shape == (3, 224, 224)
    torch.testing.assert_close(transforms_for(model)(photo), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("magnitude", [0, 9])
def test_train_transform_equals_torchvision_reference_pipeline(photo, magnitude):
    """torchvision's classification training preset (references/classification/presets.py), written
    out with EfficientNetV2-S's published preprocessing: bilinear, ImageNet mean/std, 300 px."""

    bilinear = T.InterpolationMode.BILINEAR
    steps = [T.RandomResizedCrop(300, scale=(0.08, 1.0), interpolation=bilinear, antialias=True),
             T.RandomHorizontalFlip(0.5)]
    if magnitude:
        steps.append(T.RandAugment(magnitude=magnitude, interpolation=bilinear))
    reference = T.Compose(steps + [T.PILToTensor(), T.ConvertImageDtype(torch.float),
                                   T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ours = transforms_for(converted("s"), train=True, randaugment_magnitude=magnitude)
    outputs = []
    for seed in range(4):  # several draws, so crops, flips and operations all differ between them
        torch.manual_seed(seed)
        expected = reference(photo)
        torch.manual_seed(seed)
        outputs.append(ours(photo))
        assert torch.equal(outputs[-1], expected), seed
    assert outputs[0].shape == (3, 300, 300) and not torch.equal(outputs[0], outputs[1])


def test_train_transform_size_and_crop_scale(photo):
    model = converted("s")
    assert transforms_for(model, train=True, image_size=128, randaugment_magnitude=9)(photo).shape == (3, 128, 128)
    with pytest.raises(ValueError, match="crop scale"):
        transforms_for(model, train=True, scale=(0.5, 0.2))
