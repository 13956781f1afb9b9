"""Pre-activation ResNet-18 for 32x32 inputs (He et al. 2016, "Identity Mappings in Deep Residual Networks").

The CIFAR variant of docs/protocol.md section 1: 3x3 stem without max-pool, four stages of two blocks, widths
``w, 2w, 4w, 8w`` with strides 1/2/2/2, bias-free convolutions, and a BN-ReLU-pool-linear head.

Module names, and so ``state_dict`` keys, are those of the paper's released ``models.py`` ``PreActResNet18``
(``conv1``, ``layer1.0.bn1``, ..., ``layer2.0.shortcut.0``, ``bn``, ``linear``), so checkpoints trained with the
authors' code load as they are. Unlike that code, the model does not normalize its input (theirs is an identity
``Normalize`` with mean 0 and std 1, which holds no weights); normalization is done in the data pipeline.
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut.

    When the shape changes, the shortcut is a 1x1 convolution of the *pre-activated* input, as in the paper's code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            # A one-element Sequential, as in the released code: its key is ``shortcut.0.weight``.
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (CIFAR variant).

    Args:
        num_classes: size of the output layer.
        width: channels of the stem and first stage (64 in the paper: 11.17M parameters); stages use
            ``width * (1, 2, 4, 8)``. Small widths give tiny models for tests.
        in_channels: input channels.
        blocks_per_stage: 2 for ResNet-18; 1 gives a shallower network for quick benchmarks.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, blocks_per_stage: int = 2) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        in_planes = width
        for stage, (multiplier, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            planes = width * multiplier
            blocks = [PreActBlock(in_planes, planes, stride)]
            blocks += [PreActBlock(planes, planes, 1) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            in_planes = planes
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for stage in self.stages:
            out = stage(out)  # after layer4: (B, 8w, H/8, W/8)
        out = torch.relu(self.bn(out))
        out = out.mean(dim=(2, 3))  # global average pool -> (B, 8w)
        return self.linear(out)

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        """``layer1`` to ``layer4``, in order."""
        return self.layer1, self.layer2, self.layer3, self.layer4


def preact_resnet18(num_classes: int = 10, width: int = 64, blocks_per_stage: int = 2) -> PreActResNet18:
    """Build the study's ``resnet18`` (see :class:`PreActResNet18`)."""
    return PreActResNet18(num_classes=num_classes, width=width, blocks_per_stage=blocks_per_stage)
