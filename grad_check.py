#!/usr/bin/env python
"""Check the compiled DDF op against the PyTorch reference, and its gradients with torch.autograd.gradcheck.

For every configuration of the sweep (kernel size 1/3/5/7 x dilation 1-3 x stride 1-3 x head 1/2/4 x mul/add;
batch 1-3, channels up to 70, odd and even sizes, contiguous and channels_last inputs) it

1. compares the forward output and the three gradients (input, channel filter, spatial filter) of
   ``torch.ops.ddf.ddf_forward`` / ``ddf_backward`` with ``ddf.reference`` in float64 (max abs error <= --tol),
2. runs ``torch.autograd.gradcheck`` in float64 on a tiny instance of the same configuration,

on CPU and, when present (and the extension has CUDA kernels), on CUDA. It prints one table row per configuration
and exits with status 0 only if everything passed.

    python grad_check.py                 # full sweep, CPU (+ CUDA when available)
    python grad_check.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

import ddf
from ddf import ops
from ddf.reference import ddf_reference, ddf_reference_backward

COMB = {"mul": 0, "add": 1}


def sweep(quick: bool):
    ks = (1, 3, 5, 7)
    dils = (1, 2, 3)
    strides = (1, 2, 3)
    heads = (1, 2, 4)
    combines = ("mul", "add")
    channels = (4, 8, 12, 70, 16, 36)
    sizes = ((7, 9), (8, 8), (11, 6), (9, 13), (12, 10))
    rows = []
    for i, (k, d, s, h, comb) in enumerate(itertools.product(ks, dils, strides, heads, combines)):
        if quick and i % 5:
            continue
        C = channels[i % len(channels)]
        C = max(h, C // h * h)
        H, W = sizes[i % len(sizes)]
        rows.append(dict(k=k, d=d, s=s, head=h, combine=comb, B=1 + i % 3, C=C, H=H, W=W, cl=bool((i // 2) % 2)))
    return rows


def make(cfg, device, dtype, B=None, C=None, H=None, W=None, seed=0):
    B = B or cfg["B"]
    C = C or cfg["C"]
    H = H or cfg["H"]
    W = W or cfg["W"]
    k, s, h = cfg["k"], cfg["s"], cfg["head"]
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    ch = torch.randn(B, C, k, k, generator=g, dtype=torch.float64)
    sp = torch.randn(B, h * k * k, Ho, Wo, generator=g, dtype=torch.float64)
    x, ch, sp = (t.to(device=device, dtype=dtype) for t in (x, ch, sp))
    if cfg["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
        sp = sp.contiguous(memory_format=torch.channels_last)
    return x, ch, sp


def check_one(cfg, device, tol):
    k, d, s, h, comb = cfg["k"], cfg["d"], cfg["s"], cfg["head"], cfg["combine"]
    x, ch, sp = make(cfg, device, torch.float64, seed=k * 100 + d * 10 + s)
    args = (k, d, s, h)
    out = torch.ops.ddf.ddf_forward(x, ch, sp, *args, COMB[comb])
    ref = ddf_reference(x, ch, sp, *args, comb)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, *args, COMB[comb])
    refs = ddf_reference_backward(go, x, ch, sp, *args, comb)
    errs = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, refs)]
    layout_ok = out.is_contiguous(memory_format=torch.channels_last) if cfg["cl"] and x.shape[1] > 1 else True

    # gradcheck on a tiny instance of the same configuration
    C = 2 * h
    tx, tch, tsp = make(cfg, device, torch.float64, B=min(cfg["B"], 2), C=C, H=4 + cfg["H"] % 2, W=5 - cfg["W"] % 2,
                        seed=7)
    leaves = tuple(t.detach().clone().requires_grad_() for t in (tx, tch, tsp))
    try:
        gc = torch.autograd.gradcheck(
            lambda a, b, c: torch.ops.ddf.ddf_forward(a, b, c, *args, COMB[comb]), leaves, eps=1e-6, atol=1e-5,
            rtol=1e-4, fast_mode=False,
        )
    except RuntimeError as exc:  # gradcheck raises on mismatch
        print(f"gradcheck failure for {cfg}: {str(exc).splitlines()[0]}", file=sys.stderr)
        gc = False
    ok = gc and layout_ok and all(e <= tol for e in errs)
    return errs, gc, layout_ok, ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    p.add_argument("--quick", action="store_true", help="every 5th configuration only")
    p.add_argument("--tol", type=float, default=1e-10, help="max abs error vs the float64 reference")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}; backend: {ddf.backend_info()}")
    if not ops.compiled_available():
        print("FAIL: the compiled DDF extension is not available; nothing to check "
              f"({ops.unavailable_reason()})")
        return 1
    devices = []
    if args.device in ("all", "cpu"):
        devices.append("cpu")
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available() and ops.cuda_kernels_available():
            devices.append("cuda")
        elif args.device == "cuda":
            print("FAIL: --device cuda but no CUDA device or no CUDA kernels in the extension")
            return 1
        else:
            print("(CUDA: not checked - no CUDA device or no CUDA kernels in the extension)")

    header = (f"{'dev':4} {'k':>2} {'d':>2} {'s':>2} {'hd':>2} {'comb':4} {'B':>2} {'C':>3} {'HxW':>6} {'layout':6} "
              f"{'fwd':>8} {'d_in':>8} {'d_ch':>8} {'d_sp':>8} {'gradchk':7} result")
    print(header)
    print("-" * len(header))
    n_fail = n = 0
    t0 = time.time()
    for device in devices:
        for cfg in sweep(args.quick):
            errs, gc, layout_ok, ok = check_one(cfg, device, args.tol)
            n += 1
            n_fail += not ok
            print(f"{device:4} {cfg['k']:>2} {cfg['d']:>2} {cfg['s']:>2} {cfg['head']:>2} {cfg['combine']:4} "
                  f"{cfg['B']:>2} {cfg['C']:>3} {cfg['H']:>2}x{cfg['W']:<3} {'NHWC' if cfg['cl'] else 'NCHW':6} "
                  + " ".join(f"{e:8.1e}" for e in errs)
                  + f" {'ok' if gc else 'FAIL':7} {'PASS' if ok else 'FAIL' + ('' if layout_ok else ' (layout)')}")
    print("-" * len(header))
    print(f"{n - n_fail}/{n} configurations passed on {', '.join(devices)} in {time.time() - t0:.1f} s")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
