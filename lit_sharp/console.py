"""What a run prints: a one-screen summary when it ends, and no library noise that the project's own calls cause.

Where a library's message can be fixed at the call, it is (see :mod:`lit_sharp.tracking`); the filters here cover
messages that no argument can turn off, each matched by its exact text so nothing else is hidden.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Sharpness values shown in the summary when a run has them: the paper's headline measures (Figure 5).
HEADLINE_SHARPNESS = (
    "worst_linf_adaptive_ln_rho0.002",
    "worst_linf_adaptive_rho0.001",
    "worst_linf_adaptive_rho0.0005",
    # The ImageNet zoos' headline (Table 1): from a random start.
    "worst_linf_adaptive_rho0.002_random_start",
    "worst_linf_adaptive_ln_rho0.002_random_start",
)
_ERRORS = (("train", "final/train_err"), ("test", "final/test_err"), ("CIFAR-10-C", "c10c/err"))
#: Evaluation sets of a zoo model, ``<set>/err`` (:mod:`lit_sharp.zoo.eval_sets`), shown as ``<set>``.
_SET_ERROR_SUFFIX = "/err"


class _DropLightningTip(logging.Filter):
    """Lightning advertises its LitLogger at every ``Trainer`` start, at INFO level, with no option to turn it off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


def quiet_library_noise() -> None:
    """Install the narrow filters (idempotent)."""
    # Lightning 2.6's own pytree helper calls a torch API that torch 2.9 deprecates; nothing the caller passes
    # reaches it (every fit with a dataloader triggers it), and Lightning's next release drops the call.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # The evaluation sets are tensors in memory (normalised once); worker processes would only add copies.
    warnings.filterwarnings("ignore", message=r"The '(val|test)_dataloader' does not have many workers")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropLightningTip) for existing in logger.filters):
            logger.addFilter(_DropLightningTip())
    if logging.getLogger().handlers:
        # Under Hydra the root logger prints (and writes the job's log file); Lightning's own console handler,
        # installed when it found no root handler at import, would print every message a second time.
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)


def run_summary(record: Mapping[str, Any], run_dir: Path, wandb_location: str | None,
                notes: Sequence[str] = ()) -> str:
    """A few lines on how a run ended: folder, status, seconds, errors, headline sharpness and where W&B went.

    Args:
        record: the run's ``results.json`` record.
        run_dir: the run folder.
        wandb_location: from :func:`lit_sharp.tracking.wandb_location`, or None without W&B.
        notes: one line each, e.g. the evaluation sets a zoo run skipped.
    """
    run, metrics = record["run"], record.get("metrics", {})
    lines = [f"run {run['name']}: {run['status']} in {run['seconds']:.1f} s", f"  folder     {run_dir}"]
    errors = [f"{label} {_number(metrics[key])}" for label, key in _ERRORS if key in metrics]
    known = {key for _, key in _ERRORS}
    errors += [f"{key.removesuffix(_SET_ERROR_SUFFIX)} {_number(value)}" for key, value in metrics.items()
               if key.endswith(_SET_ERROR_SUFFIX) and key.count("/") == 1 and key not in known]
    if errors:
        lines.append("  error      " + "   ".join(errors))
    lines += [f"  {'skipped' if index == 0 else '':<10} {note}" for index, note in enumerate(notes)]
    if run.get("error"):
        lines.append(f"  why        {run['error']}")
    if run.get("recovered"):
        lines.append(f"  recovered  {run['recovered']}")
    sharpness = [name for name in HEADLINE_SHARPNESS if f"sharpness/{name}" in metrics]
    for index, name in enumerate(sharpness):
        lines.append(f"  {'sharpness' if index == 0 else '':<10} {name} = {_number(metrics[f'sharpness/{name}'])}")
    others = sum(key.startswith("sharpness/") for key in metrics) - len(sharpness)
    if others:
        lines.append(f"  {'' if sharpness else 'sharpness':<10} {others} more measures in {run_dir / 'results.json'}")
    if wandb_location:
        lines.append(f"  W&B        {wandb_location}")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"
