"""The two architectures of the study, with the ``state_dict`` keys of the paper's released code (docs/protocol.md
section 1); each is a plain ``nn.Module`` factory usable as a Hydra ``_target_``.

:mod:`lit_sharp.models.convert` renames ResNet checkpoints of the project's earlier key layout.
"""

from lit_sharp.models.preact_resnet import PreActResNet18, preact_resnet18
from lit_sharp.models.vit import SimpleViT, simple_vit

__all__ = ["PreActResNet18", "SimpleViT", "preact_resnet18", "simple_vit"]
