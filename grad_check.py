#!/usr/bin/env python
"""Check the DDF op's kernels against the PyTorch reference, and its gradients with torch.autograd.gradcheck; or
compile the Triton kernels ahead of time for NVIDIA GPUs with no GPU present.

For every configuration of the sweep (kernel size 1/3/5/7 x dilation 1-3 x stride 1-3 x head 1/2/4 x mul/add;
batch 1-3, channels up to 70, odd and even sizes, contiguous and channels_last inputs, every third configuration
with the fused FilterNorm) it

1. compares the forward output and the three gradients (input, channel filter, spatial filter) of
   ``torch.ops.ddf.ddf_forward`` / ``ddf_backward`` with ``ddf.reference`` in float64 (max abs error <= --tol),
2. runs ``torch.autograd.gradcheck`` in float64 on a tiny instance of the same configuration,

with the chosen backend on the chosen devices. ``--backend triton`` on a machine without a GPU runs the Triton
kernels in Triton's interpreter (CPU tensors) and says so. It prints one row per configuration and exits with
status 0 only if everything passed.

    python grad_check.py                          # C++ kernels on CPU (+ Triton on CUDA when a GPU is present)
    python grad_check.py --backend triton         # the GPU kernels, in Triton's interpreter on this CPU
    python grad_check.py --device cuda            # the Triton kernels compiled, on a GPU
    python grad_check.py --compile-only --arch sm_75,sm_80,sm_90 [--all]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

COMB = {"mul": 0, "add": 1}


def sweep(quick: bool):
    ks, dils, strides, heads, combines = (1, 3, 5, 7), (1, 2, 3), (1, 2, 3), (1, 2, 4), ("mul", "add")
    channels = (4, 8, 12, 70, 16, 36)
    sizes = ((7, 9), (8, 8), (11, 6), (9, 13), (12, 10))
    rows = []
    for i, (k, d, s, h, comb) in enumerate(itertools.product(ks, dils, strides, heads, combines)):
        if quick and i % 5:
            continue
        C = channels[i % len(channels)]
        C = max(h, C // h * h)
        H, W = sizes[i % len(sizes)]
        rows.append(dict(k=k, d=d, s=s, head=h, combine=comb, B=1 + i % 3, C=C, H=H, W=W, cl=bool((i // 2) % 2),
                         norm=k >= 3 and i % 3 == 0))
    return rows


def make(cfg, device, dtype, B=None, C=None, H=None, W=None, seed=0):
    import torch

    B, C, H, W = B or cfg["B"], C or cfg["C"], H or cfg["H"], W or cfg["W"]
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


def _gradcheck(cfg, device, op_args, fast: bool) -> bool:
    import torch

    h = cfg["head"]
    tx, tch, tsp = make(cfg, device, torch.float64, B=min(cfg["B"], 2), C=2 * h, H=4 + cfg["H"] % 2,
                        W=5 - cfg["W"] % 2, seed=7)
    leaves = tuple(t.detach().clone().requires_grad_() for t in (tx, tch, tsp))
    try:
        return torch.autograd.gradcheck(lambda a, b, c: torch.ops.ddf.ddf_forward(a, b, c, *op_args), leaves,
                                        eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)
    except RuntimeError as exc:  # gradcheck raises on mismatch
        print(f"gradcheck failure for {cfg}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return False


def check_one(cfg, device, tol, fast_gradcheck=False):
    import torch
    from ddf.reference import ddf_reference, ddf_reference_backward

    k, d, s, h, comb = cfg["k"], cfg["d"], cfg["s"], cfg["head"], cfg["combine"]
    x, ch, sp = make(cfg, device, torch.float64, seed=k * 100 + d * 10 + s)
    op_args = (k, d, s, h, COMB[comb], cfg["norm"], 0.7)
    out = torch.ops.ddf.ddf_forward(x, ch, sp, *op_args)
    ref = ddf_reference(x, ch, sp, *op_args)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, *op_args)
    refs = ddf_reference_backward(go, x, ch, sp, *op_args)
    errs = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, refs)]
    layout_ok = out.is_contiguous(memory_format=torch.channels_last) if cfg["cl"] and x.shape[1] > 1 else True
    gc = _gradcheck(cfg, device, op_args, fast_gradcheck)
    ok = gc and layout_ok and all(e <= tol for e in errs)
    return errs, gc, layout_ok, ok


def _run_sweep(args, devices) -> int:
    import ddf

    header = (f"{'dev':4} {'k':>2} {'d':>2} {'s':>2} {'hd':>2} {'comb':4} {'nrm':3} {'B':>2} {'C':>3} {'HxW':>6} "
              f"{'layout':6} {'fwd':>8} {'d_in':>8} {'d_ch':>8} {'d_sp':>8} {'gradchk':7} result")
    print(header)
    print("-" * len(header))
    n_fail = n = 0
    t0 = time.time()
    with ddf.use_backend(args.backend):
        for device in devices:
            for cfg in sweep(args.quick):
                errs, gc, layout_ok, ok = check_one(cfg, device, args.tol, fast_gradcheck=args.interpreting)
                n += 1
                n_fail += not ok
                print(f"{device:4} {cfg['k']:>2} {cfg['d']:>2} {cfg['s']:>2} {cfg['head']:>2} {cfg['combine']:4} "
                      f"{'yes' if cfg['norm'] else 'no':3} {cfg['B']:>2} {cfg['C']:>3} {cfg['H']:>2}x{cfg['W']:<3} "
                      f"{'NHWC' if cfg['cl'] else 'NCHW':6} " + " ".join(f"{e:8.1e}" for e in errs)
                      + f" {'ok' if gc else 'FAIL':7} {'PASS' if ok else 'FAIL' + ('' if layout_ok else ' (layout)')}",
                      flush=True)
    print("-" * len(header))
    where = " in Triton's interpreter (CPU tensors)" if args.interpreting else ""
    print(f"{n - n_fail}/{n} configurations passed with backend {args.backend!r} on {', '.join(devices)}{where} "
          f"in {time.time() - t0:.1f} s")
    return 0 if n_fail == 0 else 1


def _compile_only(args) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile real GPU code: the kernels must not be interpreted
    from ddf.backends.triton import compile_check

    try:
        archs = compile_check.parse_archs(args.arch)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = compile_check.run(archs, all_variants=args.all)
    print(compile_check.format_table(rows))
    errors = sum(bool(r["error"]) for r in rows)
    spills = sum(r["spills"] > 0 for r in rows)
    over = sum(r["registers"] > compile_check.MAX_REGISTERS for r in rows)
    warps = [r["warps_per_sm"] for r in rows if r.get("warps_per_sm") is not None]
    print(f"compiled {len(rows) - errors}/{len(rows)} kernel variants for {args.arch} in {time.time() - t0:.1f} s "
          f"(no GPU needed, triton {compile_check.triton.__version__}); {errors} compile errors, {spills} with register spills, "
          f"{over} over {compile_check.MAX_REGISTERS} registers; max registers "
          f"{max((r['registers'] for r in rows), default=0)}, min resident warps/SM {min(warps, default='?')} (model)")
    return 0 if not any(compile_check.failures(r) for r in rows) else 1


def _devices(args, torch):
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL: --device cuda but torch sees no CUDA device")
        return None
    if args.device == "cuda":
        return ["cuda"]
    if args.device == "cpu" or args.interpreting:
        return ["cpu"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("auto", "cpp", "triton", "reference"), default="auto",
                   help="kernels to check (default auto: C++ on CPU, Triton on CUDA)")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    p.add_argument("--quick", action="store_true", help="every 5th configuration only")
    p.add_argument("--tol", type=float, default=1e-10, help="max abs error vs the float64 reference")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the Triton kernel variants for --arch with no GPU and print registers, spills and "
                        "resident warps per SM; fails on spills or > 128 registers")
    p.add_argument("--arch", default="sm_75,sm_80,sm_90", help="architectures for --compile-only")
    p.add_argument("--all", action="store_true", help="with --compile-only: every variant (k 1, 3, 5, 7 too)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compile_only:
        return _compile_only(args)
    import torch

    # Triton on a machine without a GPU: its interpreter, switched on before ddf (and triton.jit) are imported
    args.interpreting = args.backend == "triton" and args.device != "cuda" and not torch.cuda.is_available()
    if args.interpreting:
        os.environ["TRITON_INTERPRET"] = "1"
    import ddf

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; {ddf.backend_info()}")
    if args.interpreting:
        print("Running the Triton kernels in Triton's interpreter on CPU tensors (no GPU here); gradcheck in "
              "fast mode")
    devices = _devices(args, torch)
    if devices is None:
        return 1
    return _run_sweep(args, devices)


if __name__ == "__main__":
    sys.exit(main())
