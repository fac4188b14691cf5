"""Pieces shared by train.py and validate.py: key=value parsing, AMP set-up, the evaluation loop, transforms."""
from __future__ import annotations

import ast
import contextlib
import logging
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import DatasetError

_logger = logging.getLogger("ddf")


def parse_kv(items: Optional[Iterable[str]], what: str = "--model-kwargs") -> Dict:
    """``['se_ratio=0.3', 'filters=channel']`` -> ``{'se_ratio': 0.3, 'filters': 'channel'}``.

    Values are read as Python literals when they parse (numbers, bools, None, tuples), else kept as strings."""
    out: Dict = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ValueError(f"{what}: empty key in {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def resolve_amp(device: torch.device, amp: bool, amp_dtype: str) -> Tuple[Optional[torch.dtype], str]:
    """Return (autocast dtype or None, human note). CPU autocast runs in bfloat16 (float16 is not offered there)."""
    if not amp:
        return None, "float32 (no AMP)"
    if amp_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"--amp-dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}")
    if device.type == "cpu":
        note = "bfloat16 autocast on CPU"
        if amp_dtype == "float16":
            note += " (--amp-dtype float16 is CUDA-only; CPU autocast uses bfloat16)"
        return torch.bfloat16, note
    dtype = torch.float16 if amp_dtype == "float16" else torch.bfloat16
    return dtype, f"{amp_dtype} autocast on {device.type}" + (" with a grad scaler" if dtype == torch.float16 else "")


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: Optional[torch.dtype]):
    """A GradScaler for float16 autocast on CUDA, else None."""
    if dtype != torch.float16 or device.type != "cuda":
        return None
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, distributed: bool = False, log_interval: int = 0,
             header: str = "Eval") -> Dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over the loader. With ``distributed`` the per-rank sums are
    all-reduced, so a sharded, unpadded sampler gives the exact metric over the whole split."""
    model.eval()
    ctx = autocast_ctx(device, amp_dtype)
    sums = torch.zeros(5, dtype=torch.float64)  # loss_sum, top1, top5, count, unreadable images skipped
    n_batches = len(loader)
    t0 = time.time()
    for i, (images, target, *dropped) in enumerate(loader):
        sums[4] += dropped[0] if dropped else 0
        if target.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with ctx():
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, target, reduction="sum")
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(target.unsqueeze(1))
        sums += torch.tensor([loss.item(), hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), target.numel(), 0],
                             dtype=torch.float64)
        if log_interval and (i + 1) % log_interval == 0:
            _logger.info("%s: [%d/%d] %.1f img/s", header, i + 1, n_batches, sums[3].item() / (time.time() - t0))
    if distributed:
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    count = max(sums[3].item(), 1.0)
    if sums[4].item():
        _logger.warning("%s: metrics over the %d readable images; %d unreadable image(s) skipped", header,
                        int(sums[3].item()), int(sums[4].item()))
    return {"loss": sums[0].item() / count, "top1": 100.0 * sums[1].item() / count,
            "top5": 100.0 * sums[2].item() / count, "count": int(sums[3].item()), "skipped": int(sums[4].item())}


def eval_transform(data_config: Dict):
    """timm's eval transform (resize by crop_pct, center crop, normalize) from a resolved data config."""
    from timm.data import create_transform
    return create_transform(data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
                            mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main()``; a user error (bad data path, bad argument) prints one line and exits with 2."""
    try:
        main()
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
