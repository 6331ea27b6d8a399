"""train.py's promised options end to end (README, "Paper-grade options"): --mixed-precision, --channels-last,
--mixup, --cutmix, --label-smoothing, --warmup-epochs, --randaugment, --pool attention --num-heads, and a
.safetensors file as --weights. Two runs carry all the flags; each test checks what one flag must change,
and the other run is its control. The runs are observed, never altered: global module and optimizer hooks,
and call-through spies on the loss and on the dataset's images. --compile has its own pair of runs (eager
and compiled), on a two-block network put in b0's place so that compiling stays cheap."""
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision import transforms as T

from effnetv2 import EfficientNetV2
from effnetv2.checkpoint import weights_fingerprint
from effnetv2.configs import VARIANTS, StageConfig, VariantConfig
from effnetv2.data import ImageFolderDataset
from test_train import SMOKE, metrics_of, run, shapes  # noqa: F401  (shapes is a fixture)
from train_script import patch_training_loss, real_cross_entropy, reset_accelerate, train
from test_training import find_cutmix, recover_mixup, smoothed_onehot

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

BATCH = 4  # test_train's SMOKE: b0, 32 px, batch 4, one CPU process, no loader workers
LR, LRF = 0.1, 0.01


class Recorder:
    """What one train.py run did, seen from outside."""

    def __init__(self):
        self.images, self.labels, self.train_transforms = [], [], []  # each training image as the loader fetched it
        self.inputs, self.targets, self.lrs = [], [], []  # per training step: model input, loss targets, lr used
        self.model = None  # the model that trained
        self.channels_last_weights = []  # per training forward: is the stem conv's weight channels_last
        self.linear_dtypes = {True: set(), False: set()}  # dtypes out of every nn.Linear, training / not

    def on_forward_pre(self, module, args):
        if isinstance(module, EfficientNetV2) and module.training:
            self.inputs.append(args[0].detach().clone())
            self.channels_last_weights.append(module.stem.conv.weight.is_contiguous(memory_format=torch.channels_last))
            if self.model is None:
                self.model = module

    def on_forward(self, module, args, output):
        if isinstance(module, torch.nn.Linear):
            self.linear_dtypes[module.training].add(output.dtype)

    def on_optimizer_step(self, optimizer, args, kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def batch(self, step: int):
        """The loader's batch ``step`` before mixing (images ``[B, 3, H, W]``, labels ``[B]``), the model's
        input and the loss targets of that step."""
        window = slice(step * BATCH, (step + 1) * BATCH)
        return (torch.stack(self.images[window]), torch.tensor(self.labels[window]), self.inputs[step],
                self.targets[step])


def is_train_transform(transform) -> bool:
    return isinstance(transform, T.Compose) and any(isinstance(t, T.RandomResizedCrop) for t in transform.transforms)


@contextmanager
def observed_run():
    """A fresh Accelerate state and a :class:`Recorder` watching the run; everything undone after."""
    rec = Recorder()
    get_item, loss = ImageFolderDataset.__getitem__, real_cross_entropy

    def spy_get_item(self, index):
        image, label = get_item(self, index)
        if is_train_transform(self.transform):
            rec.images.append(image)
            rec.labels.append(label)
            rec.train_transforms.append(self.transform)
        return image, label

    def spy_loss(logits, targets):
        rec.targets.append(targets.detach().clone())
        return loss(logits, targets)

    reset_accelerate()
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(rec.on_forward_pre),
             torch.nn.modules.module.register_module_forward_hook(rec.on_forward),
             register_optimizer_step_pre_hook(rec.on_optimizer_step)]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ImageFolderDataset, "__getitem__", spy_get_item)
            patch_training_loss(patch, spy_loss)
            yield rec
    finally:
        for hook in hooks:
            hook.remove()
        reset_accelerate()


@pytest.fixture(scope="module")
def flags_run(shapes, tmp_path_factory):
    """From scratch, one epoch (6 optimizer steps of 4 of the 25 training images), with bf16, channels_last,
    mixup, label smoothing, warmup over half an epoch, RandAugment 7 and a 4-head attention pool."""
    out = tmp_path_factory.mktemp("flags") / "run"
    with observed_run() as rec:
        assert run(shapes, out, "--epochs", "1", "--lr", str(LR), "--lrf", str(LRF), "--mixed-precision", "bf16",
                   "--channels-last", "--mixup", "0.4", "--label-smoothing", "0.1", "--warmup-epochs", "0.5",
                   "--randaugment", "7", "--pool", "attention", "--num-heads", "4") == 0
    return out, rec


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """An effnetv2 b0 state dict (3 classes) as .safetensors, with BatchNorm statistics that no fresh
    model has, and built from another seed than train.py's, so that a model not loaded from it differs."""
    torch.manual_seed(1234)
    model = EfficientNetV2("b0", num_classes=3, image_size=32)
    for name, buffer in model.state_dict().items():
        if "running_" in name:
            buffer.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "b0.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def weights_run(shapes, weights_file, tmp_path_factory):
    """Fine-tune from the .safetensors file (backbone frozen, the default with --weights): 3 steps, CutMix,
    float32, no other option. The control of every flag of ``flags_run``."""
    out = tmp_path_factory.mktemp("weights") / "run"
    with observed_run() as rec:
        assert run(shapes, out, "--weights", str(weights_file), "--epochs", "1", "--max-steps", "3",
                   "--lr", str(LR), "--cutmix", "1.0") == 0
    return out, rec


