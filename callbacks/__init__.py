"""Lightning callbacks over lit_sharp's pure functions; installed as ``lit_sharp.callbacks``.

Import them from there (``from lit_sharp.callbacks import AdaptiveSharpness``), both from an install and from a
checkout: the folder is ``callbacks/`` in the repository and ``lit_sharp/callbacks/`` once installed.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "AdaptiveSharpness": "sharpness",
    "CorruptionError": "corruption",
    "FinalErrors": "final_errors",
    "Preemption": "preemption",
    "RunClock": "run_clock",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one callback module does not import the others (and their data readers).
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOMES)
