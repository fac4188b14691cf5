"""DDF op: reference vs a naive loop, every backend vs the float64 reference (forward + all grads, dtypes,
layouts), opcheck, torch.compile, double backward, padding/empty-tensor semantics, special cases of the original
README, backend selection."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddf
from ddf import backends
from ddf.reference import ddf_reference, ddf_reference_backward

COMB = {"mul": 0, "add": 1}
CPU = torch.device("cpu")
# kernels that run on CPU tensors here; Triton only under its interpreter (tests/conftest.py sets TRITON_INTERPRET)
KERNEL_BACKENDS = ["cpp"] + (["triton"] if backends.can_run_triton(CPU)[0] else [])
ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]
# The device axis of the comparisons against the reference: "triton-cuda" runs Triton's compiled kernels on CUDA
# tensors (fp32 sqrt/div are approximate there: GPU_TOL); the other entries run on CPU tensors.
TRITON_CUDA = pytest.param("triton-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="no CUDA device"))
DEVICE_BACKENDS = ALL_BACKENDS + [TRITON_CUDA]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def backend_device(backend):
    """(backend, device) of a DEVICE_BACKENDS entry: 'triton-cuda' is the triton backend on CUDA tensors."""
    return ("triton", torch.device("cuda")) if backend == "triton-cuda" else (backend, CPU)


def make_inputs(B, C, H, W, k, s, head, dtype=torch.float64, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    ch = torch.randn(B, C, k, k, generator=g, dtype=torch.float64).to(dtype)
    sp = torch.randn(B, head * k * k, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        sp = sp.contiguous(memory_format=torch.channels_last)
    return x, ch, sp


def naive_ddf(x, ch, sp, k, d, s, head, combine):
    B, C, H, W = x.shape
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    r = (k - 1) // 2
    out = torch.zeros(B, C, Ho, Wo, dtype=torch.float64)
    for b, c, y, xx in itertools.product(range(B), range(C), range(Ho), range(Wo)):
        h = c // (C // head)
        acc = 0.0
        for jy, jx in itertools.product(range(k), range(k)):
            iy, ix = y * s + (jy - r) * d, xx * s + (jx - r) * d
            if 0 <= iy < H and 0 <= ix < W:
                spv = float(sp[b, h * k * k + jy * k + jx, y, xx])
                chv = float(ch[b, c, jy, jx])
                f = spv * chv if combine == "mul" else spv + chv
                acc += f * float(x[b, c, iy, ix])
        out[b, c, y, xx] = acc
    return out


def max_rel_err(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


# ------------------------------------------------------------------------------------------ reference vs naive
@pytest.mark.parametrize(
    "k,d,s,head,combine,H,W",
    [(3, 1, 1, 1, "mul", 5, 6), (3, 2, 2, 2, "add", 7, 5), (5, 1, 3, 2, "mul", 6, 7), (1, 1, 2, 1, "add", 5, 4)],
)
def test_reference_matches_naive_loop(k, d, s, head, combine, H, W):
    x, ch, sp = make_inputs(2, 4, H, W, k, s, head, seed=k + d + s)
    ref = ddf_reference(x, ch, sp, k, d, s, head, combine)
    assert torch.allclose(ref, naive_ddf(x, ch, sp, k, d, s, head, combine), atol=1e-12, rtol=0)


def test_reference_backward_matches_autograd():
    for combine, cl in itertools.product(("mul", "add"), (False, True)):
        x, ch, sp = make_inputs(2, 6, 7, 8, 3, 2, 3, seed=3, channels_last=cl)
        go = torch.randn(2, 6, 4, 4, dtype=torch.float64)
        grads = ddf_reference_backward(go, x, ch, sp, 3, 2, 2, 3, combine)
        leaves = [t.clone().requires_grad_() for t in (x, ch, sp)]
        ddf_reference(*leaves, 3, 2, 2, 3, combine).backward(go)
        for g, leaf in zip(grads, leaves):
            assert torch.allclose(g, leaf.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------- compiled vs reference
RANDOM_CONFIGS = [
    # B, C, H, W, k, d, s, head, combine
    (1, 3, 9, 8, 1, 1, 1, 1, "mul"),
    (2, 4, 8, 8, 3, 1, 1, 1, "mul"),
    (2, 6, 7, 9, 3, 2, 1, 2, "add"),
    (3, 8, 10, 7, 3, 1, 2, 4, "mul"),
    (1, 4, 11, 10, 5, 1, 1, 2, "add"),
    (2, 4, 9, 9, 5, 3, 3, 1, "mul"),
    (1, 2, 12, 13, 7, 1, 2, 1, "mul"),
    (2, 6, 6, 5, 7, 2, 1, 3, "add"),
    (1, 70, 5, 6, 3, 1, 1, 2, "mul"),
    (2, 5, 3, 4, 5, 2, 2, 5, "add"),  # taps mostly outside the image
]


def _compare(cfg, dtype, channels_last, tol, backend="cpp", sp_channels_last=None):
    B, C, H, W, k, d, s, head, combine = cfg
    backend, device = backend_device(backend)
    x, ch, sp = make_inputs(B, C, H, W, k, s, head, dtype=dtype, seed=sum(cfg[:8]), channels_last=channels_last)
    if sp_channels_last is not None:  # mixed layouts: the spatial filter in the other layout than the input
        sp = sp.contiguous(memory_format=torch.channels_last if sp_channels_last else torch.contiguous_format)
    x, ch, sp = (t.to(device) for t in (x, ch, sp))  # keeps each layout
    with ddf.use_backend(backend):
        out = torch.ops.ddf.ddf_forward(x, ch, sp, k, d, s, head, COMB[combine])
        go = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device, dtype)
        grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, k, d, s, head, COMB[combine])
    assert out.dtype == dtype
    fmt = torch.channels_last if channels_last and C > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    # ground truth in float64 from the same (rounded) inputs, on CPU
    x64, ch64, sp64 = x.double().cpu(), ch.double().cpu(), sp.double().cpu()
    ref = ddf_reference(x64, ch64, sp64, k, d, s, head, combine)
    assert max_rel_err(out, ref) <= tol, (cfg, dtype, max_rel_err(out, ref))
    refs = ddf_reference_backward(go.double().cpu(), x64, ch64, sp64, k, d, s, head, combine)
    for name, g, r in zip(("grad_input", "grad_channel", "grad_spatial"), grads, refs):
        assert g.dtype == dtype and g.shape == r.shape
        assert max_rel_err(g, r) <= tol, (name, cfg, dtype, max_rel_err(g, r))
    assert grads[0].is_contiguous(memory_format=fmt)
    assert grads[2].is_contiguous(memory_format=ddf._checks.memory_format_of(sp))


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backend_matches_reference_fp64(backend, cfg, channels_last):
    _compare(cfg, torch.float64, channels_last, 1e-10, backend)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("input_cl,sp_cl", [(False, True), (True, False)])
def test_mixed_layouts_forward_and_backward(backend, input_cl, sp_cl):
    for cfg in (RANDOM_CONFIGS[3], RANDOM_CONFIGS[7]):
        _compare(cfg, torch.float64, input_cl, 1e-10, backend, sp_channels_last=sp_cl)



# Shapes aimed at the C++ backward's row-block / padded-vector / stride-phase paths (issue 12): widths below and
# just above the vector length, odd widths, stride 2 + dilation 2, stride 3, k = 5/7, head > 1, C not a multiple
# of 8, several row blocks with a halo (tall images), a single output row or column.
BACKWARD_PATH_CONFIGS = [
    # B, C, H, W, k, d, s, head, combine
    (2, 3, 5, 3, 3, 1, 1, 1, "mul"),
    (1, 6, 9, 5, 3, 2, 2, 2, "add"),
    (1, 5, 13, 11, 5, 2, 2, 1, "mul"),
    (2, 9, 7, 17, 7, 1, 1, 3, "mul"),
    (1, 12, 40, 9, 3, 2, 2, 4, "add"),
    (1, 10, 37, 10, 5, 1, 3, 2, "mul"),
    (1, 7, 1, 12, 3, 1, 1, 1, "add"),
    (3, 4, 10, 1, 3, 2, 2, 2, "mul"),
    (1, 4, 6, 4, 7, 3, 1, 1, "mul"),  # taps far outside a small image
    # small planes with >= 8 (b, head) planes: one row block per plane (no halo), NCHW and channels_last
    (4, 6, 7, 7, 3, 1, 1, 2, "mul"),
    (8, 3, 5, 9, 3, 1, 1, 1, "add"),
    (2, 8, 9, 6, 5, 1, 2, 4, "mul"),
    # NCHW with <= 8 output columns and >= 16 channels per head: run by the channels-last kernel
    (2, 32, 7, 7, 3, 1, 1, 2, "mul"),
    (3, 20, 9, 8, 5, 2, 1, 1, "add"),
    (2, 16, 13, 15, 3, 1, 2, 1, "mul"),
    # a 1440-pixel plane with 8 planes: one backward row block; forward planes taller than one row block (the
    # block's flat filter is capped at 256 KB): 3 blocks at k = 7, 2 at k = 5 stride 2
    (8, 2, 36, 40, 3, 1, 1, 1, "add"),
    (1, 3, 60, 40, 7, 1, 1, 1, "mul"),
    (1, 2, 120, 118, 5, 1, 2, 2, "add"),
]


@pytest.mark.parametrize("cfg", BACKWARD_PATH_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_backward_paths_fp64(cfg, channels_last):
    _compare(cfg, torch.float64, channels_last, 1e-10, "cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_backward_paths_low_precision(dtype, channels_last):
    for cfg in BACKWARD_PATH_CONFIGS[:5]:
        _compare(cfg, dtype, channels_last, LOW_PRECISION_TOL[dtype], "cpp")


@pytest.mark.parametrize("spatial_norm", [False, True])
def test_cpp_backward_channels_last_non_contiguous_filters(spatial_norm):
    """channels_last input with a transposed-view channel filter and a sliced (strided) spatial filter."""
    k, d, s, head = 3, 2, 2, 2
    x, _, _ = make_inputs(2, 6, 9, 8, k, s, head, seed=21, channels_last=True)
    g = torch.Generator().manual_seed(22)
    ch = torch.randn(2, 6, k, k, generator=g, dtype=torch.float64).transpose(2, 3)  # non-contiguous view
    sp_big = torch.randn(2, 2 * head * k * k, 5, 4, generator=g, dtype=torch.float64)
    sp = sp_big[:, ::2]  # neither contiguous nor channels_last
    assert not ch.is_contiguous() and not sp.is_contiguous()
    go = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with ddf.use_backend("cpp"):
        grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, k, d, s, head, 0, spatial_norm, 0.7)
    refs = ddf_reference_backward(go, x, ch, sp, k, d, s, head, "mul", spatial_norm, 0.7)
    for name, a, r in zip(("grad_input", "grad_channel", "grad_spatial"), grads, refs):
        assert max_rel_err(a, r) <= 1e-10, name


def test_cpp_backward_does_not_depend_on_thread_count():
    """Fixed task layout and block-ordered grad_channel reduction: bitwise equal results for 1 and 2 threads."""
    threads = torch.get_num_threads()
    for (B, H, W), cl, norm in itertools.product(((2, 30, 20), (8, 7, 7)), (False, True), (False, True)):
        x, ch, sp = make_inputs(B, 16, H, W, 3, 1, 2, dtype=torch.float32, seed=5, channels_last=cl)
        go = torch.randn(B, 16, H, W, generator=torch.Generator().manual_seed(6)).contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format)
        results = []
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                with ddf.use_backend("cpp"):
                    results.append(torch.ops.ddf.ddf_backward(go, x, ch, sp, 3, 1, 1, 2, 0, norm, 1.0))
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(*results):
            assert torch.equal(a, b)

@pytest.mark.skipif(sys.platform == "darwin", reason="Apple clang builds the kernels without OpenMP (build_flags.py)")
def test_cpp_kernels_use_torch_threads():
    """The C++ kernels are compiled with OpenMP, so at::parallel_for spreads them over torch's intra-op threads
    (until 2026-12-03 they were built without it and silently ran on one thread at any torch.set_num_threads)."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert backends.cpp.parallel_threads(64) == n
            assert f"{n} of {n} threads" in ddf.backend_info()
    finally:
        torch.set_num_threads(threads)


