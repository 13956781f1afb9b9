"""SimpleViT (Beyer et al. 2022, "Better plain ViT baselines for ImageNet-1k") from vit-pytorch.

Defaults are the paper's CIFAR-10 model (protocol.md section 1): patch 4, dim 512, depth 6, 16 heads, MLP 1024,
head dimension 64: 18.93M parameters. Fixed 2-D sin-cos position embedding, mean pooling, no CLS token.
"""

from __future__ import annotations

from torch import nn
from vit_pytorch import SimpleViT


def simple_vit(
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 4,
    dim: int = 512,
    depth: int = 6,
    heads: int = 16,
    mlp_dim: int = 1024,
    dim_head: int = 64,
) -> nn.Module:
    """Build the study's ``simplevit``; smaller ``dim``/``depth``/``heads`` give tiny models for tests.

    Raises:
        ValueError: ``image_size`` is not a multiple of ``patch_size``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    return SimpleViT(
        image_size=image_size,
        patch_size=patch_size,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        dim_head=dim_head,
    )
