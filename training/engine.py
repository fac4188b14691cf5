"""The training loop: ``train_one_epoch``, ``evaluate`` and the :class:`Trainer` that runs epochs, evaluates,
saves checkpoints (last / best / top-k, periodic and on a stop signal) and writes the run log."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointSaver, model_state
from .pace import Pace
from .runtime import GracefulStop, RunLog, Runtime, fmt_time, gather_rng, stop_signals_blocked
from .step_stats import NonFiniteLossError, StepStats

_logger = logging.getLogger("train")


# ------------------------------------------------------------------------------------------------- evaluation
def _unpack(batch):
    if len(batch) == 3:  # collate_skip: (images, targets, skipped)
        return batch
    images, target = batch
    return images, target, 0


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast: Callable = None, channels_last: bool = False,
             rt: Optional[Runtime] = None, log_interval: int = 0, header: str = "Eval",
             stop: Optional[GracefulStop] = None) -> Optional[Dict[str, float]]:
    """Top-1 / top-5 (percent) and mean cross-entropy over the readable images of the loader; ``skipped`` counts the
    unreadable ones. The sums stay on the device (no host sync per batch) and, distributed, are all-reduced once at
    the end, with no collective per batch: exact over the whole split with the unpadded sampler, whose shards may
    differ by a batch between ranks. Returns None (on every rank) when ``stop`` received a signal on any rank before
    the end; over zero readable images the metrics are None (``count`` 0), which callers treat as an error."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top1, top5 (count: ``seen``, on the host)
    skipped = seen = 0
    signals = list(stop.SIGNALS) if stop is not None else []  # one slot each: which signal any rank received
    t0 = time.time()
    with stop_signals_blocked():  # no stop signal can kill a worker that is still starting
        batches = iter(loader)
    for i, batch in enumerate(batches):
        images, target, n_skipped = _unpack(batch)
        skipped += n_skipped
        if images is not None:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with (autocast or contextlib.nullcontext)():
                logits = model(images)
            logits = logits.float()
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target.unsqueeze(1))
            sums += torch.stack([F.cross_entropy(logits, target, reduction="sum").double(), hit[:, 0].sum().double(),
                                 hit.any(dim=1).sum().double()])
            seen += target.shape[0]
        if log_interval and (i + 1) % log_interval == 0:
            _logger.info("%s: [%d/%d] %.1f img/s", header, i + 1, len(loader), seen / (time.time() - t0))
        if stop is not None and stop.received:  # this rank stops early; the others learn it from the one all-reduce
            break
    flags = [float(stop is not None and stop.signum == s) for s in signals]
    total = torch.cat([sums, torch.tensor([float(seen), float(skipped), *flags], dtype=torch.float64, device=device)])
    if rt is not None and rt.distributed:
        dist.all_reduce(total)
    loss_sum, top1, top5, count, skipped, *flags = total.tolist()
    received = [s for s, f in zip(signals, flags) if f]
    if received:
        stop.adopt(received[0])  # another rank's signal: this rank stops here as well
        return None
    count, skipped = int(count), int(skipped)
    if count == 0:  # nothing was scored: no metric at all, never a 0.0 that could become a best
        return {"loss": None, "top1": None, "top5": None, "count": 0, "skipped": skipped}
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "count": count,
            "skipped": skipped}