# tolerances: ~2x the largest error of the float32-accumulating C++ kernels on these sweeps (measured 2026-11-24:
# float32 2.3e-7, float16 4.2e-4, bfloat16 3.2e-3 relative to max |ref|)
LOW_PRECISION_TOL = {torch.float32: 5e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# compiled Triton on a GPU: fp32 sqrt/div approximate (~1e-6 relative), FMA contraction; half types as on CPU
GPU_TOL = {**LOW_PRECISION_TOL, torch.float32: 2e-6}
LOW_PRECISION_CONFIGS = RANDOM_CONFIGS[1:6] + [(1, 4, 32, 33, 7, 1, 1, 2, "mul"), (1, 8, 40, 36, 7, 2, 2, 1, "add")]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOL))
def test_backend_matches_reference_low_precision(backend, dtype, channels_last):
    tol = (GPU_TOL if backend_device(backend)[1].type == "cuda" else LOW_PRECISION_TOL)[dtype]
    for cfg in LOW_PRECISION_CONFIGS:
        _compare(cfg, dtype, channels_last, tol, backend)


def test_autograd_through_public_api():
    x, ch, sp = make_inputs(2, 4, 9, 7, 3, 2, 2, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, ch, sp)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, ch, sp)]
    out = ddf.ddf(*leaves, 3, dilation=1, stride=2, head=2, kernel_combine="mul")
    ref = ddf_reference(*ref_leaves, 3, 1, 2, 2, "mul")
    go = torch.randn_like(ref)
    out.backward(go)
    ref.backward(go)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)
    # only some inputs require grad
    xg = x.clone().requires_grad_()
    ddf.ddf(xg, ch, sp, 3, 1, 2, 2, "mul").sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_gradcheck_fp64_small(backend):
    backend, device = backend_device(backend)
    for combine, cl in (("mul", False), ("add", True)):
        x, ch, sp = make_inputs(1, 4, 5, 4, 3, 2, 2, seed=11, channels_last=cl)
        leaves = tuple(t.to(device, copy=True).requires_grad_() for t in (x, ch, sp))
        with ddf.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda a, b, c: torch.ops.ddf.ddf_forward(a, b, c, 3, 1, 2, 2, COMB[combine]), leaves)


