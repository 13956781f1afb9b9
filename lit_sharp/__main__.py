"""``python -m lit_sharp [overrides]``: train and measure one model, or a grid with ``-m``."""

from lit_sharp.cli import main

if __name__ == "__main__":
    main()
