#!/usr/bin/env python
"""DDF speed goals (issue 12): every figure a ratio of two timings measured side by side in one process.

    python benchmarks/bench_speed.py                       # fp32, 2 threads, the goals table
    python benchmarks/bench_speed.py --quick               # fewer rounds, skip the ResNet-50 rows
    python benchmarks/bench_speed.py --save benchmarks/results

Each pair (numerator, denominator) is timed in interleaved rounds (num, den, num, den, ...) after a warm-up; the
ratio of the two medians is printed with the goal beside it. The machine load (/proc/loadavg) is printed and
saved: on a shared machine only ratios measured in one process mean anything. Rows marked "unfused" time the
same module with the fused FilterNorm switched off (ddf.modules._FUSE_SPATIAL_NORM = False), i.e. the normalised
spatial filter written to memory as before the fusion. Rows marked "floor" time timm's resnet50 with its
bottleneck 3x3 convolutions (the layers DDF replaces) made free against resnet50 itself: no replacement of those
layers can bring the ddf_mul_resnet50 ratio below that floor; the three nets are timed in the same rounds.
The "allocator" line says whether GLIBC_TUNABLES or LD_PRELOAD change how fresh tensors are paid for (README,
"CPU benchmark", "Measuring on this VM").
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddf  # noqa: E402
import ddf.modules  # noqa: E402


def time_group(fns, rounds: int, warmup: int = 2):
    """Medians (ms) of the callables ``fns``, timed in interleaved rounds (fns[0], fns[1], ..., fns[0], ...)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def time_pair(num, den, rounds: int, warmup: int = 2):
    """Medians (ms) of ``num`` and ``den``, interleaved."""
    tn, td = time_group((num, den), rounds, warmup)
    return tn, td


def _op_inputs(B, C, H, W, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g)
    ch = torch.randn(B, C, 3, 3, generator=g)
    sp = torch.randn(B, 9, H, W, generator=g)
    if channels_last:
        x, sp = (t.contiguous(memory_format=torch.channels_last) for t in (x, sp))
    return x, ch, sp


def op_rows(rounds):
    rows = []
    x, ch, sp = _op_inputs(8, 256, 56, 56, False)
    w = torch.randn(256, 1, 3, 3)
    fwd = lambda: ddf.ddf(x, ch, sp, 3)  # noqa: E731
    rows.append(("op forward / copy of its input (8x256x56x56)", fwd, lambda: x.clone(), 4.0))
    rows.append(("op forward / conv2d(groups=C) 3x3, NCHW", fwd,
                 lambda: F.conv2d(x, w, padding=1, groups=256), 1.0))
    xc, chc, spc = _op_inputs(8, 256, 56, 56, True)
    rows.append(("op forward / conv2d(groups=C) 3x3, channels_last", lambda: ddf.ddf(xc, chc, spc, 3),
                 lambda: F.conv2d(xc, w, padding=1, groups=256), 1.0))
    leaves = [t.clone().requires_grad_() for t in (x, ch, sp)]

    def fwd_bwd():
        for t in leaves:  # the op's forward+backward only: no accumulation into earlier .grad tensors
            t.grad = None
        ddf.ddf(*leaves, 3).backward(go)

    go = torch.randn(8, 256, 56, 56)
    rows.append(("op forward+backward / op forward", fwd_bwd, fwd, 2.5))
    rounds = 3 * rounds  # calls of 1-20 ms: more rounds for steadier medians at little cost
    return [(name, *time_pair(a, b, rounds), goal) for name, a, b, goal in rows]


def _train_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()
    return step


def module_rows(rounds, resolutions):
    rows = []
    for r in resolutions:
        torch.manual_seed(0)
        pack, conv = ddf.DDFPack(256, 3), nn.Conv2d(256, 256, 3, padding=1)
        x = torch.randn(8, 256, r, r)
        pack.eval()
        with torch.no_grad():
            rows.append((f"DDFPack / Conv3x3 forward, {r}x{r}", *time_pair(lambda: pack(x), lambda: conv(x), rounds),
                         1.0))
            ddf.modules._FUSE_SPATIAL_NORM = False
            rows.append((f"  (unfused DDFPack / Conv3x3 forward, {r}x{r})",
                         *time_pair(lambda: pack(x), lambda: conv(x), rounds), None))
            ddf.modules._FUSE_SPATIAL_NORM = True
        pack.train()
        rows.append((f"DDFPack / Conv3x3 forward+backward, {r}x{r}",
                     *time_pair(_train_step(pack, x), _train_step(conv, x), rounds), 0.8))
    return rows