def test_double_backward_gradgradcheck():
    """Second-order gradients (the op is linear in each input): gradgradcheck in float64 (C++ first order)."""
    for combine in ("mul", "add"):
        x, ch, sp = make_inputs(1, 4, 5, 6, 3, 2, 2, seed=13)
        leaves = tuple(t.clone().requires_grad_() for t in (x, ch, sp))
        with ddf.use_backend("cpp"):
            assert torch.autograd.gradgradcheck(lambda a, b, c: ddf.ddf(a, b, c, 3, 2, 2, 2, combine), leaves)


def _second_order(backend, combine, spatial_norm):
    x, ch, sp = make_inputs(1, 4, 5, 6, 3, 2, 2, seed=19)
    leaves = [t.clone().requires_grad_() for t in (x, ch, sp)]
    with ddf.use_backend(backend):
        out = ddf.ddf(*leaves, 3, 2, 2, 2, combine, spatial_norm=spatial_norm, spatial_gain=0.8)
        go = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)).requires_grad_()
        grads = torch.autograd.grad(out, leaves, go, create_graph=True)
        weights = [torch.randn(g.shape, dtype=g.dtype, generator=torch.Generator().manual_seed(i))
                   for i, g in enumerate(grads)]
        total = sum((g * w).sum() for g, w in zip(grads, weights))
        return torch.autograd.grad(total, leaves + [go])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("combine,spatial_norm", [("mul", False), ("add", False), ("mul", True)])
