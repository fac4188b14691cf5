"""Phase ``correctness``: the Triton kernels on CUDA against the float64 reference, then modules and models.

* op sweep: forward and the three gradients of ``torch.ops.ddf`` (Triton backend) for every kernel family's
  variant axes: 4 dtypes x NCHW/channels_last x mul/add x k 1/3/5/7, plus stride, dilation, head > 1 and the
  fused FilterNorm; ``||out - ref|| / ||ref||`` against ``ddf.reference`` on float64 copies of the same inputs;
* one input with more than 2**31 elements (float16, about 20 GB in all): int32 index overflow;
* DDFPack and ``ddf_mul_resnet50`` logits, CPU (C++ kernels) vs GPU (Triton); ``torch.compile`` of a DDF model.

``--dry-run``: the same checks at tiny sizes with the Triton kernels in Triton's interpreter on CPU tensors; the
>2**31 case is skipped (CPU memory), the models are the tiny DDF-ResNet, and ``torch.compile`` uses aot_eager.
"""
from __future__ import annotations

import itertools
import os
import time

import torch

from .common import Context, rel_err, result, table

COMB = {"mul": 0, "add": 1}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ||err|| / ||ref|| allowed per dtype (the suite's tests/test_fused.py tolerances)
TOL = {"fp64": 1e-10, "fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}


def cases(dry_run: bool):
    """(name, cfg) of the sweep: every variant axis once, then stride/dilation/head/norm variants."""
    B, C, H, W = (1, 4, 7, 6) if dry_run else (2, 48, 21, 20)
    out = []
    for dt, cl, comb, k in itertools.product(DTYPES, (False, True), COMB, (1, 3, 5, 7)):
        out.append(dict(dtype=dt, cl=cl, comb=comb, k=k, d=1, s=1, head=1, norm=False, B=B, C=C, H=H, W=W))
    for dt, (k, d, s, head, norm) in itertools.product(("fp32", "fp16"), ((3, 2, 1, 1, False), (3, 1, 2, 1, False),
                                                                          (5, 2, 2, 2, False), (3, 1, 1, 4, False),
                                                                          (3, 1, 1, 2, True), (7, 1, 1, 1, True))):
        for cl in (False, True):
            out.append(dict(dtype=dt, cl=cl, comb="mul" if s == 1 else "add", k=k, d=d, s=s, head=head, norm=norm,
                            B=B, C=C, H=H, W=W))
    for (k, head), cl in itertools.product(((3, 2), (7, 1)), (False, True)):  # fp64 FilterNorm: the gain's precision
        out.append(dict(dtype="fp64", cl=cl, comb="mul", k=k, d=1, s=1, head=head, norm=True, B=B, C=C, H=H, W=W))
    return out


def make_inputs(cfg, device, seed):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W, k, s, h = (cfg[n] for n in ("B", "C", "H", "W", "k", "s", "head"))
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    x = torch.randn(B, C, H, W, generator=g)
    ch = torch.randn(B, C, k, k, generator=g)
    sp = torch.randn(B, h * k * k, Ho, Wo, generator=g)
    go = torch.randn(B, C, Ho, Wo, generator=g)
    ts = [t.to(device=device, dtype=DTYPES[cfg["dtype"]]) for t in (x, ch, sp, go)]
    if cfg["cl"]:
        ts = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and i != 1 else t
              for i, t in enumerate(ts)]
    return ts


def check_case(cfg, device, seed):
    """Relative errors of (out, d_input, d_channel, d_spatial) vs the float64 reference; layout kept."""
    import ddf
    from ddf.reference import ddf_reference, ddf_reference_backward

    x, ch, sp, go = make_inputs(cfg, device, seed)
    args = (cfg["k"], cfg["d"], cfg["s"], cfg["head"], COMB[cfg["comb"]], cfg["norm"], 0.7)
    with ddf.use_backend("triton"):
        out = torch.ops.ddf.ddf_forward(x, ch, sp, *args)
        grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, *args)
    up = [t.double() for t in (x, ch, sp, go)]
    ref = ddf_reference(up[0], up[1], up[2], *args)
    refs = ddf_reference_backward(up[3], up[0], up[1], up[2], *args)
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, refs)]
    layout_ok = out.is_contiguous(memory_format=torch.channels_last) if cfg["cl"] else out.is_contiguous()
    dtype_ok = out.dtype == x.dtype and all(g.dtype == t.dtype for g, t in zip(grads, (x, ch, sp)))
    return errs, layout_ok and dtype_ok


