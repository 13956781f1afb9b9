"""Seeds derived from the run's seed, so every random choice can be replayed after an interruption.

Training never draws from a global RNG whose state would be lost when a process dies: the data order depends on
``(seed, epoch)``, an image's augmentation on ``(seed, epoch, index)``, mixup's lambda on ``(seed, step)`` and the
initial weights of ``model.init=released`` on ``seed``.
"""

from __future__ import annotations

import numpy as np

#: Stream tags keep the seeds of different random choices (order, augmentation, mixup, initialisation) independent.
SHUFFLE_STREAM, AUGMENT_STREAM, MIXUP_STREAM, INIT_STREAM = 1, 2, 3, 4


def derived_seed(stream: int, *keys: int) -> int:
    """A 63-bit seed that depends on ``(stream, *keys)`` alone (non-negative integers), via numpy's ``SeedSequence``."""
    state = np.random.SeedSequence([stream, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))