# --------------------------------------------------------------------------------------------------- training
@dataclass
class TrainParts:
    """What one optimisation step needs."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    scheduler: Any
    autocast: Callable
    scaler: Any = None
    mixup: Any = None
    ema: Any = None
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    channels_last: bool = False
    sched_on_updates: bool = False


SYNC_EVERY = 50  # sync cadence with --log-interval 0 (timm's default log interval)


@dataclass
class RunPlan:
    """Run-level settings of the loop."""
    epochs: int
    steps_per_epoch: int
    eval_metric: str = "top1"
    log_interval: int = 50
    checkpoint_interval: int = 0
    stop_after_steps: int = 0
    dist_bn: str = ""
    max_nonfinite_steps: int = 100  # float16 GradScaler: consecutive skipped steps that stop the run (0: never)

    @property
    def sync_every(self) -> int:
        """Steps between the loop's sync points (the only host sync and collective of the steps): the log interval,
        or :data:`SYNC_EVERY` when progress lines are off."""
        return self.log_interval or SYNC_EVERY


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    count: int = 0
    nonfinite: int = 0  # non-finite steps of this epoch (see training.step_stats)
    run_steps: int = 0

    def train_state(self) -> Dict[str, float]:
        return {"loss_sum": self.loss_sum, "count": self.count}


def train_step(p: TrainParts, images: torch.Tensor, target: torch.Tensor,
               global_step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward (scaled under float16 AMP), optional clipping, optimizer step, EMA update. Returns the
    detached loss and whether the step was non-finite (:mod:`training.step_stats`), both 0-d device tensors: no host
    sync here (under float16 the GradScaler's own found-inf check is one, inside torch, unless the optimizer is
    fused). A step the GradScaler skips leaves the model as it was: the scaler keeps the weights, and the floating
    buffers (BatchNorm running statistics, updated by the forward) are put back here, on the device."""
    from timm.utils import dispatch_clip_grad, unwrap_model
    if p.mixup is not None:
        images, target = p.mixup(images, target)
    if p.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    buffers = [b for b in p.model.buffers() if b.is_floating_point()] if p.scaler is not None else []
    saved = [b.clone() for b in buffers]  # BN statistics as before the forward: a skipped step restores them
    with p.autocast():
        loss = p.loss_fn(p.model(images).float(), target)
    p.optimizer.zero_grad(set_to_none=True)
    params = [q for q in p.model.parameters() if q.requires_grad]
    if p.scaler is not None:
        p.scaler.scale(loss).backward()
        scale = p.scaler._scale.clone()  # the public get_scale() is a host sync; _scale exists after scale()
        if p.clip_grad is not None:
            p.scaler.unscale_(p.optimizer)
            dispatch_clip_grad(params, p.clip_grad, mode=p.clip_mode)
        p.scaler.step(p.optimizer)  # skipped when the loss or a gradient is not finite
        p.scaler.update()
        nonfinite = p.scaler._scale < scale  # update() lowers the scale exactly when it skipped the step
        for b, old in zip(buffers, saved):  # a non-finite forward wrote nan/inf into the running statistics
            b.copy_(torch.where(nonfinite, old, b))
    else:
        loss.backward()
        if p.clip_grad is not None:
            dispatch_clip_grad(params, p.clip_grad, mode=p.clip_mode)
        p.optimizer.step()
        nonfinite = ~torch.isfinite(loss.detach())
    if p.ema is not None:
        p.ema.update(unwrap_model(p.model), step=global_step)
    return loss.detach(), nonfinite.reshape(())