def test_double_backward_matches_reference(backend, combine, spatial_norm):
    for got, ref in zip(_second_order(backend, combine, spatial_norm), _second_order("reference", combine,
                                                                                     spatial_norm)):
        assert torch.allclose(got, ref, atol=1e-10, rtol=1e-10)


# Triton's interpreter evaluates the filter product with numpy on every lane, masked ones included, before the
# mask selects 0 (Inf * 0 there warns; the result is checked below)
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_non_finite_filter_on_padded_tap_is_skipped(backend, stride, channels_last):
    """A tap on the zero padding contributes exactly 0, even when its filter value is Inf/NaN (every backend, both
    layouts; at stride 2 the left-border tap starts the valid column range at ceil(r*d/s))."""
    x, ch, sp = make_inputs(1, 4, 6, 7, 3, stride, 2, seed=17, channels_last=channels_last)
    sp = sp.clone()
    sp[0, 0, 0, :] = float("inf")  # tap (jy=0, jx=0) of head 0 is on the padding for the whole first row
    sp[0, 9 + 2, :, -1] = float("nan")  # tap (jy=0, jx=2) of head 1 is on the padding for the last column
    sp[0, 9 + 3, :, 0] = float("-inf")  # tap (jy=1, jx=0) of head 1 is on the padding for the first column
    backend, device = backend_device(backend)
    leaves = [t.to(device, copy=True).requires_grad_() for t in (x, ch, sp)]
    with ddf.use_backend(backend):
        out = ddf.ddf(*leaves, 3, 1, stride, 2, "mul")
        out.backward(torch.ones_like(out))
    out = out.cpu()
    assert torch.isfinite(out).all()
    finite_sp = torch.where(torch.isfinite(sp), sp, torch.zeros_like(sp))
    assert torch.allclose(out, ddf_reference(x, ch, finite_sp, 3, 1, stride, 2, "mul"), atol=1e-12)
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert leaves[2].grad[0, 0, 0, :].abs().max() == 0
    assert leaves[2].grad[0, 9 + 3, :, 0].abs().max() == 0


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 0, 5, 5), (2, 4, 0, 5), (2, 4, 5, 0), (1, 2, 0, 0)])
@pytest.mark.parametrize("stride", [1, 2])
def test_empty_tensors(backend, shape, stride):
    backend, device = backend_device(backend)
    B, C, H, W = shape
    Ho, Wo = ddf._checks.out_size(H, stride), ddf._checks.out_size(W, stride)
    assert (Ho == 0) == (H == 0) and (Wo == 0) == (W == 0)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    ch = torch.randn(B, C, 3, 3, device=device, requires_grad=True)
    sp = torch.randn(B, 2 * 9 if C % 2 == 0 else 9, Ho, Wo, device=device, requires_grad=True)
    head = sp.shape[1] // 9
    with ddf.use_backend(backend):
        out = ddf.ddf(x, ch, sp, 3, 1, stride, head, "mul")
        assert out.shape == (B, C, Ho, Wo)
        out.sum().backward()
    assert x.grad.shape == x.shape and ch.grad.shape == ch.shape and sp.grad.shape == sp.shape
    assert not ch.grad.any()  # no pixel: zero channel-filter gradient


