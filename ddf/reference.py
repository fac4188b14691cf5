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

__all__ = ["ddf_reference"]


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
