"""The Hub end to end, through a local Hub look-alike (tests/hubserver.py) and the unmodified client:
push and load, revisions, private repos, offline use, the model card, untrusted files, and the
train.py / convert CLI pushes. Large files travel by the LFS batch API (basic transfer)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from effnetv2 import EfficientNetV2
from effnetv2.hub import ModelDownloadError
from effnetv2.sources import load_model
from hubserver import hub_server, set_offline  # noqa: F401  (hub_server is a fixture)
from inference_models import realistic_model

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with the 2 cores busy, 2 threads spin against each other (100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0) -> EfficientNetV2:
    """b0, 3 classes, 32 px, calibrated BatchNorm: logits of order 1 that differ from seed to seed."""
    return realistic_model("b0", num_classes=3, image_size=32, seed=seed)


def assert_same_model(loaded: EfficientNetV2, expected: EfficientNetV2) -> None:
    assert not loaded.training
    assert loaded.config == expected.config
    assert torch.equal(loaded(X), expected(X))


@pytest.mark.numerics
def test_push_then_load_in_a_fresh_cache(hub_server, tmp_path):
    model = tiny()
    assert model(X).abs().max() > 0.1  # outputs that can tell weights apart
    commit = model.push_to_hub("org/name")
    assert commit.oid == hub_server.head("org/name")

    assert_same_model(EfficientNetV2.from_pretrained("org/name", cache_dir=tmp_path / "fresh"), model)
    # the weights went by LFS (batch API, PUT to the storage, verify); config and card inline in the commit
    assert hub_server.lfs_paths("org/name") == {"model.safetensors"}
    oid = hashlib.sha256(hub_server.files("org/name")["model.safetensors"]).hexdigest()
    uploads = [path for method, path in hub_server.requests if method == "PUT"]
    assert uploads == [f"/upload/{oid}"]
    assert {("POST", "/org/name.git/info/lfs/objects/batch"), ("POST", "/org/name.git/info/lfs/objects/verify")
            } <= set(hub_server.requests)


def test_card_has_real_metadata(hub_server):
    tiny().push_to_hub("org/finetuned", model_card_kwargs={"base_model": "org/base", "datasets": ["shapes"],
                                                           "metrics": {"accuracy": 0.75}})
    card = ModelCard(hub_server.files("org/finetuned")["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "effnetv2" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/base"
    assert {"efficientnetv2", "efficientnetv2-b0"} <= set(meta["tags"])
    assert meta["datasets"] == ["shapes"] and meta["metrics"] == ["accuracy"]
    text = card.text
    assert 'EfficientNetV2.from_pretrained("org/finetuned")' in text and "python app.py --model org/finetuned" in text
    assert "Fine-tuned from `org/base`" in text and "`class_0`, `class_1`, `class_2`" in text
    assert "| eval image size | 32 (resize to 32, centre crop 32) |" in text and "| interpolation | bicubic |" in text
    assert "| accuracy | 0.75 |" in text


def test_revisions_pin_the_weights(hub_server, tmp_path):
    first, second = tiny(0), tiny(1)
    first_sha = first.push_to_hub("org/name").oid
    second_sha = second.push_to_hub("org/name").oid
    assert first_sha != second_sha and len(first_sha) == 40 and int(first_sha, 16) >= 0
    assert [c.oid for c in hub_server.history("org/name")][:2] == [second_sha, first_sha]

    assert_same_model(EfficientNetV2.from_pretrained("org/name"), second)
    assert_same_model(load_model(f"org/name@{first_sha}"), first)
    assert_same_model(EfficientNetV2.from_pretrained("org/name", revision=first_sha, cache_dir=tmp_path / "c"), first)
    with pytest.raises(ModelDownloadError, match="Hub repo 'org/name' has no revision 'v9'.*list_repo_refs"):
        load_model("org/name@v9")


def test_private_repo_needs_the_right_token(hub_server, tmp_path, monkeypatch):
    model = tiny()
    model.push_to_hub("org/secret", private=True)
    assert_same_model(EfficientNetV2.from_pretrained("org/secret", cache_dir=tmp_path / "with-token"), model)

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):  # the client's own error: the Hub hides private repos
        HfApi().model_info("org/secret")
    with pytest.raises(ModelDownloadError, match=r"Hub repo 'org/secret' was not found. It may be private or gated: "
                                                 r"log in with `hf auth login` \(or set HF_TOKEN.* may not exist"):
        EfficientNetV2.from_pretrained("org/secret", cache_dir=tmp_path / "no-token")

    hub_server.add_token("hf_other_user", namespaces={"other"})
    monkeypatch.setenv("HF_TOKEN", "hf_other_user")
    with pytest.raises(ModelDownloadError, match="'org/secret' was not found with the Hugging Face token in use: "
                                                 "check the spelling; if the repo is private, log in"):
        load_model("org/secret", cache_dir=str(tmp_path / "other"))

    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    with pytest.raises(ModelDownloadError, match="refused the Hugging Face token.*invalid, expired or revoked"):
        EfficientNetV2.from_pretrained("org/secret", cache_dir=tmp_path / "revoked")


def test_offline_loads_from_the_cache_and_explains_a_miss(hub_server, monkeypatch):
    model = tiny()
    model.push_to_hub("org/name")
    EfficientNetV2.from_pretrained("org/name")  # downloads into the (test) cache

    set_offline(monkeypatch)
    before = len(hub_server.requests)
    assert_same_model(EfficientNetV2.from_pretrained("org/name"), model)
    assert_same_model(load_model("org/name"), model)
    assert len(hub_server.requests) == before  # not a single request
    for load in (EfficientNetV2.from_pretrained, load_model):
        with pytest.raises(ModelDownloadError, match=r"config.json of Hub repo 'org/elsewhere' is not in the local "
                                                     r"Hugging Face cache .* offline \(HF_HUB_OFFLINE=1 is set\).* "
                                                     r"Download the model once while online"):
            load("org/elsewhere")


def test_offline_set_after_import_asks_the_hub_nothing(hub_server, monkeypatch):
    tiny().push_to_hub("org/name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub read it at import: its constant stays False
    before = len(hub_server.requests)
    for load in (EfficientNetV2.from_pretrained, load_model):
        with pytest.raises(ModelDownloadError, match=r"config.json of Hub repo 'org/name' is not in the local Hugging "
                                                     r"Face cache .* offline \(HF_HUB_OFFLINE=1 is set\).* pass a "
                                                     r"local folder written by save_pretrained\.$"):
            load("org/name")
    assert len(hub_server.requests) == before


def test_card_edited_on_the_hub_survives_a_push(hub_server):
    api = HfApi()
    tiny(0).push_to_hub("org/name")
    edited = b"---\nlicense: mit\nlibrary_name: effnetv2\n---\n# Our own card\n"
    api.upload_file(path_or_fileobj=edited, path_in_repo="README.md", repo_id="org/name")
    api.upload_file(path_or_fileobj=b"notes", path_in_repo="notes.txt", repo_id="org/name")

    second = tiny(1)
    second.push_to_hub("org/name")
    files = hub_server.files("org/name")
    assert files["README.md"] == edited
    assert_same_model(EfficientNetV2.from_pretrained("org/name"), second)

    tiny(2).push_to_hub("org/name", delete_patterns="*")  # deletes stale files, never the card
    assert set(hub_server.files("org/name")) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    assert hub_server.files("org/name")["README.md"] == edited

    tiny(2).push_to_hub("org/name", overwrite_card=True)
    card = ModelCard(hub_server.files("org/name")["README.md"].decode())
    assert card.data.license == "apache-2.0" and 'from_pretrained("org/name")' in card.text


class Payload:
    """Unpickling this runs code: it would create ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_weights_never_run_code(hub_server, tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"head.classifier.weight": Payload(marker)}, buffer)  # what a malicious checkpoint looks like
    evil = buffer.getvalue()
    live = io.BytesIO()
    torch.save(Payload(tmp_path / "live"), live)
    torch.load(io.BytesIO(live.getvalue()), weights_only=False)  # such a payload does run when unpickled
    assert (tmp_path / "live").exists()
    api = HfApi()
    api.create_repo("org/pickle-only")
    api.upload_file(path_or_fileobj=evil, path_in_repo="pytorch_model.bin", repo_id="org/pickle-only")
    with pytest.raises(FileNotFoundError, match="'org/pickle-only' has no config.json: it is not an effnetv2 model"):
        EfficientNetV2.from_pretrained("org/pickle-only")

    api.create_repo("org/pickle")
    config = json.dumps(tiny().config).encode()
    api.create_commit("org/pickle", commit_message="weights as a pickle", operations=[
        CommitOperationAdd("config.json", config), CommitOperationAdd("pytorch_model.bin", evil)])
    with pytest.raises(ValueError) as err:
        EfficientNetV2.from_pretrained("org/pickle")
    message = str(err.value)
    assert message.startswith("pytorch_model.bin of Hub repo 'org/pickle' (cached at ")
    assert "could not be read as a weights-only PyTorch checkpoint" in message and "never loaded" in message
    assert re.search(r"\([Uu]nsupported .*open", message)  # what was refused
    assert "weights_only` set to `False" not in message and "add_safe_globals" not in message  # no unsafe advice
    assert not marker.exists()