def _worker_check(job):
    """One sweep case in a worker process: (index, errs, ok, verdict); a launch error is a failed case."""
    i, cfg, device = job
    try:
        errs, layout_ok = check_case(cfg, torch.device(device), seed=1000 + i)
        ok = layout_ok and all(e <= TOL[cfg["dtype"]] for e in errs)
        return i, errs, ok, "pass" if ok else ("FAIL" + ("" if layout_ok else " (layout/dtype)"))
    except Exception as exc:
        return i, [float("nan")] * 4, False, f"FAIL ({type(exc).__name__}: {str(exc)[:120]})"


def sweep_workers(dry_run: bool) -> int:
    """Worker processes of the sweep: Triton compiles each variant on the host CPU, so on a 16-core GPU machine
    up to 12 processes compile (and run) cases side by side; 2 in the dry run (a 2-core CI machine)."""
    return 2 if dry_run else max(1, min(12, (os.cpu_count() or 2) - 2))


def _case_name(cfg) -> str:
    return (f"{cfg['dtype']} {'NHWC' if cfg['cl'] else 'NCHW'} {cfg['comb']} k{cfg['k']} d{cfg['d']} s{cfg['s']} "
            f"h{cfg['head']}{' norm' if cfg['norm'] else ''}")


def op_sweep(ctx: Context):
    """Every case of ``cases()`` in spawned worker processes (CUDA needs spawn); cases not finished 30 s before the
    time box are failures named as not run."""
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = cases(ctx.dry_run)
    done = {}
    pool = cf.ProcessPoolExecutor(sweep_workers(ctx.dry_run), mp_context=mp.get_context("spawn"))
    futures = [pool.submit(_worker_check, (i, cfg, str(ctx.device))) for i, cfg in enumerate(todo)]
    try:
        for fut in cf.as_completed(futures, timeout=max(ctx.left() - 30, 1)):
            i, errs, ok, verdict = fut.result()
            done[i] = (errs, ok, verdict)
    except cf.TimeoutError:  # stop the workers still compiling or running: the phase reports and exits now
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    rows, failed = [], 0
    for i, cfg in enumerate(todo):
        errs, ok, verdict = done.get(i, ([float("nan")] * 4, False, "FAIL (not run: time box)"))
        failed += not ok
        rows.append([_case_name(cfg)] + [f"{e:.1e}" for e in errs] + [f"{TOL[cfg['dtype']]:.0e}", verdict])
    shape = "B,C,H,W = " + ",".join(str(todo[0][n]) for n in ("B", "C", "H", "W"))
    t = table(f"Triton op vs float64 reference ({shape}; ||err||/||ref||)",
              ["case", "out", "d_input", "d_channel", "d_spatial", "tol", "result"], rows)
    return failed, len(todo), t


def _band_reference(x, ch, sp, go, a, b, args):
    """float64 reference of out, d_input, d_channel, d_spatial restricted to output rows [a, b) (stride 1, k=3):
    x/sp/go read on rows [a-1, b+1) with go zeroed outside [a, b), so every tap the band uses is present."""
    from ddf.reference import ddf_reference, ddf_reference_backward

    H = x.shape[2]
    lo, hi = max(a - 1, 0), min(b + 1, H)
    xs, sps = x[:, :, lo:hi].double(), sp[:, :, lo:hi].double()
    gos = go[:, :, lo:hi].double()
    gos[:, :, : a - lo] = 0
    gos[:, :, b - lo:] = 0
    out = ddf_reference(xs, ch.double(), sps, *args)[:, :, a - lo: b - lo]
    gin, gch, gsp = ddf_reference_backward(gos, xs, ch.double(), sps, *args)
    return out, gin, gch, gsp[:, :, a - lo: b - lo], (lo, hi)


