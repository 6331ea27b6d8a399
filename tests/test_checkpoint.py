"""effnetv2.checkpoint: the weights fingerprint (the safe reading and checked loading of weights files are
exercised through ``from_pretrained`` in test_hub.py)."""
from torch import nn

from effnetv2.checkpoint import weights_fingerprint


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
