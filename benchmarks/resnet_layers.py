#!/usr/bin/env python
"""Where the inference time of ddf_mul_resnet50, resnet50 and the floor net goes, by bottleneck part (batch 8, 224²).

    python benchmarks/resnet_layers.py                     # NCHW, 2 threads
    python benchmarks/resnet_layers.py --channels-last

Forward hooks time every part of every bottleneck (conv1, bn1, act1, conv2, ...; conv2 is the 3x3 convolution, the
DDF layer in ddf_mul_resnet50, free in the floor net of bench_speed.py); the three nets run in interleaved rounds
in one process and each figure is the sum over the 16 bottlenecks of the per-call medians. The hooks add a little
time to every part; use the totals of bench_speed.py for ratios, this table for where the difference lies.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddf  # noqa: E402,F401  (registers the DDF models with timm)
from bench_speed import _floor_resnet50  # noqa: E402

PARTS = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3")


def _hook_parts(net, times: dict) -> None:
    """Record every bottleneck part's forward durations in times[key] = [part name, duration, ...] (one key per
    block and part; one dict per net)."""
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            for part in PARTS:
                module = getattr(block, part)
                key = f"{id(block)}.{part}"

                def pre(mod, inputs, key=key, part=part):
                    times.setdefault(key, [part]).append(-time.perf_counter())

                def post(mod, inputs, output, key=key):
                    times[key][-1] += time.perf_counter()

                module.register_forward_pre_hook(pre)
                module.register_forward_hook(post)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error(f"--rounds: expected >= 3 (the first 2 are warm-up), got {args.rounds}")
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nets = {"ddf_mul_resnet50": timm.create_model("ddf_mul_resnet50"), "floor": _floor_resnet50(),
            "resnet50": timm.create_model("resnet50")}
    x = torch.randn(8, 3, 224, 224)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    per_net, totals = {}, {name: [] for name in nets}
    for name, net in nets.items():
        net.eval().to(memory_format=fmt)
        per_net[name] = {}
        _hook_parts(net, per_net[name])
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, net in nets.items():
                t0 = time.perf_counter()
                net(x)
                totals[name].append(time.perf_counter() - t0)
    print(f"# per-part inference time (ms), batch 8, 224x224, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{args.threads} threads, medians of {args.rounds - 2} rounds after 2 warm-up rounds")
    print("| net | total | " + " | ".join(PARTS) + " |")
    print("|---|---:|" + "---:|" * len(PARTS))
    for name in nets:
        sums = dict.fromkeys(PARTS, 0.0)
        for values in per_net[name].values():
            sums[values[0]] += statistics.median(values[3:]) * 1e3  # values[0]: the part name; 2 warm-up rounds
        total = statistics.median(totals[name][2:]) * 1e3
        print(f"| {name} | {total:.1f} | " + " | ".join(f"{sums[p]:.1f}" for p in PARTS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
