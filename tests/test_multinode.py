"""train.py on two "machines" (README, "Training on several machines"): two `accelerate launch
--num_machines 2 --machine_rank {0,1}` commands on this host, each in its own working folder with its
own copy of the data, one process each, joined over loopback (gloo). They must train one model: the
same weights on both, written once, by machine 0; and an uneven image count must be reported (training)
or counted exactly once (validation)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from app_server import free_port
from effnetv2 import EfficientNetV2, transforms_for
from effnetv2.checkpoint import weights_fingerprint
from effnetv2.data import ImageFolderDataset, make_shapes_dataset, read_split
from effnetv2.training import epoch_coverage
from test_train import SMOKE, metrics_of, subprocess_env

pytestmark = pytest.mark.numerics  # compares floating-point results or trains: see CONTRIBUTING.md

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for the whole two-machine run


def launch_machine(rank: int, port: int, cwd: Path, log) -> subprocess.Popen:
    """``accelerate launch`` as machine ``rank`` of 2 would run it: ``--multi_gpu`` is Accelerate's
    torchrun launcher (``--cpu`` there would start one unconnected process per machine), train.py's own
    ``--cpu`` makes the process group gloo. Paths are relative: each machine has its own folders."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
           "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train.py"), "--data-path", "data", "--output-dir", "out", *SMOKE, "--epochs", "1"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    # a session of its own: the launcher's children (torchrun's worker) can be stopped with it
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """Both machines' folders and logs after one run on 40 images (8 per class): 30 for training, 10 for
    validation (2 of each class's 8, the 20% split rounded half up)."""
    root = tmp_path_factory.mktemp("machines")
    folders = [root / "machine0", root / "machine1"]
    make_shapes_dataset(folders[0] / "data", num_per_class=8, image_size=32)
    shutil.copytree(folders[0] / "data", folders[1] / "data")
    logs = [root / "machine0.log", root / "machine1.log"]
    port = free_port()
    with logs[0].open("w") as log0, logs[1].open("w") as log1:
        procs = [launch_machine(0, port, folders[0], log0), launch_machine(1, port, folders[1], log1)]
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:  # both done, or one failed (the other would wait for it)
                codes = [proc.poll() for proc in procs]
                if codes == [0, 0] or any(code not in (None, 0) for code in codes):
                    break
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(text[-3000:] for text in texts)
    return folders, texts


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_both_machines_end_with_the_weights_that_machine_0_saved(machines):
    (machine0, _), logs = machines
    reported = [line.split()[-1] for log in logs for line in log.splitlines() if "final weights fingerprint" in line]
    # each machine's own log holds its own process's line, and only that one
    assert [f"process {rank} of 2" in log for rank, log in enumerate(logs)] == [True, True]
    assert len(reported) == 2 and reported[0] == reported[1]
    saved = EfficientNetV2.from_pretrained(machine0 / "out")
    assert weights_fingerprint(saved) == reported[0] == metrics_of(machine0 / "out")["fingerprint"]
    assert metrics_of(machine0 / "out")["processes"] == 2


def test_only_machine_0_writes_and_its_checkpoint_holds_both_processes_states(machines):
    (machine0, machine1), _ = machines
    # machine 1 wrote nothing at all in its working folder: no out/, no half checkpoint
    assert [p.name for p in machine1.iterdir()] == ["data"]
    assert files_under(machine1 / "data") == files_under(machine0 / "data")
    written = files_under(machine0 / "out")
    assert {"model.safetensors", "config.json", "README.md", "metrics.json", "split.json"} <= set(written)
    # what resuming each process needs, sent by machine 1 and written by machine 0
    assert {"checkpoints/epoch_1/random_states_0.pkl", "checkpoints/epoch_1/random_states_1.pkl"} <= set(written)
    assert not any(".tmp" in name for name in written)


def test_training_reports_the_images_an_epoch_leaves_out(machines):
    """30 training images, batches of 4 on each of 2 processes: a step takes 8 images, 3 steps take 24,
    and the 6 left over make no whole step (worked by hand; one process would leave out only 2)."""
    (machine0, _), logs = machines
    m = metrics_of(machine0 / "out")
    assert m["train_images"] == 30 and m["steps_per_epoch"] == 3
    assert m["history"][0]["train_images"] == 24  # counted by the training loop itself
    assert m["train_coverage"] == {"trained": 24, "left_out": 6, "repeated": 0}
    assert "each epoch trains on 24 of the 30 training images" in logs[0]
    assert "the other 6, a different random 6 each epoch, are left out" in logs[0]


def test_validation_counts_every_image_exactly_once(machines):
    """10 validation images in batches of 4 on 2 processes: the second round has 2 images for 8 places,
    padded with 6 repeats. The reported loss and accuracy must be those of the saved model on the 10
    images of split.json, each counted once.

    They are recomputed here as the run computed them: the batches Accelerate gave each process (image 9
    shares a batch with repeats), at one thread. Three steps from scratch leave BatchNorm variances of
    1e-8 and logits in the hundreds: a one-ulp change of the input moves this loss by ~10%, and on an
    AVX2-only CPU batches of 2 and 4 take different kernels (0.7%), so only the same computation can be
    compared; it leaves the float32 mean of 10 losses, within 10 roundings of 2^-24."""
    (machine0, _), _ = machines
    m = metrics_of(machine0 / "out")
    model = EfficientNetV2.from_pretrained(machine0 / "out")
    _, val, classes = read_split(machine0 / "out" / "split.json", machine0 / "data")
    assert len(val) == 10
    images, labels = zip(*ImageFolderDataset(val, classes, transforms_for(model, train=False)))
    images, labels = torch.stack(images), torch.tensor(labels)
    shards = [list(BatchSamplerShard(BatchSampler(range(10), 4, drop_last=False), 2, rank, even_batches=True))
              for rank in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():  # gather_for_metrics' order: round by round, process by process
            slots = [(batch, model(images[batch])) for rounds in zip(*shards) for batch in rounds]
    finally:
        torch.set_num_threads(threads)
    order = torch.tensor([i for batch, _ in slots for i in batch])
    logits = torch.cat([out for _, out in slots])
    losses = F.cross_entropy(logits, labels[order], reduction="none")
    assert order[:10].tolist() == list(range(10)) and len(order) == 16  # 6 repeats, gathered last
    val_loss = losses[:10].mean().item()
    assert m["final"]["val_images"] == 10
    assert m["final"]["val_loss"] == pytest.approx(val_loss, rel=10 * 2 ** -24)
    assert losses.mean().item() != pytest.approx(val_loss, rel=10 * 2 ** -24)  # the repeats would show
    assert m["final"]["val_accuracy"] == pytest.approx((logits[:10].argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_epoch_coverage_is_what_accelerates_sharding_does(processes):
    """For every image count up to 30 (batch 4), the reported coverage against the batches Accelerate
    gives each process (one process: the DataLoader's own) with train.py's drop_last: the slots all
    processes fill, and the distinct images among them."""
    for images in range(1, 31):
        coverage = epoch_coverage(images, 4, processes)
        batches = BatchSampler(range(images), 4, drop_last=images >= 4 * processes)  # train.py's rule
        shards = [list(batches)] if processes == 1 else [
            list(BatchSamplerShard(batches, processes, rank, even_batches=True)) for rank in range(processes)]
        slots = [index for shard in shards for batch in shard for index in batch]
        assert coverage.trained == len(slots), images
        assert coverage.left_out == images - len(set(slots)), images
        assert coverage.repeated == len(slots) - len(set(slots)), images