def test_channels_last_and_strided_views():
    x, ch, sp = make_inputs(2, 8, 10, 12, 3, 1, 2, dtype=torch.float32)
    ref = ddf_reference(x.double(), ch.double(), sp.double(), 3, 2, 1, 2, "mul")
    x_cl, sp_cl = x.contiguous(memory_format=torch.channels_last), sp.contiguous(memory_format=torch.channels_last)
    for xi, spi in ((x_cl, sp), (x_cl, sp_cl), (x, sp_cl)):
        out = ddf.ddf(xi, ch, spi, 3, 2, 1, 2, "mul")
        assert out.is_contiguous(memory_format=torch.channels_last) == (xi is x_cl)
        assert max_rel_err(out, ref) < 2e-5
    # a non-contiguous view (neither layout) still gives the right values
    big = torch.randn(2, 8, 10, 24)
    xv = big[..., ::2]
    out = ddf.ddf(xv, ch, sp, 3, 2, 1, 2, "mul")
    assert max_rel_err(out, ddf_reference(xv.double(), ch.double(), sp.double(), 3, 2, 1, 2, "mul")) < 2e-5


def test_reference_keeps_channels_last():
    """The reference backend's output and grads keep the layouts the fake kernel promises."""
    x, ch, sp = make_inputs(2, 8, 6, 7, 3, 1, 2, channels_last=True)
    with ddf.use_backend("reference"):
        out = torch.ops.ddf.ddf_forward(x, ch, sp, 3, 1, 1, 2, 0)
        gin, gch, gsp = torch.ops.ddf.ddf_backward(torch.randn_like(out), x, ch, sp, 3, 1, 1, 2, 0)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert gin.is_contiguous(memory_format=torch.channels_last) and not gin.is_contiguous()
    assert gsp.is_contiguous(memory_format=torch.channels_last) and gch.is_contiguous()