def bad_config(config: dict, **changes) -> bytes:
    return json.dumps({**config, **changes}).encode()


def test_tampered_files_are_named(hub_server, tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()
    cfg = model.config
    cases = {  # repo → (config.json, model.safetensors, what the ValueError says)
        "variant": (bad_config(cfg, variant="q"), weights,
                    "config.json of Hub repo 'org/variant' does not describe a valid model: "
                    "unknown EfficientNetV2 variant 'q'"),
        "types": (bad_config(cfg, num_classes="3"), weights,
                  "'org/types' does not describe a valid model: num_classes must be an integer"),
        "labels": (bad_config(cfg, id2label={"0": "a"}, label2id={"a": 0}), weights,
                   r"'org/labels' does not describe a valid model: id2label has 1 labels .* but num_classes=3"),
        "size": (bad_config(cfg, image_size=10**9), weights,
                 "'org/size' does not describe a valid model: image_size must be an integer between 32 and 4096"),
        "key": (bad_config(cfg, colour="blue"), weights,
                r"config.json of Hub repo 'org/key': unknown keys \['colour'\]"),
        "json": (b'{"variant": "b0",', weights, "config.json of Hub repo 'org/json' is not valid JSON"),
        "list": (b'["b0", 3]', weights, "config.json of Hub repo 'org/list' holds a JSON list, not an object"),
        "truncated": (bad_config(cfg), weights[: len(weights) // 2],
                      r"model.safetensors of Hub repo 'org/truncated' \(cached at .*\) is not a readable safetensors "
                      r"file .* corrupt or truncated"),
        "classes": (bad_config(cfg, num_classes=5, id2label=None, label2id=None), weights,
                    "only the classifier differs: model.safetensors of Hub repo 'org/classes' .* has 3 classes but "
                    "the model was built for 5.*num_classes=5"),
        "shape": (bad_config(cfg, variant="b1"), weights,
                  "the weights in model.safetensors of Hub repo 'org/shape' .* do not fit EfficientNetV2-b1"),
    }
    api = HfApi()
    for name, (config, safetensors, _) in cases.items():
        api.create_repo(f"org/{name}")
        api.create_commit(f"org/{name}", commit_message="tampered", operations=[
            CommitOperationAdd("config.json", config), CommitOperationAdd("model.safetensors", safetensors)])
    for name, (_, _, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            EfficientNetV2.from_pretrained(f"org/{name}")


@pytest.fixture
def train_module():
    from train_script import reset_accelerate, train

    reset_accelerate()
    yield train
    reset_accelerate()


@pytest.mark.numerics
def test_train_pushes_the_run_and_survives_a_failed_push(hub_server, train_module, tmp_path, monkeypatch, capsys):
    from effnetv2.data import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", num_per_class=4, image_size=32)

    def train(out: Path, repo: str) -> int:
        return train_module.main(["--data-path", str(data), "--output-dir", str(out), "--push-to-hub", repo,
                                  "--variant", "b0", "--image-size", "32", "--batch-size", "4", "--workers", "0",
                                  "--cpu", "--epochs", "1", "--max-steps", "2", "--seed", "0"])

    assert train(tmp_path / "run", "org/trained") == 0
    assert f"pushed to {hub_server.url}/org/trained" in capsys.readouterr().out
    assert_same_model(EfficientNetV2.from_pretrained("org/trained"), EfficientNetV2.from_pretrained(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "logs").is_dir()
    uploaded = set(hub_server.files("org/trained"))
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= uploaded
    assert not [f for f in uploaded if f.startswith(("checkpoints/", "logs/"))]

    # a second run pushed to the same repo keeps a card edited on the Hub, unless --overwrite-card
    edited = b"---\nlicense: mit\nlibrary_name: effnetv2\n---\n# Edited on the Hub\n"
    HfApi().upload_file(path_or_fileobj=edited, path_in_repo="README.md", repo_id="org/trained")
    assert train(tmp_path / "again", "org/trained") == 0
    assert hub_server.files("org/trained")["README.md"] == edited
    assert hub_server.files("org/trained")["model.safetensors"] == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert train_module.main(["--data-path", str(data), "--output-dir", str(tmp_path / "again"), "--push-to-hub",
                              "org/trained", "--overwrite-card", "--overwrite", "--variant", "b0", "--image-size", "32",
                              "--batch-size", "4", "--workers", "0", "--cpu", "--epochs", "1", "--max-steps", "1"]) == 0
    assert hub_server.files("org/trained")["README.md"] == (tmp_path / "again" / "README.md").read_bytes()
    capsys.readouterr()

    hub_server.fail("POST", r"/commit/main$", status=500)  # the Hub is down when the run ends
    out = tmp_path / "down"
    assert train(out, "org/later") == 1
    printed = capsys.readouterr().out
    assert "error: pushing to org/later failed (HfHubHTTPError: Server error '500 Internal Server Error'" in printed
    assert f"Everything is saved in {out}" in printed and f"hf upload org/later {out} ." in printed
    retry = next(line.strip() for line in printed.splitlines() if line.strip().startswith("python -c"))
    subprocess.run(retry, shell=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert_same_model(EfficientNetV2.from_pretrained("org/later"), EfficientNetV2.from_pretrained(out))
    assert not [f for f in hub_server.files("org/later") if f.startswith(("checkpoints/", "logs/"))]

    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    assert train(tmp_path / "refused", "org/refused") == 1
    printed = capsys.readouterr().out
    assert "error: pushing to org/refused failed (HfHubHTTPError:" in printed and "401" in printed
    assert "Log in (`hf auth login` or HF_TOKEN)" in printed and "org/refused" not in hub_server.repos
    assert EfficientNetV2.from_pretrained(tmp_path / "refused").num_classes == 5


def test_convert_cli_pushes_a_complete_repo(hub_server, tmp_path):
    from torchvision.models import efficientnet_v2_s

    torch.save(efficientnet_v2_s().state_dict(), tmp_path / "tv_s.pth")
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "effnetv2.convert", "torchvision", str(tmp_path / "tv_s.pth"),
                             "--out", str(out), "--push-to-hub", "org/conv"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"pushed to {hub_server.url}/org/conv/commit/" in result.stdout
    files = hub_server.files("org/conv")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    pushed, local = load_safetensors(files["model.safetensors"]), load_file(out / "model.safetensors")
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
    assert json.loads(files["config.json"]) == json.loads((out / "config.json").read_text())
    assert 'from_pretrained("org/conv")' in files["README.md"].decode()


def test_a_local_config_that_is_not_an_object_is_named(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"m/config.json holds a JSON list, not an object of settings"):
        EfficientNetV2.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("changes, key", [
    ({"pool": "attention", "attn_dim": 16000}, "attn_dim"),
    ({"pool": "attention", "attn_dim": -8}, "attn_dim"),
    ({"pool": "attention", "attn_dim": 8e6}, "attn_dim"),
    ({"num_classes": 10**6, "id2label": None, "label2id": None}, "num_classes"),
    ({"std": [0.2, float("nan"), 0.2]}, "std"),
    ({"mean": [0.5, float("inf"), 0.5]}, "mean"),
])
def test_a_hostile_local_config_is_refused_by_file_and_key(tmp_path, changes, key, monkeypatch):
    from effnetv2 import model as model_module

    tiny().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **changes}))
    # refused before the first layer is built (attn_dim 16000 would otherwise allocate gigabytes)
    monkeypatch.setattr(model_module, "ConvBNAct", lambda *a, **k: pytest.fail("a layer was built before the check"))
    with pytest.raises(ValueError, match=rf"m/config.json does not describe a valid model: {key} must be"):
        EfficientNetV2.from_pretrained(tmp_path / "m")


def write_safetensors_header(path: Path, header: dict) -> None:
    """A safetensors file by its format (8-byte little-endian header length, JSON header, data)."""
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob)


def test_weights_are_checked_from_the_header_before_any_tensor_is_read(tmp_path, monkeypatch):
    import safetensors.torch

    from effnetv2 import checkpoint

    model = tiny()
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    read = []
    real_load_file = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: read.append(a) or real_load_file(*a, **k))

    # A header declaring more tensors than any EfficientNetV2 has (1.2 M empty ones in the wild).
    count = checkpoint.MAX_HEADER_BYTES // 60
    write_safetensors_header(weights, {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                       for i in range(count)})
    with pytest.raises(ValueError, match=r"m/model.safetensors is not a readable safetensors file \(its header "
                                         r"claims [\d,]+ bytes; at most 8,388,608"):
        EfficientNetV2.from_pretrained(tmp_path / "m")
    # Weights of another architecture: refused by their shapes alone.
    EfficientNetV2("b1", num_classes=3).save_pretrained(tmp_path / "b1")
    weights.write_bytes((tmp_path / "b1" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"the weights in .*m/model.safetensors do not fit EfficientNetV2-b0"):
        EfficientNetV2.from_pretrained(tmp_path / "m")
    EfficientNetV2("b0", num_classes=7).save_pretrained(tmp_path / "seven")
    weights.write_bytes((tmp_path / "seven" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="only the classifier differs: .*m/model.safetensors has 7 classes"):
        EfficientNetV2.from_pretrained(tmp_path / "m")
    assert read == []
    weights.write_bytes(good)
    assert_same_model(EfficientNetV2.from_pretrained(tmp_path / "m"), model)
    assert len(read) == 1


def test_a_new_num_classes_keeps_the_backbone_and_warns_about_the_classifier(tmp_path, caplog):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    with caplog.at_level("WARNING", logger="effnetv2.hub"):
        loaded = EfficientNetV2.from_pretrained(tmp_path / "m", num_classes=5)
    state = loaded.state_dict()
    assert loaded.num_classes == 5 and state["head.classifier.weight"].shape == (5, 1280)
    assert state["head.classifier.bias"].shape == (5,)
    backbone = [k for k in saved if not k.startswith("head.classifier.")]
    assert len(backbone) == len(state) - 2
    assert all(torch.equal(state[k], saved[k]) for k in backbone)
    assert loaded.id2label == {str(i): str(i) for i in range(5)}
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "head.classifier re-initialised for 5 classes" in record.getMessage()
    assert "has 3" in record.getMessage()


def test_an_oversized_local_config_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    from effnetv2 import hub

    tiny().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    padded = json.dumps({**config, "source": {"notes": "x" * hub.MAX_CONFIG_BYTES}})
    (tmp_path / "m" / "config.json").write_text(padded)
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("config.json was parsed"))
    with pytest.raises(ValueError, match=rf"m/config.json is {len(padded):,} bytes, more than the 16,777,216"):
        EfficientNetV2.from_pretrained(tmp_path / "m")


def write_images(folder: Path, count: int, size: int = 40) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = torch.Generator().manual_seed(count)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def push_shipped(model: EfficientNetV2, repo_id: str, calibration: Path | None = None) -> dict:
    """``python -m effnetv2.export --ship --push-to-hub``: the weights and the exported graphs (int8 too,
    calibrated on the images of ``calibration``) in one commit; the manifest it pushed."""
    import tempfile

    from huggingface_hub import hf_hub_download

    from effnetv2.export.__main__ import main as export_main

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, model_card_kwargs={"repo_id": repo_id})
        calibrate = ["--int8", "--calibration", str(calibration)] if calibration else []
        assert export_main(["--model", folder, "--ship", *calibrate, "--push-to-hub", repo_id]) == 0
    return json.loads(Path(hf_hub_download(repo_id, "onnx/graphs.json")).read_text())


