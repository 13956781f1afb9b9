"""Any timm model with pretrained weights (``zoo=timm``), for questions beyond the paper's zoos.

timm downloads the weights itself (Hugging Face Hub, cached under ``HF_HOME``); this module only turns a name that
timm does not know, or a download that fails, into one clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_sharp.errors import ConfigError
from lit_sharp.zoo.download import DownloadError


@dataclass(frozen=True)
class TimmZoo:
    """timm's pretrained models, named by the user (``resnet50.a1_in1k``, ``vit_base_patch16_224.augreg_in1k``...)."""

    zoo: str = "timm"

    def metadata_files(self) -> list[tuple[str, str]]:
        return []

    def names(self, root: Path) -> list[str]:
        raise ConfigError("zoo", self.zoo, "timm's zoo has no fixed model list: name the timm models to measure")

    def file_name(self, name: str) -> str:
        raise ConfigError("zoo", self.zoo, "timm keeps its weights in its own cache, not in the zoo's folder")

    def hparams(self, name: str, root: Path) -> dict[str, Any]:
        """The pretrained tag's own description: architecture and tag (``resnet50``, ``a1_in1k``)."""
        architecture, _, tag = name.partition(".")
        return {"architecture": architecture, "tag": tag or "default"}

    def load(self, name: str, root: Path, model_kwargs: dict[str, Any] | None = None):
        """``timm.create_model(name, pretrained=True)`` in evaluation mode, with its hyperparameters.

        Raises:
            ConfigError: timm has no such model, or none with pretrained weights.
            DownloadError: the weights are not cached and cannot be downloaded (offline).
        """
        import timm

        if not timm.is_model(name) or not timm.is_model_pretrained(name):
            raise ConfigError("zoo.model", name, "timm has no pretrained model of this name; see "
                              "`python -c \"import timm; print(timm.list_pretrained('PATTERN*'))\"`")
        try:
            model = timm.create_model(name, pretrained=True, **(model_kwargs or {}))
        except OSError as exc:
            raise DownloadError(f"timm could not fetch the pretrained weights of {name} ({type(exc).__name__}); "
                                "run once with internet access so that timm caches them (under HF_HOME)") from exc
        return model.eval(), self.hparams(name, root)
