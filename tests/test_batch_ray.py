"""`python -m effnetv2.predict --engine ray` (effnetv2.batch_ray): the rows of the local engine, on a Ray the
command starts and on a 2-node Ray cluster on loopback.

200 files with bad ones mixed in; the local CLI's Parquet file is the reference. Every Ray here has its own
short temp folder (Ray's socket paths must stay under 108 characters), free ports and an 80 MB object
store, and is stopped by the test that started it, never another one (no `ray stop`: it stops them all).
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from PIL import Image

from app_server import free_port
from effnetv2.batch_ray import RayOptions, predict_with_ray, ray_session
from effnetv2.predict.__main__ import main
from inference_models import realistic_model
from ray_processes import is_loopback, listeners, ray_processes, stop_ray
from test_predict import read_results, wait_for_bytes

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE = 80 * 1024 * 1024
LOOPBACK = "127.0.0.2"  # Ray replaces 127.0.0.1 and localhost by the host's network address; not this one
BAD = {"broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "empty.png": b"", "notes.jpg": b"plain text",
       "half.png": None, "cut.jpg": None, "header.webp": b"RIFF\x00\x00\x00\x00WEBPVP8 "}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The module's environment, also inherited by every Ray process: one graph cache (each model exported
    once), effnetv2 imported from this checkout, no Ray found through $RAY_ADDRESS."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EFFNETV2_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.delenv("RAY_ADDRESS", raising=False)
        yield patch


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A b0 model (64 px) and a folder of 194 readable images (sizes, modes and formats vary, some nested)
    with 6 bad files among them; ``files`` is the folder's sorted listing."""
    root = tmp_path_factory.mktemp("ray-photos")
    model_dir = root / "model"
    realistic_model("b0", num_classes=4, image_size=64).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    folder = root / "photos"
    for i in range(194):
        (folder / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (int(rng.integers(24, 90)), int(rng.integers(24, 90)), 3), dtype=np.uint8)
        mode, suffix = [("RGB", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("P", "png")][i % 4]
        Image.fromarray(pixels).convert(mode).save(folder / f"part{i % 3}" / f"img{i:03d}.{suffix}")
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    contents = {**BAD, "half.png": png.getvalue()[:300], "cut.jpg": jpeg.getvalue()[:200]}
    for i, (name, data) in enumerate(contents.items()):
        (folder / f"part{i % 3}" / name).write_bytes(data)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert len(files) == 200
    return model_dir, folder, files


@pytest.fixture(scope="module")
def local_rows(env, photos, tmp_path_factory):
    """What the local CLI writes to Parquet for the folder and a path that does not exist."""
    model_dir, folder, files = photos
    out = tmp_path_factory.mktemp("local") / "preds.parquet"
    with pytest.warns(UserWarning, match="skipping 6 unreadable"):
        assert main(["--model", str(model_dir), str(folder), "--top-k", "3", "--batch-size", "16", "--quiet",
                     "--output", str(out)]) == 0
    rows = read_results(out)
    assert [path for path, _, _ in rows] == files
    assert sorted(Path(path).name for path, _, error in rows if error) == sorted(BAD)
    return rows


def assert_same_rows(rows, expected):
    """Same paths in the same order, same errors, same labels, probabilities to 1e-5."""
    assert [path for path, _, _ in rows] == [path for path, _, _ in expected]
    for (path, top, error), (_, want, want_error) in zip(rows, expected):
        assert error == want_error, path
        assert [label for label, _ in top] == [label for label, _ in want], path
        assert [p for _, p in top] == pytest.approx([p for _, p in want], abs=1e-5), path


def test_ray_engine_on_a_ray_it_starts_writes_the_local_rows(env, photos, local_rows, tmp_path):
    model_dir, folder, _ = photos
    temp_root = tempfile.mkdtemp(dir="/tmp", prefix="ray")
    env.setenv("RAY_TMPDIR", temp_root)  # Ray's own variable: its folders go under $RAY_TMPDIR/ray
    out = tmp_path / "preds.parquet"
    try:
        # not pytest.warns: it would show every other warning too, Ray's own that pyproject.toml filters
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            assert main(["--engine", "ray", "--num-actors", "2", "--cpus-per-actor", "0.5", "--model", str(model_dir),
                         str(folder), "--top-k", "3", "--batch-size", "16", "--quiet",
                         "--object-store-memory", str(OBJECT_STORE), "--output", str(out)]) == 0
        assert any(str(w.message).startswith("skipping 6 unreadable") for w in caught)
        assert_same_rows(read_results(out), local_rows)
        assert not ray.is_initialized() and not ray_processes(temp_root)  # the command stopped its Ray
    finally:
        env.delenv("RAY_TMPDIR")
        ray.shutdown()
        stop_ray(temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)


def test_the_ray_it_starts_listens_on_loopback_only(env, photos):
    """The Ray that `predict --engine ray` starts (ray_session without an address), while it runs a prediction
    and an actor: every listening socket of every one of its processes, this driver's included, is on
    loopback, as the kernel lists them."""
    model_dir, _, files = photos
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="ray")

    @ray.remote(num_cpus=0.5)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    try:
        with ray_session(num_cpus=2, object_store_memory=OBJECT_STORE, _temp_dir=temp_dir):
            rows = predict_with_ray(str(model_dir), files[:4], top_k=1, options=RayOptions(cpus_per_actor=0.5))
            probe = Probe.remote()
            actor_pid = ray.get(probe.pid.remote(), timeout=120)
            sockets = listeners([psutil.Process(), *ray_processes(temp_dir)])
    finally:
        ray.shutdown()
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [path for path, _, _ in rows] == files[:4]
    # found them all: Ray's servers, the driver's and an actor's gRPC ports
    assert {"gcs_server", "raylet"} <= {s.process for s in sockets}
    assert {os.getpid(), actor_pid} <= {s.pid for s in sockets}
    assert [s for s in sockets if not is_loopback(s.ip)] == []


