"""Convert ResNet checkpoints of the project's earlier key layout to the released code's layout.

Earlier versions of lit_sharp kept the eight PreAct blocks in one ``layers`` Sequential (``layers.3.conv1.weight``)
with a bare shortcut convolution (``layers.2.shortcut.weight``). The model now uses the module names of the paper's
released ``PreActResNet18`` (``layer2.1.conv1.weight``, ``layer2.0.shortcut.0.weight``), so the authors' checkpoints
load as they are; files written before need this one-off renaming::

    python -m lit_sharp.models.convert OLD NEW

Works on a plain ``state_dict`` file and on a Lightning checkpoint (keys prefixed ``model.``; everything else in it,
optimizer state included, is kept: parameters keep their order, so the optimizer's per-index state still fits).
Files are read with ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lit_sharp.errors import UserError

_OLD_BLOCK_KEY = re.compile(r"^(?P<prefix>(?:model\.)?)layers\.(?P<index>\d+)\.(?P<rest>.+)$")
STAGES = 4


def is_old_layout(keys: Iterable[str]) -> bool:
    """Whether ``state_dict`` keys use the earlier ``layers.<i>.`` ResNet layout (with or without ``model.``)."""
    return any(_OLD_BLOCK_KEY.match(key) for key in keys)


def old_layout_error(path: Path | str) -> UserError:
    """The one error for a checkpoint of the earlier layout: names the file and the command that converts it."""
    return UserError(f"{path} is a ResNet checkpoint of lit_sharp's earlier key layout (layers.<i>.*); convert it "
                     f"once with: python -m lit_sharp.models.convert {path} NEW_FILE (NEW_FILE may be the same path)")


def convert_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename ``[model.]layers.<i>.<rest>`` to ``[model.]layer<s>.<b>.<rest>``; other keys are kept as they are.

    Block ``i`` of ``n`` is block ``b = i mod (n/4)`` of stage ``s = i // (n/4) + 1``; a shortcut's
    ``shortcut.weight`` becomes ``shortcut.0.weight``. Key order is kept.

    Raises:
        UserError: the block count is not a multiple of the four stages (not a checkpoint of this ResNet).
    """
    indices = {int(m["index"]) for m in map(_OLD_BLOCK_KEY.match, state) if m}
    if not indices:
        return dict(state)
    blocks = max(indices) + 1
    if blocks % STAGES or indices != set(range(blocks)):
        raise UserError(f"old-layout ResNet checkpoint with blocks {sorted(indices)}: not 4 equal stages")
    per_stage = blocks // STAGES
    converted = {}
    for key, value in state.items():
        match = _OLD_BLOCK_KEY.match(key)
        if match:
            index, rest = int(match["index"]), match["rest"]
            rest = re.sub(r"^shortcut\.(weight|bias)$", r"shortcut.0.\1", rest)
            key = f"{match['prefix']}layer{index // per_stage + 1}.{index % per_stage}.{rest}"
        converted[key] = value
    return converted


def convert_file(old: Path, new: Path) -> int:
    """Write ``new``: the checkpoint ``old`` with its keys in the new layout. Returns the number of renamed keys.

    Raises:
        UserError: ``old`` is missing, unreadable, or not in the earlier layout.
    """
    if not old.is_file():
        raise UserError(f"{old}: no such file")
    try:
        loaded = torch.load(old, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a (safe) checkpoint
        raise UserError(f"{old} cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None
    lightning = isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping)
    state = loaded["state_dict"] if lightning else loaded
    if not isinstance(state, Mapping) or not is_old_layout(state):
        raise UserError(f"{old} holds no ResNet state_dict of the earlier layout (no layers.<i>.* keys); nothing to do")
    converted = convert_state_dict(state)
    renamed = sum(a != b for a, b in zip(state, converted))
    output = {**loaded, "state_dict": converted} if lightning else converted
    partial = new.with_name(new.name + ".partial")
    torch.save(output, partial)
    partial.replace(new)  # atomic, so converting a file in place never leaves half a checkpoint
    return renamed


def main(argv: list[str] | None = None) -> int:
    """``python -m lit_sharp.models.convert OLD NEW``."""
    parser = argparse.ArgumentParser(prog="python -m lit_sharp.models.convert", description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="checkpoint of the earlier layout (.ckpt or state_dict file)")
    parser.add_argument("new", type=Path, help="file to write (may be OLD itself)")
    args = parser.parse_args(argv)
    try:
        renamed = convert_file(args.old, args.new)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.new}: {renamed} keys renamed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
