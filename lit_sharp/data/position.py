"""Where a training epoch stands, so that a run checkpointed mid-epoch resumes at the next batch.

Lightning checkpoints the state of a train loader that has ``state_dict``/``load_state_dict`` and hands it back on
resume, before the loader is iterated. The state is ``{"epoch": e, "batches": k}``: ``k`` batches of epoch ``e``
were handed to training. The resumed loader replays epoch ``e`` from batch ``k``: its sampler starts at index
``k * batch_size`` of the same seeded order, so the remaining batches are those of an uninterrupted run, and no
batch is trained twice. Every other random choice depends on ``(seed, epoch, index)`` or ``(seed, step)``
(:mod:`lit_sharp.seeding`), except the device pipeline's one augmentation generator per epoch, whose state travels in
the loader state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


def resume_point(state: dict[str, Any], batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches to skip)`` to resume from a loader state; a finished epoch resumes at the next one."""
    epoch, batches = int(state["epoch"]), int(state["batches"])
    return (epoch + 1, 0) if batches >= batches_per_epoch else (epoch, batches)


class ResumableEpochs:
    """Mixin of an epoch sampler (an ``epoch`` attribute, set by ``set_epoch``): one epoch's next iteration can start
    at a given index of its order."""

    epoch: int
    _resume: tuple[int, int] | None = None
    #: Index at which the latest iteration started (0 unless it resumed).
    started_at: int = 0

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next iteration of ``epoch`` start at index ``start`` of its order (once)."""
        self._resume = (int(epoch), int(start))

    def iteration_start(self) -> int:
        """Where this iteration starts; consumes a pending :meth:`resume_at` of this epoch."""
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        self.started_at = start
        return start


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose sampler is :class:`ResumableEpochs`: Lightning checkpoints how many batches of the
    epoch it handed out, and a resumed run continues with the next one (see the module docstring).

    The count is of batches handed to training, not of indices drawn: worker processes draw ahead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed_out = 0

    def __iter__(self) -> Iterator[Any]:
        if not isinstance(self.sampler, ResumableEpochs):  # e.g. a distributed sampler put in by Lightning
            return super().__iter__()
        pending = self.sampler._resume
        self._handed_out = pending[1] // self.batch_size if pending is not None else 0
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        first = True
        for batch in batches:
            if first:  # the sampler has started by now (at the first batch, or earlier with workers)
                self._handed_out = self.sampler.started_at // self.batch_size
                first = False
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches"}``: the batches of the sampler's epoch handed out so far (empty for another
        sampler: such a run resumes at the start of its epoch)."""
        if not isinstance(self.sampler, ResumableEpochs):
            return {}
        return {"epoch": int(self.sampler.epoch), "batches": int(self._handed_out)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the batch after the last one handed out when ``state`` was taken."""
        if not state or not isinstance(self.sampler, ResumableEpochs):
            return
        epoch, skip = resume_point(state, len(self))
        self.sampler.set_epoch(epoch)  # workers draw indices as soon as the iterator exists
        self.sampler.resume_at(epoch, skip * self.batch_size)
        self._handed_out = skip