def test_bf16_autocasts_on_the_cpu_and_keeps_float32_weights(flags_run, weights_run):
    (out, rec), (_, control) = flags_run, weights_run
    assert rec.linear_dtypes == {True: {torch.bfloat16}, False: {torch.bfloat16}}  # training and evaluation
    assert control.linear_dtypes == {True: {torch.float32}, False: {torch.float32}}
    assert {t.dtype for t in load_file(out / "model.safetensors").values() if t.is_floating_point()} == {torch.float32}
    assert "| mixed precision | bf16 |" in (out / "README.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--mixed-precision fp16 needs a CUDA GPU; this machine has "
                                                           "none (bf16 is tested on the CPU)")
def test_fp16_autocasts_on_a_gpu(shapes, tmp_path):
    out = tmp_path / "run"
    with observed_run() as rec:
        assert train.main(["--data-path", str(shapes), "--output-dir", str(out), *(a for a in SMOKE if a != "--cpu"),
                           "--epochs", "1", "--max-steps", "3", "--mixed-precision", "fp16"]) == 0
    assert rec.linear_dtypes[True] == {torch.float16}
    assert {t.dtype for t in load_file(out / "model.safetensors").values() if t.is_floating_point()} == {torch.float32}
    assert torch.isfinite(torch.tensor(metrics_of(out)["final"]["train_loss"]))


def test_fp16_on_the_cpu_autocasts_or_is_refused(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    with observed_run() as rec:
        rc = run(shapes, out, "--epochs", "1", "--max-steps", "1", "--precise-bn", "0", "--mixed-precision", "fp16")
    refused = rc == 2 and "--mixed-precision fp16" in capsys.readouterr().out
    assert refused or rec.linear_dtypes[True] == {torch.float16}


def test_channels_last_trains_in_that_layout_and_saves_the_trained_weights(flags_run, weights_run):
    (out, rec), (_, control) = flags_run, weights_run
    assert len(rec.inputs) == 6 and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                                        for x in rec.inputs)
    assert all(rec.channels_last_weights)  # the weights too, not only the batches
    assert not any(x.is_contiguous(memory_format=torch.channels_last) for x in control.inputs)
    assert not any(control.channels_last_weights)
    model, saved = rec.model, load_file(out / "model.safetensors")
    # safetensors stores every tensor row-major: the file must hold the trained values, not a channels_last
    # buffer read in the standard order
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_mixup_blends_images_and_targets_by_the_same_lambda(flags_run):
    _, rec = flags_run
    blended = 0
    for step in range(6):
        images, labels, model_input, targets = rec.batch(step)
        lam, perm = recover_mixup(images, model_input)
        expected = lam * smoothed_onehot(labels, 5, 0.1) + (1 - lam) * smoothed_onehot(labels[perm], 5, 0.1)
        assert torch.allclose(targets, expected, atol=1e-4), step
        blended += 0 < lam < 1 and not torch.equal(perm, torch.arange(BATCH))
    assert blended >= 3


def test_label_smoothing_gives_every_class_a_floor(flags_run, weights_run):
    """eps / C = 0.1 / 5 for a class in neither image of a mixed pair; without smoothing, 0."""
    targets, control = torch.cat(flags_run[1].targets), torch.cat(weights_run[1].targets)
    assert targets.min().item() == pytest.approx(0.02) and control.min().item() == 0
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area(weights_run):
    _, rec = weights_run
    assert len(rec.inputs) == 3
    pasted = 0
    for step in range(3):
        images, labels, model_input, targets = rec.batch(step)
        (y0, y1, x0, x1), perm = find_cutmix(images, model_input)
        kept = 1 - (y1 - y0) * (x1 - x0) / 32 ** 2
        expected = kept * smoothed_onehot(labels, 5, 0.0) + (1 - kept) * smoothed_onehot(labels[perm], 5, 0.0)
        assert torch.allclose(targets, expected, atol=1e-6), step
        pasted += kept < 1
    assert pasted >= 1


def test_warmup_then_cosine_is_the_lr_of_every_optimizer_step(flags_run, weights_run):
    """--warmup-epochs 0.5 of 6 steps: 3 warmup steps at lr * 1/3, 2/3, 3/3, then cosine over the other 3,
    lr * (((1 + cos(pi t / 3)) / 2) * 0.99 + 0.01) for t = 0, 1, 2: 1, 0.7525, 0.2575 (worked by hand)."""
    assert flags_run[1].lrs == pytest.approx([LR / 3, LR * 2 / 3, LR, LR, LR * 0.7525, LR * 0.2575])
    assert weights_run[1].lrs[0] == pytest.approx(LR)  # no warmup: the first step at the full lr


