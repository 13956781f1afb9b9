"""The CLIP ViT-B/32 fine-tunes of model soups (Wortsman et al. 2022): 72 ImageNet classifiers from one OpenAI CLIP.

Each release file ``model_<i>.pt`` is the state dict of a wrapper around the whole OpenAI CLIP model (text tower
removed): the image tower under ``model.visual.*`` (OpenAI names: ``conv1``, ``class_embedding``,
``transformer.resblocks.<j>.attn.in_proj_weight``, ..., ``ln_post``, ``proj``), a few leftover text keys
(``model.token_embedding.weight``, ``model.logit_scale``, ...) that are not used, and ``classification_head.weight``
/ ``.bias`` (1000 x 512). The classifier is ``head(f / ||f||_2)`` with ``f`` the tower's 512-d projected features.
``model_0`` is the linear-probe initialisation the fine-tunes start from (its only entry in
``hparam_info.json`` is ``info``); ``hparam_info.json`` holds each
model's fine-tuning hyperparameters (``lr``, ``wd``, ``epochs``, ``aug`` as ``rand-m<M>-n<N>`` or null, ``mix``,
``smoothing``).

The tower is timm's ``vit_base_patch32_clip_quickgelu_224``: CLIP was trained with quick-GELU
(``x * sigmoid(1.702 x)``), and plain GELU moves the features by about 3e-2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_sharp.zoo.architecture import create_timm_model
from lit_sharp.zoo.safe_files import ModelFileError, load_torch_state_dict, require_file

RELEASE_URL = "https://github.com/mlfoundations/model-soups/releases/download/v0.0.2"
HPARAMS_URL = "https://raw.githubusercontent.com/mlfoundations/model-soups/main/hparam_info.json"
HPARAMS_FILE = "hparam_info.json"
NUM_MODELS = 72
TOWER = "vit_base_patch32_clip_quickgelu_224.openai"
# OpenAI CLIP's preprocessing, with which the soups were fine-tuned and evaluated: bicubic resize of the short side
# to 224 and a 224 centre crop, i.e. crop_pct 1 (timm's config for these weights says 0.9).
CROP_PCT = 1.0
TOWER_PREFIX = "model.visual."
HEAD_PREFIX = "classification_head."


class NormalizedFeatureClassifier(nn.Module):
    """``logits = head(f / ||f||_2)`` with ``f = encoder(x)``: the soups' classifier on CLIP image features.

    The encoder's timm ``pretrained_cfg`` is exposed, so ``timm.data.resolve_model_data_config`` works on the
    whole classifier.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pretrained_cfg = getattr(encoder, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.encoder(x), dim=-1))


def soup_names() -> list[str]:
    """The release's models: ``model_0`` ... ``model_71``."""
    return [f"model_{i}" for i in range(NUM_MODELS)]


def read_hparams(path: Path) -> dict[str, dict[str, Any]]:
    """``model_<i> -> hyperparameters`` from ``hparam_info.json``; a null ``aug`` (no RandAugment) becomes ``"none"``.

    Raises:
        ModelFileError: the file is missing or is not the release's JSON object of objects.
    """
    fix = "fetch it with `python -m lit_sharp.zoo download clip_soups --to DIR`"
    require_file(path, fix)
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError("expected an object of objects")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(path, f"not the model soups hparam_info.json ({exc})", fix) from exc
    return {name: {key: ("none" if key == "aug" and value is None else value) for key, value in entry.items()}
            for name, entry in table.items()}


def load_soup_state_dict(state: dict[str, torch.Tensor], model_kwargs: dict[str, Any] | None = None
                         ) -> NormalizedFeatureClassifier:
    """The classifier of a soups-layout state dict: timm tower (+ ``model_kwargs``), L2 normalisation, linear head.

    The tower's keys are converted by timm's own OpenAI-CLIP converter; the tower's output size is the checkpoint's
    projection width. Loading is strict, so a key or shape that does not fit raises.
    """
    from timm.models.vision_transformer import _convert_openai_clip

    head_weight = state[f"{HEAD_PREFIX}weight"]
    kwargs = {"num_classes": state[f"{TOWER_PREFIX}proj"].shape[1], **(model_kwargs or {})}
    tower = create_timm_model(TOWER, kwargs, crop_pct=CROP_PCT)
    tower.load_state_dict(_convert_openai_clip(state, tower, prefix=TOWER_PREFIX), strict=True)
    head = nn.Linear(head_weight.shape[1], head_weight.shape[0])
    head.load_state_dict({"weight": head_weight, "bias": state[f"{HEAD_PREFIX}bias"]})
    return NormalizedFeatureClassifier(tower, head).eval()


@dataclass(frozen=True)
class ClipSoupsZoo:
    """The 72 CLIP ViT-B/32 ImageNet fine-tunes, kept as ``<root>/model_<i>.pt`` next to ``hparam_info.json``."""

    zoo: str = "clip_soups"
    release_url: str = RELEASE_URL
    hparams_url: str = HPARAMS_URL

    def metadata_files(self) -> list[tuple[str, str]]:
        return [(self.hparams_url, HPARAMS_FILE)]

    def names(self, root: Path) -> list[str]:
        return soup_names()

    def file_name(self, name: str) -> str:
        return f"{name}.pt"

    def url(self, name: str) -> str:
        return f"{self.release_url}/{self.file_name(name)}"

    def hparams(self, name: str, root: Path) -> dict[str, Any]:
        path = root / HPARAMS_FILE
        table = read_hparams(path)
        if name not in table:
            raise ModelFileError(path, f"has no entry {name!r}", "the zoo's models are model_0 ... model_71")
        return table[name]

    def load(self, name: str, root: Path, model_kwargs: dict[str, Any] | None = None):
        """The fine-tune ``name`` in evaluation mode, with its hyperparameters."""
        hparams = self.hparams(name, root)
        path = root / self.file_name(name)
        fix = f"fetch it with `python -m lit_sharp.zoo download {self.zoo} --to {root}`"
        state = load_torch_state_dict(path, fix)
        for key in (f"{HEAD_PREFIX}weight", f"{HEAD_PREFIX}bias", f"{TOWER_PREFIX}class_embedding",
                    f"{TOWER_PREFIX}proj"):
            if key not in state:
                raise ModelFileError(path, f"has no {key!r}; not a model soups checkpoint", fix)
        try:
            return load_soup_state_dict(state, model_kwargs), hparams
        except (RuntimeError, ValueError) as exc:
            raise ModelFileError(path, f"does not fit {TOWER} ({str(exc).splitlines()[0]})", fix) from exc
