"""Parity of the converters, as figures: max |Δ| of pooled features and logits between our converted
model and the source model (torchvision efficientnet_v2_s/m/l, timm tf_efficientnetv2_b0..xl), on
random weights with BatchNorm statistics measured on random images, at two input sizes (one odd).

    python benchmarks/parity.py                  # every variant and source, 64 and 67 px
    python benchmarks/parity.py --sizes 224 225 --only s

Nothing is downloaded. The same check, with a 1e-4-of-scale tolerance, is in tests/test_convert.py.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from effnetv2 import VARIANTS, convert


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and statistics measured on random images (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.reset_running_stats()
        m.momentum = None
    model.train()(torch.randn(4, 3, 64, 64, generator=g))
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=g) / classifier.in_features ** 0.5)
    return model.eval()


@torch.no_grad()
def compare(ours, ref, size: int, kind: str) -> tuple[float, float, float, float]:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    pooled = ours.forward_head(ours.forward_features(x), pre_logits=True)
    if kind == "torchvision":
        ref_pooled, ref_logits = ref.avgpool(ref.features(x)).flatten(1), ref(x)
    else:
        ref_pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        ref_logits = ref(x)
    logits = ours(x)
    return ((pooled - ref_pooled).abs().max().item(), ref_pooled.abs().max().item(),
            (logits - ref_logits).abs().max().item(), ref_logits.abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 67])
    parser.add_argument("--only", nargs="*", help="variants to check (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [("torchvision", v) for v in convert.TORCHVISION_VARIANTS] + [("timm", v) for v in VARIANTS]
    print("| source | variant | params | size | max |Δ pooled| (scale) | max |Δ logit| (scale) |")
    print("|---|---|---|---|---|---|")
    for kind, variant in cases:
        if args.only and variant not in args.only:
            continue
        if kind == "torchvision":
            import torchvision

            ref = randomise(getattr(torchvision.models, f"efficientnet_v2_{variant}")())
            ours = convert.from_torchvision(ref)
        else:
            try:
                import timm
            except ImportError:
                print(f"| timm | {variant} | (timm not installed) | | | |")
                continue
            ref = randomise(timm.create_model(f"tf_efficientnetv2_{variant}"))
            ours = convert.from_timm(ref)
        params = sum(p.numel() for p in ours.parameters())
        for size in args.sizes:
            dp, sp, dl, sl = compare(ours, ref, size, kind)
            print(f"| {kind} | {variant} | {params:,} | {size} | {dp:.2g} ({sp:.3g}) | {dl:.2g} ({sl:.3g}) |", flush=True)
        del ref, ours


if __name__ == "__main__":
    main()
