#!/usr/bin/env python
"""CPU timing of the compiled DDF op against a depthwise conv, the PyTorch reference and a plain copy.

    python benchmarks/bench_op_cpu.py                                  # 8x256x56x56 fp32, k=3, all threads
    python benchmarks/bench_op_cpu.py --size 2 64 28 28 --threads 1 --channels-last
    python benchmarks/bench_op_cpu.py --save benchmarks/results         # also write cpu_op_<date>.md there

Rows: forward and forward+backward (all input gradients) median wall time in ms, and the ratio to the depthwise
conv (``F.conv2d(groups=C)`` with the same k, dilation and stride). The copy row (``x.clone()``) is the memory
floor of reading and writing one tensor of the input's size.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddf  # noqa: E402
from ddf import ops  # noqa: E402
from ddf.reference import ddf_reference  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timeit(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=4, default=[8, 256, 56, 56], metavar=("B", "C", "H", "W"))
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--head", type=int, default=1)
    p.add_argument("--combine", choices=("mul", "add"), default="mul")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="skip the (slow, memory hungry) reference rows")
    p.add_argument("--save", metavar="DIR", help="append the table to DIR/cpu_op_<date>.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, C, H, W = args.size
    k, d, s, h = args.kernel_size, args.dilation, args.stride, args.head
    dtype = getattr(torch, args.dtype)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(B, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
    ch = torch.randn(B, C, k, k, dtype=dtype)
    sp = torch.randn(B, h * k * k, Ho, Wo, dtype=dtype).contiguous(memory_format=fmt)
    wdw = torch.randn(C, 1, k, k, dtype=dtype)
    go = torch.randn(B, C, Ho, Wo, dtype=dtype).contiguous(memory_format=fmt)
    pad = (k - 1) * d // 2

    def op_fwd(a, b, c):
        return ddf.ddf(a, b, c, k, d, s, h, args.combine)

    def ref_fwd(a, b, c):
        return ddf_reference(a, b, c, k, d, s, h, args.combine)

    def conv_fwd(a, w):
        return F.conv2d(a, w, stride=s, padding=pad, dilation=d, groups=C)

    def fwd_bwd(fn, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]

        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(go)

        return run

    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    rows = []
    with torch.no_grad():
        t_conv = timeit(lambda: conv_fwd(x, wdw), args.repeat)
        t_op = timeit(lambda: op_fwd(x, ch, sp), args.repeat)
        t_copy = timeit(lambda: x.clone(), args.repeat)
        t_ref = None if args.no_reference else timeit(lambda: ref_fwd(x, ch, sp), max(3, args.repeat // 3), 1)
    tb_conv = timeit(fwd_bwd(conv_fwd, x, wdw), args.repeat)
    tb_op = timeit(fwd_bwd(op_fwd, x, ch, sp), args.repeat)
    tb_ref = None if args.no_reference else timeit(fwd_bwd(ref_fwd, x, ch, sp), max(3, args.repeat // 3), 1)
    rows.append((f"DDF op ({ddf.backend_info().split(' (')[0]})", t_op, tb_op))
    rows.append((f"depthwise conv {k}x{k} (F.conv2d groups=C)", t_conv, tb_conv))
    if t_ref is not None:
        rows.append(("DDF reference (unfold)", t_ref, tb_ref))
    rows.append(("copy of the input (x.clone())", t_copy, None))

    def fmt_ms(t):
        return "-" if t is None else f"{t:.2f}"

    def ratio(t, base):
        return "-" if t is None else f"{t / base:.2f}x"

    lines = [
        f"## DDF op CPU benchmark, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, backend: {ddf.backend_info()}",
        f"- 1/5/15-min load average before the run: {load_before} (other jobs share this machine)",
        f"- input {B}x{C}x{H}x{W} {args.dtype} {'channels_last' if args.channels_last else 'contiguous'}, "
        f"k={k} dilation={d} stride={s} head={h} combine={args.combine}; median of {args.repeat} runs",
        "",
        "| op | forward ms | vs dwconv | fwd+bwd ms | vs dwconv |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, tf, tb in rows:
        lines.append(f"| {name} | {fmt_ms(tf)} | {ratio(tf, t_conv)} | {fmt_ms(tb)} | {ratio(tb, tb_conv)} |")
    text = "\n".join(lines)
    print(text)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        path = os.path.join(args.save, f"cpu_op_{datetime.date.today().isoformat()}.md")
        previous = ""
        if os.path.exists(path):  # several runs on one day (e.g. both layouts) go into one file
            with open(path) as f:
                previous = f.read().rstrip("\n") + "\n\n"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(previous + text + "\n")
        os.replace(tmp, path)
        print(f"saved {path}")
    if not ops.compiled_available():
        print("note: the compiled extension is unavailable; the 'DDF op' row ran the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