@pytest.mark.numerics
def test_shipped_graphs_run_from_the_hub_without_exporting(hub_server, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import effnetv2.inference as inference
    from effnetv2.export import relative_error
    from effnetv2.inference import Predictor

    model = tiny()
    manifest = push_shipped(model, "org/shipped", write_images(tmp_path / "calibration", 12))
    assert len(hub_server.history("org/shipped")) == 2  # the repo's first commit, then one push
    stored = hub_server.files("org/shipped")
    assert {"onnx/model.onnx", "onnx/model_int8.onnx", "onnx/graphs.json"} <= set(stored)
    card = stored["README.md"].decode()
    assert "## Runtimes in this repo" in card and manifest["graphs"]["int8"]["sha256"][:16] in card
    assert hashlib.sha256(stored["onnx/model.onnx"]).hexdigest() == manifest["graphs"]["fp32"]["sha256"]

    def no_export(*args, **kwargs):
        raise AssertionError("exported although the repo ships a good graph")

    monkeypatch.setattr(inference, "export_onnx", no_export)
    monkeypatch.setattr(inference, "export_int8", no_export)
    cache = tmp_path / "graph-cache"
    predictor = Predictor("org/shipped", backend="onnxruntime", cache_dir=cache)
    assert predictor.graph_path.read_bytes() == stored["onnx/model.onnx"]
    assert relative_error(predictor(X), model(X).detach()) < 1e-5
    int8 = Predictor("org/shipped", backend="onnxruntime", precision="int8", cache_dir=cache)  # no calibration: shipped
    assert int8.graph_path.read_bytes() == stored["onnx/model_int8.onnx"]
    assert int8(X).shape == (2, 3)
    assert not cache.exists() or not list(cache.rglob("*.onnx"))


@pytest.mark.numerics
def test_a_tampered_shipped_graph_or_new_weights_fall_back_to_exporting(hub_server, tmp_path, monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    import effnetv2.inference as inference
    from effnetv2.export import export_onnx, relative_error
    from effnetv2.inference import Predictor

    model, other = tiny(), tiny(seed=1)
    assert not torch.equal(model(X).argmax(1), other(X).argmax(1))  # a wrong graph shows in the classes
    push_shipped(model, "org/swapped")
    swapped = export_onnx(other, tmp_path / "other.onnx").read_bytes()
    HfApi().upload_file(path_or_fileobj=swapped, path_in_repo="onnx/model.onnx", repo_id="org/swapped")
    push_shipped(model, "org/retrained")
    other.save_pretrained(tmp_path / "other")  # new weights uploaded, the graphs left as they were
    HfApi().upload_file(path_or_fileobj=tmp_path / "other" / "model.safetensors", path_in_repo="model.safetensors",
                        repo_id="org/retrained")
    exports = []
    real_export = inference.export_onnx
    monkeypatch.setattr(inference, "export_onnx", lambda *a, **k: exports.append(a[0]) or real_export(*a, **k))
    for repo, weights, why in (
            ("org/swapped", model, "its SHA-256 differs from the one in onnx/graphs.json (damaged or replaced)"),
            ("org/retrained", other, "it was exported from other weights (its fingerprint in onnx/graphs.json differs)")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="effnetv2.inference"):
            predictor = Predictor(repo, backend="onnxruntime", cache_dir=tmp_path / "cache")
        assert [r.getMessage() for r in caplog.records] == [
            f"shipped graph onnx/model.onnx of {repo} is not used: {why}; exporting it here instead"]
        assert predictor.graph_path.parent == tmp_path / "cache" / "onnx"
        assert relative_error(predictor(X), weights(X).detach()) < 1e-5
    assert len(exports) == 2
