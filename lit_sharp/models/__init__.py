"""The two architectures of the study, with the ``state_dict`` keys of the paper's released code (docs/protocol.md
section 1); each is a plain ``nn.Module`` factory usable as a Hydra ``_target_``.

:mod:`lit_sharp.models.convert` renames ResNet checkpoints of the project's earlier key layout.
"""

from lit_sharp.models.preact_resnet import PreActResNet18, preact_resnet18


def __getattr__(name: str):
    # Lazy, so that code using only the ResNet (e.g. bench/gpu_check.py) does not import the ViT's dependencies.
    if name in ("SimpleViT", "simple_vit"):
        from lit_sharp.models import vit

        return getattr(vit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PreActResNet18", "SimpleViT", "preact_resnet18", "simple_vit"]
