"""The two architectures of the study; each is a plain ``nn.Module`` factory usable as a Hydra ``_target_``."""

from lit_sharp.models.preact_resnet import PreActResNet18, preact_resnet18


def __getattr__(name: str):
    # Lazy, so that code using only the ResNet (e.g. bench/gpu_check.py) does not import the ViT's dependencies.
    if name == "simple_vit":
        from lit_sharp.models.vit import simple_vit

        return simple_vit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PreActResNet18", "preact_resnet18", "simple_vit"]
