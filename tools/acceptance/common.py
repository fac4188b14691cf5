"""What every acceptance phase shares: the run context, tables, relative errors, CUDA-event timing."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclasses.dataclass
class Context:
    out: str  #: the --out folder
    dry_run: bool  #: tiny sizes on a CPU machine; CUDA-only steps skipped with a reason
    deadline: float  #: time.time() by which the phase must have finished (the orchestrator kills it after)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    def left(self) -> float:
        return self.deadline - time.time()

    def save_partial(self, res: Dict, name: str) -> None:
        """Write what a phase has so far, so that a phase killed at its time box still leaves its tables."""
        write_json(os.path.join(self.out, "phases", f"{name}.json"), res)

    def path(self, *parts: str) -> str:
        p = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p


def table(title: str, header: Sequence[str], rows: List[Sequence], note: str = "") -> Dict:
    return {"title": title, "header": list(header), "rows": [list(r) for r in rows], "note": note}


def result(status: str, text: str, tables: Optional[List[Dict]] = None, **extra) -> Dict:
    key = "reason" if status == "skipped" else "detail"
    return {"status": status, key: text, "tables": tables or [], **extra}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; inf when ``a`` holds a NaN/Inf that ``ref`` does not."""
    a64, r64 = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a64).all():
        return float("inf")
    den = r64.norm().item()
    return (a64 - r64).norm().item() / (den if den > 0 else 1.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of one ``fn()`` call: CUDA events on a GPU, perf_counter on CPU, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def write_json(path: str, data) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
