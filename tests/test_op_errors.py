"""Bad input to ddf() and to the raw torch.ops.ddf.* ops: clear errors naming the argument, never crashes."""
import pytest
import torch

from ddf import ddf

B, C, H, W, K = 2, 4, 6, 5, 3


def good(dtype=torch.float32, device="cpu", head=1, stride=1):
    g = torch.Generator().manual_seed(0)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    return (
        torch.randn(B, C, H, W, generator=g).to(dtype).to(device),
        torch.randn(B, C, K, K, generator=g).to(dtype).to(device),
        torch.randn(B, head * K * K, Ho, Wo, generator=g).to(dtype).to(device),
    )


def test_good_input_runs():
    x, ch, sp = good()
    assert ddf(x, ch, sp, K).shape == (B, C, H, W)


@pytest.mark.parametrize("which,name", [(0, "input"), (1, "channel_filter"), (2, "spatial_filter")])
def test_wrong_ndim(which, name):
    args = list(good())
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=f"{name} must be 4-D"):
        ddf(*args, K)


@pytest.mark.parametrize("which,name", [(0, "input"), (1, "channel_filter"), (2, "spatial_filter")])
def test_not_a_tensor_or_integer_dtype(which, name):
    args = list(good())
    bad = list(args)
    bad[which] = args[which].tolist()
    with pytest.raises(TypeError, match=name):
        ddf(*bad, K)
    bad[which] = args[which].to(torch.int32)
    with pytest.raises(TypeError, match=f"{name} must be a floating point"):
        ddf(*bad, K)


def test_batch_and_channel_mismatch():
    x, ch, sp = good()
    with pytest.raises(ValueError, match=r"channel_filter must have shape \(B, C, k, k\)"):
        ddf(x, ch[:1], sp, K)
    with pytest.raises(ValueError, match="channel_filter must have shape"):
        ddf(x, ch[:, :2], sp, K)
    with pytest.raises(ValueError, match="spatial_filter must have shape"):
        ddf(x, ch, sp[:1], K)


def test_spatial_filter_not_fitting_k_head_stride():
    x, ch, sp = good()
    with pytest.raises(ValueError, match=r"spatial_filter must have shape \(B, head\*k\*k"):
        ddf(x, ch, sp, K, head=2)  # needs 2*9 channels
    with pytest.raises(ValueError, match="spatial_filter must have shape"):
        ddf(x, ch, sp, K, stride=2)  # needs ceil(H/2) x ceil(W/2)
    with pytest.raises(ValueError, match="spatial_filter must have shape"):
        ddf(x, torch.randn(B, C, 5, 5), sp, 5)


@pytest.mark.parametrize("k,exc,msg", [(2, ValueError, "odd"), (0, ValueError, ">= 1"), (-3, ValueError, ">= 1"),
                                       (3.0, TypeError, "integer"), ("3", TypeError, "integer")])
def test_bad_kernel_size(k, exc, msg):
    x, ch, sp = good()
    with pytest.raises(exc, match=f"kernel_size.*{msg}"):
        ddf(x, ch, sp, k)


@pytest.mark.parametrize("name", ["dilation", "stride"])
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_dilation_stride(name, value, exc):
    x, ch, sp = good()
    with pytest.raises(exc, match=name):
        ddf(x, ch, sp, K, **{name: value})


def test_head_not_dividing_channels_and_bad_head():
    x, ch, _ = good()
    sp3 = torch.randn(B, 3 * K * K, H, W)
    with pytest.raises(ValueError, match="head=3 must divide"):
        ddf(x, ch, sp3, K, head=3)
    with pytest.raises(ValueError, match="head"):
        ddf(x, ch, sp3, K, head=0)
    with pytest.raises(TypeError, match="head"):
        ddf(x, ch, sp3, K, head=1.0)


def test_unknown_combine():
    x, ch, sp = good()
    with pytest.raises(ValueError, match="kernel_combine"):
        ddf(x, ch, sp, K, kernel_combine="sum")
    with pytest.raises(ValueError, match="kernel_combine"):
        ddf(x, ch, sp, K, 1, 1, "max")  # legacy positional form


