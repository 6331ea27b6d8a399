"""``transforms_for`` builds exactly the preprocessing the converted weights expect."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from effnetv2 import EfficientNetV2, convert, transforms_for


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


def test_eval_transform_equals_timm(photo):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        source = timm.create_model("tf_efficientnetv2_b0")
    model = convert.from_timm(source)
    config = timm.data.resolve_data_config({}, model=source, use_test_size=True)
    theirs = timm.data.create_transform(**config)(photo)
    assert theirs.shape == (3, 224, 224)
    torch.testing.assert_close(transforms_for(model)(photo), theirs, rtol=0, atol=1e-6)


def test_train_transform_shape(photo):
    model = converted("s")
    out = transforms_for(model, train=True)(photo)
    assert out.shape == (3, 300, 300) and out.dtype == torch.float32
    assert transforms_for(model, train=True, image_size=128, randaugment_magnitude=9)(photo).shape == (3, 128, 128)