def large_case(device, shape=(1, 32, 8192, 8200), band: int = 256):
    """float16 NCHW input of 1 x 32 x 8192 x 8200 (> 2**31 elements, about 20 GB with outputs and gradients):
    every output and gradient element (d_input: all but the 2 rows at each band seam) against float64,
    computed in bands of output rows."""
    import ddf

    (B, C, H, W), k = shape, 3
    g = torch.Generator(device=device).manual_seed(5)
    x, go = (torch.randn(B, C, H, W, device=device, dtype=torch.float16, generator=g) for _ in range(2))
    ch = torch.randn(B, C, k, k, device=device, dtype=torch.float16, generator=g)
    sp = torch.randn(B, k * k, H, W, device=device, dtype=torch.float16, generator=g)
    args = (k, 1, 1, 1, 0, False, 1.0)
    with ddf.use_backend("triton"):
        out = torch.ops.ddf.ddf_forward(x, ch, sp, *args)
        gin, gch, gsp = torch.ops.ddf.ddf_backward(go, x, ch, sp, *args)
    num = dict.fromkeys(("out", "d_input", "d_spatial"), 0.0)
    den = dict(num)
    gch_ref = torch.zeros(gch.shape, dtype=torch.float64, device=device)
    for a in range(0, H, band):
        b = min(a + band, H)
        r_out, r_gin, r_gch, r_gsp, (lo, hi) = _band_reference(x, ch, sp, go, a, b, args)
        gch_ref += r_gch
        # the band's d_input is complete on the input rows whose 3 output rows all lie in [a, b): every row but
        # the two at each seam between bands (those are covered by out and d_spatial of both bands)
        i0, i1 = (a + 1 if a else 0), (b - 1 if b < H else H)
        pairs = (("out", out[:, :, a:b], r_out), ("d_spatial", gsp[:, :, a:b], r_gsp),
                 ("d_input", gin[:, :, i0:i1], r_gin[:, :, i0 - lo: i1 - lo]))
        for name, got, ref in pairs:
            num[name] += (got.double() - ref).pow(2).sum().item()
            den[name] += ref.pow(2).sum().item()
    errs = {n: (num[n] / den[n]) ** 0.5 for n in num}
    errs["d_channel"] = rel_err(gch, gch_ref)
    return errs, B * C * H * W


def _random_norms(model):
    """timm zero-initialises each block's last BatchNorm, which would hide the DDF layers from the logits: draw
    every BatchNorm's weight and running statistics at random instead."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _model_pair(ctx: Context, name: str, size: int):
    """Logits of one model, eval mode, C++ kernels on CPU vs the Triton kernels (GPU, or the interpreter)."""
    import timm
    import ddf
    import models  # noqa: F401  (registers the DDF-ResNets)

    torch.manual_seed(0)
    model = _random_norms(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), ddf.use_backend("cpp"):
        ref = model(x)
    with torch.no_grad(), ddf.use_backend("triton"):
        got = model.to(ctx.device)(x.to(ctx.device))
    return rel_err(got.cpu(), ref)


def module_checks(ctx: Context):
    """DDFPack forward + input gradient and a DDF-ResNet's logits: CPU (C++) vs Triton; float32, TF32 off."""
    import ddf

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    torch.manual_seed(1)
    C, R = (8, 9) if ctx.dry_run else (64, 28)
    for head, comb in ((1, "mul"), (2, "add")):
        m = ddf.DDFPack(C, kernel_size=3, head=head, kernel_combine=comb)
        x = torch.randn(2, C, R, R, requires_grad=True)
        with ddf.use_backend("cpp"):
            ref = m(x)
            (ref_g,) = torch.autograd.grad(ref.square().sum(), x)
        xd = x.detach().to(ctx.device).requires_grad_()
        with ddf.use_backend("triton"):
            got = m.to(ctx.device)(xd)
            (got_g,) = torch.autograd.grad(got.square().sum(), xd)
        m.cpu()
        err = max(rel_err(got.cpu(), ref), rel_err(got_g.cpu(), ref_g))
        rows.append([f"DDFPack C={C} {R}x{R} head {head} {comb} (fwd, d_input)", f"{err:.1e}", "1e-4",
                     "pass" if err <= 1e-4 else "FAIL"])
    name, size = ("ddf_mul_resnet_tiny", 32) if ctx.dry_run else ("ddf_mul_resnet50", 224)
    err = _model_pair(ctx, name, size)
    rows.append([f"{name} logits, 2x3x{size}x{size}", f"{err:.1e}", "1e-3", "pass" if err <= 1e-3 else "FAIL"])
    return rows


def compile_check(ctx: Context):
    """torch.compile of a DDF model (inductor on the GPU; aot_eager in the dry run): forward and input gradient
    equal eager's."""
    import timm
    import models  # noqa: F401

    backend = "aot_eager" if ctx.dry_run else "inductor"
    torch.manual_seed(2)
    model = _random_norms(timm.create_model("ddf_mul_resnet_tiny", num_classes=10)).to(ctx.device)
    x = torch.randn(4, 3, 32, 32, device=ctx.device, requires_grad=True)
    ref = model(x)
    (ref_g,) = torch.autograd.grad(ref.sum(), x)
    t0 = time.time()
    compiled = torch.compile(model, backend=backend)
    got = compiled(x)
    (got_g,) = torch.autograd.grad(got.sum(), x)
    err = max(rel_err(got, ref), rel_err(got_g, ref_g))
    tol = 1e-4 if ctx.dry_run else 1e-3
    return [f"torch.compile(ddf_mul_resnet_tiny, backend={backend}) fwd + d_input vs eager "
            f"({time.time() - t0:.0f} s to compile)", f"{err:.1e}", f"{tol:.0e}", "pass" if err <= tol else "FAIL"]


