"""Training at scale (issue 28, items 3-4): no host sync or collective on a training step outside the sync points
(the log interval), non-finite steps under float16 AMP skipped and counted instead of ending the run, the stop
request agreed across ranks at the sync points, and distributed evaluation exact over uneven shards with one
all-reduce. Tiny models on random tensors, CPU only; the two-rank cases run under gloo (torch.multiprocessing)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from training import engine
from training.checkpoint import CheckpointSaver, load_checkpoint
from training.data import ResumableSampler
from training.engine import RunPlan, Trainer, TrainParts, evaluate
from training.runtime import GracefulStop, Runtime
from training.step_stats import NonFiniteLossError

CPU = torch.device("cpu")
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier")


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Sched:
    def state_dict(self):
        return {}

    def step(self, *a):
        pass


def data(n, bad=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    for i in bad:
        x[i, 0, 0, 0] = float("inf")
    return x, torch.randint(0, 3, (n,), generator=g)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def make_trainer(x, y, rt, batch=1, log_interval=4, scaler=None, saver=None, cls=Trainer, model=None, **plan_kw):
    model = model if model is not None else tiny_model()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.float16)) if scaler is not None else contextlib.nullcontext
    parts = TrainParts(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                       loss_fn=nn.CrossEntropyLoss(), scheduler=Sched(), autocast=autocast, scaler=scaler)
    sampler = ResumableSampler(len(y), shuffle=False, num_replicas=rt.world_size, rank=rt.rank)
    loader = torch.utils.data.DataLoader(Tensors(x, y), batch_size=batch, sampler=sampler, drop_last=True)
    steps = int(math.ceil(len(y) / rt.world_size)) // batch  # train.py's steps_per_epoch
    plan = RunPlan(epochs=1, steps_per_epoch=steps, log_interval=log_interval, **plan_kw)
    return cls(parts, plan, rt, loader, None, {"arch": "tiny"}, saver, None, GracefulStop(rt))


class Counter:
    """Counts host syncs (Tensor.item/tolist/bool/...) and collectives (torch.distributed.*) while installed."""

    def __init__(self, monkeypatch):
        self.syncs = self.collectives = 0
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), "syncs"))
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self._wrap(getattr(dist, name), "collectives"))

    def _wrap(self, fn, what):
        def counted(*a, **k):
            setattr(self, what, getattr(self, what) + 1)
            return fn(*a, **k)
        return counted

    def now(self):
        return self.syncs, self.collectives


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-process gloo group, so the loop's collectives are called (and counted) as in a DDP run."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield Runtime(CPU, distributed=True, world_size=1, rank=0)
    finally:
        dist.destroy_process_group()


def per_step_counts(trainer, monkeypatch, epoch=0):
    """(syncs, collectives) of each step, the step's after_step included."""
    counter = Counter(monkeypatch)
    marks = []
    real = engine.train_step

    def marked(*a, **k):
        marks.append(counter.now())
        return real(*a, **k)
    monkeypatch.setattr(engine, "train_step", marked)
    done = trainer.train_one_epoch(epoch, 0)
    marks.append(counter.now())
    return done, [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


# ------------------------------------------------------------------------------------------- item 3: syncs
def test_no_host_sync_or_collective_between_log_intervals(one_rank_group, monkeypatch):
    x, y = data(8)
    tr = make_trainer(x, y, one_rank_group, log_interval=4)
    done, counts = per_step_counts(tr, monkeypatch)
    assert done and len(counts) == 8
    for step, (syncs, colls) in enumerate(counts, start=1):
        if step % 4:
            assert (syncs, colls) == (0, 0), f"step {step}: {syncs} host syncs, {colls} collectives"
        else:  # one read of the accumulator, one agreement (its all-reduce and read)
            assert colls == 1 and 1 <= syncs <= 3, (step, syncs, colls)
    assert tr.progress.count == 8 and math.isfinite(tr.progress.loss_sum) and tr.progress.loss_sum > 0


def test_float16_scaler_adds_no_sync_of_ours(one_rank_group, monkeypatch):
    """Under a GradScaler the only per-step sync left is torch's own found-inf check in GradScaler.step (one
    ``item``, absent with a fused optimizer)."""
    x, y = data(8)
    tr = make_trainer(x, y, one_rank_group, log_interval=4, scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    done, counts = per_step_counts(tr, monkeypatch)
    assert done
    assert [c for i, c in enumerate(counts, start=1) if i % 4] == [(1, 0)] * 6


def test_evaluation_has_no_per_batch_sync_or_collective(one_rank_group, monkeypatch):
    x, y = data(7)
    loader = list(torch.utils.data.DataLoader(Tensors(x, y), batch_size=2))  # (a DataLoader's iter() draws a seed)
    model = tiny_model()
    counter = Counter(monkeypatch)
    m = evaluate(model, loader, CPU, rt=one_rank_group, stop=GracefulStop(one_rank_group))
    assert counter.now() == (1, 1)  # 4 batches: one all-reduce of the sums, one read
    assert m["count"] == 7


def test_train_sampler_gives_every_rank_the_same_number_of_batches():
    """The sync points depend on the step number only; that is safe because every rank runs the same number of
    steps: the padded train sampler and drop_last give floor(ceil(N / world) / batch) batches on every rank (train.py's
    steps_per_epoch), also from a mid-epoch start."""
    for n in range(1, 30):
        for world in (1, 2, 3, 4, 8):
            for batch in (1, 2, 3, 5):
                steps = int(math.ceil(n / world)) // batch
                for start in {0, min(steps, 1)}:
                    lens = set()
                    for rank in range(world):
                        s = ResumableSampler(n, shuffle=True, seed=1, num_replicas=world, rank=rank)
                        s.set_epoch(2, start=start * batch)
                        lens.add(len(list(torch.utils.data.DataLoader(range(n), batch_size=batch, sampler=s,
                                                                      drop_last=True))))
                    assert lens == {steps - start}, (n, world, batch, start, lens)


# ------------------------------------------------------------------------------------ item 3: non-finite
def test_float16_nonfinite_loss_is_skipped_counted_and_logged(train_log):
    x, y = data(8, bad=[2])  # step 3 has an inf input: a NaN loss
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # low enough that no finite step overflows
    tr = make_trainer(x, y, Runtime(CPU), log_interval=4, scaler=scaler)
    assert tr.train_one_epoch(0, 0)  # used to raise FloatingPointError at step 3
    assert tr.progress.nonfinite == 1 and scaler.get_scale() == 8.0
    assert all(torch.isfinite(t).all() for t in [*tr.p.model.parameters(), *tr.p.model.buffers()])  # BN stats too
    assert tr.progress.count == 7  # the mean loss is over the finite steps
    warn = [m for m in train_log if "non-finite" in m]
    assert warn == ["epoch 0 step 4: 1 non-finite step(s) since the last check, skipped by the GradScaler (scale now "
                    "8) (1 in this epoch)"]


def test_long_run_of_nonfinite_steps_stops_and_keeps_the_last_checkpoint(tmp_path):
    x, y = data(12, bad=range(4, 12))  # steps 5.. are all non-finite
    saver = CheckpointSaver(str(tmp_path), top_k=1)
    tr = make_trainer(x, y, Runtime(CPU), log_interval=2, checkpoint_interval=2, max_nonfinite_steps=3, saver=saver,
                      scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    with pytest.raises(NonFiniteLossError) as ei:
        tr.train_one_epoch(0, 0)
    msg = str(ei.value)
    assert "\n" not in msg and "4 consecutive steps" in msg and "--max-nonfinite-steps 3" in msg
    assert f"stopped at epoch 0 step 8" in msg and f"{saver.last_path} (written before it) is kept" in msg
    ck = load_checkpoint(saver.last_path)  # saved at step 6 (2 skipped steps: below the limit), not at step 8
    assert ck["step"] == 6 and all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert sorted(os.listdir(tmp_path)) == ["last.pth.tar"]


def test_nonfinite_loss_without_scaler_stops_at_the_next_check_before_saving(tmp_path):
    x, y = data(8, bad=[2])
    saver = CheckpointSaver(str(tmp_path), top_k=1)
    tr = make_trainer(x, y, Runtime(CPU), log_interval=4, checkpoint_interval=2, saver=saver)
    with pytest.raises(NonFiniteLossError, match=r"without a GradScaler.*stopped at epoch 0 step 4 .*without saving"):
        tr.train_one_epoch(0, 0)
    assert load_checkpoint(saver.last_path)["step"] == 2  # the step-4 checkpoint (NaN weights) was not written


def test_max_nonfinite_steps_is_an_option():
    import train
    cfg = os.path.join(os.path.dirname(train.__file__), "configs", "demo.yaml")
    assert train.parse_args(["-c", cfg]).max_nonfinite_steps == 100
    assert train.parse_args(["-c", cfg, "--max-nonfinite-steps", "7"]).max_nonfinite_steps == 7
    with pytest.raises(ValueError, match="--max-nonfinite-steps"):
        train.parse_args(["-c", cfg, "--max-nonfinite-steps", "-1"])


# ---------------------------------------------------------------------------------------- two gloo ranks
class SignalOnRank1(Trainer):
    """Rank 1 receives SIGTERM during step 4; only rank 1 knows until the next sync point."""

    def after_step(self, epoch, step, *a):
        if self.rt.rank == 1 and step == 4:
            self.stop.signum = signal.SIGTERM
        return super().after_step(epoch, step, *a)


def _two_rank_worker(rank, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    rt = Runtime(CPU, distributed=True, world_size=2, rank=rank)
    out = {}
    try:
        # item 4: 5 val samples on 2 ranks, batch 2: rank 0 has 2 batches, rank 1 one
        x, y = data(5, seed=1)
        sampler = ResumableSampler(5, shuffle=False, num_replicas=2, rank=rank, pad=False)
        loader = torch.utils.data.DataLoader(Tensors(x, y), batch_size=2, sampler=sampler)
        out["batches"] = len(loader)
        out["eval"] = evaluate(tiny_model(), loader, CPU, rt=rt, stop=GracefulStop(rt))
        # item 3: 13 train samples padded to 7 per rank: 7 steps each; syncs at steps 3, 6 and 7
        x, y = data(13, seed=2)
        model = nn.parallel.DistributedDataParallel(tiny_model())
        saver = CheckpointSaver(folder, top_k=1) if rank == 0 else None
        tr = make_trainer(x, y, rt, log_interval=3, saver=saver, cls=SignalOnRank1, model=model)
        calls = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        out["finished"] = tr.train_one_epoch(0, 0)
        dist.all_reduce = real
        out.update(step=tr.progress.step, signum=tr.stop.signum, all_reduces=len(calls))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("two_ranks"))
    ctx = mp.spawn(_two_rank_worker, args=(folder,), nprocs=2, join=False)
    for _ in range(240):  # a hang fails by this timeout
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("two-rank run hung")
    res = []
    for r in range(2):
        with open(os.path.join(folder, f"rank{r}.json")) as f:
            res.append(json.load(f))
    return folder, res


def test_distributed_evaluation_over_uneven_shards_is_exact(two_ranks):
    _, (r0, r1) = two_ranks
    assert (r0["batches"], r1["batches"]) == (2, 1)  # uneven: the old per-batch stop all-reduce mismatched here
    x, y = data(5, seed=1)
    ref = evaluate(tiny_model(), torch.utils.data.DataLoader(Tensors(x, y), batch_size=2), CPU)
    for r in (r0, r1):
        assert r["eval"]["count"] == 5 and r["eval"]["top1"] == ref["top1"] and r["eval"]["top5"] == ref["top5"]
        assert r["eval"]["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_stop_signal_of_one_rank_is_agreed_at_the_next_sync_step(two_ranks):
    folder, (r0, r1) = two_ranks
    for r in (r0, r1):  # rank 1's signal at step 4 stops both ranks at step 6, after the same collectives
        assert (r["finished"], r["step"], r["signum"]) == (False, 6, int(signal.SIGTERM))
    assert r0["all_reduces"] == r1["all_reduces"] == 2  # steps 3 and 6 (none per step)
    assert load_checkpoint(os.path.join(folder, "last.pth.tar"))["step"] == 6
