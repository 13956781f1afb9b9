"""lit_sharp: train grids of CIFAR-10 classifiers with Lightning and measure adaptive sharpness."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path
from types import ModuleType


class _CheckoutCallbacks(MetaPathFinder):
    """Find ``lit_sharp.callbacks`` in a checkout, where it is the ``callbacks/`` folder beside this package.

    An install maps that folder to ``lit_sharp/callbacks`` (``package-dir`` in pyproject.toml), so that no generic
    top-level ``callbacks`` lands in site-packages. A checkout imported through the working directory or
    PYTHONPATH has no such folder inside the package; this finder answers for exactly that one name, with the same
    files an install would hold. It goes first in ``sys.meta_path`` so that an editable install of some other
    checkout cannot answer instead. Widening ``__path__`` to the repository root would do the same in one line but
    would also make ``lit_sharp.tests``, ``lit_sharp.bench`` or the root ``train.py`` importable under this package.
    """

    name = f"{__name__}.callbacks"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        return spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def _install_checkout_finder() -> None:
    here = Path(__file__).resolve().parent
    sibling = here.parent / "callbacks"
    if (here / "callbacks").is_dir() or not (sibling / "__init__.py").is_file():
        return  # an install (the folder is inside), or not a checkout
    if not any(isinstance(finder, _CheckoutCallbacks) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutCallbacks(sibling))


_install_checkout_finder()
