"""Plain PyTorch reference implementation of the DDF operation.

This is the ground truth every compiled backend is tested against, and the
fallback used when no compiled extension is available. It is written for
readability, not speed: it materialises the unfolded input (B, C, k*k, Ho*Wo).

    out[b, c, y, x] = sum_j  sp[b, head(c)*k*k + j, y, x]  (*|+)  ch[b, c, j]
                             * in[b, c, y*s + (jy - (k-1)/2)*d, x*s + (jx - (k-1)/2)*d]

with zero padding outside the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ddf_reference", "ddf_reference_backward"]


def ddf_reference(
    input: torch.Tensor,
    channel_filter: torch.Tensor,
    spatial_filter: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    head: int = 1,
    kernel_combine: str = "mul",
) -> torch.Tensor:
    """Reference DDF. Arguments are assumed valid (see :func:`ddf.ddf` for checks).

    Half-precision inputs are computed in float32 and cast back.
    """
    B, C, H, W = input.shape
    k = kernel_size
    kk = k * k
    Ho = (H - 1) // stride + 1
    Wo = (W - 1) // stride + 1
    out_dtype = input.dtype
    compute_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(compute_dtype)
    ch = channel_filter.to(compute_dtype)
    sp = spatial_filter.to(compute_dtype)

    pad = (k - 1) * dilation // 2
    cols = F.unfold(x, kernel_size=k, dilation=dilation, padding=pad, stride=stride)
    cols = cols.view(B, head, C // head, kk, Ho, Wo)
    sp = sp.reshape(B, head, 1, kk, Ho, Wo)
    ch = ch.reshape(B, head, C // head, kk, 1, 1)
    if kernel_combine == "mul":
        filt = sp * ch
    else:
        filt = sp + ch
    out = (cols * filt).sum(dim=3).reshape(B, C, Ho, Wo)
    out = out.to(out_dtype)
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _memory_format(t: torch.Tensor):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def ddf_reference_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    channel_filter: torch.Tensor,
    spatial_filter: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    head: int = 1,
    kernel_combine: str = "mul",
):
    """Explicit (autograd-free) gradients of :func:`ddf_reference` w.r.t. input, channel and spatial filter.

    Used as the kernel of ``torch.ops.ddf.ddf_backward`` when the compiled extension is unavailable.
    Gradients keep the layout rule of the compiled op: grad_input follows the input's memory format,
    grad_spatial the spatial filter's, grad_channel is contiguous.
    """
    B, C, H, W = input.shape
    k = kernel_size
    kk = k * k
    Ho = (H - 1) // stride + 1
    Wo = (W - 1) // stride + 1
    out_dtype = input.dtype
    compute_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(compute_dtype)
    go = grad_output.to(compute_dtype).reshape(B, head, C // head, 1, Ho, Wo)
    ch = channel_filter.to(compute_dtype).reshape(B, head, C // head, kk, 1, 1)
    sp = spatial_filter.to(compute_dtype).reshape(B, head, 1, kk, Ho, Wo)
    pad = (k - 1) * dilation // 2
    cols = F.unfold(x, kernel_size=k, dilation=dilation, padding=pad, stride=stride).view(B, head, C // head, kk, Ho, Wo)
    filt = sp * ch if kernel_combine == "mul" else sp + ch
    gcols = (go * filt).reshape(B, C * kk, Ho * Wo)
    grad_input = F.fold(gcols, output_size=(H, W), kernel_size=k, dilation=dilation, padding=pad, stride=stride)
    gfilt = go * cols  # (B, head, Cg, kk, Ho, Wo)
    if kernel_combine == "mul":
        grad_spatial = (gfilt * ch).sum(dim=2)
        grad_channel = (gfilt * sp).sum(dim=(4, 5))
    else:
        grad_spatial = gfilt.sum(dim=2)
        grad_channel = gfilt.sum(dim=(4, 5))
    grad_input = grad_input.to(out_dtype).contiguous(memory_format=_memory_format(input))
    grad_channel = grad_channel.reshape(B, C, k, k).to(out_dtype).contiguous()
    grad_spatial = (
        grad_spatial.reshape(B, head * kk, Ho, Wo).to(out_dtype).contiguous(memory_format=_memory_format(spatial_filter))
    )
    return grad_input, grad_channel, grad_spatial
