"""FilterNorm, DDFPack (with the Table 3 ablation switches) and DDFUpPack against plain computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddf.modules
from ddf import DDFPack, DDFUpPack, FilterNorm, ddf_reference

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _conv1x1(x, conv: nn.Conv2d):
    """1x1 conv written out (independent of F.conv2d); handles stride."""
    s = conv.stride[0]
    x = x[:, :, ::s, ::s]
    w = conv.weight[:, :, 0, 0]
    return torch.einsum("oc,bchw->bohw", w, x) + conv.bias.view(1, -1, 1, 1)


def _norm_taps(f, groups, kk):
    """(B, groups*kk, ...) -> subtract mean, divide by (unbiased std + 1e-10) over the kk taps."""
    shape = f.shape
    f = f.reshape(shape[0], groups, kk, -1)
    mean = f.sum(2, keepdim=True) / kk
    var = ((f - mean) ** 2).sum(2, keepdim=True) / (kk - 1)
    return ((f - mean) / (var.sqrt() + 1e-10)).reshape(shape)


# ----------------------------------------------------------------------------------------------- FilterNorm
@pytest.mark.parametrize("head,k,nl", [(1, 3, "relu"), (2, 5, "linear")])
def test_filter_norm_spatial_statistics(head, k, nl):
    fn = FilterNorm(head, k, "spatial", nl)
    x = torch.randn(2, head * k * k, 4, 5, generator=_gen(1), dtype=DT) * 3 + 1.5
    y = fn(x).reshape(2, head, k * k, 4, 5)
    scale = torch.nn.init.calculate_gain(nl) / k
    assert not any(True for _ in fn.parameters()), "spatial FilterNorm scale must be fixed, not learnable"
    torch.testing.assert_close(y.mean(2), torch.zeros(2, head, 4, 5, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std(2), torch.full((2, head, 4, 5), scale, dtype=DT), atol=1e-9, rtol=1e-9)


def test_filter_norm_channel_learnable_scale():
    c, k = 6, 3
    torch.manual_seed(0)
    fn = FilterNorm(c, k, "channel", "relu", running_std=True)
    assert isinstance(fn.std, nn.Parameter) and fn.std.shape == (c * k * k,) and fn.std.requires_grad
    assert set(fn.state_dict()) == {"std"}
    x = torch.randn(3, c * k * k, 1, 1, generator=_gen(2), dtype=DT) * 2 - 0.7
    fn = fn.double()
    y = fn(x)
    assert y.shape == (3, c * k * k)
    unscaled = (y / fn.std.detach().view(1, -1)).reshape(3, c, k * k)
    torch.testing.assert_close(unscaled.mean(2), torch.zeros(3, c, dtype=DT), atol=1e-9, rtol=0)
    torch.testing.assert_close(unscaled.std(2), torch.ones(3, c, dtype=DT), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(y, _norm_taps(x.reshape(3, -1), c, k * k) * fn.std.view(1, -1), **TOL)
    y.sum().backward()
    assert fn.std.grad is not None and fn.std.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape,dim", [((3, 4, 9), 2), ((2, 2, 25, 3, 4), 2)])
def test_filter_norm_matches_torch_std_composition(dtype, tol, shape, dim):
    """filter_norm writes the unbiased std out (speed); value and gradient equal the Tensor.std composition."""
    from ddf.reference import filter_norm

    x = (torch.randn(*shape, generator=_gen(5), dtype=torch.float64) * 2 + 0.3).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    centred = b - b.mean(dim=dim, keepdim=True)
    want = centred / (centred.std(dim=dim, keepdim=True) + 1e-10)
    got = filter_norm(a, dim=dim)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g = torch.randn(*shape, generator=_gen(6), dtype=torch.float64).to(dtype)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)


def test_filter_norm_channel_init_scale():
    # std is initialised as randn * gain / k: its empirical std is close to gain / k
    torch.manual_seed(0)
    fn = FilterNorm(512, 3, "channel", "relu", running_std=True)
    assert abs(fn.std.detach().std().item() - math.sqrt(2) / 3) < 0.03


def test_filter_norm_bad_args():
    with pytest.raises(ValueError, match="filter_type"):
        FilterNorm(1, 3, "pixel")
    with pytest.raises(ValueError, match="nonlinearity"):
        FilterNorm(1, 3, "spatial", "gelu")
    with pytest.raises(ValueError, match=r"\(B, 1\*9, H, W\)"):
        FilterNorm(1, 3, "spatial")(torch.randn(1, 8, 2, 2))


# ----------------------------------------------------------------------------------------------- DDFPack
def _expected_ddfpack(m: DDFPack, x):
    """DDFPack forward written out from its parameters (paper Fig. 2b, Eq. 3)."""
    b, c, h, w = x.shape
    k, kk = m.kernel_size, m.kernel_size ** 2
    gain = torch.nn.init.calculate_gain("relu") / k
    sp = _norm_taps(_conv1x1(x, m.spatial_branch[0]), m.head, kk) * gain
    g = x.mean((2, 3), keepdim=True)
    hdn = torch.relu(_conv1x1(g, m.channel_branch[1]))
    ch = _norm_taps(_conv1x1(hdn, m.channel_branch[3]).reshape(b, -1), c, kk) * m.channel_branch[4].std.view(1, -1)
    return ddf_reference(x, ch.reshape(b, c, k, k), sp, k, m.dilation, m.stride, m.head, m.kernel_combine)


@pytest.mark.parametrize("combine,stride,dilation,head", [("mul", 1, 1, 1), ("add", 2, 1, 2), ("mul", 2, 2, 4)])
def test_ddfpack_matches_written_out(combine, stride, dilation, head):
    torch.manual_seed(0)
    m = DDFPack(8, 3, stride=stride, dilation=dilation, head=head, kernel_combine=combine).double()
    x = torch.randn(2, 8, 7, 9, generator=_gen(3), dtype=DT)
    y = m(x)
    assert y.shape == (2, 8, (7 - 1) // stride + 1, (9 - 1) // stride + 1)
    torch.testing.assert_close(y, _expected_ddfpack(m, x), **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_branch_fast_path_matches_branch(dtype, tol, channels_last):
    """DDFPack runs its standard channel branch as linear ops (speed): value and gradients (input and every
    parameter) equal running the nn.Sequential branch as built."""
    torch.manual_seed(0)
    m = DDFPack(16, 5).to(dtype)
    x = torch.randn(3, 16, 6, 7, generator=_gen(7), dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(m.channel_branch.parameters())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = m.channel_branch.channel_filter(xa, 5)
    slow = m.channel_branch(xb).reshape(3, 16, 5, 5)
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    g = torch.randn(3, 16, 5, 5, generator=_gen(8), dtype=torch.float64).to(dtype)
    grads_fast = torch.autograd.grad(fast, [xa] + params, g)
    grads_slow = torch.autograd.grad(slow, [xb] + params, g)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_matches_conv2d(dtype, tol, stride, channels_last):
    """The spatial branch's 1x1 conv (a batched GEMM on NCHW CPU tensors, the convolution otherwise): value, output
    layout and gradients (input, weight, bias) equal F.conv2d's."""
    torch.manual_seed(0)
    m = ddf.modules.PointwiseConv2d(12, 9, stride).to(dtype)
    assert list(m.state_dict()) == ["weight", "bias"] and m.weight.shape == (9, 12, 1, 1)
    x = torch.randn(3, 12, 7, 10, generator=_gen(11), dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = m(xa), F.conv2d(xb, m.weight, m.bias, stride=stride)
    assert got.shape == want.shape == (3, 9, (7 - 1) // stride + 1, (10 - 1) // stride + 1)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g = torch.randn(want.shape, generator=_gen(12), dtype=torch.float64).to(dtype)
    grads_got = torch.autograd.grad(got, [xa, m.weight, m.bias], g)
    grads_want = torch.autograd.grad(want, [xb, m.weight, m.bias], g)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10)


def test_channel_branch_other_layouts_run_as_built():
    torch.manual_seed(0)
    m = DDFPack(8, 3, normalization="sigmoid").double()
    x = torch.randn(2, 8, 5, 5, generator=_gen(9), dtype=DT)
    assert type(m.channel_branch) is ddf.modules.ChannelBranch
    torch.testing.assert_close(m.channel_branch.channel_filter(x, 3), m.channel_branch(x).reshape(2, 8, 3, 3))


def test_ddfpack_state_dict_keys_as_original():
    m = DDFPack(16, se_ratio=0.25)
    sd = m.state_dict()
    assert list(sd) == ["spatial_branch.0.weight", "spatial_branch.0.bias", "channel_branch.1.weight",
                        "channel_branch.1.bias", "channel_branch.3.weight", "channel_branch.3.bias",
                        "channel_branch.4.std"]
    assert sd["spatial_branch.0.weight"].shape == (9, 16, 1, 1)
    assert sd["channel_branch.1.weight"].shape == (4, 16, 1, 1)
    assert sd["channel_branch.3.weight"].shape == (16 * 9, 4, 1, 1)
    assert sd["channel_branch.4.std"].shape == (16 * 9,)


def test_ddfpack_backward_reaches_every_parameter():
    torch.manual_seed(0)
    m = DDFPack(16, stride=2, se_ratio=0.5)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    (m(x) * torch.randn(2, 16, 3, 3)).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("combine,fill", [("mul", 1.0), ("add", 0.0)])
def test_ablation_spatial_only(combine, fill):
    torch.manual_seed(0)
    m = DDFPack(8, kernel_combine=combine, filters="spatial").double()
    assert m.channel_branch is None and not any(k.startswith("channel_branch") for k in m.state_dict())
    x = torch.randn(2, 8, 5, 5, generator=_gen(4), dtype=DT)
    sp = m.spatial_branch(x)
    exp = ddf_reference(x, torch.full((2, 8, 3, 3), fill, dtype=DT), sp, 3, 1, 1, 1, combine)
    torch.testing.assert_close(m(x), exp, **TOL)


@pytest.mark.parametrize("combine,fill", [("mul", 1.0), ("add", 0.0)])
def test_ablation_channel_only(combine, fill):
    torch.manual_seed(0)
    m = DDFPack(8, stride=2, kernel_combine=combine, filters="channel").double()
    assert m.spatial_branch is None and not any(k.startswith("spatial_branch") for k in m.state_dict())
    x = torch.randn(2, 8, 5, 5, generator=_gen(5), dtype=DT)
    ch = m.channel_branch(x).reshape(2, 8, 3, 3)
    exp = ddf_reference(x, ch, torch.full((2, 9, 3, 3), fill, dtype=DT), 3, 1, 2, 1, combine)
    torch.testing.assert_close(m(x), exp, **TOL)
    # channel-only + mul is a dynamic depthwise conv: compare with F.conv2d per sample
    if combine == "mul":
        dw = torch.cat([F.conv2d(x[i:i + 1], ch[i].unsqueeze(1), stride=2, padding=1, groups=8) for i in range(2)])
        torch.testing.assert_close(m(x), dw, **TOL)


@pytest.mark.parametrize("norm", ["batch_norm", "sigmoid"])
def test_ablation_normalisation(norm):
    torch.manual_seed(0)
    m = DDFPack(8, normalization=norm).double()
    fn = [mod for mod in m.modules() if isinstance(mod, FilterNorm)]
    assert not fn
    kind = nn.BatchNorm2d if norm == "batch_norm" else nn.Sigmoid
    assert isinstance(m.spatial_branch[-1], kind) and isinstance(m.channel_branch[-1], kind)
    x = torch.randn(3, 8, 5, 5, generator=_gen(6), dtype=DT)
    m.train()
    sp = m.spatial_branch(x)
    ch = m.channel_branch(x)
    if norm == "sigmoid":
        assert (sp > 0).all() and (sp < 1).all() and (ch > 0).all() and (ch < 1).all()
        torch.testing.assert_close(sp, torch.sigmoid(_conv1x1(x, m.spatial_branch[0])), **TOL)
    else:  # batch statistics: every filter tap has zero mean over the batch (and pixels)
        torch.testing.assert_close(sp.mean((0, 2, 3)), torch.zeros(9, dtype=DT), atol=1e-9, rtol=0)
        torch.testing.assert_close(ch.mean((0, 2, 3)), torch.zeros(72, dtype=DT), atol=1e-9, rtol=0)
    y = m(x)
    exp = ddf_reference(x, ch.reshape(3, 8, 3, 3), sp, 3, 1, 1, 1, "mul")
    torch.testing.assert_close(y, exp, **TOL)


@pytest.mark.parametrize("ratio,hidden", [(0.2, 12), (0.3, 19), (0.4, 25)])
def test_ablation_se_ratio(ratio, hidden):
    m = DDFPack(64, se_ratio=ratio)
    assert m.channel_branch[1].out_channels == hidden == int(64 * ratio)
    assert m.channel_branch[3].in_channels == hidden


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=0), "in_channels"),
    (dict(in_channels=8, kernel_size=4), "kernel_size must be odd"),
    (dict(in_channels=8, kernel_size=1), "kernel_size"),
    (dict(in_channels=8, stride=0), "stride"),
    (dict(in_channels=8, head=3), "head=3 must divide in_channels=8"),
    (dict(in_channels=8, kernel_combine="sub"), "kernel_combine"),
    (dict(in_channels=8, filters="none"), "filters"),
    (dict(in_channels=8, normalization="layer_norm"), "normalization"),
    (dict(in_channels=8, se_ratio=0.1), "se_ratio"),
    (dict(in_channels=8, se_ratio=-1.0), "se_ratio"),
])
def test_ddfpack_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDFPack(**kwargs)


