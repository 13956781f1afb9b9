"""Building a zoo's timm architecture, with a data config that follows any size override."""

from __future__ import annotations

from typing import Any

from torch import nn


def create_timm_model(name: str, model_kwargs: dict[str, Any] | None = None, **cfg_overlay: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **model_kwargs)``, its weights left for the caller to load.

    timm's data config comes from the pretrained tag (224 pixels for every zoo model); an ``img_size`` override (a
    small model for tests) changes the model's input, so the config's ``input_size`` follows it.

    Args:
        name: a timm name with its pretrained tag (``vit_base_patch16_224.augreg_in1k``), which picks the config.
        model_kwargs: architecture overrides passed to timm.
        **cfg_overlay: pretrained config entries to replace (``crop_pct``...).
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
        cfg_overlay = {"input_size": (3, height, width), **cfg_overlay}
    return timm.create_model(name, pretrained=False, pretrained_cfg_overlay=cfg_overlay or None, **kwargs)
