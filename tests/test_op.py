"""DDF op: reference vs a naive loop, compiled kernels vs reference (forward + all grads, dtypes, layouts),
opcheck, torch.compile, special cases of the original README, backend selection."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddf
from ddf import ops
from ddf.reference import ddf_reference, ddf_reference_backward

requires_compiled = pytest.mark.skipif(
    not ops.compiled_available(), reason=f"compiled DDF extension unavailable: {ops.unavailable_reason()}"
)
COMB = {"mul": 0, "add": 1}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    a, ref = a.double(), ref.double()
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


def _compare(cfg, dtype, channels_last, tol):
    B, C, H, W, k, d, s, head, combine = cfg
    x, ch, sp = make_inputs(B, C, H, W, k, s, head, dtype=dtype, seed=sum(cfg[:8]), channels_last=channels_last)
    out = torch.ops.ddf.ddf_forward(x, ch, sp, k, d, s, head, COMB[combine])
    assert out.dtype == dtype
    fmt = torch.channels_last if channels_last and C > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    # ground truth in float64 from the same (rounded) inputs
    x64, ch64, sp64 = x.double(), ch.double(), sp.double()
    ref = ddf_reference(x64, ch64, sp64, k, d, s, head, combine)
    assert max_rel_err(out, ref) <= tol, (cfg, dtype, max_rel_err(out, ref))
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, k, d, s, head, COMB[combine])
    refs = ddf_reference_backward(go.double(), x64, ch64, sp64, k, d, s, head, combine)
    for name, g, r in zip(("grad_input", "grad_channel", "grad_spatial"), grads, refs):
        assert g.dtype == dtype and g.shape == r.shape
        assert max_rel_err(g, r) <= tol, (name, cfg, dtype, max_rel_err(g, r))
    assert grads[0].is_contiguous(memory_format=fmt)


@requires_compiled
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_matches_reference_fp64(cfg, channels_last):
    _compare(cfg, torch.float64, channels_last, 1e-10)


@requires_compiled
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)]
)
def test_compiled_matches_reference_low_precision(dtype, tol, channels_last):
    for cfg in RANDOM_CONFIGS[1:6]:
        _compare(cfg, dtype, channels_last, tol)


@requires_compiled
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


@requires_compiled
def test_gradcheck_fp64_small():
    for combine, cl in (("mul", False), ("add", True)):
        x, ch, sp = make_inputs(1, 4, 5, 4, 3, 2, 2, seed=11, channels_last=cl)
        leaves = tuple(t.clone().requires_grad_() for t in (x, ch, sp))
        assert torch.autograd.gradcheck(
            lambda a, b, c: torch.ops.ddf.ddf_forward(a, b, c, 3, 1, 2, 2, COMB[combine]), leaves
        )


@requires_compiled
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


# --------------------------------------------------------------------------------- opcheck and torch.compile
@pytest.mark.parametrize("combine,cl", [(0, False), (1, True)])
def test_opcheck(combine, cl):
    x, ch, sp = make_inputs(2, 4, 6, 5, 3, 2, 2, dtype=torch.float32, channels_last=cl)
    args = tuple(t.clone().requires_grad_() for t in (x, ch, sp)) + (3, 1, 2, 2, combine)
    torch.library.opcheck(torch.ops.ddf.ddf_forward.default, args)
    go = torch.randn(2, 4, 3, 3)
    torch.library.opcheck(torch.ops.ddf.ddf_backward.default, (go, x, ch, sp, 3, 1, 2, 2, combine))


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
    assert ("compiled" in info) == ops.compiled_available()
    monkeypatch.setenv("DDF_BACKEND", "reference")
    assert ddf.backend_info().startswith("reference")
    x, ch, sp = make_inputs(1, 2, 5, 5, 3, 1, 1)
    assert torch.allclose(ddf.ddf(x, ch, sp, 3), ddf_reference(x, ch, sp, 3))
    monkeypatch.setenv("DDF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DDF_BACKEND"):
        ddf.ddf(x, ch, sp, 3)
    monkeypatch.setenv("DDF_BACKEND", "compiled")
    if ops.compiled_available():
        assert torch.allclose(ddf.ddf(x, ch, sp, 3), ddf_reference(x, ch, sp, 3))
    else:
        with pytest.raises(RuntimeError, match="compiled"):
            ddf.ddf(x, ch, sp, 3)


def test_python_fallback_when_extension_unavailable():
    """Without the extension (import blocked, JIT off) the op still exists, runs the reference, warns once."""
    code = r"""
import sys, warnings
sys.modules["ddf._C"] = None  # make `from . import _C` fail
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import ddf
import torch
msgs = [str(x.message) for x in w if "ddf" in str(x.message)]
assert len(msgs) == 1 and "pip install" in msgs[0], msgs
info = ddf.backend_info()
assert "compiled" not in info and info.startswith("reference"), info
from ddf.reference import ddf_reference
torch.manual_seed(0)
x, ch, sp = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 3, 3), torch.randn(2, 18, 3, 3)
args = (x, ch, sp, 3, 1, 2, 2, 1)
assert torch.allclose(torch.ops.ddf.ddf_forward(*args), ddf_reference(x, ch, sp, 3, 1, 2, 2, "add"))
leaves = tuple(t.double().requires_grad_() for t in (x, ch, sp))
assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.ddf.ddf_forward(a, b, c, 3, 1, 2, 2, 0), leaves)
torch.library.opcheck(torch.ops.ddf.ddf_forward.default, tuple(t.requires_grad_() for t in (x, ch, sp)) + args[3:])
try:
    torch.ops.ddf.ddf_forward(x, ch, sp, 4, 1, 2, 2, 0)
except ValueError as e:
    assert "kernel_size" in str(e)
else:
    raise AssertionError("no error for even kernel_size")
print("FALLBACK_OK")
"""
    env = dict(os.environ, DDF_JIT="0", DDF_BACKEND="auto", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "FALLBACK_OK" in res.stdout, res.stdout + res.stderr
