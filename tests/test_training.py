"""effnetv2/training.py helpers on their own: mixup and CutMix (checked from the images they return, not
from the code's own draws), label smoothing, the
confusion matrix's orientation, checkpoint listing. The build/freeze/BatchNorm
helpers are tested in test_train.py."""

import pytest
import torch
import torch.nn.functional as F

from effnetv2 import EfficientNetV2
from effnetv2.training import (backbone_batchnorm_eval, confusion_matrix, epoch_coverage, evaluate, freeze_backbone,
                               mix_batch, recalibrate_batchnorm)

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md


def smoothed_onehot(y: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Label smoothing by hand: ``eps / C`` everywhere, ``1 - eps + eps / C`` at the label."""
    targets = torch.full((len(y), num_classes), eps / num_classes)
    targets[torch.arange(len(y)), y] = 1 - eps + eps / num_classes
    return targets


def recover_mixup(x: torch.Tensor, mixed: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(lam, perm)`` with ``mixed = lam * x + (1 - lam) * x[perm]``, read off the images ``[B, ...]``.

    A changed row ``d = mixed[i] - x[i] = (1 - lam) (x[j] - x[i])`` lies along exactly one ``x[j] - x[i]``
    (the least-squares fit leaves no residual); an unchanged row is its own partner. Asserts that one
    ``lam`` fits every changed row. With no changed row, lam is 1 (any value gives the same targets).
    """
    flat, out = x.flatten(1).double(), mixed.flatten(1).double()
    perm, lams = torch.arange(len(x)), []
    for i in range(len(x)):
        d = out[i] - flat[i]
        if d.norm() <= 1e-6 * flat[i].norm():
            continue
        fits = []
        for j in range(len(x)):
            direction = flat[j] - flat[i]
            if j == i or direction.norm() == 0:
                continue
            mu = (d @ direction) / (direction @ direction)
            fits.append(((d - mu * direction).norm() / d.norm(), j, 1 - mu.item()))
        residual, perm[i], lam = min(fits)
        assert residual < 1e-4, f"row {i} is no blend of two images of the batch (residual {residual:.2e})"
        lams.append(lam)
    assert max(lams, default=1.0) - min(lams, default=1.0) < 1e-4, f"rows mixed with different lambdas: {lams}"
    return (sum(lams) / len(lams) if lams else 1.0), perm


def find_cutmix(x: torch.Tensor, mixed: torch.Tensor) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """``((y0, y1, x0, x1), perm)``: the one box of ``mixed`` ``[B, C, H, W]`` pasted from ``x[perm]``.

    The box is the bounding box of every changed pixel of the batch; asserts that inside it each row is
    exactly one image of the batch (``x[perm[i]]``) and outside it the row is untouched.
    """
    changed = (mixed != x).any(1).any(0)  # [H, W]
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    if not len(rows):
        return (0, 0, 0, 0), torch.arange(len(x))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    outside = torch.ones(x.shape[-2:], dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(mixed[..., outside], x[..., outside])
    perm = torch.empty(len(x), dtype=torch.long)
    for i in range(len(x)):
        sources = [j for j in range(len(x)) if torch.equal(mixed[i, :, y0:y1, x0:x1], x[j, :, y0:y1, x0:x1])]
        assert sources, f"row {i}: the box holds no image of the batch"
        perm[i] = sources[0]
    return (y0, y1, x0, x1), perm


def batch(generator_seed: int = 0, size: int = 8, side: int = 12):
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randn(size, 3, side, side, generator=g), torch.randint(0, 5, (size,), generator=g)


def test_label_smoothing_alone_keeps_the_images_and_smooths_the_labels():
    x, y = batch()
    mixed, targets = mix_batch(x, y, 5, label_smoothing=0.1)
    assert torch.equal(mixed, x)
    assert torch.allclose(targets, smoothed_onehot(y, 5, 0.1))
    assert torch.allclose(targets.max(1).values, torch.full((8,), 0.92))  # 1 - 0.1 + 0.1 / 5
    assert torch.allclose(targets.min(1).values, torch.full((8,), 0.02))  # 0.1 / 5
    assert torch.equal(mix_batch(x, y, 5)[1], F.one_hot(y, 5).float())


@pytest.mark.parametrize("seed", range(4))
def test_mixup_blends_images_and_targets_by_the_same_lambda(seed):
    x, y = batch(seed)
    mixed, targets = mix_batch(x, y, 5, mixup=0.4, label_smoothing=0.1,
                               generator=torch.Generator().manual_seed(seed))
    lam, perm = recover_mixup(x, mixed)
    assert sorted(perm.tolist()) == list(range(8)) and 0 < lam < 1
    expected = lam * smoothed_onehot(y, 5, 0.1) + (1 - lam) * smoothed_onehot(y[perm], 5, 0.1)
    assert torch.allclose(targets, expected, atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(8))


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_one_box_and_weights_the_targets_by_its_area(seed):
    x, y = batch(seed, side=16)
    mixed, targets = mix_batch(x, y, 5, cutmix=1.0, label_smoothing=0.1,
                               generator=torch.Generator().manual_seed(seed))
    (y0, y1, x0, x1), perm = find_cutmix(x, mixed)
    kept = 1 - (y1 - y0) * (x1 - x0) / 16 ** 2  # the share of each image left in place
    assert 0 < kept < 1
    expected = kept * smoothed_onehot(y, 5, 0.1) + (1 - kept) * smoothed_onehot(y[perm], 5, 0.1)
    assert torch.allclose(targets, expected, atol=1e-6)


def test_mixup_lambda_follows_the_beta_distribution():
    """Two one-pixel images 0 and 1: when they swap, image 1 becomes lam. Beta(a, a) has mean 1/2 and
    variance 1 / (4 (2a + 1)): 0.1786 for a = 0.2, 1/12 for a = 1 (uniform)."""
    x, y = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), torch.tensor([0, 1])
    for alpha, variance in ((0.2, 1 / 5.6), (1.0, 1 / 12)):
        lams = []
        for seed in range(1200):
            mixed, targets = mix_batch(x, y, 2, mixup=alpha, generator=torch.Generator().manual_seed(seed))
            if mixed[0].item() != 0:  # swapped (an unswapped batch is left as it is)
                lams.append(mixed[1].item())
                assert targets[1].tolist() == pytest.approx([1 - lams[-1], lams[-1]], abs=1e-6)
        lams = torch.tensor(lams, dtype=torch.float64)
        assert len(lams) > 450
        assert abs(lams.mean() - 0.5) < 0.05 and abs(lams.var() - variance) < 0.02, (alpha, lams.mean(), lams.var())


def test_mixup_and_cutmix_together_take_turns():
    """Both on: CutMix half the time. Images 0 and 1 blended by mixup give values strictly between 0 and 1."""
    x = torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)])
    kinds = {"cutmix": 0, "mixup": 0}
    for seed in range(200):
        mixed, _ = mix_batch(x, torch.tensor([0, 1]), 2, mixup=1.0, cutmix=1.0,
                             generator=torch.Generator().manual_seed(seed))
        if not torch.equal(mixed, x):
            kinds["mixup" if ((mixed > 0) & (mixed < 1)).any() else "cutmix"] += 1
    assert kinds["cutmix"] > 40 and kinds["mixup"] > 40, kinds


