"""A plain PyTorch pixel-adaptive convolution (PAC) baseline, written for this project.

This is **our own** unfold-based re-implementation of the idea of Su et al., "Pixel-Adaptive
Convolutional Neural Networks" (CVPR 2019), used only as the dynamic-filter baseline of the
latency/memory comparison (paper Table 2). It is *not* the original PAC code: the original has
a hand-written CUDA path and other options; numbers obtained with this module must be labelled
"PAC (our unfold baseline)".

For every output pixel ``i`` and every tap ``j`` of its ``k x k`` (dilated) window, a standard
convolution weight ``W[co, ci, j]`` is modulated by a fixed Gaussian kernel on guidance features::

    K(i, j) = exp(-0.5 * || f[:, i] - f[:, j] ||^2)          (sum over all guidance channels)
    out[b, co, i] = bias[co] + sum_{ci, j} K(i, j) * W[co, ci, j] * x[b, ci, j]

``x`` and ``f`` are zero padded by ``dilation * (k - 1) / 2``; padded taps contribute zero because
``x`` is zero there. The guidance defaults to the input itself (as in the paper's Table 2).
Memory cost: the unfolded input and guidance are ``(B, C * k * k, Ho * Wo)`` tensors, which is why
PAC is memory hungry compared with DDF.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["pac_conv2d", "pac_conv2d_naive", "PacConv2dBaseline"]


def _check(input: torch.Tensor, weight: torch.Tensor, guidance: torch.Tensor, kernel_size: int) -> None:
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError(f"pac_conv2d: input must be a 4-D tensor (B, C, H, W), got {getattr(input, 'shape', input)!r}")
    B, C, H, W = input.shape
    k = kernel_size
    if k < 1 or k % 2 == 0:
        raise ValueError(f"pac_conv2d: kernel_size must be odd and >= 1, got {k}")
    if weight.dim() != 4 or weight.shape[1:] != (C, k, k):
        raise ValueError(
            f"pac_conv2d: weight must have shape (C_out, C={C}, k={k}, k={k}), got {tuple(weight.shape)}"
        )
    if guidance.dim() != 4 or guidance.shape[0] != B or guidance.shape[2:] != (H, W):
        raise ValueError(
            f"pac_conv2d: guidance must have shape (B={B}, C_g, H={H}, W={W}), got {tuple(guidance.shape)}"
        )


def pac_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    guidance: Optional[torch.Tensor] = None,
    dilation: int = 1,
    stride: int = 1,
) -> torch.Tensor:
    """Pixel-adaptive convolution via ``F.unfold`` (see module docstring).

    Args:
        input: ``(B, C, H, W)``.
        weight: ``(C_out, C, k, k)`` with odd ``k``.
        bias: optional ``(C_out,)``.
        guidance: ``(B, C_g, H, W)`` adapting features; defaults to ``input``.
        dilation, stride: as in ``nn.Conv2d``; padding is ``dilation * (k - 1) / 2``.

    Returns:
        ``(B, C_out, ceil(H / stride), ceil(W / stride))``.
    """
    if guidance is None:
        guidance = input
    k = weight.shape[-1]
    _check(input, weight, guidance, k)
    B, C, H, W = input.shape
    kk = k * k
    pad = dilation * (k - 1) // 2
    Ho = (H + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    Wo = (W + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    L = Ho * Wo

    # Gaussian adapting kernel K: (B, 1, kk, L). The centre tap of each window is the pixel itself.
    cols_g = F.unfold(guidance, kernel_size=k, dilation=dilation, padding=pad, stride=stride)
    cols_g = cols_g.view(B, guidance.shape[1], kk, L)
    diff = cols_g - cols_g[:, :, kk // 2 : kk // 2 + 1, :]
    kernel = torch.exp(-0.5 * (diff * diff).sum(dim=1, keepdim=True))
    del cols_g, diff

    cols_x = F.unfold(input, kernel_size=k, dilation=dilation, padding=pad, stride=stride)
    modulated = (cols_x.view(B, C, kk, L) * kernel).view(B, C * kk, L)
    out = torch.matmul(weight.reshape(weight.shape[0], C * kk), modulated)  # (B, C_out, L)
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(B, weight.shape[0], Ho, Wo)


def pac_conv2d_naive(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    guidance: Optional[torch.Tensor] = None,
    dilation: int = 1,
    stride: int = 1,
) -> torch.Tensor:
    """Explicit-loop PAC (for tests only: very slow). Same arguments as :func:`pac_conv2d`."""
    if guidance is None:
        guidance = input
    k = weight.shape[-1]
    _check(input, weight, guidance, k)
    B, C, H, W = input.shape
    Co = weight.shape[0]
    r = (k - 1) // 2
    Ho = (H - 1) // stride + 1
    Wo = (W - 1) // stride + 1
    out = input.new_zeros(B, Co, Ho, Wo)
    for b in range(B):
        for yo in range(Ho):
            for xo in range(Wo):
                y, x = yo * stride, xo * stride
                acc = input.new_zeros(Co)
                for ky in range(k):
                    for kx in range(k):
                        yy = y + (ky - r) * dilation
                        xx = x + (kx - r) * dilation
                        if not (0 <= yy < H and 0 <= xx < W):
                            continue
                        d2 = ((guidance[b, :, y, x] - guidance[b, :, yy, xx]) ** 2).sum()
                        kval = math.exp(-0.5 * float(d2))
                        acc = acc + kval * (weight[:, :, ky, kx] @ input[b, :, yy, xx])
                if bias is not None:
                    acc = acc + bias
                out[b, :, yo, xo] = acc
    return out


class PacConv2dBaseline(nn.Module):
    """``nn.Conv2d``-like module running :func:`pac_conv2d` (our baseline, not the original PAC).

    ``forward(x, guidance=None)``: the guidance defaults to ``x``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
                 stride: int = 1, bias: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"PacConv2dBaseline: kernel_size must be odd and >= 1, got {kernel_size}")
        self.dilation = dilation
        self.stride = stride
        # Same parameterisation and initialisation as a standard convolution.
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pac_conv2d(x, self.weight, self.bias, guidance, self.dilation, self.stride)
