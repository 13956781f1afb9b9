"""SimpleViT (Beyer et al. 2022, "Better plain ViT baselines for ImageNet-1k") as in vit-pytorch 0.40.2.

The paper's code pins vit-pytorch 0.40.2; later releases (1.x) changed the network under the same name (LayerNorms
on the raw patches, after the patch embedding and at the end of the transformer; no LayerNorm in the head), which
changes its invariances and so its adaptive sharpness. The 0.40.2 network is therefore written out here
(docs/protocol.md section 1): patch embedding = rearrange into ``p x p`` patches + Linear, fixed 2-D sin-cos position
embedding, ``depth`` pre-norm blocks (attention without biases, LayerNorm-Linear-GELU-Linear MLP), mean pooling,
LayerNorm + Linear head. Module names, and so ``state_dict`` keys, are those of 0.40.2, so the authors' checkpoints
load as they are. Defaults are the paper's CIFAR-10 model: 18,927,114 parameters.

The current vit-pytorch network stays reachable as ``variant="vit_pytorch_latest"``, outside the paper's experiments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

# The position embedding is the one block that did not change from 0.40.2 to 1.x: the same formula (sin/cos of x and
# y with frequencies temperature ** -(i / (dim/4 - 1))), only its signature went from a patch tensor to (h, w, dim).
from vit_pytorch.simple_vit import posemb_sincos_2d

VARIANTS = ("paper", "vit_pytorch_latest")


class Attention(nn.Module):
    """Pre-norm multi-head self-attention: ``softmax(q k^T / sqrt(dim_head)) v``, projections without bias."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        # (B, N, 3 * H * d) -> three (B, H, N, d); the fused kernel computes 0.40.2's softmax(q k^T * d^-1/2) v.
        q, k, v = self.to_qkv(self.norm(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class FeedForward(nn.Module):
    """Pre-norm MLP ``Linear(GELU(Linear(LayerNorm(x))))``; one ``net`` Sequential, as the keys ``net.0..3`` need."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """``depth`` residual pairs ``x + attn(x)``, ``x + ff(x)``; no final LayerNorm (that came with vit-pytorch 1.x)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)]) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class SimpleViT(nn.Module):
    """The SimpleViT of vit-pytorch 0.40.2 (square images and patches).

    Args:
        image_size: input height and width.
        patch_size: patch height and width; must divide ``image_size``.
        num_classes: size of the output layer.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_dim: hidden width of the MLPs.
        channels: input channels.
        dim_head: width of one attention head.
    """

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(channels * patch_size * patch_size, dim),
        )
        # Fixed, so not a parameter nor part of the state_dict (0.40.2 recomputed it in every forward).
        self.register_buffer("pos_embedding", posemb_sincos_2d(h=grid, w=grid, dim=dim), persistent=False)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.linear_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)  # (B, N, dim), patches in row-major order
        x = self.transformer(x + self.pos_embedding.to(x.dtype))
        return self.linear_head(x.mean(dim=1))


def simple_vit(
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 4,
    dim: int = 512,
    depth: int = 6,
    heads: int = 16,
    mlp_dim: int = 1024,
    dim_head: int = 64,
    variant: str = "paper",
) -> nn.Module:
    """Build the study's ``simplevit``; smaller ``dim``/``depth``/``heads`` give tiny models for tests.

    Args:
        variant: ``"paper"`` (vit-pytorch 0.40.2, the network of the paper) or ``"vit_pytorch_latest"`` (the
            ``SimpleViT`` of the installed vit-pytorch, a different network; not for the paper's experiments).

    Raises:
        ValueError: ``image_size`` is not a multiple of ``patch_size``, or an unknown ``variant``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if variant not in VARIANTS:
        raise ValueError(f"model variant must be one of {VARIANTS}, got {variant!r}")
    kwargs = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, depth=depth,
                  heads=heads, mlp_dim=mlp_dim, dim_head=dim_head)
    if variant == "vit_pytorch_latest":
        from vit_pytorch import SimpleViT as LatestSimpleViT

        return LatestSimpleViT(**kwargs)
    return SimpleViT(**kwargs)