def test_a_generator_makes_mixing_reproducible_and_leaves_the_global_rng_alone():
    x, y = batch()
    state = torch.get_rng_state()
    first = mix_batch(x, y, 5, mixup=0.4, cutmix=1.0, generator=torch.Generator().manual_seed(7))
    again = mix_batch(x, y, 5, mixup=0.4, cutmix=1.0, generator=torch.Generator().manual_seed(7))
    other = mix_batch(x, y, 5, mixup=0.4, cutmix=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_confusion_matrix_rows_are_true_classes_and_columns_predictions():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])  # a 0 taken for a 1, a 2 taken for a 0
    assert confusion_matrix(preds, labels, 4).tolist() == [[1, 1, 0, 0],
                                                          [0, 1, 0, 0],
                                                          [1, 0, 2, 0],
                                                          [0, 0, 0, 0]]


def test_freeze_helpers_on_a_model():
    model = EfficientNetV2("b0", num_classes=3)
    trainable = freeze_backbone(model)
    assert trainable and all(n.startswith("head.") for n in trainable)
    model.train()
    backbone_batchnorm_eval(model)
    assert not model.stem.bn.training and not model.blocks[5].project_conv.bn.training
    assert model.head.project_conv.bn.training and model.training


def test_precise_batchnorm_uses_the_exact_statistics_and_no_randomness():
    model = EfficientNetV2("b0", num_classes=3, dropout=0.5)
    model.train()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    stem_out = [model.stem.conv(x) for x in batches]
    blocks_bn = model.blocks[0].project_conv.bn.running_mean.clone()
    rng = torch.get_rng_state()
    assert recalibrate_batchnorm(model, batches, prefix="stem.") == 2
    assert torch.equal(torch.get_rng_state(), rng)  # dropout and drop-path stayed off
    assert model.training and model.head.dropout.training  # modes restored
    expected = torch.stack([o.mean((0, 2, 3)) for o in stem_out]).mean(0)  # average of the batch means
    assert torch.allclose(model.stem.bn.running_mean, expected, atol=1e-5)
    assert model.stem.bn.momentum == 0.1 and int(model.stem.bn.num_batches_tracked) == 2
    assert torch.equal(model.blocks[0].project_conv.bn.running_mean, blocks_bn)  # outside the prefix: untouched


def test_epoch_coverage_says_what_an_epoch_leaves_out_or_repeats():
    assert epoch_coverage(30, 4, 3).describe(4, 3) == (
        "each epoch trains on 24 of the 30 training images (whole batches of 4 on each of 3 process(es)); "
        "the other 6, a different random 6 each epoch, are left out")
    assert epoch_coverage(5, 4, 2).describe(4, 2) == (
        "5 training images are less than a batch of 4 for each of 2 processes: 3 are repeated each epoch")
    assert epoch_coverage(24, 4, 3).describe(4, 3) is None and epoch_coverage(3, 4, 1).describe(4, 1) is None


def test_evaluate_counts_every_validation_image_once():
    """One process: the loss is the mean cross-entropy, the accuracy and matrix those of argmax, over all
    batches (the last one short)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 3, (10,))
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4)
    try:
        metrics, cm = evaluate(model.train(), loader, Accelerator(cpu=True), 3)
    finally:
        AcceleratorState._reset_state(True)  # the state is process-wide: leave none to later tests
    assert not model.training
    with torch.no_grad():
        logits = model(x)
    assert metrics["val_images"] == 10 and cm.sum() == 10
    assert metrics["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["val_accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert torch.equal(cm, confusion_matrix(logits.argmax(1), y, 3))