class _NoConv(nn.Module):
    """Stand-in for a 3x3 convolution that costs nothing: the input subsampled by the stride (same output shape)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return x[:, :, ::self.stride, ::self.stride].contiguous(memory_format=fmt)


def _floor_resnet50():
    """timm resnet50 with every bottleneck's 3x3 convolution (the layer DDF replaces) made free: the best time any
    replacement of those layers could reach, everything else (1x1 convs, batch norm, stem, pooling) unchanged."""
    import timm

    net = timm.create_model("resnet50")
    for m in net.modules():
        if type(m).__name__ == "Bottleneck":
            m.conv2 = _NoConv(m.conv2.stride[0])
    return net


def _step(m, opt, x):
    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()
        opt.step()
    return run


def _resnet_pair_rows(nets, x, rounds, tag):
    """Inference and training-step rows of the DDF net / timm net pair in one memory format ``tag``, each followed
    by the floor row (resnet50 without its 3x3 convs / resnet50) that bounds what the ratio can reach. The three
    nets are timed in the same interleaved rounds, so both rows divide by the same resnet50 median."""
    rows = []
    for m in nets:
        m.eval()
    with torch.no_grad():
        t_ddf, t_ref, t_floor = time_group([lambda m=m: m(x) for m in nets], rounds)
    rows.append((f"ddf_mul_resnet50 / resnet50 inference, batch 8, 224x224, {tag}", t_ddf, t_ref, 0.75))
    rows.append((f"  (floor: resnet50 without 3x3 convs / resnet50 inference, {tag})", t_floor, t_ref, None))
    steps = [_step(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), x) for m in nets]
    for m in nets:
        m.train()
    t_ddf, t_ref, t_floor = time_group(steps, max(5, rounds // 2))  # ~2 s a round: fewer rounds, but 5 at least
    rows.append((f"ddf_mul_resnet50 / resnet50 training step (SGD), batch 8, {tag}", t_ddf, t_ref, 0.85))
    rows.append((f"  (floor: resnet50 without 3x3 convs / resnet50 training step, {tag})", t_floor, t_ref, None))
    return rows


def resnet_rows(rounds):
    """ResNet-50 rows, NCHW and channels_last (all nets and the input in the same memory format)."""
    import timm

    torch.manual_seed(0)
    nets = (timm.create_model("ddf_mul_resnet50"), timm.create_model("resnet50"), _floor_resnet50())
    x = torch.randn(8, 3, 224, 224)
    rows = _resnet_pair_rows(nets, x, rounds, "NCHW")
    for m in nets:
        m.to(memory_format=torch.channels_last)
    return rows + _resnet_pair_rows(nets, x.contiguous(memory_format=torch.channels_last), rounds, "channels_last")


def _allocator() -> str:
    """The environment that decides how freshly allocated tensors cost (README, "Measuring on this VM")."""
    said = [f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if os.environ.get(k)]
    return ", ".join(said) if said else "default (glibc malloc, no GLIBC_TUNABLES / LD_PRELOAD)"


def render(rows, header) -> str:
    lines = header + ["", "| figure | numerator ms | denominator ms | ratio | goal | met |", "|---|---:|---:|---:|---:|---|"]
    for name, tn, td, goal in rows:
        ratio = tn / td
        met = "" if goal is None else ("yes" if ratio <= goal else "NO")
        lines.append(f"| {name} | {tn:.2f} | {td:.2f} | {ratio:.2f} | {'' if goal is None else f'<= {goal}'} | {met} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="3 rounds, resolutions 7 and 28, no ResNet-50 rows")
    p.add_argument("--only", choices=("op", "module", "resnet"), default="",
                   help="only the rows of the op, of DDFPack vs Conv3x3, or of ResNet-50 (default: all)")
    p.add_argument("--save", default="", help="folder for speed_<date>.md")
    args = p.parse_args(argv)
    if args.save and not os.path.isdir(args.save):
        p.error(f"--save: {args.save!r} is not an existing folder")
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    ddf.ddf(*_op_inputs(1, 4, 5, 5, False), 3)  # load (or build) the C++ kernels before timing
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    header = [f"# DDF speed goals, {datetime.date.today()}",
              f"- {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{args.threads} threads, fp32, {rounds} interleaved rounds (medians)",
              f"- {ddf.backend_info()}", f"- allocator: {_allocator()}", f"- load average before: {' '.join(load)}"]
    if load[0] != "?" and float(load[0]) > 0.5 * (os.cpu_count() or 1):
        header.append(f"- WARNING: the machine is busy (load {load[0]} on {os.cpu_count()} cores): threads of one "
                      "op wait for descheduled peers, so the ratios are unreliable")
    rows = []
    if args.only in ("", "op"):
        rows += op_rows(rounds)
    if args.only in ("", "module"):
        rows += module_rows(rounds, (7, 28) if args.quick else (7, 14, 28, 56))
    if args.only == "resnet" or (not args.only and not args.quick):
        rows += resnet_rows(rounds)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    text = render(rows, header + [f"- load average after: {' '.join(load)}"])
    print(text)
    if args.save:
        path = os.path.join(args.save, f"speed_{datetime.date.today()}.md")
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