def test_randaugment_magnitude_reaches_every_training_image(flags_run, weights_run):
    (_, rec), (_, control) = flags_run, weights_run
    assert len(rec.train_transforms) >= 6 * BATCH
    for transform in rec.train_transforms:
        augment = [t for t in transform.transforms if isinstance(t, T.RandAugment)]
        assert len(augment) == 1 and augment[0].magnitude == 7
    assert not any(isinstance(t, T.RandAugment) for c in control.train_transforms for t in c.transforms)


def test_attention_pool_and_heads_from_the_command_line(flags_run, weights_run):
    (out, rec), (control_out, _) = flags_run, weights_run
    tuned = EfficientNetV2.from_pretrained(out)
    assert tuned.config["pool"] == "attention" and tuned.config["num_heads"] == 4
    for model in (rec.model, tuned):  # the model that trained and the one saved
        assert model.head.attn_pool.attn.num_heads == 4
    saved = load_file(out / "model.safetensors")
    assert {"head.attn_pool.pos_embed", "head.attn_pool.attn.q_proj.weight"} <= saved.keys()
    assert not any(k.startswith("head.attn_pool.") for k in load_file(control_out / "model.safetensors"))


def test_safetensors_weights_initialise_the_frozen_backbone(weights_run, weights_file):
    out, _ = weights_run
    initial, saved = load_file(weights_file), load_file(out / "model.safetensors")
    backbone = [k for k in initial if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(saved[k], initial[k]) for k in backbone)  # weights and BatchNorm statistics
    assert saved["head.classifier.weight"].shape == (5, 1280) and initial["head.classifier.weight"].shape == (3, 1280)
    assert not torch.equal(saved["head.project_conv.conv.weight"], initial["head.project_conv.conv.weight"])  # trained


# A two-block cut of b0 (its first Fused-MBConv and one MBConv with squeeze-excitation, 64 head features):
# torch.compile traces every block, and the whole b0 takes minutes to compile on a 2-core CPU.
TINY_B0 = VariantConfig((StageConfig(1, 3, 1, 1, 32, 16, "F", 0.0), StageConfig(1, 3, 2, 4, 16, 24, "M", 0.25)),
                        192, 224, 0.2, num_features=64)


def tiny_run(data, out, *flags):
    """train.py on TINY_B0 for 4 steps at lr 0.1 without dropout or drop-path (a compiled graph draws its
    random numbers its own way); returns the loss of every step and the backends torch.compile was given."""
    losses, backends = [], []
    loss, compile_ = real_cross_entropy, torch.compile

    def spy_loss(logits, targets):
        value = loss(logits, targets)
        losses.append(value.item())
        return value

    def spy_compile(model, **kwargs):
        backends.append(kwargs.get("backend"))
        return compile_(model, **kwargs)

    reset_accelerate()
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, "b0", TINY_B0)
        patch_training_loss(patch, spy_loss)
        patch.setattr(torch, "compile", spy_compile)
        assert run(data, out, "--epochs", "1", "--max-steps", "4", "--lr", "0.1", "--dropout", "0",
                   "--drop-path-rate", "0", "--precise-bn", "0", *flags) == 0
        saved = weights_fingerprint(EfficientNetV2.from_pretrained(out))
    reset_accelerate()
    return losses, backends, saved


def test_compile_trains_like_eager(shapes, tmp_path):
    """--compile through Accelerate's dynamo backend: the model train.py trains is compiled, with the
    backend asked for, and its loss, step by step, is eager's (float32 reassociation aside). aot_eager
    traces the forward and backward graphs like inductor but runs them without generating C++ (inductor
    takes minutes to compile here; the GPU figures come from benchmarks/training.py --compile)."""
    eager, eager_backends, _ = tiny_run(shapes, tmp_path / "eager")
    compiled, backends, saved = tiny_run(shapes, tmp_path / "compiled", "--compile", "aot_eager")
    assert eager_backends == [] and backends == ["aot_eager"]
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert max(eager) - min(eager) > 0.05  # the losses move: a trajectory, not one value four times
    # the weights saved and fingerprinted are the plain module's, not the compiled wrapper's
    assert metrics_of(tmp_path / "compiled")["fingerprint"] == saved


def test_compile_flag_takes_a_dynamo_backend(tmp_path, capsys, monkeypatch):
    def backend(*flags):
        reset_accelerate()
        args = train.parse_args(["--data-path", str(tmp_path), "--output-dir", str(tmp_path / "run"), "--cpu", *flags])
        return train.make_accelerator(args).state.dynamo_plugin.backend.value.lower()

    assert backend("--compile") == "inductor" and backend("--compile", "aot_eager") == "aot_eager"
    assert backend() == "no"
    # without --compile, `accelerate launch --dynamo_backend` (this variable) decides; with it, the flag
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    assert backend() == "aot_eager" and backend("--compile") == "inductor"
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", str(tmp_path), "--compile", "turbo"])
    assert "--compile: invalid choice: 'turbo'" in capsys.readouterr().err
