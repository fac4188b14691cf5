"""Plain PyTorch reference implementation of the DDF operation.

This is the ground truth every backend is tested against, and the kernel of the ``reference`` backend. It is
written for readability, not speed: it materialises the unfolded input (B, C, k*k, Ho*Wo).

    out[b, c, y, x] = sum_j  sp[b, head(c)*k*k + j, y, x]  (*|+)  ch[b, c, j]
                             * in[b, c, y*s + (jy - (k-1)/2)*d, x*s + (jx - (k-1)/2)*d]

with zero padding outside the image. A tap that falls on the padding is skipped: it contributes exactly 0 even
when the filter value there is Inf/NaN. With ``spatial_norm=True`` the spatial filter holds raw taps that are
first normalised per (b, head, pixel) by :func:`spatial_filter_norm` (FilterNorm, paper Eq. 3).
Half-precision inputs are computed in float32 and cast back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import COMBINE_NAMES, FILTER_NORM_EPS, memory_format_of, out_size

__all__ = ["ddf_reference", "ddf_reference_backward", "spatial_filter_norm", "filter_norm"]


def _unbiased_std(centred: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std over ``dim`` of an already centred tensor (keepdim). Written out because ``Tensor.std`` over a
    short dimension (the 9 taps of a 3x3 filter) is ~7x slower on CPU than these two reductions, and its backward
    slower still."""
    n = centred.shape[dim]
    return ((centred * centred).sum(dim=dim, keepdim=True) / (n - 1)).sqrt()


def filter_norm(x: torch.Tensor, dim: int, eps: float = FILTER_NORM_EPS) -> torch.Tensor:
    """(x - mean) / (unbiased std + eps) over ``dim`` (paper Eq. 3 without the scale), in x's dtype."""
    x = x - x.mean(dim=dim, keepdim=True)
    return x / (_unbiased_std(x, dim) + eps)


def spatial_filter_norm(spatial_filter: torch.Tensor, head: int, kernel_size: int, gain: float = 1.0) -> torch.Tensor:
    """FilterNorm of a spatial filter (B, head*k*k, H, W): each pixel's k*k taps of a head, times ``gain``."""
    b, _, h, w = spatial_filter.shape
    kk = kernel_size * kernel_size
    y = filter_norm(spatial_filter.reshape(b, head, kk, h, w), dim=2)
    return y.reshape(b, head * kk, h, w) * gain


