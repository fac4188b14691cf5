"""Phase ``speed``: op bandwidth against a copy of the same bytes, Table A / Table 2, DDF-R50 vs ResNet-50 training.

Every ratio is measured side by side in this one process (CUDA events, warm-up, medians). The op's bytes are the
fewest it must move (``test_time.min_bytes``: each input read once, each output written once); the copy moves
the same number of bytes (half read, half written). ``--dry-run`` runs the same code on CPU at tiny sizes with
the C++ kernels: its figures say only that the code runs, nothing about a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from .common import Context, median_ms, result, table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _op_fns(B, C, H, W, k, dtype, cl, device):
    import ddf

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    sp = torch.randn(B, k * k, H, W, device=device, dtype=dtype, generator=g)
    if cl:
        x, sp = (t.contiguous(memory_format=torch.channels_last) for t in (x, sp))
    ch = torch.randn(B, C, k, k, device=device, dtype=dtype, generator=g)
    go = torch.randn_like(x)
    args = (k, 1, 1, 1, 0, False, 1.0)

    def fwd():
        with ddf.use_backend("auto"):
            return torch.ops.ddf.ddf_forward(x, ch, sp, *args)

    def fwd_bwd():
        with ddf.use_backend("auto"):
            out = torch.ops.ddf.ddf_forward(x, ch, sp, *args)
            return torch.ops.ddf.ddf_backward(go, x, ch, sp, *args), out

    return fwd, fwd_bwd


def op_bandwidth(ctx: Context):
    """GB/s of the op (fwd, fwd+bwd) and its time over a copy of the same bytes, 3 dtypes x 2 layouts, k=3."""
    from test_time import min_bytes

    B, C, H, W, k = (2, 16, 28, 28, 3) if ctx.dry_run else (32, 256, 56, 56, 3)
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cl in (False, True):
            fwd, fwd_bwd = _op_fns(B, C, H, W, k, dtype, cl, ctx.device)
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                nbytes = min_bytes("ddf_op", (B, C, H, W), k, dtype.itemsize, mode)
                src = torch.empty(nbytes // 2, dtype=torch.uint8, device=ctx.device).random_(0, 255)
                dst = torch.empty_like(src)
                t_copy = median_ms(lambda: dst.copy_(src), ctx.device, repeats=20)
                t_op = median_ms(fn, ctx.device, repeats=20)
                rows.append([str(dtype).replace("torch.", ""), "NHWC" if cl else "NCHW", mode,
                             f"{nbytes / 2**20:.2f}", f"{t_op:.3f}", f"{nbytes / t_op / 1e6:.0f}",
                             f"{nbytes / t_copy / 1e6:.0f}", f"{t_op / t_copy:.2f}"])
    return table(f"DDF op bandwidth, {B}x{C}x{H}x{W}, k=3, head 1, mul (goal: op / copy <= 1.25, i.e. >= 80 % "
                 "of copy bandwidth)", ["dtype", "layout", "mode", "MiB moved", "op ms", "op GB/s", "copy GB/s",
                                       "op / copy"], rows)


def _train_step_fn(model, x, y, opt, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def resnet_training(ctx: Context):
    """Training img/s of ddf_mul_resnet50 vs ResNet-50: AMP bfloat16, channels_last, SGD, side by side."""
    import timm
    import models  # noqa: F401

    B, R = (2, 64) if ctx.dry_run else (128, 224)
    torch.backends.cudnn.benchmark = True
    rows, times = [], {}
    for name in ("resnet50", "ddf_mul_resnet50"):
        model = timm.create_model(name).to(ctx.device).to(memory_format=torch.channels_last)
        x = torch.randn(B, 3, R, R, device=ctx.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (B,), device=ctx.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = _train_step_fn(model, x, y, opt, ctx.device)
        times[name] = median_ms(step, ctx.device, warmup=2 if ctx.dry_run else 5, repeats=3 if ctx.dry_run else 15)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if ctx.device.type == "cuda" else "n/a"
        rows.append([name, f"{times[name]:.1f}", f"{B / times[name] * 1e3:.0f}", peak])
        del model, opt
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    ratio = times["ddf_mul_resnet50"] / times["resnet50"]
    return table(f"Training step, batch {B} at {R}x{R}, AMP bfloat16, channels_last, SGD",
                 ["model", "ms / step", "img/s", "peak GiB"], rows,
                 note=f"DDF-R50 / ResNet-50 step time: {ratio:.2f}")


def paper_tables(ctx: Context):
    """Table A and Table 2 through test_time.py (its own process), at the paper's sizes on the GPU."""
    md = ctx.path("speed", "test_time.md")
    cmd = [sys.executable, os.path.join(ROOT, "test_time.py"), "--tables", "A,2", "--mode", "both",
           "--markdown", md, "--json", ctx.path("speed", "test_time.json"), "--quiet"]
    if ctx.dry_run:
        cmd += ["--device", "cpu", "--resolutions", "7,14", "--batch", "2", "--channels", "16", "--table2-shape",
                "1,16,20,30", "--min-time", "0.02", "--min-repeats", "2", "--warmup", "1", "--rounds", "1", "--threads", "1"]
    else:
        cmd += ["--device", "cuda", "--min-time", "0.1", "--min-repeats", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(ctx.left() - 40, 10), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"test_time.py exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    with open(md) as f:
        return table("Table A and Table 2 (test_time.py)", [], [], note=f.read())


def run(ctx: Context):
    if ctx.dry_run:
        torch.set_num_threads(1)  # a shared CPU: one thread avoids the ms-scale stalls of descheduled threads
    tables, errors = [], []
    for step in (op_bandwidth, resnet_training, paper_tables):
        t0 = time.time()
        try:
            tables.append(step(ctx))
            print(f"{step.__name__}: {time.time() - t0:.1f} s", flush=True)
            ctx.save_partial(result("fail", f"unfinished (last step done: {step.__name__})", tables), "speed")
        except Exception as exc:  # one step's failure leaves the others' figures
            errors.append(f"{step.__name__}: {type(exc).__name__}: {str(exc)[:200]}")
    what = "CPU dry run, C++ kernels: no GPU figure" if ctx.dry_run else "measured on this GPU"
    if errors:
        return result("fail", "; ".join(errors), tables)
    return result("pass", f"{len(tables)} tables ({what})", tables)
