"""The two architectures of the study; each is a plain ``nn.Module`` factory usable as a Hydra ``_target_``."""

from lit_sharp.models.preact_resnet import PreActResNet18, preact_resnet18
from lit_sharp.models.vit import simple_vit

__all__ = ["PreActResNet18", "preact_resnet18", "simple_vit"]
