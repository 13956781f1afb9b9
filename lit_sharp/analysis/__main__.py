"""``python -m lit_sharp.analysis``: see :mod:`lit_sharp.analysis.cli`."""

import sys

from lit_sharp.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