def test_ddfpack_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        DDFPack(8)(torch.randn(1, 4, 5, 5))


# ----------------------------------------------------------------------------------------------- DDFUpPack
def _expected_up(m: DDFUpPack, x, guide):
    b, c, h, w = x.shape
    s, k = m.scale_factor, m.kernel_size
    out = torch.zeros(b, c, h * s, w * s, dtype=x.dtype)
    for idx, (sb, cb) in enumerate(zip(m.spatial_branch, m.channel_branch)):
        sp = sb(guide)
        ch = cb(x).reshape(b, c, k, k)
        i, j = divmod(idx, s)
        out[:, :, i::s, j::s] = ddf_reference(x, ch, sp, k, m.dilation, 1, m.head, m.kernel_combine)
    return out


@pytest.mark.parametrize("scale,combine,head", [(2, "mul", 1), (3, "add", 2), (4, "mul", 1)])
def test_ddfuppack_typical(scale, combine, head):
    torch.manual_seed(0)
    m = DDFUpPack(8, scale_factor=scale, head=head, kernel_combine=combine).double()
    assert len(m.spatial_branch) == len(m.channel_branch) == scale ** 2
    assert isinstance(m.spatial_branch[0][0], nn.Conv2d) and m.spatial_branch[0][0].groups == 8  # depthwise
    x = torch.randn(2, 8, 4, 5, generator=_gen(7), dtype=DT)
    y = m(x)
    assert y.shape == (2, 8, 4 * scale, 5 * scale)
    torch.testing.assert_close(y, _expected_up(m, x, x), **TOL)