def graph_check(ctx: Context):
    """The op captured in a CUDA graph after two warm-up calls (the autotuner benchmarks on a first call, which a
    capture cannot hold), replayed on new inputs: equal to eager. Needs CUDA: skipped in the dry run."""
    if ctx.dry_run:
        return ["CUDA graph capture of the op (fwd + bwd)", "", "", "skipped: CUDA graphs need a GPU"]
    import ddf

    cfg = dict(dtype="fp16", cl=True, comb="mul", k=3, d=1, s=1, head=1, norm=True, B=8, C=64, H=28, W=28)
    x, ch, sp, go = make_inputs(cfg, ctx.device, seed=7)
    args = (3, 1, 1, 1, 0, True, 0.7)
    with ddf.use_backend("triton"):
        step = lambda: (torch.ops.ddf.ddf_forward(x, ch, sp, *args),) + tuple(  # noqa: E731
            torch.ops.ddf.ddf_backward(go, x, ch, sp, *args))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        for t, new in zip((x, ch, sp, go), make_inputs(cfg, ctx.device, seed=8)):
            t.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        ref = step()
    err = max(rel_err(a, b) for a, b in zip(outs, ref))
    return ["CUDA graph capture of the op (fwd + bwd, fp16 NHWC FilterNorm), replayed on new inputs vs eager",
            f"{err:.1e}", "0e+00", "pass" if err == 0 else "FAIL"]


def _large_row(ctx: Context):
    if ctx.dry_run:  # the banded float64 check itself, at a size the interpreter runs in seconds
        errs, n = large_case(ctx.device, shape=(1, 4, 40, 30), band=16)
        ok = all(e <= TOL["fp16"] for e in errs.values())
        return ok, (f"{'skipped' if ok else 'FAIL'}: needs a GPU with >= 40 GB (dry run: the banded check ran at "
                    f"1x4x40x30: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ")")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        return None, "skipped: the GPU has < 40 GB"
    if ctx.left() < 60:
        return False, "FAIL: not run, the phase's time box was nearly spent"
    errs, n = large_case(ctx.device)
    torch.cuda.empty_cache()
    ok = all(e <= TOL["fp16"] for e in errs.values())
    text = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    return ok, f"{'pass' if ok else 'FAIL'}: {n} elements (> 2**31): {text} (tol {TOL['fp16']:.0e})"


def run(ctx: Context):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    import ddf
    from ddf.backends import choose

    with ddf.use_backend("triton"):
        backend = choose(ctx.device)  # raises when the Triton kernels cannot run here (a forced backend never falls back)
    failed, n, sweep = op_sweep(ctx)
    large_ok, large_text = _large_row(ctx)
    rows = []
    for step in (module_checks, graph_check, compile_check):
        if ctx.left() < (90 if step is compile_check else 20):
            rows.append([step.__name__, "", "", "FAIL (not run: time box)"])
            continue
        try:
            got = step(ctx)
            rows.extend(got if step is module_checks else [got])
        except Exception as exc:
            rows.append([step.__name__, "", "", f"FAIL ({type(exc).__name__}: {str(exc)[:160]})"])
    bad_rows = [r for r in rows if not str(r[-1]).startswith(("pass", "skipped"))]
    tables = [sweep, table("Modules and models (float32, TF32 off), CUDA graph, torch.compile", ["check", "rel err", "tol", "result"], rows),
              table("More than 2**31 input elements (float16 NCHW 1x32x8192x8200, k=3)", ["result"], [[large_text]])]
    ok = failed == 0 and not bad_rows and large_ok is not False
    where = "Triton interpreter, CPU tensors" if ctx.dry_run else "CUDA"
    detail = (f"op ({backend}): {n - failed}/{n} cases within tolerance ({where}); modules/models: "
              f"{sum(str(r[-1]).startswith('pass') for r in rows)}/{len(rows)} passed, "
              f"{sum(str(r[-1]).startswith('skipped') for r in rows)} skipped; >2**31: {large_text.split(':')[0]}")
    return result("pass" if ok else "fail", detail, tables)