class Trainer:
    """Runs the epochs of one run: training steps, evaluation (and EMA evaluation), BN sync, schedule, checkpoints
    (epoch-end last/best/top-k on rank 0; mid-epoch ``last`` every ``checkpoint_interval`` steps, after
    ``stop_after_steps`` and when a stop signal arrives), the summary rows and the progress lines.

    ``meta`` holds the checkpoint fields that do not change during the run (arch, args, classes, data config,
    run signature); ``saver``/``runlog`` are None on ranks other than 0."""

    def __init__(self, parts: TrainParts, plan: RunPlan, rt: Runtime, train_loader, val_loader, meta: Dict,
                 saver: Optional[CheckpointSaver], runlog: Optional[RunLog], stop: GracefulStop):
        self.p, self.plan, self.rt = parts, plan, rt
        self.train_loader, self.val_loader = train_loader, val_loader
        self.meta, self.saver, self.runlog, self.stop = meta, saver, runlog, stop
        self.progress = Progress()
        self.pace = Pace()  # the progress line's speed and ETAs, without the first step's warm-up
        self.stats = StepStats(rt.device)
        self.history: List[Dict] = []

    # -------------------------------------------------------------------------------------------- checkpoint
    def state(self, epoch: int, step: int, metrics: Optional[Dict] = None) -> Dict:
        p = self.p
        st = dict(self.meta)
        st.update(epoch=epoch, step=step, state_dict=model_state(p.model), optimizer=p.optimizer.state_dict(),
                  scheduler=p.scheduler.state_dict(), scaler=p.scaler.state_dict() if p.scaler is not None else None,
                  state_dict_ema=model_state(p.ema.module) if p.ema is not None else None,
                  eval_on_ema=p.ema is not None)
        if metrics is not None:
            st["metric"] = metrics[self.plan.eval_metric]
            st["metrics"] = metrics
        return st

    def save_last(self, epoch: int, step: int, why: str) -> None:
        """Collective (every rank calls it at the same step); in the step loop only right after a sync point, whose
        check ran first, so no checkpoint of non-finite weights is written."""
        self.fold(self.stats.flush())
        rng = gather_rng(self.rt)  # collective: every rank takes part
        if self.saver is None:
            return
        st = self.state(epoch, step)
        st.update(train_state=self.progress.train_state(), rng_state=rng)
        self.saver.save_last(st)
        _logger.info("saved %s (epoch %d, step %d%s)", self.saver.last_path, epoch, step, why)

    def save_epoch_end(self, epoch: int, metrics: Optional[Dict], row: Dict) -> None:
        """The epoch-end save, one transaction (last, best, top-k, the summary row; see CheckpointSaver);
        ``metrics`` None: an epoch without a metric (never a best)."""
        rng = gather_rng(self.rt)  # collective: every rank takes part
        if self.saver is None:
            return
        st = self.state(epoch, 0, metrics)
        st["rng_state"] = rng
        self.saver.save_epoch(st, epoch, metrics[self.plan.eval_metric] if metrics else None, row)
        if metrics is None:
            _logger.info("saved %s (epoch %d, evaluation failed)", self.saver.last_path, epoch)
        self.runlog.epoch(row)

    # ----------------------------------------------------------------------------------------------- epochs
    def fit(self, start_epoch: int = 0, start_step: int = 0, train_state: Optional[Dict] = None) -> Dict:
        pr = self.progress
        pr.global_step = start_epoch * self.plan.steps_per_epoch + start_step
        if train_state and start_step:
            pr.loss_sum, pr.count = float(train_state["loss_sum"]), int(train_state["count"])
        stopped = False
        for epoch in range(start_epoch, self.plan.epochs):
            step0 = start_step if epoch == start_epoch else 0
            if step0 == 0:
                pr.loss_sum, pr.count, pr.nonfinite = 0.0, 0, 0
            pr.epoch = epoch
            ep_t0 = time.time()
            if not self.train_one_epoch(epoch, step0):
                stopped = True
                break
            if not self.end_epoch(epoch, ep_t0):
                stopped = True
                break
        return {"interrupted": stopped, "history": self.history, "global_step": pr.global_step,
                "signal": self.stop.signum}

    def train_one_epoch(self, epoch: int, step0: int) -> bool:
        """Steps of one epoch from ``step0``; False when the run stops inside it (``last`` is then saved)."""
        p, plan = self.p, self.plan
        self.train_loader.sampler.set_epoch(epoch, start=step0 * self.train_loader.batch_size)
        self.train_loader.dataset.set_epoch(epoch)
        p.model.train()
        self.progress.step = step0
        self.pace.epoch_start(self.progress.run_steps)
        try:
            with stop_signals_blocked():  # see evaluate
                batches = iter(self.train_loader)
            for i, (images, target) in enumerate(batches, start=step0):
                loss, nonfinite = train_step(p, images.to(self.rt.device, non_blocking=True),
                                             target.to(self.rt.device, non_blocking=True), self.progress.global_step)
                if not self.after_step(epoch, i + 1, loss, nonfinite, images.shape[0]):
                    return False
                if i + 1 == plan.steps_per_epoch:
                    break
        except RuntimeError:
            if self.stop.signum is None:  # a worker killed by a signal to the whole process group
                raise
            _logger.warning("data loader stopped by the signal; saving the last completed step")
            self.save_last(epoch, self.progress.step, ", stopped by a signal")
            return False
        if self.progress.step != plan.steps_per_epoch:  # the padded sampler makes this impossible; never a hang
            raise RuntimeError(f"rank {self.rt.rank}: the train loader gave {self.progress.step} of "
                               f"{plan.steps_per_epoch} batches in epoch {epoch}")
        return True

    def after_step(self, epoch: int, step: int, loss: torch.Tensor, nonfinite: torch.Tensor, n: int) -> bool:
        """Bookkeeping of one step: device ops only, except at a sync point (:meth:`sync`): every
        ``plan.sync_every`` steps, the epoch's last step, a checkpoint or a ``--stop-after-steps`` step. These
        depend only on the step number, which is the same on every rank (the padded train sampler)."""
        pr, plan = self.progress, self.plan
        pr.global_step += 1
        pr.run_steps += 1
        pr.step = step
        self.stats.add(loss, nonfinite, n)
        if pr.run_steps == 1:  # once per run: the end of the warm-up step (its GPU work included)
            if self.rt.device.type == "cuda":
                torch.cuda.synchronize(self.rt.device)
            self.pace.first_step_done(pr.run_steps)
        if self.p.sched_on_updates:
            self.p.scheduler.step_update(pr.global_step)
        last = step == plan.steps_per_epoch
        want_stop = bool(plan.stop_after_steps and pr.global_step >= plan.stop_after_steps and not last)
        save = bool(plan.checkpoint_interval and step % plan.checkpoint_interval == 0 and not last)
        if not (last or want_stop or save or step % plan.sync_every == 0):
            return True
        log = bool(plan.log_interval and (step % plan.log_interval == 0 or last))
        signalled = self.sync(epoch, step, log)
        if want_stop or signalled:
            self.save_last(epoch, step, ", stopped by a signal" if signalled else ", --stop-after-steps")
            return False
        if save:
            self.save_last(epoch, step, ", --checkpoint-interval")
        return True

    def fold(self, f) -> None:
        """Add a flush of the device accumulator to the epoch's host totals."""
        pr = self.progress
        pr.loss_sum += f.loss_sum
        pr.count += f.count
        pr.nonfinite += f.nonfinite

    def sync(self, epoch: int, step: int, log: bool) -> bool:
        """The sync point of the step loop: one host read of the accumulated loss statistics, one collective that
        agrees on the stop request and the longest run of non-finite steps; logs, then applies the non-finite
        rule. Returns whether the run stops here on a signal."""
        f = self.stats.flush()
        self.fold(f)
        worst, = self.stop.agree(f.max_run)
        if log:
            self.log_progress(epoch, step, f)
        if f.nonfinite and self.rt.primary:
            _logger.warning("epoch %d step %d: %d non-finite step(s) since the last check%s (%d in this epoch)",
                            epoch, step, f.nonfinite,
                            f", skipped by the GradScaler (scale now {self.p.scaler.get_scale():g})"
                            if self.p.scaler is not None else "", self.progress.nonfinite)
        self.check_finite(epoch, step, int(worst))
        return self.stop.signum is not None

    def check_finite(self, epoch: int, step: int, worst: int) -> None:
        """The non-finite rule (:mod:`training.step_stats`) on the agreed longest run, the same on every rank."""
        p, plan = self.p, self.plan
        if p.scaler is not None:
            if not plan.max_nonfinite_steps or worst < plan.max_nonfinite_steps:
                return
            what = (f"{worst} consecutive steps had a non-finite loss or gradients and were skipped by the float16 "
                    f"GradScaler (--max-nonfinite-steps {plan.max_nonfinite_steps})")
        elif worst:
            what = ("the loss was not finite (NaN/Inf) without a GradScaler, so that update reached the weights "
                    "(float32/bfloat16 steps are not skipped)")
        else:
            return
        last = self.saver.last_path if self.saver is not None else None
        kept = (f"{last} (written before it) is kept" if last and os.path.isfile(last)
                else "no checkpoint had been written")
        raise NonFiniteLossError(f"{what}; stopped at epoch {epoch} step {step} (global step "
                                 f"{self.progress.global_step}) without saving; the last checkpoint {kept}; lower "
                                 f"--lr, use --clip-grad or check the data")

    def log_progress(self, epoch: int, step: int, f) -> None:
        pr, plan = self.progress, self.plan
        if self.rt.rank != 0:
            return
        per_step, run_per_step = self.pace.seconds_per_step(pr.run_steps)
        total = plan.epochs * plan.steps_per_epoch
        _logger.info("Train: %d [%4d/%d (%3.0f%%)]  loss %.4f (%.4f)  lr %.3e  %.1f img/s  ETA epoch %s  run %s",
                     epoch, step, plan.steps_per_epoch, 100.0 * step / plan.steps_per_epoch, f.last_loss,
                     pr.loss_sum / max(pr.count, 1), self.p.optimizer.param_groups[0]["lr"],
                     self.train_loader.batch_size * self.rt.world_size / max(per_step, 1e-9),
                     fmt_time(per_step * (plan.steps_per_epoch - step)),
                     fmt_time(run_per_step * (total - pr.global_step)))
        if self.runlog is not None:
            self.runlog.step("train/loss", f.last_loss, pr.global_step)
            if f.nonfinite:
                self.runlog.step("train/nonfinite_steps", pr.nonfinite, pr.global_step)

    def _evaluate(self, model: nn.Module) -> Optional[Dict]:
        if self.rt.distributed and self.plan.dist_bn:
            from timm.utils import distribute_bn
            distribute_bn(model, self.rt.world_size, self.plan.dist_bn == "reduce")
        try:
            return evaluate(model, self.val_loader, self.rt.device, self.p.autocast, self.p.channels_last, self.rt,
                            stop=self.stop)
        except RuntimeError:
            if self.stop.signum is None:  # not a loader worker killed by the signal to the process group
                raise
            return None

    def failed_evaluation(self, epoch: int, ev: Dict, ep_t0: float) -> bool:
        """An evaluation over zero images: logged as an error for this epoch, no metric, no best, no top-k entry;
        ``last.pth.tar`` is saved at the epoch's end so a resume continues with the next epoch."""
        _logger.error("Epoch %d: evaluation saw 0 images (%d unreadable skipped): no metric for this epoch, it cannot "
                      "become the best; fix the val split (--val-split) and resume", epoch, ev["skipped"])
        if not self.p.sched_on_updates:
            self.p.scheduler.step(epoch + 1)
        row = {"epoch": epoch, "train_loss": self.progress.loss_sum / max(self.progress.count, 1),
               "eval_error": "0 images evaluated", "eval_skipped": ev["skipped"],
               "lr": self.p.optimizer.param_groups[0]["lr"], "epoch_time_s": round(time.time() - ep_t0, 2)}
        self.save_epoch_end(epoch, None, row)  # an epoch-end state without a metric: resume starts the next epoch
        self.history.append(row)
        return not (epoch + 1 < self.plan.epochs and self.stop.requested())

    def end_epoch(self, epoch: int, ep_t0: float) -> bool:
        """Evaluate, step the schedule, save, log; False when the run stops here."""
        p, pr, plan = self.p, self.progress, self.plan
        ev = self._evaluate(p.model)
        ev_ema = self._evaluate(p.ema.module) if (p.ema is not None and ev is not None) else None
        if ev is None or (p.ema is not None and ev_ema is None):  # signal during evaluation: resume re-evaluates
            self.save_last(epoch, plan.steps_per_epoch, ", stopped by a signal during evaluation")
            return False
        if ev["count"] == 0 or (ev_ema is not None and ev_ema["count"] == 0):
            return self.failed_evaluation(epoch, ev, ep_t0)
        row = {"epoch": epoch, "train_loss": pr.loss_sum / max(pr.count, 1), "eval_loss": ev["loss"],
               "eval_top1": ev["top1"], "eval_top5": ev["top5"], "lr": p.optimizer.param_groups[0]["lr"],
               "epoch_time_s": round(time.time() - ep_t0, 2)}
        metrics = ev
        if ev_ema is not None:
            row.update(ema_eval_loss=ev_ema["loss"], ema_eval_top1=ev_ema["top1"], ema_eval_top5=ev_ema["top5"])
            metrics = ev_ema
        if ev["skipped"]:
            row["eval_skipped"] = ev["skipped"]
        if pr.nonfinite:
            row["nonfinite_steps"] = pr.nonfinite
        if not p.sched_on_updates:
            p.scheduler.step(epoch + 1, metrics[plan.eval_metric])
        _logger.info("Epoch %d: train loss %.4f | val loss %.4f top-1 %.3f top-5 %.3f%s%s | %.1fs", epoch,
                     row["train_loss"], ev["loss"], ev["top1"], ev["top5"],
                     f" | EMA top-1 {ev_ema['top1']:.3f}" if ev_ema is not None else "",
                     f" | {ev['skipped']} unreadable val image(s) skipped" if ev["skipped"] else "",
                     row["epoch_time_s"])
        self.save_epoch_end(epoch, {k: metrics[k] for k in ("loss", "top1", "top5")}, row)
        self.history.append(row)
        more = epoch + 1 < plan.epochs
        return not (more and (self.stop.requested() or
                              (plan.stop_after_steps and pr.global_step >= plan.stop_after_steps)))