def test_ddfuppack_combine_is_used():
    """The original passed `head` in the combine slot; here 'mul' and 'add' must give different results."""
    torch.manual_seed(0)
    mul = DDFUpPack(8, kernel_combine="mul").double()
    add = DDFUpPack(8, kernel_combine="add").double()
    add.load_state_dict(mul.state_dict())
    x = torch.randn(1, 8, 3, 3, generator=_gen(8), dtype=DT)
    assert not torch.allclose(mul(x), add(x))


@pytest.mark.parametrize("scale", [2, 3])
def test_ddfuppack_joint_other_channel_count(scale):
    torch.manual_seed(0)
    m = DDFUpPack(8, scale_factor=scale, joint_channels=3, dilation=2).double()
    assert m.spatial_branch[0][0].in_channels == 3  # guidance branch built with the guidance channel count
    x = torch.randn(2, 8, 5, 4, generator=_gen(9), dtype=DT)
    g = torch.randn(2, 3, 5, 4, generator=_gen(10), dtype=DT)
    y = m(x, g)
    assert y.shape == (2, 8, 5 * scale, 4 * scale)
    torch.testing.assert_close(y, _expected_up(m, x, g), **TOL)
    g2 = g.clone()
    g2[:, :, 2, 2] += 1.0
    assert not torch.allclose(m(x, g2), y), "output must depend on the guidance"
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_ddfuppack_errors():
    typical = DDFUpPack(8)
    joint = DDFUpPack(8, joint_channels=3)
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="joint_x given"):
        typical(x, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="needs joint_x"):
        joint(x)
    with pytest.raises(ValueError, match=r"joint_x must have shape .*\(1, 3, 4, 4\)"):
        joint(x, torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"joint_x must have shape"):
        joint(x, torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="scale_factor"):
        DDFUpPack(8, scale_factor=1)
    with pytest.raises(ValueError, match="joint_channels"):
        DDFUpPack(8, joint_channels=0)
    with pytest.raises(ValueError, match="dw_kernel_size"):
        DDFUpPack(8, dw_kernel_size=2)
