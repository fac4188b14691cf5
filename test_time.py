#!/usr/bin/env python
"""Latency and memory benchmark of DDF against Conv, DwConv and PAC (paper Table 2, supplement Table A).

Two tables are reproduced and printed beside the paper's numbers:

* **Table A** (supplement): ``B x C x R x R`` inputs for a list of resolutions ``R``; entries Conv
  (``nn.Conv2d(C, C, 3, padding=1)``), DwConv (``groups=C``), DDF module (``ddf.DDFPack``, filters
  predicted from the input) and DDF op (``ddf.ddf`` with the filters given).
* **Table F** (ours, not in the paper): the DDF module with its spatial FilterNorm fused into the op (the
  default, ``ddf.modules._FUSE_SPATIAL_NORM = True``: the op normalises the raw filter, the normalised filter
  never exists) beside the unfused module (``False``: the normalised filter is written to memory first), at the
  Table A sizes, and their ratio.
* **Table 2** (paper): one input shape (default ``2 x 256 x 200 x 300``); entries Conv, DwConv,
  PAC (**our** unfold re-implementation in ``benchmarks/pac.py``, not the original PAC code),
  DDF module and DDF op; latency and peak allocated memory.

Timing: warm-up calls, then repeated samples until ``--min-time`` seconds and ``--min-repeats``
samples are reached (at most ``--max-repeats``). Each sample times ``inner`` back-to-back calls
(``inner`` chosen so that one sample lasts about ``--sample-ms``) with CUDA events on GPU and
``time.perf_counter`` on CPU; we report the median per-call time and the interquartile range
(IQR) of the samples. Forward runs under ``torch.no_grad()``; forward+backward runs the forward
with autograd and ``torch.autograd.grad`` of a fixed random output gradient with respect to the
input, the parameters and (for the op) the filters, so gradients are not accumulated.

Memory (CUDA only): after the timing of an entry, ``torch.cuda.reset_peak_memory_stats`` and one
more call; ``torch.cuda.max_memory_allocated`` is the peak, which includes the input, parameters
and filters held by the benchmark (as the paper's numbers appear to), and ``above inputs`` is the
peak minus what was allocated before the call. On CPU memory is not measured (reported as n/a).

Examples::

    python test_time.py --device cpu                     # scaled-down sizes, about a minute
    python test_time.py --device cuda --mode both --save-results benchmarks/results
    python test_time.py --device cuda --dtype float16 --memory-format channels_last

Run ``python test_time.py --help`` for every option.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ddf.modules as ddf_modules  # noqa: E402
from ddf import DDFPack, backend_info, ddf  # noqa: E402
from ddf.backends import op_label  # noqa: E402
from benchmarks.pac import PacConv2dBaseline  # noqa: E402
from training.io import atomic_write, check_output_dir, claim_output_file, discard_if_empty  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The paper's numbers (float32 forward, single GTX/RTX 2080 Ti).
# ----------------------------------------------------------------------------------------------
PAPER_A_SETUP = "B=32, C=256, 3x3, float32 forward, one 2080 Ti (supplement Table A)"
PAPER_A_BATCH, PAPER_A_CHANNELS = 32, 256
PAPER_TABLE_A: Dict[int, Dict[str, float]] = {  # ms
    7: {"conv": 0.21, "dwconv": 0.05, "ddf": 0.93, "ddf_op": 0.12},
    14: {"conv": 0.40, "dwconv": 0.09, "ddf": 0.96, "ddf_op": 0.15},
    28: {"conv": 2.31, "dwconv": 0.22, "ddf": 1.29, "ddf_op": 0.48},
    56: {"conv": 4.09, "dwconv": 0.79, "ddf": 2.60, "ddf_op": 1.80},
    112: {"conv": 16.04, "dwconv": 3.08, "ddf": 9.07, "ddf_op": 7.30},
    224: {"conv": 82.57, "dwconv": 11.97, "ddf": 37.11, "ddf_op": 28.62},
}
PAPER_2_SETUP = "input 2x256x200x300, 3x3, float32 forward, one 2080 Ti (paper Table 2)"
PAPER_2_SHAPE = (2, 256, 200, 300)
# (latency ms, memory "M"). The paper's "DDF" column is mapped to our DDF *module* row. Its "M" is
# read as MiB: DwConv's 236.0M is about input + output of 2x256x200x300 float32 (234.4 MiB).
PAPER_TABLE_2: Dict[str, Tuple[float, float]] = {
    "conv": (7.5, 356.3),
    "dwconv": (1.0, 236.0),
    "pac": (46.4, 3406.4),
    "ddf": (3.0, 245.7),
}

ENTRIES_A = ("conv", "dwconv", "ddf", "ddf_op")
ENTRIES_2 = ("conv", "dwconv", "pac", "ddf", "ddf_op")
ENTRIES_F = ("ddf", "ddf_unfused")
TABLES = ("A", "2", "F")
LABELS = {
    "conv": "Conv",
    "dwconv": "DwConv",
    "pac": "PAC (our unfold baseline)",
    "ddf": "DDF module (DDFPack)",
    "ddf_op": "DDF op (filters given)",
    "ddf_unfused": "DDF module, unfused FilterNorm",
}
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Scaled-down defaults for a small CPU; the paper's sizes on CUDA.
CPU_DEFAULTS = dict(batch=2, channels=64, resolutions=[7, 14, 28, 56], table2_shape=(1, 64, 100, 150))
CUDA_DEFAULTS = dict(batch=PAPER_A_BATCH, channels=PAPER_A_CHANNELS, resolutions=sorted(PAPER_TABLE_A),
                     table2_shape=PAPER_2_SHAPE)


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------
def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape4(text: str) -> Tuple[int, int, int, int]:
    values = _int_list(text)
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--table2-shape must be B,C,H,W (4 integers), got {text!r}")
    return tuple(values)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Latency/memory of Conv, DwConv, PAC, DDF module and DDF op beside the paper's numbers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--tables", default="A,2,F",
                   help="which tables to run, comma-separated: 'A', '2', 'F' (fused vs unfused DDF module)")
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwd+bwd", "both"),
                   help="forward only (as the paper), forward+backward, or both")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--memory-format", default="contiguous", choices=("contiguous", "channels_last"))
    p.add_argument("--batch", type=int, default=None,
                   help=f"Table A batch (default {CPU_DEFAULTS['batch']} on CPU, {PAPER_A_BATCH} on CUDA)")
    p.add_argument("--channels", type=int, default=None,
                   help=f"Table A channels (default {CPU_DEFAULTS['channels']} on CPU, {PAPER_A_CHANNELS} on CUDA)")
    p.add_argument("--resolutions", type=_int_list, default=None,
                   help="Table A resolutions, e.g. 7,14,28 (default 7,14,28,56 on CPU; 7..224 on CUDA)")
    p.add_argument("--table2-shape", type=_shape4, default=None,
                   help="Table 2 input B,C,H,W (default 1,64,100,150 on CPU; 2,256,200,300 on CUDA)")
    p.add_argument("--kernel-size", type=int, default=3, help="filter size of every entry (odd)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per entry (default 10 CUDA, 2 CPU)")
    p.add_argument("--min-repeats", type=int, default=None, help="minimum timed samples (default 20 CUDA, 5 CPU)")
    p.add_argument("--max-repeats", type=int, default=1000, help="maximum timed samples per entry")
    p.add_argument("--min-time", type=float, default=None,
                   help="keep sampling for at least this many seconds per entry (default 1.0 CUDA, 0.3 CPU)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="target duration of one sample; short calls are repeated inside a sample "
                        "(default 2 ms CUDA, 20 ms CPU)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="size of the tensor copied to measure device copy bandwidth (default 1024 CUDA, 64 CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure every entry in this many interleaved rounds (entries built afresh each round) "
                        "and pool the samples, so that load from other processes spreads over all entries "
                        "(default 1 CUDA, 3 CPU)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 in float32 convolutions/matmuls on CUDA (off by default: the paper's "
                        "2080 Ti has no TF32)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="do not set cudnn.benchmark=True")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="write every measurement to this CSV file")
    p.add_argument("--json", default=None, help="write metadata + every measurement to this JSON file")
    p.add_argument("--markdown", default=None, help="write the printed markdown report to this file")
    p.add_argument("--plot", default=None,
                   help="write a PNG of Table A latency vs resolution (log scale); needs matplotlib")
    p.add_argument("--save-results", default=None, metavar="DIR",
                   help="write <date>_<device>_<dtype>_<format>.{md,json} into DIR (e.g. benchmarks/results), "
                        "and a .png plot of Table A when matplotlib is installed")
    p.add_argument("--quiet", action="store_true", help="do not print progress lines to stderr")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill device-dependent defaults and validate; raises ValueError with a clear message."""
    dev = str(args.device)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
    is_cuda = dev.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False on this machine")
    defaults = CUDA_DEFAULTS if is_cuda else CPU_DEFAULTS
    for name in ("batch", "channels", "resolutions", "table2_shape"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    timing = dict(warmup=10, min_repeats=20, min_time=1.0, sample_ms=2.0, copy_mib=1024, rounds=1) \
        if is_cuda else dict(warmup=2, min_repeats=5, min_time=0.3, sample_ms=20.0, copy_mib=64, rounds=3)
    for name, value in timing.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    tables = [t.strip().upper() for t in str(args.tables).split(",") if t.strip()]
    if not tables or any(t not in TABLES for t in tables):
        raise ValueError(f"--tables must be a comma-separated subset of {','.join(TABLES)}, got {args.tables!r}")
    args.tables = tables
    for name in ("batch", "channels", "warmup", "min_repeats", "max_repeats", "copy_mib", "rounds"):
        v = getattr(args, name)
        if v < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    if args.kernel_size < 3 or args.kernel_size % 2 == 0:
        raise ValueError(f"--kernel-size must be odd and >= 3, got {args.kernel_size}")
    if args.min_time < 0 or args.sample_ms <= 0:
        raise ValueError("--min-time must be >= 0 and --sample-ms > 0")
    if args.dtype == "float16" and not is_cuda:
        print("note: float16 on CPU is slow/unsupported for some ops; entries that fail are reported as errors",
              file=sys.stderr)
    args.modes = list(MODES) if args.mode == "both" else [args.mode]
    return args


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds taken by ``inner`` back-to-back calls of ``fn`` (device work included)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return time.perf_counter() - t0


def _quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def measure(fn: Callable[[], object], device: torch.device, warmup: int, min_repeats: int, max_repeats: int,
            min_time: float, sample_ms: float) -> Dict[str, float]:
    """Median / quartiles (ms per call) of repeated samples of ``fn``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    one = max(_time_block(fn, 1, device), 1e-7)
    inner = max(1, min(1000, int(round(sample_ms / 1e3 / one))))
    samples: List[float] = []
    t_start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - t_start < min_time):
        samples.append(_time_block(fn, inner, device) / inner * 1e3)
    return dict(_summary(samples), inner=inner, samples_ms=samples)


def _summary(samples: Sequence[float]) -> Dict[str, float]:
    q1, med, q3 = _quartiles(samples)
    return dict(median_ms=med, q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1, repeats=len(samples))


def copy_bandwidth(device: torch.device, mib: int, args: argparse.Namespace) -> Dict[str, float]:
    """Device copy bandwidth: (bytes read + bytes written) / time of ``dst.copy_(src)``."""
    n = mib * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device, max(1, args.warmup), args.min_repeats, args.max_repeats,
                    args.min_time, args.sample_ms)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return dict(bytes=moved, median_ms=stats["median_ms"], iqr_ms=stats["iqr_ms"],
                gbps=moved / (stats["median_ms"] / 1e3) / 1e9)


# ----------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------
def min_bytes(name: str, shape: Sequence[int], k: int, elem: int, mode: str) -> Optional[int]:
    """Bytes an entry must at least move (DDF op and DwConv only), for achieved-bandwidth columns.

    DDF op forward: read input (B*C*H*W), channel filter (B*C*k*k), spatial filter (B*k*k*H*W),
    write output (B*C*H*W). Backward additionally reads the output gradient, input and both
    filters, and writes the gradients of input and both filters. DwConv: the same with the
    weight (C*k*k) + bias (C) in place of the two filters.
    """
    B, C, H, W = shape
    kk = k * k
    if name == "ddf_op":
        params = B * C * kk + B * kk * H * W
    elif name == "dwconv":
        params = C * kk + C
    else:
        return None
    feat = B * C * H * W
    fwd = feat + params + feat
    if mode == "fwd":
        return fwd * elem
    return (fwd + feat + feat + params + feat + params) * elem


def make_entry(name: str, shape: Sequence[int], k: int, dtype: torch.dtype, device: torch.device,
               channels_last: bool, mode: str) -> Tuple[Callable[[], object], list]:
    """Build the call to time. Returns ``(step, keep_alive)``."""
    B, C, H, W = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(B, C, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
    grad = mode == "fwd+bwd"
    if name == "ddf_op":
        ch = (torch.randn(B, C, k, k, device=device, dtype=dtype) / k)
        sp = (torch.randn(B, k * k, H, W, device=device, dtype=dtype) / k).contiguous(memory_format=fmt)
        inputs = [x, ch, sp]

        def run():
            return ddf(x, ch, sp, k)
    else:
        if name == "conv":
            m: nn.Module = nn.Conv2d(C, C, k, padding=k // 2)
        elif name == "dwconv":
            m = nn.Conv2d(C, C, k, padding=k // 2, groups=C)
        elif name == "pac":
            m = PacConv2dBaseline(C, C, k)
        elif name in ("ddf", "ddf_unfused"):
            m = DDFPack(C, kernel_size=k)
        else:
            raise ValueError(f"unknown entry {name!r}")
        m = m.to(device=device, dtype=dtype, memory_format=fmt)
        m.train(grad)  # forward only: eval() as the original script; forward+backward: train()
        inputs = [x] + [p for p in m.parameters()]

        fuse = name != "ddf_unfused"

        def run():
            ddf_modules._FUSE_SPATIAL_NORM = fuse
            try:
                return m(x)
            finally:
                ddf_modules._FUSE_SPATIAL_NORM = True
    if not grad:
        def step():
            with torch.no_grad():
                return run()
        return step, inputs
    for t in inputs:
        t.requires_grad_(True)
    with torch.no_grad():
        gout = torch.randn_like(run())

    def step():
        out = run()
        return torch.autograd.grad(out, inputs, gout)
    return step, inputs + [gout]


def run_entry(table: str, name: str, shape: Sequence[int], mode: str, args: argparse.Namespace,
              device: torch.device) -> Dict[str, object]:
    dtype = DTYPES[args.dtype]
    rec: Dict[str, object] = dict(table=table, entry=name, label=LABELS[name], mode=mode,
                                  shape="x".join(str(s) for s in shape),
                                  resolution=shape[2] if table in ("A", "F") else None,
                                  dtype=args.dtype, memory_format=args.memory_format, device=str(device))
    torch.manual_seed(args.seed)
    step = keep = None
    try:
        step, keep = make_entry(name, shape, args.kernel_size, dtype, device,
                                args.memory_format == "channels_last", mode)
        rec.update(measure(step, device, args.warmup, args.min_repeats, args.max_repeats, args.min_time,
                           args.sample_ms))
        rec["status"] = "ok"
        if device.type == "cuda":
            gc.collect()
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            out = step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            del out
            rec["peak_mem_mib"] = peak / 2 ** 20
            rec["peak_above_inputs_mib"] = (peak - base) / 2 ** 20
        else:
            rec["peak_mem_mib"] = None
            rec["peak_above_inputs_mib"] = None
        nbytes = min_bytes(name, shape, args.kernel_size, torch.tensor([], dtype=dtype).element_size(), mode)
        rec["min_bytes"] = nbytes
        rec["achieved_gbps"] = None if nbytes is None else nbytes / (rec["median_ms"] / 1e3) / 1e9
    except Exception as exc:  # reported in the table, never silently dropped
        if device.type == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
            msg = "out of memory"
        else:
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rec.update(status="error", error=msg, median_ms=None, q1_ms=None, q3_ms=None, iqr_ms=None,
                   peak_mem_mib=None, peak_above_inputs_mib=None, min_bytes=None, achieved_gbps=None)
    finally:
        del step, keep
        if device.type == "cuda":  # free the entry's memory before the next one (gc is slow: CUDA only)
            gc.collect()
            torch.cuda.empty_cache()
    if table in ("A", "F"):
        rec["paper_ms"] = PAPER_TABLE_A.get(shape[2], {}).get(name) if mode == "fwd" and table == "A" else None
        rec["paper_mem"] = None
    else:
        paper = PAPER_TABLE_2.get(name) if mode == "fwd" else None
        rec["paper_ms"], rec["paper_mem"] = (paper if paper else (None, None))
    return rec


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _ms(rec: Optional[dict]) -> str:
    if rec is None:
        return "—"
    if rec.get("status") != "ok":
        return f"error ({rec.get('error', '')[:60]})"
    return f"{rec['median_ms']:.3f} [{rec['iqr_ms']:.3f}]"


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _get(records: List[dict], table: str, mode: str, entry: str, key) -> Optional[dict]:
    for r in records:
        if r["table"] == table and r["mode"] == mode and r["entry"] == entry:
            if r["resolution"] == key:
                return r
    return None


def _med(rec: Optional[dict]) -> Optional[float]:
    return None if rec is None or rec.get("status") != "ok" else rec["median_ms"]


def meta_info(args: argparse.Namespace, device: torch.device, copy: Dict[str, float]) -> Dict[str, object]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"CPU: {name} ({torch.get_num_threads()} torch threads)"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=str(device), device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        python=platform.python_version(), ddf_backend=backend_info(),
        dtype=args.dtype, memory_format=args.memory_format, modes=args.modes, kernel_size=args.kernel_size,
        tf32=bool(args.tf32) if device.type == "cuda" else None,
        cudnn_benchmark=(not args.no_cudnn_benchmark) if device.type == "cuda" else None,
        table_a=dict(batch=args.batch, channels=args.channels, resolutions=list(args.resolutions)),
        table2_shape=list(args.table2_shape),
        timing=dict(warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                    min_time_s=args.min_time, sample_ms=args.sample_ms, rounds=args.rounds),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        copy_bandwidth=copy,
        command="python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv else "",
    )


def format_report(meta: Dict[str, object], records: List[dict], args: argparse.Namespace) -> str:
    cuda = str(meta["device"]).startswith("cuda")
    copy = meta["copy_bandwidth"]
    L: List[str] = []
    L.append(f"# DDF latency / memory benchmark — {'GPU' if cuda else 'CPU'} run")
    L.append("")
    L.append(f"- device: **{meta['device_name']}** (`{meta['device']}`)")
    L.append(f"- torch {meta['torch']} (CUDA {meta['cuda']}), Python {meta['python']}, date {meta['date']}")
    L.append(f"- DDF backend: {meta['ddf_backend']}")
    L.append(f"- dtype {meta['dtype']}, memory format {meta['memory_format']}, kernel {meta['kernel_size']}x"
             f"{meta['kernel_size']}" + (f", TF32 {'on' if meta['tf32'] else 'off'}, cudnn.benchmark "
                                          f"{meta['cudnn_benchmark']}" if cuda else ""))
    t = meta["timing"]
    L.append(f"- timing: {t['rounds']} interleaved round(s); per entry and round {t['warmup']} warm-up calls, "
             f">= {t['min_repeats']} samples and >= {t['min_time_s']} s, samples of ~{t['sample_ms']} ms; cells are "
             "**median [IQR] ms per call** over the pooled samples")
    if meta.get("load_average") and not cuda:
        la = meta["load_average"]
        L.append(f"- system load average at the end (1/5/15 min): {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} "
                 "(other processes share this CPU: expect noise; see the IQRs)")
        cores = os.cpu_count() or 1
        if la[0] > cores and meta.get("threads", 1) > 1:
            L.append(f"- **warning**: load {la[0]:.1f} > {cores} cores with {meta['threads']} torch threads: "
                     "multi-threaded CPU kernels wait for descheduled threads (ms-scale stalls); rerun with "
                     "`--threads 1` for stable numbers")
    L.append(f"- device copy bandwidth: {copy['gbps']:.1f} GB/s (copy of {copy['bytes'] / 2 / 2 ** 20:.0f} MiB, "
             "bytes read + written / median time)")
    if not cuda:
        L.append("- **CPU run**: sizes are scaled down and the paper's numbers are GPU (2080 Ti) numbers at the "
                 "paper's sizes — compare ratios, not absolute times. Memory is **not measured** on CPU (n/a).")
    info = str(meta["ddf_backend"])
    if "reference" in info or (cuda and "cuda" not in info):
        L.append("- note: DDF rows ran the plain PyTorch *reference* implementation (no compiled op), which "
                 "materialises the unfolded input; they say nothing about the speed of the compiled op.")
    L.append("")
    for mode in args.modes:
        if "A" in args.tables:
            a = meta["table_a"]
            same = a["batch"] == PAPER_A_BATCH and a["channels"] == PAPER_A_CHANNELS and meta["kernel_size"] == 3
            L.append(f"## Table A — {mode}, B={a['batch']}, C={a['channels']}")
            L.append("")
            note = "" if mode == "fwd" else " (the paper has forward only)"
            L.append(f"Paper: {PAPER_A_SETUP}{note}." + ("" if same else
                     " **Our sizes differ from the paper's**: absolute times are not comparable."))
            L.append("")
            L.append("| Resolution | Conv paper | Conv ours | DwConv paper | DwConv ours | DDF paper | DDF module ours "
                     "| DDF Op paper | DDF op ours |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for res in a["resolutions"]:
                cells = [f"{res}×{res}"]
                for e in ENTRIES_A:
                    r = _get(records, "A", mode, e, res)
                    cells += [_num(r["paper_ms"] if r else None), _ms(r)]
                L.append("| " + " | ".join(cells) + " |")
            L.append("")
            L.append(f"Ratios (median latency) and DDF op bandwidth — {mode}:")
            L.append("")
            L.append("| Resolution | DDF/Conv paper | ours | DDF/DwConv paper | ours | Op/Conv paper | ours "
                     "| Op/DwConv paper | ours | Op GB/s | Op % of copy BW | DwConv GB/s |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for res in a["resolutions"]:
                r = {e: _get(records, "A", mode, e, res) for e in ENTRIES_A}
                p = PAPER_TABLE_A.get(res) if mode == "fwd" else None
                pv = (lambda e: p[e] if p else None)
                op = r["ddf_op"]
                gbps = op["achieved_gbps"] if op and op.get("status") == "ok" else None
                dw = r["dwconv"]
                L.append("| " + " | ".join([
                    f"{res}×{res}",
                    _ratio(pv("ddf"), pv("conv")), _ratio(_med(r["ddf"]), _med(r["conv"])),
                    _ratio(pv("ddf"), pv("dwconv")), _ratio(_med(r["ddf"]), _med(r["dwconv"])),
                    _ratio(pv("ddf_op"), pv("conv")), _ratio(_med(op), _med(r["conv"])),
                    _ratio(pv("ddf_op"), pv("dwconv")), _ratio(_med(op), _med(r["dwconv"])),
                    _num(gbps, "{:.3g}"), _num(None if gbps is None else 100 * gbps / copy["gbps"], "{:.2g}%"),
                    _num(dw["achieved_gbps"] if dw and dw.get("status") == "ok" else None, "{:.3g}"),
                ]) + " |")
            L.append("")
        if "2" in args.tables:
            shape = meta["table2_shape"]
            same = tuple(shape) == PAPER_2_SHAPE and meta["kernel_size"] == 3
            L.append(f"## Table 2 — {mode}, input {'×'.join(map(str, shape))}")
            L.append("")
            L.append(f"Paper: {PAPER_2_SETUP}; paper memory read as MiB; the paper's 'DDF' is put beside our DDF "
                     "module." + ("" if same else " **Our shape differs from the paper's**: absolute numbers are "
                                  "not comparable.") + ("" if mode == "fwd" else " The paper has forward only."))
            L.append("")
            L.append("| Filter | Latency paper (ms) | Latency ours (ms) | /Conv paper | /Conv ours | Memory paper (M) "
                     "| Peak alloc. ours (MiB) | Above inputs ours (MiB) | /Conv mem paper | /Conv mem ours |")
            L.append("|---|---|---|---|---|---|---|---|---|---|")
            conv = _get(records, "2", mode, "conv", None)
            for e in ENTRIES_2:
                r = _get(records, "2", mode, e, None)
                if r is None:
                    continue
                pc = PAPER_TABLE_2["conv"] if mode == "fwd" else (None, None)
                mem = r.get("peak_mem_mib")
                cmem = conv.get("peak_mem_mib") if conv else None
                L.append("| " + " | ".join([
                    r["label"], _num(r["paper_ms"]), _ms(r), _ratio(r["paper_ms"], pc[0]), _ratio(_med(r), _med(conv)),
                    _num(r["paper_mem"], "{:.1f}"),
                    _num(mem, "{:.1f}") if cuda else "n/a", _num(r.get("peak_above_inputs_mib"), "{:.1f}")
                    if cuda else "n/a", _ratio(r["paper_mem"], pc[1]), _ratio(mem, cmem) if cuda else "n/a",
                ]) + " |")
            L.append("")
        if "F" in args.tables:
            L += _fused_section(meta, records, mode)
    errors = [r for r in records if r.get("status") != "ok"]
    if errors:
        L.append("Errors: " + "; ".join(f"{r['table']}/{r['entry']}/{r['shape']}/{r['mode']}: {r['error']}"
                                        for r in errors))
        L.append("")
    return "\n".join(L)


def _fused_section(meta: Dict[str, object], records: List[dict], mode: str) -> List[str]:
    """Table F: DDF module with the fused spatial FilterNorm vs unfused, at the Table A sizes."""
    a = meta["table_a"]
    L = [f"## Table F — fused spatial FilterNorm, {mode}, B={a['batch']}, C={a['channels']}", "",
         "DDF module with its spatial FilterNorm applied inside the op (default) vs the unfused module "
         "(`ddf.modules._FUSE_SPATIAL_NORM = False`: the normalised filter is written to memory first); ours only.",
         "", "| Resolution | DDF module fused | DDF module unfused | fused/unfused |", "|---|---|---|---|"]
    for res in a["resolutions"]:
        fused, unfused = (_get(records, "F", mode, e, res) for e in ENTRIES_F)
        L.append(f"| {res}×{res} | {_ms(fused)} | {_ms(unfused)} | {_ratio(_med(fused), _med(unfused))} |")
    return L + [""]


CSV_FIELDS = ["table", "entry", "label", "mode", "shape", "resolution", "dtype", "memory_format", "device",
              "status", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "repeats", "inner", "peak_mem_mib",
              "peak_above_inputs_mib", "min_bytes", "achieved_gbps", "paper_ms", "paper_mem", "error"]


def write_csv(path: str, records: List[dict]) -> None:
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    atomic_write(path, buf.getvalue())


def write_plot(path: str, meta: Dict[str, object], records: List[dict], args: argparse.Namespace) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed; skipping the plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(conv="C0", dwconv="C1", ddf="C2", ddf_op="C3")
    res = list(meta["table_a"]["resolutions"])
    for mode in args.modes:
        for e in ENTRIES_A:
            ys = [_med(_get(records, "A", mode, e, r)) for r in res]
            pts = [(r, y) for r, y in zip(res, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[e], linestyle="-" if mode == "fwd" else "--",
                        label=f"{LABELS[e]} ({mode}, ours)")
    a = meta["table_a"]
    if a["batch"] == PAPER_A_BATCH and a["channels"] == PAPER_A_CHANNELS:
        for e in ENTRIES_A:
            pts = [(r, PAPER_TABLE_A[r][e]) for r in res if r in PAPER_TABLE_A]
            if pts:
                ax.plot(*zip(*pts), marker="x", color=colors[e], linestyle=":", label=f"{LABELS[e]} (paper)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter
    ax.xaxis.set_major_locator(FixedLocator(res))
    ax.xaxis.set_major_formatter(FixedFormatter([str(r) for r in res]))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("resolution (pixels per side)")
    ax.set_ylabel("latency per call (ms, median)")
    ax.set_title(f"Table A, B={a['batch']} C={a['channels']}, {meta['dtype']}, {meta['device_name']}"[:90],
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return True


OUTPUT_FILES = (("csv", (".csv",)), ("json", (".json",)), ("markdown", None), ("plot", (".png",)))


def check_outputs(args: argparse.Namespace) -> List[Tuple[str, bool]]:
    """Before the measurements: every output file is created now, empty (so a path that cannot be written fails
    first), and ``--save-results`` is checked to be a folder files can be created in. An existing file is kept:
    test_time.py never replaces one (ValueError naming the option). Returns the claimed (path, created) pairs for
    :func:`training.io.discard_if_empty`."""
    claimed: List[Tuple[str, bool]] = []
    try:
        for option, suffixes in OUTPUT_FILES:
            path = getattr(args, option)
            if not path:
                continue
            full, created = claim_output_file(path, "--" + option, suffixes=suffixes)
            if not created and os.path.getsize(full) > 0:
                raise ValueError(f"--{option} {path} exists; test_time.py does not replace results files (it is "
                                 f"kept as it is): give a new file name")
            claimed.append((full, created))
            setattr(args, option, full)
        if args.save_results:
            check_output_dir(args.save_results, "--save-results")
    except ValueError:
        for full, created in claimed:
            discard_if_empty(full, created)
        raise
    return claimed


def _unused_base(folder: str, name: str) -> str:
    """``folder/name``, or ``folder/name-2``, ``-3``... when an earlier run wrote that name (never replaced)."""
    base, n = os.path.join(folder, name), 1
    while any(os.path.exists(base + (f"-{n}" if n > 1 else "") + ext) for ext in (".md", ".json", ".png")):
        n += 1
    return base + (f"-{n}" if n > 1 else "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve_args(args)
        claimed = check_outputs(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return _run(args)
    finally:
        for full, created in claimed:  # e.g. --plot without matplotlib, or a failure before the writing
            discard_if_empty(full, created)


def _setup_device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    return device


def _jobs(args: argparse.Namespace) -> List[Tuple[str, str, Tuple[int, ...], str]]:
    jobs = []
    for mode in args.modes:
        if "A" in args.tables:
            for res in args.resolutions:
                for e in ENTRIES_A:
                    jobs.append(("A", e, (args.batch, args.channels, res, res), mode))
        if "2" in args.tables:
            for e in ENTRIES_2:
                jobs.append(("2", e, tuple(args.table2_shape), mode))
        if "F" in args.tables:
            for res in args.resolutions:
                for e in ENTRIES_F:
                    jobs.append(("F", e, (args.batch, args.channels, res, res), mode))
    return jobs


def _run(args: argparse.Namespace) -> Dict[str, object]:
    device = _setup_device(args)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    log(f"op: {op_label(device)} | device: {device}")
    copy = copy_bandwidth(device, args.copy_mib, args)
    log(f"copy bandwidth: {copy['gbps']:.1f} GB/s")
    jobs = _jobs(args)
    by_job: Dict[int, dict] = {}
    for rnd in range(args.rounds):
        for i, (table, e, shape, mode) in enumerate(jobs):
            rec = run_entry(table, e, shape, mode, args, device)
            prev = by_job.get(i)
            if prev is None or prev.get("status") != "ok":
                by_job[i] = rec
            elif rec.get("status") == "ok":  # pool the samples of all rounds
                prev["samples_ms"] = prev["samples_ms"] + rec["samples_ms"]
                prev.update(_summary(prev["samples_ms"]))
                if prev.get("min_bytes"):
                    prev["achieved_gbps"] = prev["min_bytes"] / (prev["median_ms"] / 1e3) / 1e9
            else:  # a later round failed: report it, never hide it
                by_job[i] = rec
            log(f"[round {rnd + 1}/{args.rounds}, {i + 1}/{len(jobs)}] table {table} {LABELS[e]:<26} "
                f"{rec['shape']:<16} {mode:<8} {_ms(rec)} ms"
                + (f", peak {rec['peak_mem_mib']:.1f} MiB" if rec.get("peak_mem_mib") else ""))
    records = [by_job[i] for i in range(len(jobs))]
    meta = meta_info(args, device, copy)
    report = format_report(meta, records, args)
    print(report)
    result = dict(meta=meta, records=records, report=report)
    _write_outputs(args, result, device, log)
    return result


def _write_outputs(args: argparse.Namespace, result: Dict[str, object], device: torch.device, log) -> None:
    meta, records, report = result["meta"], result["records"], result["report"]
    if args.csv:
        write_csv(args.csv, records)
    if args.json:
        atomic_write(args.json, json.dumps(dict(meta=meta, records=records), indent=1))
    if args.markdown:
        atomic_write(args.markdown, report + "\n")
    if args.plot:
        result["plot"] = write_plot(args.plot, meta, records, args)
    if args.save_results:
        day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        kind = "gpu" if device.type == "cuda" else "cpu"
        base = _unused_base(args.save_results,
                            f"{day}_{kind}_{_slug(str(meta['device_name']))}_{args.dtype}_{args.memory_format}")
        atomic_write(base + ".md", report + "\n")
        atomic_write(base + ".json", json.dumps(dict(meta=meta, records=records), indent=1))
        result["saved"] = [base + ".md", base + ".json"]
        if "A" in args.tables and write_plot(base + ".png", meta, records, args):
            result["saved"].append(base + ".png")
        log(f"saved {base}.md and {base}.json")


def failed_rows(result: Dict[str, object]) -> List[dict]:
    return [r for r in result["records"] if r.get("status") != "ok"]


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The command: 0 when every row was measured, 1 (with one line naming the failed rows) otherwise."""
    failed = failed_rows(main(argv))
    if failed:
        names = "; ".join(f"{r['table']}/{r['entry']}/{r['shape']}/{r['mode']}" for r in failed[:5])
        print(f"error: {len(failed)} measurement(s) failed (see 'Errors:' in the report): {names}"
              + (" ..." if len(failed) > 5 else ""), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