def ray_start(*args: str, temp_dir: str) -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--node-ip-address", LOOPBACK,
                    "--temp-dir", temp_dir, "--object-store-memory", str(OBJECT_STORE),
                    "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", *args],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(env):
    """A head node (1 CPU) and a worker node (2 CPUs) on this host, joined over loopback; yields the address."""
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="ray")
    address = f"{LOOPBACK}:{free_port()}"
    try:
        ray_start("--head", "--port", address.split(":")[1], "--num-cpus", "1", "--include-dashboard", "false",
                  "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                  temp_dir=temp_dir)
        ray_start("--address", address, "--num-cpus", "2", temp_dir=temp_dir)
        yield address
    finally:
        ray.shutdown()
        stop_ray(temp_dir, address)
        assert not ray_processes(temp_dir, address)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_predict_with_ray_on_a_two_node_cluster_gives_the_local_rows(photos, local_rows, cluster):
    model_dir, folder, _ = photos
    with ray_session(cluster):
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert [node["NodeManagerAddress"] for node in nodes] == [LOOPBACK, LOOPBACK]
        assert sorted(node["Resources"]["CPU"] for node in nodes) == [1, 2]
        rows = predict_with_ray(str(model_dir), [folder, folder / "gone.png"], top_k=3, batch_size=16,
                                options=RayOptions(num_actors=2, cpus_per_actor=0.5))
        assert ray.is_initialized()  # a Ray the caller connected to stays connected
    assert_same_rows(rows, local_rows + [(str(folder / "gone.png"), [], "no such file or folder")])


def test_without_ray_the_error_says_what_to_install(photos, monkeypatch, capsys):
    model_dir, folder, _ = photos
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    assert main(["--engine", "ray", "--model", str(model_dir), str(folder)]) == 2
    assert "pip install 'effnetv2[scale]'" in capsys.readouterr().err


def test_an_address_where_no_ray_answers_is_one_error_line(photos, capsys):
    model_dir, folder, _ = photos
    address = f"{LOOPBACK}:{free_port()}"  # free: nothing listens there
    assert main(["--engine", "ray", "--address", address, "--model", str(model_dir), str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --address {address}: no Ray cluster answers there")
    assert not ray.is_initialized()


def test_object_store_memory_is_refused_with_an_address(photos):
    model_dir, folder, _ = photos
    with pytest.raises(SystemExit):
        main(["--engine", "ray", "--address", "auto", "--object-store-memory", "80000000", "--model",
              str(model_dir), str(folder)])


def test_a_killed_ray_run_leaves_the_previous_results_whole(env, photos, tmp_path):
    model_dir, folder, _ = photos
    out = tmp_path / "out" / "preds.jsonl"
    out.parent.mkdir()
    out.write_text('{"path": "old.jpg", "predictions": [], "error": "from an earlier run"}\n')
    before = out.read_bytes()
    temp_root = tempfile.mkdtemp(dir="/tmp", prefix="ray")
    proc = subprocess.Popen([sys.executable, "-m", "effnetv2.predict", "--engine", "ray", "--model", str(model_dir),
                             str(folder), str(folder), "--batch-size", "4", "--quiet", "--object-store-memory",
                             str(OBJECT_STORE), "--output", str(out)], env={**os.environ, "RAY_TMPDIR": temp_root},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # mid-run: rows are arriving (somewhere in the output's folder), 400 of them in all
        wait_for_bytes(proc, out.parent, len(before) + 2000, seconds=240)
    finally:
        proc.kill()
        proc.wait()
        stop_ray(temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["preds.jsonl"]
