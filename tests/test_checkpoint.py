"""effnetv2.checkpoint: the weights fingerprint, and which files it reads (the safe reading and checked
loading of weights files are exercised through ``from_pretrained`` in test_hub.py)."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from effnetv2.checkpoint import read_state_dict, weights_fingerprint
from effnetv2.sources import parse_source


def test_weights_fingerprint_sees_every_weight_buffer_dtype_and_context():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    reference = weights_fingerprint(model)
    copy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    copy.load_state_dict(model.state_dict())
    assert weights_fingerprint(copy) == reference
    assert weights_fingerprint(copy, "config A") != reference != weights_fingerprint(copy, "config B")
    copy[1].running_var[2] += 1e-3  # a BatchNorm statistic, not a parameter
    assert weights_fingerprint(copy) != reference
    assert weights_fingerprint(model.half()) != reference


def test_every_weight_suffix_reads_back_whatever_its_case(tmp_path):
    """What parse_source calls a weights file (``WEIGHT_SUFFIXES``, any case) is what read_state_dict reads."""
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    for suffix in (".safetensors", ".SafeTensors", ".pth", ".PT", ".bin", ".ckpt"):
        path = tmp_path / f"weights{suffix}"
        if suffix.lower() == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        assert torch.equal(read_state_dict(path)["w"], state["w"]), suffix
        assert parse_source(str(path)).kind == "weights"


def test_safetensors_shapes_come_from_the_header(tmp_path):
    from effnetv2.checkpoint import safetensors_shapes

    tensors = {"a": torch.zeros(2, 3), "b.c": torch.zeros(0), "d": torch.zeros((), dtype=torch.int64),
               "e": torch.zeros(1, 4, 1, 5, dtype=torch.float16)}
    save_file(tensors, tmp_path / "w.safetensors")
    assert safetensors_shapes(tmp_path / "w.safetensors") == {"a": (2, 3), "b.c": (0,), "d": (), "e": (1, 4, 1, 5)}
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        safetensors_shapes(tmp_path / "cut.safetensors")


def test_sha256_file_is_the_digest_of_every_byte(tmp_path):
    """sha256_file equals hashlib over the whole content, past a megabyte (its chunk) too."""
    import hashlib
    import os

    from effnetv2.checkpoint import sha256_file

    for size in (0, 5, (3 << 20) + 7):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest(), size