# --------------------------------------------------------------------------------- opcheck and torch.compile
OPCHECK_SAMPLES = [  # B, C, H, W, k, s, head, combine, channels_last, spatial_norm
    (2, 4, 6, 5, 3, 2, 2, 0, False, False),
    (2, 4, 6, 5, 3, 2, 2, 1, True, False),
    (1, 6, 7, 7, 5, 1, 3, 0, False, True),
    (1, 3, 4, 5, 1, 1, 1, 1, True, False),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_opcheck(backend, sample):
    B, C, H, W, k, s, head, combine, cl, norm = sample
    x, ch, sp = make_inputs(B, C, H, W, k, s, head, dtype=torch.float32, channels_last=cl)
    args = tuple(t.clone().requires_grad_() for t in (x, ch, sp)) + (k, 1, s, head, combine, norm, 0.5)
    with ddf.use_backend(backend):
        torch.library.opcheck(torch.ops.ddf.ddf_forward.default, args)
        go = torch.randn(ddf._checks.empty_forward_output(x, s).shape)
        torch.library.opcheck(torch.ops.ddf.ddf_backward.default, (go, x, ch, sp) + args[3:])


class TwoDDF(nn.Module):
    """Two DDF layers whose spatial filters are predicted by 1x1 convs (a tiny DDF network)."""

    def __init__(self, C=8, k=3, head=2):
        super().__init__()
        self.k, self.head = k, head
        self.sp1 = nn.Conv2d(C, head * k * k, 1)
        self.sp2 = nn.Conv2d(C, head * k * k, 1, stride=2)
        self.ch1 = nn.Parameter(torch.randn(1, C, k, k) * 0.3)
        self.ch2 = nn.Parameter(torch.randn(1, C, k, k) * 0.3)

    def forward(self, x):
        B = x.shape[0]
        y = ddf.ddf(x, self.ch1.expand(B, -1, -1, -1), self.sp1(x), self.k, 1, 1, self.head, "mul")
        y = torch.relu(y)
        return ddf.ddf(y, self.ch2.expand(B, -1, -1, -1), self.sp2(y), self.k, 2, 2, self.head, "add")


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                os.environ.get("DDF_TEST_INDUCTOR", "0") != "1",
                reason="inductor's C++ codegen takes minutes on a 2-core CPU; opt in with DDF_TEST_INDUCTOR=1",
            ),
        ),
    ],
)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoDDF()
    x = torch.randn(2, 8, 9, 10)
    eager = model(x)
    eager.sum().backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), grads_eager):
        assert torch.allclose(p.grad, g, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ special cases (original README)
def test_channel_ones_mul_is_carafe_like():
    """channel filter of ones with 'mul' (or zeros with 'add') == a per-pixel (CARAFE/involution-like) filter."""
    x, _, sp = make_inputs(2, 4, 8, 7, 3, 1, 2, seed=4)
    cols = F.unfold(x, 3, padding=1).view(2, 2, 2, 9, 8, 7)
    expected = (cols * sp.view(2, 2, 1, 9, 8, 7)).sum(3).view(2, 4, 8, 7)
    ones, zeros = torch.ones(2, 4, 3, 3, dtype=x.dtype), torch.zeros(2, 4, 3, 3, dtype=x.dtype)
    assert torch.allclose(ddf.ddf(x, ones, sp, 3, 1, 1, 2, "mul"), expected, atol=1e-12)
    assert torch.allclose(ddf.ddf(x, zeros, sp, 3, 1, 1, 2, "add"), expected, atol=1e-12)


def test_spatial_ones_is_weightnet_like_depthwise_conv():
    """spatial filter of ones with 'mul' (or zeros with 'add') == a depthwise conv with a per-sample filter."""
    x, ch, _ = make_inputs(3, 6, 9, 8, 5, 2, 1, seed=6)
    for d, s in ((1, 1), (2, 2)):
        Ho, Wo = (9 - 1) // s + 1, (8 - 1) // s + 1
        ones = torch.ones(3, 25, Ho, Wo, dtype=x.dtype)
        zeros = torch.zeros(3, 25, Ho, Wo, dtype=x.dtype)
        expected = torch.cat(
            [F.conv2d(x[b : b + 1], ch[b].unsqueeze(1), stride=s, padding=2 * d, dilation=d, groups=6) for b in range(3)]
        )
        assert torch.allclose(ddf.ddf(x, ch, ones, 5, d, s, 1, "mul"), expected, atol=1e-12)
        assert torch.allclose(ddf.ddf(x, ch, zeros, 5, d, s, 1, "add"), expected, atol=1e-12)


# -------------------------------------------------------------------------------------------- backend selection
def test_backend_info_and_env(monkeypatch):
    info = ddf.backend_info()
    assert info.startswith("DDF_BACKEND=auto") and "cpu: cpp" in info, info
    x, ch, sp = make_inputs(1, 2, 5, 5, 3, 1, 1)
    with ddf.use_backend("reference"):
        assert ddf.backend_info().startswith("DDF_BACKEND=reference")
        assert backends.choose(CPU) == "reference"
        assert torch.allclose(ddf.ddf(x, ch, sp, 3), ddf_reference(x, ch, sp, 3))
    with pytest.raises(ValueError, match="use_backend"):
        with ddf.use_backend("bogus"):
            pass
    if "triton" not in KERNEL_BACKENDS:
        with ddf.use_backend("triton"):
            with pytest.raises(RuntimeError, match="triton"):
                ddf.ddf(x, ch, sp, 3)
    assert backends.choose(torch.device("meta")) == "meta"


@pytest.mark.parametrize("value,ok", [("cpp", True), ("reference", True), ("compiled", False), ("", True)])
def test_ddf_backend_env_parsed(value, ok):
    code = "import ddf, torch; print(ddf.backend_info()); ddf.ddf(*[torch.randn(s) for s in ((1,2,4,4),(1,2,3,3),(1,9,4,4))], 3)"
    env = dict(os.environ, DDF_BACKEND=value, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0 and "DDF_BACKEND must be one of" in res.stderr, res.stderr


def test_reference_fallback_when_extension_unavailable():
    """Without the extension (import blocked, JIT off) auto runs the reference with one warning saying why."""
    code = r"""
import sys, warnings
sys.modules["ddf._C"] = None  # make `from .. import _C` fail
import ddf, torch
from ddf.reference import ddf_reference
torch.manual_seed(0)
x, ch, sp = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 3, 3), torch.randn(2, 18, 3, 3)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out = torch.ops.ddf.ddf_forward(x, ch, sp, 3, 1, 2, 2, 1)
    torch.ops.ddf.ddf_forward(x, ch, sp, 3, 1, 2, 2, 1)
msgs = [str(x.message) for x in w if "ddf" in str(x.message)]
assert len(msgs) == 1 and "DDF_JIT=0" in msgs[0] and "pip install" in msgs[0], msgs
assert "cpu: reference" in ddf.backend_info(), ddf.backend_info()
assert torch.allclose(out, ddf_reference(x, ch, sp, 3, 1, 2, 2, "add"))
with ddf.use_backend("cpp"):
    try:
        ddf.ddf(x, ch, sp, 3, 1, 2, 2, "add")
    except RuntimeError as e:
        assert "cpp" in str(e) and "DDF_JIT=0" in str(e)
    else:
        raise AssertionError("forced cpp backend did not raise")
print("FALLBACK_OK")
"""
    env = dict(os.environ, DDF_JIT="0", DDF_BACKEND="auto", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "FALLBACK_OK" in res.stdout, res.stdout + res.stderr


def test_compile_sees_the_triton_kernels_for_cuda_tensors():
    """For CUDA tensors the op body (triton_op) decomposes into the Triton kernel launches when AOTAutograd
    traces it (what torch.compile does), so inductor sees and schedules the kernels: traced here with fake CUDA
    tensors, no GPU needed (compiled kernels, not the interpreter, hence a subprocess)."""
    import triton
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 3) and not torch.cuda.is_available():
        pytest.skip(f"triton {triton.__version__} makes an Autotuner only with an active GPU driver (3.3+ without)")
    code = r"""
import torch, ddf
from torch._subclasses.fake_tensor import FakeTensorMode
from functorch.compile import aot_function
graphs = []
def keep(gm, inputs):
    graphs.append(gm.code)
    return gm
def f(x, ch, sp):
    return ddf.ddf(x, ch, sp, 3, 1, 1, 1, "mul", spatial_norm=True, spatial_gain=0.5)
def b(go, x, ch, sp):
    return torch.ops.ddf.ddf_backward(go, x, ch, sp, 3, 1, 1, 1, 0, True, 0.5)
with FakeTensorMode():
    x, go = torch.empty(2, 8, 9, 9, device="cuda"), torch.empty(2, 8, 9, 9, device="cuda")
    ch = torch.empty(2, 8, 3, 3, device="cuda")
    sp = torch.empty(2, 9, 9, 9, device="cuda")
    aot_function(f, fw_compiler=keep)(x, ch, sp)
    aot_function(b, fw_compiler=keep)(go, x, ch, sp)
fw, bw = graphs
assert "triton_kernel_wrapper_functional" in fw and "ddf_forward" not in fw, fw
assert bw.count("triton_kernel_wrapper_functional") >= 2 and "ddf_backward" not in bw, bw
print("TRITON_IN_GRAPH")
"""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "TRITON_IN_GRAPH" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpp_forward_other_instruction_sets(isa):
    """The register-blocked forward kernels and the backward kernels built for other instruction sets (DDF_CPU_ISA
    caps the run-time choice; read once per process, hence the subprocess) match the reference, NCHW and
    channels_last (backward: also FilterNorm, small planes in one row block, stride 2, float16)."""
    code = """
import torch, ddf
from ddf.reference import ddf_reference, ddf_reference_backward
g = torch.Generator().manual_seed(0)
for (B, C, H, W, k, d, s, head, comb, norm, dt) in [(2, 12, 9, 23, 3, 1, 1, 3, 'mul', False, torch.float64),
                                                    (8, 4, 7, 7, 3, 1, 1, 2, 'mul', True, torch.float64),
                                                    (4, 32, 7, 7, 3, 1, 1, 2, 'mul', True, torch.float32),
                                                    (4, 20, 5, 37, 5, 2, 2, 2, 'add', False, torch.float64),
                                                    (2, 32, 13, 19, 3, 1, 1, 1, 'mul', True, torch.float32),
                                                    (2, 40, 6, 21, 3, 2, 1, 2, 'mul', False, torch.float16)]:
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64); ch = torch.randn(B, C, k, k, generator=g, dtype=torch.float64)
    sp = torch.randn(B, head * k * k, Ho, Wo, generator=g, dtype=torch.float64); go = torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64)
    x, ch, sp, go = (t.to(dt) for t in (x, ch, sp, go))
    refs = ddf_reference_backward(go.double(), x.double(), ch.double(), sp.double(), k, d, s, head, comb, norm, 0.8)
    for cl in (False, True):
        f = (lambda t: t.contiguous(memory_format=torch.channels_last)) if cl else (lambda t: t)
        with ddf.use_backend('cpp'):
            grads = torch.ops.ddf.ddf_backward(f(go), f(x), ch, f(sp), k, d, s, head, 0 if comb == 'mul' else 1, norm, 0.8)
        for name, a, r in zip(('grad_input', 'grad_channel', 'grad_spatial'), grads, refs):
            err = ((a.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()
            assert err < (1e-10 if dt == torch.float64 else 5e-7 if dt == torch.float32 else 1e-3), (name, B, C, H, W, k, cl, dt, err)
for (B, C, H, W, k, d, s, head, comb) in [(2, 12, 9, 23, 3, 1, 1, 3, 'mul'), (1, 20, 6, 37, 5, 2, 1, 2, 'add'),
                                          (2, 8, 5, 3, 7, 1, 1, 1, 'mul'), (1, 48, 4, 17, 3, 1, 1, 1, 'mul'),
                                          (1, 6, 30, 40, 3, 1, 1, 2, 'mul'),  # NCHW: 3 row blocks, 3 channels a head
                                          (2, 8, 15, 22, 3, 1, 2, 1, 'mul'), (1, 6, 13, 9, 5, 2, 3, 2, 'add')]:
    x = torch.randn(B, C, H, W, generator=g); ch = torch.randn(B, C, k, k, generator=g)
    sp = torch.randn(B, head * k * k, (H - 1) // s + 1, (W - 1) // s + 1, generator=g)
    ref = ddf_reference(x.double(), ch.double(), sp.double(), k, d, s, head, comb)
    for cl in (False, True):
        xi, spi = (x.contiguous(memory_format=torch.channels_last), sp.contiguous(memory_format=torch.channels_last)) if cl else (x, sp)
        out = ddf.ddf(xi, ch, spi, k, d, s, head, comb)
        err = (out.double() - ref).abs().max().item()
        assert err < 1e-4, (B, C, H, W, k, d, s, head, comb, cl, err)
print("ok")
"""
    env = dict(os.environ, DDF_CPU_ISA=isa, DDF_BACKEND="cpp")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-3000:]