def test_legacy_positional_combine():
    x, ch, sp = good()
    assert torch.allclose(ddf(x, ch, sp, K, 1, 1, "add"), ddf(x, ch, sp, K, kernel_combine="add"))


def test_different_devices_and_dtypes():
    x, ch, sp = good()
    with pytest.raises(ValueError, match="channel_filter is on meta"):
        ddf(x, ch.to("meta"), sp, K)
    with pytest.raises(ValueError, match="spatial_filter is on meta"):
        ddf(x, ch, sp.to("meta"), K)
    with pytest.raises(TypeError, match="channel_filter has dtype torch.float64"):
        ddf(x, ch.double(), sp, K)
    with pytest.raises(TypeError, match="spatial_filter has dtype torch.float16"):
        ddf(x, ch, sp.half(), K)


def test_meta_device_shapes():
    x, ch, sp = good(device="meta", head=2, stride=2)
    out = ddf(x, ch, sp, K, stride=2, head=2)
    assert out.device.type == "meta" and out.shape == (B, C, 3, 3)


# raw ops: the C++ TORCH_CHECKs (RuntimeError) or the Python-defined ops' checks (ValueError/TypeError)
RAW_ERRORS = (RuntimeError, ValueError, TypeError)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "input must be 4-D"),
        (lambda a: a.__setitem__(1, a[1][:1]), "channel_filter must have shape"),
        (lambda a: a.__setitem__(2, a[2][:, :4]), "spatial_filter must have shape"),
        (lambda a: a.__setitem__(3, 4), "kernel_size"),
        (lambda a: a.__setitem__(3, -1), "kernel_size"),
        (lambda a: a.__setitem__(4, 0), "dilation"),
        (lambda a: a.__setitem__(5, 0), "stride"),
        (lambda a: a.__setitem__(6, 3), "head"),
        (lambda a: a.__setitem__(7, 5), "combine"),
        (lambda a: a.__setitem__(1, a[1].double()), "channel_filter has dtype"),
        (lambda a: a.__setitem__(0, a[0].to(torch.int64)), "input must be a floating point"),
    ],
)
def test_raw_op_checks(mutate, msg):
    x, ch, sp = good()
    args = [x, ch, sp, K, 1, 1, 1, 0]
    mutate(args)
    with pytest.raises(RAW_ERRORS, match=msg):
        torch.ops.ddf.ddf_forward(*args)


def test_raw_op_head_not_dividing_c_with_matching_spatial_filter():
    """head=3 with C=4 and a spatial filter sized for 3 heads: the head check itself must fire."""
    x, ch, _ = good()
    sp = torch.randn(B, 3 * K * K, H, W)
    with pytest.raises(RAW_ERRORS, match="head=3 must divide"):
        torch.ops.ddf.ddf_forward(x, ch, sp, K, 1, 1, 3, 0)
    with pytest.raises(RAW_ERRORS, match="head=3 must divide"):
        torch.ops.ddf.ddf_backward(torch.randn(B, C, H, W), x, ch, sp, K, 1, 1, 3, 0)
    if C % 3:  # the C++ kernels check it too when called directly
        import ddf.backends.cpp as cpp

        assert cpp.load()
        with pytest.raises(RuntimeError, match="head=3 must divide"):
            torch.ops.ddf_cpp.forward(x, ch, sp, K, 1, 1, 3, 0, False, 1.0)


def test_spatial_norm_needs_k3():
    x = torch.randn(B, C, H, W)
    with pytest.raises(RAW_ERRORS, match="spatial_norm=True needs kernel_size >= 3"):
        ddf(x, torch.randn(B, C, 1, 1), torch.randn(B, 1, H, W), 1, spatial_norm=True)


def test_raw_backward_checks():
    x, ch, sp = good()
    with pytest.raises(RAW_ERRORS, match="grad_output"):
        torch.ops.ddf.ddf_backward(torch.randn(B, C, 3, 3), x, ch, sp, K, 1, 1, 1, 0)
    with pytest.raises(RAW_ERRORS, match="kernel_size"):
        torch.ops.ddf.ddf_backward(torch.randn(B, C, H, W), x, ch, sp, 2, 1, 1, 1, 0)
