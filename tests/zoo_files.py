"""Writers of the zoos' real file formats, for tests: AugReg ``.npz`` and ``index.csv``, model soups ``.pt``.

``save_augreg_npz`` inverts timm's JAX loader (``timm.models.vision_transformer._load_weights``), key by key, from the
layout of the released checkpoints; ``OpenAIClipVisual`` is OpenAI CLIP's image tower (``VisionTransformer`` of
openai/CLIP's ``model.py``: conv without bias, class embedding, ``ln_pre``, pre-norm blocks with
``nn.MultiheadAttention`` and quick-GELU MLPs, ``ln_post`` on the class token, projection ``proj``).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: A tiny ViT in the AugReg zoos' architecture family (vit_base_patch16_224 with smaller sizes).
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
#: The same for the soups' CLIP tower (vit_base_patch32_clip_quickgelu_224); its output size comes from ``proj``.
TINY_CLIP = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}

INDEX_COLUMNS = ("name", "ds", "epochs", "lr", "aug", "wd", "do", "sd", "best_val", "final_val", "final_test",
                 "adapt_ds", "adapt_lr", "adapt_steps", "adapt_resolution", "adapt_final_val", "adapt_final_test",
                 "params", "infer_samples_per_sec", "filename", "adapt_filename")
AUGS = ("none", "light0", "light1", "medium1", "medium2", "strong1", "strong2")


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn from N(0, 0.2^2) (timm zero-initialises some), so that a missed weight shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def save_augreg_npz(model: nn.Module, path: Path) -> None:
    """Write a timm ``VisionTransformer``'s weights in the released AugReg ``.npz`` layout (no key prefix)."""
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float32)

    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": arr(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),  # OIHW -> HWIO
        "embedding/bias": arr(model.patch_embed.proj.bias),
        "cls": arr(model.cls_token),
        "Transformer/posembed_input/pos_embedding": arr(model.pos_embed),
        "Transformer/encoder_norm/scale": arr(model.norm.weight),
        "Transformer/encoder_norm/bias": arr(model.norm.bias),
        "head/kernel": arr(model.head.weight.T),
        "head/bias": arr(model.head.bias),
    }
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = arr(block.norm1.weight), arr(block.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = arr(block.norm2.weight), arr(block.norm2.bias)
        qkv_w = block.attn.qkv.weight.reshape(3, dim, dim)  # (out, in) per projection
        qkv_b = block.attn.qkv.bias.reshape(3, dim)
        for j, name in enumerate(("query", "key", "value")):
            w[mha + f"{name}/kernel"] = arr(qkv_w[j].T.reshape(dim, heads, dim // heads))
            w[mha + f"{name}/bias"] = arr(qkv_b[j].reshape(heads, dim // heads))
        w[mha + "out/kernel"] = arr(block.attn.proj.weight.reshape(dim, heads, dim // heads).permute(1, 2, 0))
        w[mha + "out/bias"] = arr(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = arr(fc.weight.T)
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = arr(fc.bias)
    np.savez(path, **w)


def augreg_file_name(ds: str, aug: str, wd: float, dropout: float, adapt_lr: float, *, name: str = "B_16",
                     res: int = 224, adapt_ds: str = "imagenet2012") -> str:
    """A fine-tune's ``adapt_filename`` as the release writes it (without ``.npz``)."""
    return (f"{name}-{ds}-300ep-lr_0.001-aug_{aug}-wd_{wd}-do_{dropout}-sd_{dropout}"
            f"--{adapt_ds}-steps_20k-lr_{adapt_lr}-res_{res}")


def index_row(ds: str, aug: str, wd: float, dropout: float, adapt_lr: float, *, name: str = "B/16", res: int = 224,
              adapt_ds: str = "imagenet2012") -> dict[str, object]:
    """One ``index.csv`` row, with made-up accuracies."""
    file_name = augreg_file_name(ds, aug, wd, dropout, adapt_lr, name=name.replace("/", "_").replace("+", "_"),
                                 res=res, adapt_ds=adapt_ds)
    return {"name": name, "ds": ds, "epochs": 300, "lr": 0.001, "aug": aug, "wd": wd, "do": dropout, "sd": dropout,
            "best_val": 0.7, "final_val": 0.7, "final_test": 0.7, "adapt_ds": adapt_ds, "adapt_lr": adapt_lr,
            "adapt_steps": 20000, "adapt_resolution": res, "adapt_final_val": 0.8, "adapt_final_test": 0.8,
            "params": 86567656, "infer_samples_per_sec": 1000.0, "filename": file_name.split("--")[0],
            "adapt_filename": file_name}


def zoo_rows(ds: str) -> list[dict[str, object]]:
    """The 56 rows of one paper zoo: 7 augmentations x wd {0.03, 0.1} x dropout {0, 0.1} x fine-tuning lr."""
    return [index_row(ds, aug, wd, dropout, lr)
            for aug, wd, dropout, lr in itertools.product(AUGS, (0.03, 0.1), (0.0, 0.1), (0.01, 0.03))]


def distractor_rows() -> list[dict[str, object]]:
    """Rows of the release that belong to neither paper zoo."""
    return [
        index_row("i1k", "none", 0.1, 0.0, 0.01, name="S/16"),
        index_row("i21k_30", "none", 0.1, 0.0, 0.01),
        index_row("i1k", "none", 0.1, 0.0, 0.01, res=384),
        index_row("i1k", "none", 0.1, 0.0, 0.01, adapt_ds="cifar100"),
        index_row("i21k", "medium1", 0.1, 0.0, 0.003),
        index_row("i21k", "medium1", 0.1, 0.1, 0.01, name="R50+L/32"),
    ]


def write_index(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class OpenAIClipVisual(nn.Module):
    """OpenAI CLIP's image tower, batch-first."""

    def __init__(self, resolution: int = 32, patch: int = 8, width: int = 32, layers: int = 2, heads: int = 2,
                 output_dim: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


def soup_state_dict(visual: OpenAIClipVisual, head: nn.Linear) -> dict[str, torch.Tensor]:
    """The release's key layout: the CLIP wrapper's keys (text leftovers included) and ``classification_head.*``."""
    width = visual.proj.shape[1]
    state = {f"model.visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()}
    state.update({
        "model.positional_embedding": torch.randn(77, width), "model.text_projection": torch.randn(width, width),
        "model.logit_scale": torch.tensor(4.6052), "model.token_embedding.weight": torch.randn(100, width),
        "model.ln_final.weight": torch.ones(width), "model.ln_final.bias": torch.zeros(width),
        "classification_head.weight": head.weight.detach().clone(),
        "classification_head.bias": head.bias.detach().clone(),
    })
    return state


def soup_reference_logits(visual: OpenAIClipVisual, head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The soups' classifier: ``head(f / ||f||)`` with the CLIP features ``f``."""
    features = visual(x)
    return head(features / features.norm(dim=-1, keepdim=True))


def write_hparam_info(path: Path, count: int = 72) -> dict[str, dict]:
    """A ``hparam_info.json`` in the release's format (``model_0`` is the linear-probe start)."""
    table: dict[str, dict] = {"model_0": {"info": "LP initialization"}}
    for i in range(1, count):
        table[f"model_{i}"] = {"aug": None if i % 2 else f"rand-m{i % 20}-n{i % 3}", "wd": 0.001 * i,
                               "lr": 1e-6 * i, "mix": 0.0, "smoothing": 0.1, "epochs": 4 + i % 10}
    path.write_text(json.dumps(table))
    return table