def _combine_name(kernel_combine):
    return COMBINE_NAMES[kernel_combine] if isinstance(kernel_combine, int) else kernel_combine


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _prepare(input, channel_filter, spatial_filter, k, dilation, stride, head, spatial_norm, spatial_gain):
    """Unfolded input (B, head, C/head, kk, Ho, Wo), filters broadcastable to it, and the in-image tap mask."""
    B, C, H, W = input.shape
    kk = k * k
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    dtype = _compute_dtype(input)
    x = input.to(dtype)
    sp = spatial_filter.to(dtype)
    if spatial_norm:
        sp = spatial_filter_norm(sp, head, k, spatial_gain)
    pad = (k - 1) * dilation // 2
    unfold = dict(kernel_size=k, dilation=dilation, padding=pad, stride=stride)
    cols = F.unfold(x, **unfold).view(B, head, C // head, kk, Ho, Wo)
    valid = F.unfold(torch.ones((1, 1, H, W), dtype=dtype, device=x.device), **unfold).view(1, 1, 1, kk, Ho, Wo) > 0
    sp = sp.reshape(B, head, 1, kk, Ho, Wo)
    ch = channel_filter.to(dtype).reshape(B, head, C // head, kk, 1, 1)
    return cols, ch, sp, valid


def _empty_result(input, channel_filter, spatial_filter, stride):
    B, C, H, W = input.shape
    out = torch.zeros((B, C, out_size(H, stride), out_size(W, stride)), dtype=input.dtype, device=input.device)
    return out.contiguous(memory_format=memory_format_of(input))


def ddf_reference(
    input: torch.Tensor,
    channel_filter: torch.Tensor,
    spatial_filter: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    head: int = 1,
    kernel_combine="mul",
    spatial_norm: bool = False,
    spatial_gain: float = 1.0,
) -> torch.Tensor:
    """Reference DDF. Arguments are assumed valid (see :func:`ddf.ddf` for checks); differentiable.

    ``kernel_combine`` is ``'mul'``/``'add'`` or its op code 0/1. The output keeps the input's memory format.
    """
    if input.numel() == 0 or spatial_filter.numel() == 0:
        return _empty_result(input, channel_filter, spatial_filter, stride)
    B, C = input.shape[:2]
    cols, ch, sp, valid = _prepare(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                                   spatial_norm, spatial_gain)
    filt = sp * ch if _combine_name(kernel_combine) == "mul" else sp + ch
    filt = torch.where(valid, filt, torch.zeros((), dtype=filt.dtype, device=filt.device))
    out = (cols * filt).sum(dim=3).reshape(B, C, cols.shape[-2], cols.shape[-1]).to(input.dtype)
    return out.contiguous(memory_format=memory_format_of(input))


def _filter_norm_backward(raw: torch.Tensor, grad: torch.Tensor, dim: int, gain: float,
                          eps: float = FILTER_NORM_EPS) -> torch.Tensor:
    """Gradient w.r.t. ``raw`` of ``gain * (raw - mean) / (unbiased std + eps)`` over ``dim``, given ``grad``.

    d/dx_i = gain * [(g_i - mean(g)) / (std + eps) - (x_i - mean) * sum_j g_j (x_j - mean) / ((n-1) std (std + eps)^2)]
    (the second term is 0 where std == 0, as for a constant filter).
    """
    n = raw.shape[dim]
    centred = raw - raw.mean(dim=dim, keepdim=True)
    std = _unbiased_std(centred, dim)
    g = grad * gain
    first = (g - g.mean(dim=dim, keepdim=True)) / (std + eps)
    coef = (g * centred).sum(dim=dim, keepdim=True) / ((n - 1) * std * (std + eps) ** 2)
    coef = torch.where(std > 0, coef, torch.zeros((), dtype=coef.dtype, device=coef.device))
    return first - centred * coef


def _explicit_backward(grad_output, input, channel_filter, spatial_filter, k, dilation, stride, head, combine,
                       spatial_norm, spatial_gain):
    """Closed-form gradients (float32/float64 compute); see :func:`ddf_reference_backward`."""
    B, C, H, W = input.shape
    kk = k * k
    dtype = _compute_dtype(input)
    cols, ch, sp, valid = _prepare(input, channel_filter, spatial_filter, k, dilation, stride, head, spatial_norm,
                                   spatial_gain)
    Ho, Wo = cols.shape[-2:]
    zero = torch.zeros((), dtype=dtype, device=input.device)
    go = grad_output.to(dtype).reshape(B, head, C // head, 1, Ho, Wo)
    filt = torch.where(valid, sp * ch if combine == "mul" else sp + ch, zero)
    pad = (k - 1) * dilation // 2
    gcols = (go * filt).reshape(B, C * kk, Ho * Wo)
    grad_input = F.fold(gcols, output_size=(H, W), kernel_size=k, dilation=dilation, padding=pad, stride=stride)
    gfilt = go * cols  # (B, head, Cg, kk, Ho, Wo); 0 on padded taps (cols is 0 there)
    if combine == "mul":
        grad_spatial = torch.where(valid, gfilt * ch, zero).sum(dim=2)
        grad_channel = (gfilt * sp).masked_fill(~valid, 0).sum(dim=(4, 5))
    else:
        grad_spatial = gfilt.sum(dim=2)
        grad_channel = gfilt.sum(dim=(4, 5))
    if spatial_norm:  # gradient w.r.t. the raw taps
        raw = spatial_filter.to(dtype).reshape(B, head, kk, Ho, Wo)
        grad_spatial = _filter_norm_backward(raw, grad_spatial, dim=2, gain=spatial_gain)
    return grad_input, grad_channel.reshape(B, C, k, k), grad_spatial.reshape(B, head * kk, Ho, Wo)


def ddf_reference_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    channel_filter: torch.Tensor,
    spatial_filter: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    head: int = 1,
    kernel_combine="mul",
    spatial_norm: bool = False,
    spatial_gain: float = 1.0,
    create_graph: bool = False,
):
    """Gradients of :func:`ddf_reference` w.r.t. input, channel filter and (raw) spatial filter.

    By default closed-form (usable inside the op, where autograd does not record). With ``create_graph=True`` the
    caller passes tensors that require grad and gets gradients computed by autograd through the reference, which
    are differentiable again (double backward). Gradients keep the op's layout rule: grad_input follows the
    input's memory format, grad_spatial the spatial filter's, grad_channel is contiguous.
    """
    tensors = (input, channel_filter, spatial_filter)
    combine = _combine_name(kernel_combine)
    if input.numel() == 0 or spatial_filter.numel() == 0:
        grads = [torch.zeros_like(t) for t in tensors]
    elif create_graph:
        out = ddf_reference(*tensors, kernel_size, dilation, stride, head, combine, spatial_norm, spatial_gain)
        grads = torch.autograd.grad(out, tensors, grad_output, allow_unused=True, create_graph=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
    else:
        grads = _explicit_backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                   head, combine, spatial_norm, spatial_gain)
    gin, gch, gsp = (g.to(input.dtype) for g in grads)
    return (gin.contiguous(memory_format=memory_format_of(input)), gch.contiguous(),
            gsp.contiguous(memory_format=memory_format_of(spatial_filter)))
