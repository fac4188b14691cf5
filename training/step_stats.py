"""Per-step training statistics kept on the device, read with one host sync at a sync point (timm's rhythm: the log
interval), and the rule for non-finite steps.

A step is *non-finite* when

* float16 AMP (a GradScaler): the scaler skipped the update because the loss or the gradients were not finite (it
  lowers its scale; the weights are untouched). Only ``--max-nonfinite-steps`` such steps in a row stop the run;
* no GradScaler (float32, bfloat16): the loss was NaN/Inf. Skipping that update would need a host sync every step,
  and the optimizer has already written the non-finite gradients into the weights, so the run stops at the next
  sync point (log interval, checkpoint save, epoch end) -- before a checkpoint of those weights is written.

Either way the run ends with :class:`NonFiniteLossError` (one line from the CLI) and the checkpoints written before
stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class NonFiniteLossError(FloatingPointError):
    """The run stopped on non-finite steps (see the module docstring); the message is one line."""


@dataclass
class Flushed:
    """What the device accumulator held since the previous flush."""
    loss_sum: float  # sum of loss * batch over the steps with a finite loss
    count: int  # samples of those steps
    nonfinite: int  # non-finite steps
    max_run: int  # the longest run of consecutive non-finite steps that reached into this interval
    last_loss: float  # the loss of the latest step (may be nan/inf)


class StepStats:
    """Running sums over the steps since the last :meth:`flush`, as one float64 device tensor; :meth:`add` is a
    few device ops and never a host sync, :meth:`flush` is one (a ``tolist``). The count of consecutive non-finite
    steps carries over flushes, so a run spanning a log interval is seen whole."""

    # slots: loss_sum, count, nonfinite, current run, longest run, last loss
    def __init__(self, device: torch.device):
        self.device = device
        self._t = torch.zeros(6, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, nonfinite: torch.Tensor, n: int) -> None:
        """``loss``: the step's mean loss, ``nonfinite``: a bool 0-d tensor (see the module docstring), ``n``: its
        batch size. Device ops only."""
        t = self._t
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        bad = nonfinite.to(torch.float64)
        run = (t[3] + 1.0) * bad
        self._t = torch.stack([t[0] + torch.where(finite, loss * n, torch.zeros_like(loss)),
                               t[1] + finite.to(torch.float64) * n, t[2] + bad, run, torch.maximum(t[4], run), loss])

    def flush(self) -> Flushed:
        """Read and clear the sums (one host sync); the current run of non-finite steps is kept."""
        loss_sum, count, nonfinite, run, max_run, last = self._t.tolist()
        self._t = torch.tensor([0.0, 0.0, 0.0, run, run, last], dtype=torch.float64, device=self.device)
        return Flushed(loss_sum, int(count), int(nonfinite), int(max_run), last)
