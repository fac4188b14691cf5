"""The training loop: ``train_one_epoch``, ``evaluate`` and the :class:`Trainer` that runs epochs, evaluates,
saves checkpoints (last / best / top-k, periodic and on a stop signal) and writes the run log."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointSaver, model_state
from .runtime import GracefulStop, RunLog, Runtime, fmt_time, gather_rng, stop_signals_blocked

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
    unreadable ones. Distributed: the per-rank sums are all-reduced (exact over the whole split with an unpadded
    sampler). Returns None when ``stop`` was requested before the end; over zero readable images the metrics are None
    (``count`` 0), which callers treat as an error, not a result."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss_sum, top1, top5, count, skipped
    t0 = time.time()
    with stop_signals_blocked():  # no stop signal can kill a worker that is still starting
        batches = iter(loader)
    for i, batch in enumerate(batches):
        images, target, skipped = _unpack(batch)
        sums[4] += skipped
        if images is not None:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with (autocast or contextlib.nullcontext)():
                logits = model(images)
            logits = logits.float()
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target.unsqueeze(1))
            sums[:4] += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(), hit[:, 0].sum().item(),
                                      hit.any(dim=1).sum().item(), target.numel()], dtype=torch.float64)
        if log_interval and (i + 1) % log_interval == 0:
            _logger.info("%s: [%d/%d] %.1f img/s", header, i + 1, len(loader), sums[3].item() / (time.time() - t0))
        if stop is not None and stop.requested():
            return None
    if rt is not None and rt.distributed:
        t = sums.to(rt.device)
        dist.all_reduce(t)
        sums = t.cpu()
    count = int(sums[3].item())
    if count == 0:  # nothing was scored: no metric at all, never a 0.0 that could become a best
        return {"loss": None, "top1": None, "top5": None, "count": 0, "skipped": int(sums[4].item())}
    return {"loss": sums[0].item() / count, "top1": 100.0 * sums[1].item() / count,
            "top5": 100.0 * sums[2].item() / count, "count": count, "skipped": int(sums[4].item())}


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


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    count: int = 0
    run_steps: int = 0
    run_t0: float = field(default_factory=time.time)

    def train_state(self) -> Dict[str, float]:
        return {"loss_sum": self.loss_sum, "count": self.count}


def train_step(p: TrainParts, images: torch.Tensor, target: torch.Tensor, global_step: int) -> torch.Tensor:
    """Forward, backward (scaled under float16 AMP), optional clipping, optimizer step, EMA update."""
    from timm.utils import dispatch_clip_grad, unwrap_model
    if p.mixup is not None:
        images, target = p.mixup(images, target)
    if p.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with p.autocast():
        loss = p.loss_fn(p.model(images).float(), target)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {global_step}; lower --lr or use --clip-grad")
    p.optimizer.zero_grad(set_to_none=True)
    params = [q for q in p.model.parameters() if q.requires_grad]
    if p.scaler is not None:
        p.scaler.scale(loss).backward()
        if p.clip_grad is not None:
            p.scaler.unscale_(p.optimizer)
            dispatch_clip_grad(params, p.clip_grad, mode=p.clip_mode)
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        loss.backward()
        if p.clip_grad is not None:
            dispatch_clip_grad(params, p.clip_grad, mode=p.clip_mode)
        p.optimizer.step()
    if p.ema is not None:
        p.ema.update(unwrap_model(p.model), step=global_step)
    return loss.detach()


class Trainer:
    """Runs the epochs of one run: training steps, evaluation (and EMA evaluation), BN sync, schedule, checkpoints
    (epoch-end last/best/top-k on rank 0; mid-epoch ``last`` every ``checkpoint_interval`` steps, after
    ``stop_after_steps`` and when a stop signal arrives), the summary CSV and the progress lines.

    ``meta`` holds the checkpoint fields that do not change during the run (arch, args, classes, data config,
    run signature); ``saver``/``runlog`` are None on ranks other than 0."""

    def __init__(self, parts: TrainParts, plan: RunPlan, rt: Runtime, train_loader, val_loader, meta: Dict,
                 saver: Optional[CheckpointSaver], runlog: Optional[RunLog], stop: GracefulStop):
        self.p, self.plan, self.rt = parts, plan, rt
        self.train_loader, self.val_loader = train_loader, val_loader
        self.meta, self.saver, self.runlog, self.stop = meta, saver, runlog, stop
        self.progress = Progress()
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
        rng = gather_rng(self.rt)  # collective: every rank takes part
        if self.saver is None:
            return
        st = self.state(epoch, step)
        st.update(train_state=self.progress.train_state(), rng_state=rng)
        self.saver.save_last(st)
        _logger.info("saved %s (epoch %d, step %d%s)", self.saver.last_path, epoch, step, why)

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
                pr.loss_sum, pr.count = 0.0, 0
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
        try:
            with stop_signals_blocked():  # see evaluate
                batches = iter(self.train_loader)
            for i, (images, target) in enumerate(batches, start=step0):
                loss = train_step(p, images.to(self.rt.device, non_blocking=True),
                                  target.to(self.rt.device, non_blocking=True), self.progress.global_step)
                if not self.after_step(epoch, i + 1, loss, images.shape[0]):
                    return False
                if i + 1 == plan.steps_per_epoch:
                    break
        except RuntimeError:
            if self.stop.signum is None:  # a worker killed by a signal to the whole process group
                raise
            _logger.warning("data loader stopped by the signal; saving the last completed step")
            self.save_last(epoch, self.progress.step, ", stopped by a signal")
            return False
        return True

    def after_step(self, epoch: int, step: int, loss: torch.Tensor, n: int) -> bool:
        pr, plan = self.progress, self.plan
        pr.global_step += 1
        pr.run_steps += 1
        pr.step = step
        pr.loss_sum += loss.item() * n
        pr.count += n
        if self.p.sched_on_updates:
            self.p.scheduler.step_update(pr.global_step)
        last = step == plan.steps_per_epoch
        if plan.log_interval and (step % plan.log_interval == 0 or last):
            self.log_progress(epoch, step, loss.item())
        want_stop = bool(plan.stop_after_steps and pr.global_step >= plan.stop_after_steps and not last)
        signalled = self.stop.requested()
        if want_stop or signalled:
            self.save_last(epoch, step, ", stopped by a signal" if signalled else ", --stop-after-steps")
            return False
        if plan.checkpoint_interval and step % plan.checkpoint_interval == 0 and not last:
            self.save_last(epoch, step, ", --checkpoint-interval")
        return True

    def log_progress(self, epoch: int, step: int, loss: float) -> None:
        pr, plan = self.progress, self.plan
        if self.rt.rank != 0:
            return
        per_step = (time.time() - pr.run_t0) / max(pr.run_steps, 1)
        total = plan.epochs * plan.steps_per_epoch
        _logger.info("Train: %d [%4d/%d (%3.0f%%)]  loss %.4f (%.4f)  lr %.3e  %.1f img/s  ETA epoch %s  run %s",
                     epoch, step, plan.steps_per_epoch, 100.0 * step / plan.steps_per_epoch, loss,
                     pr.loss_sum / max(pr.count, 1), self.p.optimizer.param_groups[0]["lr"],
                     self.train_loader.batch_size * self.rt.world_size / max(per_step, 1e-9),
                     fmt_time(per_step * (plan.steps_per_epoch - step)), fmt_time(per_step * (total - pr.global_step)))
        if self.runlog is not None:
            self.runlog.step("train/loss", loss, pr.global_step)

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
        self.save_last(epoch, 0, ", evaluation failed")  # an epoch-end state: resume starts the next epoch
        if self.runlog is not None:
            self.runlog.epoch(row)
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
        if not p.sched_on_updates:
            p.scheduler.step(epoch + 1, metrics[plan.eval_metric])
        _logger.info("Epoch %d: train loss %.4f | val loss %.4f top-1 %.3f top-5 %.3f%s%s | %.1fs", epoch,
                     row["train_loss"], ev["loss"], ev["top1"], ev["top5"],
                     f" | EMA top-1 {ev_ema['top1']:.3f}" if ev_ema is not None else "",
                     f" | {ev['skipped']} unreadable val image(s) skipped" if ev["skipped"] else "",
                     row["epoch_time_s"])
        rng = gather_rng(self.rt)
        if self.saver is not None:
            st = self.state(epoch, 0, {k: metrics[k] for k in ("loss", "top1", "top5")})
            st["rng_state"] = rng
            self.saver.save_epoch(st, epoch, metrics[plan.eval_metric])
            self.runlog.epoch(row)
        self.history.append(row)
        more = epoch + 1 < plan.epochs
        return not (more and (self.stop.requested() or
                              (plan.stop_after_steps and pr.global_step >= plan.stop_after_steps)))
