"""Train and measure one model (or, with -m, a grid of them): ``python train.py experiment=quickstart``."""

import sys

import hydra
from omegaconf import DictConfig

from lit_sharp.errors import UserError
from lit_sharp.train import run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
