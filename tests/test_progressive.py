import pytest

from effnetv2.errors import UsageError
from effnetv2.progressive import RANGES, progressive_plan, stage_for_epoch


@pytest.mark.parametrize("variant, sizes, magnitudes, mixups, dropouts", [
    # the paper's Table 6 ranges, 4 stages: value_i = min + (max - min) * i / 3
    ("s", [128, 185, 243, 300], [5, 8, 12, 15], [0, 0, 0, 0], [0.1, 0.1667, 0.2333, 0.3]),
    ("m", [128, 212, 296, 380], [5, 10, 15, 20], [0, 0.0667, 0.1333, 0.2], [0.1, 0.2, 0.3, 0.4]),
    ("l", [128, 212, 296, 380], [5, 12, 18, 25], [0, 0.1333, 0.2667, 0.4], [0.1, 0.2333, 0.3667, 0.5]),
    ("xl", [128, 212, 296, 380], [5, 12, 18, 25], [0, 0.1333, 0.2667, 0.4], [0.1, 0.2333, 0.3667, 0.5]),
    # b-variants: S's regularisation, sizes from train_size * 128/300 to train_size (b0: 192)
    ("b0", [82, 119, 155, 192], [5, 8, 12, 15], [0, 0, 0, 0], [0.1, 0.1667, 0.2333, 0.3]),
])
@pytest.mark.numerics
def test_paper_plan_per_variant(variant, sizes, magnitudes, mixups, dropouts):
    plan = progressive_plan(variant, epochs=8, num_stages=4)
    assert [s.index for s in plan] == [0, 1, 2, 3]
    assert [s.start_epoch for s in plan] == [0, 2, 4, 6]
    assert [s.image_size for s in plan] == sizes
    assert [s.randaugment for s in plan] == magnitudes
    assert [s.mixup for s in plan] == pytest.approx(mixups, abs=1e-4)
    assert [s.dropout for s in plan] == pytest.approx(dropouts, abs=1e-4)


@pytest.mark.parametrize("variant, train_size", [("b1", 192), ("b2", 208), ("b3", 240)])
def test_b_variants_end_at_their_train_size(variant, train_size):
    r = RANGES[variant]
    assert (r.max_size, r.min_size) == (train_size, round(train_size * 128 / 300))
    assert progressive_plan(variant, 4)[-1].image_size == train_size


def test_stage_boundaries_for_uneven_epochs():
    plan = progressive_plan("s", epochs=10, num_stages=4)
    assert [s.start_epoch for s in plan] == [0, 2, 5, 7]
    assert [stage_for_epoch(plan, e).index for e in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_max_size_caps_and_scales_the_sizes():
    plan = progressive_plan("s", epochs=4, num_stages=2, max_size=150)
    assert [s.image_size for s in plan] == [64, 150]  # 128 * 150 / 300 = 64
    assert [s.randaugment for s in plan] == [5, 15]  # regularisation is unchanged
    assert [s.image_size for s in progressive_plan("b0", 4, 2, max_size=64)] == [27, 64]
    assert progressive_plan("s", 4, 2, max_size=20)[0].image_size == 16  # never below 16 pixels


def test_one_stage_uses_the_final_settings():
    (stage,) = progressive_plan("m", epochs=3, num_stages=1)
    assert (stage.image_size, stage.randaugment, stage.mixup, stage.dropout) == (380, 20, 0.2, 0.4)


def test_describe_names_every_setting():
    text = progressive_plan("m", 8)[1].describe()
    for part in ("stage 2", "epoch 3", "image size 212", "RandAugment magnitude 10", "mixup 0.07", "dropout 0.20"):
        assert part in text


def test_errors():
    with pytest.raises(UsageError, match="at least 4 epochs"):
        progressive_plan("s", epochs=2, num_stages=4)
    with pytest.raises(UsageError, match="variant"):
        progressive_plan("z", epochs=8)
    with pytest.raises(UsageError, match="stages"):
        progressive_plan("s", epochs=8, num_stages=0)
