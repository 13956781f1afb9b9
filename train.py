"""Train and measure one model (or, with -m, a grid of them): ``python train.py experiment=quickstart``.

The same command as ``python -m lit_sharp`` (see :mod:`lit_sharp.cli`), for a checkout.
"""

from lit_sharp.cli import main

if __name__ == "__main__":
    main()
