"""torch.hub entry points: ``torch.hub.load("<owner>/<repo>", "efficientnetv2", variant="s", weights=...)``
and ``efficientnetv2_<variant>``."""
dependencies = ["torch", "torchvision", "huggingface_hub", "safetensors"]

from functools import partial as _partial

from effnetv2 import EfficientNetV2 as _EfficientNetV2
from effnetv2.configs import VARIANTS as _VARIANTS


def efficientnetv2(variant: str | None = None, weights: str | None = None, **kwargs) -> _EfficientNetV2:
    """EfficientNetV2 of ``variant`` (b0..b3, s, m, l, xl; default s), randomly initialised with ``kwargs``, or
    in eval mode from ``weights``: any source ``effnetv2.sources.load_model`` takes (folder, Hub id
    ``org/name[@revision]``, ``torchvision:<s|m|l>``), with only ``num_classes`` (a new head) to change."""
    if weights is None:
        return _EfficientNetV2(variant or "s", **kwargs)
    from effnetv2.sources import load_model

    unknown = sorted(set(kwargs) - {"num_classes"})
    if unknown:
        raise ValueError(f"with weights={weights!r}, only num_classes can change (got {unknown}): the weights' "
                         f"config.json sets the rest")
    model = load_model(weights, **kwargs)
    if variant is not None and model.variant != variant:
        raise ValueError(f"weights={weights!r} are EfficientNetV2-{model.variant}, not {variant}: drop variant= "
                         f"or pick weights of that variant")
    return model


for _name in _VARIANTS:
    globals()[f"efficientnetv2_{_name}"] = _partial(efficientnetv2, _name)
    globals()[f"efficientnetv2_{_name}"].__doc__ = f"EfficientNetV2-{_name.upper()} (see ``efficientnetv2``)."
