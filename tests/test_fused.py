"""The fused FilterNorm path (spatial_norm=True): equal to FilterNorm-then-op and to the plain reference, in value
and all gradients, for every kernel backend; half-precision safety of FilterNorm; DDFPack/DDFUpPack use it without
changing their state dicts or outputs."""
import pytest
import torch

import ddf
from ddf import backends
from ddf.modules import FilterNorm
from ddf.reference import spatial_filter_norm

CPU = torch.device("cpu")
KERNEL_BACKENDS = ["cpp"] + (["triton"] if backends.can_run_triton(CPU)[0] else [])
ALL_BACKENDS = KERNEL_BACKENDS + ["reference"]
# the device axis (as in test_op.py): "triton-cuda" runs Triton's compiled kernels on CUDA tensors
TRITON_CUDA = pytest.param("triton-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="no CUDA device"))
DEVICE_BACKENDS = ALL_BACKENDS + [TRITON_CUDA]
# B, C, H, W, k, d, s, head, combine, channels_last
SWEEP = [
    (2, 4, 8, 9, 3, 1, 1, 1, "mul", False),
    (2, 6, 7, 9, 3, 2, 1, 2, "add", True),
    (1, 8, 10, 7, 3, 1, 2, 4, "mul", True),
    (1, 4, 11, 10, 5, 1, 1, 2, "add", False),
    (2, 4, 9, 9, 5, 3, 3, 1, "mul", True),
    (1, 2, 12, 13, 7, 1, 2, 1, "mul", False),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(cfg, dtype, seed=0):
    B, C, H, W, k, d, s, head, combine, cl = cfg
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    ch = torch.randn(B, C, k, k, generator=g, dtype=torch.float64)
    raw = torch.randn(B, head * k * k, Ho, Wo, generator=g, dtype=torch.float64)
    if cl:
        x, raw = (t.contiguous(memory_format=torch.channels_last) for t in (x, raw))
    return [t.to(dtype) for t in (x, ch, raw)]


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _backend_device(backend):
    return ("triton", torch.device("cuda")) if backend == "triton-cuda" else (backend, CPU)


def _run(backend, cfg, tensors, fused, gain=0.6):
    B, C, H, W, k, d, s, head, combine, cl = cfg
    backend, device = _backend_device(backend)
    leaves = [t.to(device, copy=True).requires_grad_() for t in tensors]  # keeps each layout
    with ddf.use_backend(backend):
        if fused:
            out = ddf.ddf(*leaves, k, d, s, head, combine, spatial_norm=True, spatial_gain=gain)
        else:
            sp = spatial_filter_norm(leaves[2], head, k, gain)
            out = ddf.ddf(leaves[0], leaves[1], sp, k, d, s, head, combine)
        go = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(device,
                                                                                                        out.dtype)
        out.backward(go)
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("cfg", SWEEP)
def test_fused_equals_filter_norm_then_op_fp64(backend, cfg):
    tensors = _inputs(cfg, torch.float64, seed=sum(cfg[:8]))
    fused = _run(backend, cfg, tensors, True)
    composed = _run("reference", cfg, tensors, False)
    for name, a, b in zip(("out", "grad_input", "grad_channel", "grad_spatial"), fused, composed):
        assert _rel(a, b) <= TOL[torch.float64], (name, backend, cfg, _rel(a, b))
    # layouts: output and grad_input follow the input, grad_spatial the raw filter
    fmt = torch.channels_last if cfg[-1] else torch.contiguous_format
    assert fused[0].is_contiguous(memory_format=fmt) and fused[3].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + [TRITON_CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_low_precision(backend, dtype):
    for cfg in SWEEP[:4]:
        tensors = _inputs(cfg, dtype, seed=3)
        fused = _run(backend, cfg, tensors, True)
        exact = _run("reference", cfg, [t.double() for t in tensors], True)
        for name, a, b in zip(("out", "grad_input", "grad_channel", "grad_spatial"), fused, exact):
            assert a.dtype == dtype
            assert _rel(a, b) <= TOL[dtype], (name, backend, dtype, cfg, _rel(a, b))


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_fused_gradcheck_fp64(backend):
    cfg = (1, 4, 5, 6, 3, 2, 2, 2, "mul", True)
    backend, device = _backend_device(backend)
    leaves = tuple(t.to(device).requires_grad_() for t in _inputs(cfg, torch.float64, seed=9))
    with ddf.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b, c: ddf.ddf(a, b, c, 3, 2, 2, 2, "mul", spatial_norm=True, spatial_gain=0.5), leaves,
            fast_mode=backend == "triton" and device.type == "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_filter_norm_constant_filter_is_zero_not_nan(dtype):
    """eps 1e-10 underflows in float16: FilterNorm computes in float32 for half types; the fused op too."""
    const = torch.full((2, 2 * 9, 4, 4), 0.37, dtype=dtype)
    y = FilterNorm(2, 3, "spatial", "relu")(const)
    assert y.dtype == dtype and torch.isfinite(y).all() and not y.any()
    x, ch = torch.randn(2, 4, 4, 4, dtype=dtype), torch.randn(2, 4, 3, 3, dtype=dtype)
    for backend in KERNEL_BACKENDS:
        with ddf.use_backend(backend):
            out = ddf.ddf(x, ch, const, 3, head=2, spatial_norm=True)
        assert torch.isfinite(out).all() and not out.any()


def _pack_pairs():
    torch.manual_seed(0)
    yield ddf.DDFPack(8, kernel_size=3, stride=2, head=2), (2, 8, 9, 10)
    yield ddf.DDFPack(8, kernel_size=5, dilation=2, kernel_combine="add"), (2, 8, 7, 7)
    yield ddf.DDFUpPack(8, kernel_size=3, scale_factor=2, head=2), (2, 8, 6, 5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_modules_use_fused_path_same_result(backend, monkeypatch):
    """DDFPack/DDFUpPack with FilterNorm call the fused op; outputs and grads equal the unfused composition and
    the state-dict keys are those of the original release."""
    import ddf.modules as modules

    for module, shape in _pack_pairs():
        module = module.double()
        keys = sorted(module.state_dict())
        assert any(k.startswith("spatial_branch") for k in keys)
        x = torch.randn(shape, dtype=torch.float64)
        calls = []
        real = modules.ddf

        def spy(*args, **kwargs):
            calls.append(kwargs.get("spatial_norm", False))
            return real(*args, **kwargs)

        monkeypatch.setattr(modules, "ddf", spy)
        with ddf.use_backend(backend):
            xf = x.clone().requires_grad_()
            fused = module(xf)
            fused.sum().backward()
        assert calls and all(calls), "the module did not use the fused FilterNorm path"
        monkeypatch.setattr(modules, "_FUSE_SPATIAL_NORM", False)
        xu = x.clone().requires_grad_()
        unfused = module(xu)
        unfused.sum().backward()
        monkeypatch.setattr(modules, "_FUSE_SPATIAL_NORM", True)
        monkeypatch.setattr(modules, "ddf", real)
        assert torch.allclose(fused, unfused, atol=1e-10) and torch.allclose(xf.grad, xu.grad, atol=1e-10)
        assert sorted(module.state_dict()) == keys


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_fused_backward_constant_filter_std_zero(channels_last, dtype):
    """std = 0 exactly at some pixels (constant taps, exactly representable): the fused kernel backward gives the
    reference's gradients there (second FilterNorm term 0, first term scaled by gain / eps), finite everywhere."""
    k, head, gain = 3, 2, 0.8
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64)
    ch = torch.randn(2, 4, k, k, generator=g, dtype=torch.float64)
    raw = torch.randn(2, head * 9, 7, 6, generator=g, dtype=torch.float64)
    raw[:, :9, 2:5, 1:4] = 0.5  # head 0: constant taps on a patch of pixels
    raw[1, 9:, :, 0] = -2.0  # head 1 of sample 1: constant along the first column (on the padding there too)
    go = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64) * 1e-9  # keeps gain/eps-sized grads moderate
    if channels_last:
        x, raw, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, raw, go))
    x, ch, raw, go = (t.to(dtype) for t in (x, ch, raw, go))
    with ddf.use_backend("cpp"):
        grads = torch.ops.ddf.ddf_backward(go, x, ch, raw, k, 1, 1, head, 0, True, gain)
    refs = ddf.reference.ddf_reference_backward(go.double(), x.double(), ch.double(), raw.double(), k, 1, 1, head,
                                                "mul", True, gain)
    for name, a, r in zip(("grad_input", "grad_channel", "grad_spatial"), grads, refs):
        assert torch.isfinite(a).all(), name
        assert _rel(a, r) <= (1e-10 if dtype == torch.float64 else 1e-5), (name, _rel(a, r))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_fused_backward_many_row_blocks(channels_last):
    """Tall inputs: several row blocks per (b, head) with halo rows, stride 2 + dilation 2 and k = 5, fused norm."""
    for cfg in [(1, 6, 41, 12, 3, 2, 2, 2, "mul", channels_last), (1, 5, 36, 9, 5, 1, 1, 1, "add", channels_last)]:
        tensors = _inputs(cfg, torch.float64, seed=11)
        fused = _run("cpp", cfg, tensors, True)
        composed = _run("reference", cfg, tensors, False)
        for name, a, b in zip(("out", "grad_input", "grad_channel", "grad_spatial"), fused, composed):
            assert _rel(a, b) <= TOL[torch.float64], (name, cfg, _rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_fused_low_precision_channels_last(dtype):
    for cfg in (SWEEP[1], SWEEP[2], SWEEP[4]):
        tensors = _inputs(cfg, dtype, seed=4)
        fused = _run("cpp", cfg, tensors, True)
        exact = _run("reference", cfg, [t.double() for t in tensors], True)
        for name, a, b in zip(("out", "grad_input", "grad_channel", "grad_spatial"), fused, exact):
            assert a.dtype == dtype and _rel(a, b) <= TOL[dtype], (name, dtype, cfg, _rel(a, b))
