"""The training speed the progress line reports (img/s, ETA of the epoch and of the run), measured without the run's
one-time warm-up.

The first step of a run is not typical: it starts the loader workers, allocates the caches, and on a GPU tunes and
compiles kernels (the C++ CPU kernels are built before the run starts, see ``train.py``). Its time is left out:
img/s and the epoch's ETA are the average over the epoch's steps so far (in epoch 0 those after the first step; an
epoch's average starts when its steps do, so the previous evaluation is not in it), the run's ETA is the average
over all the steps since the first one (so it includes the evaluations of the epochs done). Only a progress line
right after the first step, which has nothing else to go on, counts the first step. The clock is read at the end
of the first step, at each epoch's start and at the progress lines, never per step; the progress lines follow a
host sync, so what they time is done work.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

__all__ = ["Pace"]


class Pace:
    """Seconds per step for the progress line; ``steps`` below is the count of the run's steps done so far."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.t0 = clock()  # the run's start: used only before a second step exists
        self.first: Optional[Tuple[int, float]] = None  # (steps, time) at the end of the run's first step
        self.epoch: Optional[Tuple[int, float]] = None  # (steps, time) where the current epoch's average starts

    def first_step_done(self, steps: int) -> None:
        """Called once, when the run's first step is done (its work finished: on a GPU, after a synchronize)."""
        self.first = self.epoch = (steps, self.clock())

    def epoch_start(self, steps: int) -> None:
        """An epoch begins (``steps`` done before it)."""
        if self.first is not None:
            self.epoch = (steps, self.clock())

    def seconds_per_step(self, steps: int) -> Tuple[float, float]:
        """(seconds per step over the epoch so far, seconds per step over the run since its first step)."""
        now = self.clock()
        whole = (now - self.t0) / max(steps, 1)  # includes the first step: only when nothing else is measured
        run = epoch = whole
        if self.first is not None and steps > self.first[0]:
            run = epoch = (now - self.first[1]) / (steps - self.first[0])
            if steps > self.epoch[0]:
                epoch = (now - self.epoch[1]) / (steps - self.epoch[0])
        return epoch, run
