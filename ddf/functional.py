"""Functional API of the DDF operation: argument checks, then the op ``torch.ops.ddf.ddf_forward``."""
from __future__ import annotations

import torch

from . import _checks
from .backends import registration  # noqa: F401  (defines torch.ops.ddf.ddf_forward / ddf_backward)

__all__ = ["ddf"]


def ddf(
    input: torch.Tensor,
    channel_filter: torch.Tensor,
    spatial_filter: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    head=1,
    kernel_combine: str = "mul",
    spatial_norm: bool = False,
    spatial_gain: float = 1.0,
) -> torch.Tensor:
    """Decoupled dynamic filter operation.

    Args:
        input: ``(B, C, H, W)`` features.
        channel_filter: ``(B, C, k, k)`` per-channel filters (shared by all pixels).
        spatial_filter: ``(B, head*k*k, ceil(H/stride), ceil(W/stride))`` per-pixel filters
            (shared by the ``C/head`` channels of a head).
        kernel_size: odd ``k >= 1``.
        dilation, stride: integers ``>= 1``. Zero padding ``(k-1)*dilation/2``; a tap on the padding contributes 0.
        head: number of spatial-filter heads; must divide ``C``. The original call form
            ``ddf(x, ch, sp, k, dilation, stride, 'mul')`` (combine in this slot) is accepted.
        kernel_combine: ``'mul'`` (spatial * channel) or ``'add'`` (spatial + channel).
        spatial_norm: ``True``: ``spatial_filter`` holds raw taps that the kernels normalise per pixel and head
            (FilterNorm, paper Eq. 3: ``spatial_gain * (sp - mean) / (unbiased std + 1e-10)`` over the ``k*k``
            taps) before applying them; the normalised filter never exists in memory. Needs ``k >= 3``.
        spatial_gain: scale of the fused FilterNorm (``calculate_gain(nonlinearity) / k`` in DDFPack).

    Returns:
        ``(B, C, ceil(H/stride), ceil(W/stride))`` tensor of the input's dtype and memory format.
    """
    if isinstance(head, str):  # legacy form: ddf(x, ch, sp, k, dilation, stride, 'mul')
        kernel_combine, head = head, 1
    k, d, s, h, combine = _checks.check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                                 head, kernel_combine, spatial_norm, spatial_gain)
    return torch.ops.ddf.ddf_forward(input, channel_filter, spatial_filter, k, d, s, h, combine, spatial_norm,
                                     float(spatial_gain))
