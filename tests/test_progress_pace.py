"""The progress line's img/s and ETAs leave out the run's one-time warm-up (issue 25 item 4): the first step (loader
workers, caches, kernel tuning) is not counted, and an epoch's rate does not include the previous evaluation. A fake
clock drives training.pace and a tiny CPU Trainer, so no figure depends on this machine's load."""
from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn as nn

from training import engine
from training.data import ResumableSampler
from training.engine import RunPlan, Trainer, TrainParts
from training.pace import Pace
from training.runtime import GracefulStop, Runtime


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_pace_leaves_out_the_first_step_and_the_evaluation():
    clock = Clock()
    pace = Pace(clock)
    pace.epoch_start(0)
    clock.t += 100.0  # the first step: warm-up
    pace.first_step_done(1)
    clock.t += 14.0  # 14 more steps of 1 s
    assert pace.seconds_per_step(15) == (1.0, 1.0)  # counted from run start: 114 / 15 = 7.6 s per step
    clock.t += 2.0 * 15  # 15 slower steps
    assert pace.seconds_per_step(30) == (44.0 / 29, 44.0 / 29)
    clock.t += 30.0  # an evaluation
    pace.epoch_start(30)
    clock.t += 10.0
    epoch, run = pace.seconds_per_step(40)
    assert epoch == 1.0  # the epoch's average starts after the evaluation
    assert run == pytest.approx(84.0 / 39)  # the run's ETA amortises it


def test_pace_before_a_second_step_counts_what_there_is():
    clock = Clock()
    pace = Pace(clock)
    clock.t += 5.0
    pace.first_step_done(1)
    assert pace.seconds_per_step(1) == (5.0, 5.0)  # a progress line after the first step: nothing else to measure


class Tensors(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_progress_lines_leave_out_the_slow_first_step_and_the_evaluation(train_log, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    parts = TrainParts(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                       loss_fn=nn.CrossEntropyLoss(), scheduler=None, autocast=contextlib.nullcontext)
    data = Tensors(16)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=ResumableSampler(16, shuffle=False),
                                         drop_last=True)
    rt = Runtime(torch.device("cpu"))
    tr = Trainer(parts, RunPlan(epochs=2, steps_per_epoch=8, log_interval=4), rt, loader, None, {}, None, None,
                 GracefulStop(rt))
    clock = Clock()
    tr.pace = Pace(clock)
    real = engine.train_step

    def timed(p, images, target, global_step):
        clock.t += 96.0 if global_step == 0 else 0.5  # the first step: 96 s of warm-up; then 0.5 s per step
        return real(p, images, target, global_step)

    monkeypatch.setattr(engine, "train_step", timed)
    assert tr.train_one_epoch(0, 0)
    clock.t += 30.0  # the evaluation of epoch 0
    assert tr.train_one_epoch(1, 0)
    progress = [re.search(r"\] .* ([\d.]+) img/s  ETA epoch (\S+)  run (\S+)", ln).groups()
                for ln in train_log if ln.startswith("Train:")]
    # 2 images per 0.5 s; counted from run start, step 4 would give 2 * 4 / 97.5 = 0.08 img/s and a run ETA of
    # 97.5 / 4 * 12 s = 0:04:52 for a run with 12 steps of 0.5 s left
    assert progress[:2] == [("4.0", "0:00:02", "0:00:06"), ("4.0", "0:00:00", "0:00:04")]
    # epoch 1: its rate leaves the evaluation out; the run's ETA amortises it over the steps since the first
    assert progress[2] == ("4.0", "0:00:02", "0:00:12"), progress  # (131.5 - 96) / 11 s per step, 4 steps left
    assert len(progress) == 4
