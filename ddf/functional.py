"""Functional API of the DDF operation: argument checks and backend dispatch."""
from __future__ import annotations

import numbers

import torch

from . import _backend
from . import ops  # noqa: F401  (makes torch.ops.ddf.ddf_forward exist whenever `import ddf` succeeds)
from .reference import ddf_reference

__all__ = ["ddf", "check_ddf_args"]

_COMBINES = ("mul", "add")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ddf: {name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"ddf: {name} must be >= {minimum}, got {value}")
    return value


def check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine):
    """Validate the arguments of :func:`ddf`; raise TypeError/ValueError naming the argument.

    Returns the normalised ``(kernel_size, dilation, stride, head, kernel_combine)``.
    """
    for name, t in (("input", input), ("channel_filter", channel_filter), ("spatial_filter", spatial_filter)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ddf: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"ddf: {name} must be a floating point tensor (float32, float64, float16 or bfloat16), got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(f"ddf: {name} must be 4-D, got {t.dim()}-D tensor of shape {tuple(t.shape)}")
    for name, t in (("channel_filter", channel_filter), ("spatial_filter", spatial_filter)):
        if t.dtype != input.dtype:
            raise TypeError(f"ddf: {name} has dtype {t.dtype} but input has dtype {input.dtype}; they must match")
        if t.device != input.device:
            raise ValueError(f"ddf: {name} is on {t.device} but input is on {input.device}; they must be on one device")

    k = _check_int("kernel_size", kernel_size, 1)
    if k % 2 == 0:
        raise ValueError(f"ddf: kernel_size must be odd, got {k}")
    d = _check_int("dilation", dilation, 1)
    s = _check_int("stride", stride, 1)
    h = _check_int("head", head, 1)
    if not isinstance(kernel_combine, str) or kernel_combine not in _COMBINES:
        raise ValueError(f"ddf: kernel_combine must be one of {_COMBINES}, got {kernel_combine!r}")

    B, C, H, W = input.shape
    if C % h != 0:
        raise ValueError(f"ddf: head={h} must divide the number of input channels C={C}")
    expected_ch = (B, C, k, k)
    if tuple(channel_filter.shape) != expected_ch:
        raise ValueError(
            f"ddf: channel_filter must have shape (B, C, k, k) = {expected_ch}, got {tuple(channel_filter.shape)}"
        )
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    expected_sp = (B, h * k * k, Ho, Wo)
    if tuple(spatial_filter.shape) != expected_sp:
        raise ValueError(
            "ddf: spatial_filter must have shape (B, head*k*k, ceil(H/stride), ceil(W/stride)) = "
            f"{expected_sp}, got {tuple(spatial_filter.shape)}"
        )
    return k, d, s, h, kernel_combine


def ddf(
    input: torch.Tensor,
    channel_filter: torch.Tensor,
    spatial_filter: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    head=1,
    kernel_combine: str = "mul",
) -> torch.Tensor:
    """Decoupled dynamic filter operation.

    Args:
        input: ``(B, C, H, W)`` features.
        channel_filter: ``(B, C, k, k)`` per-channel filters (shared by all pixels).
        spatial_filter: ``(B, head*k*k, ceil(H/stride), ceil(W/stride))`` per-pixel filters
            (shared by the ``C/head`` channels of a head).
        kernel_size: odd ``k >= 1``.
        dilation, stride: integers ``>= 1``. Zero padding ``(k-1)*dilation/2``.
        head: number of spatial-filter heads; must divide ``C``. The original call form
            ``ddf(x, ch, sp, k, dilation, stride, 'mul')`` (combine in this slot) is accepted.
        kernel_combine: ``'mul'`` (spatial * channel) or ``'add'`` (spatial + channel).

    Returns:
        ``(B, C, ceil(H/stride), ceil(W/stride))`` tensor of the input's dtype and memory format.
    """
    if isinstance(head, str):  # legacy form: ddf(x, ch, sp, k, dilation, stride, 'mul')
        kernel_combine, head = head, 1
    k, d, s, h, combine = check_ddf_args(
        input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine
    )
    if _backend.use_compiled(input):
        return ops.ddf_op(input, channel_filter, spatial_filter, k, d, s, h, combine)
    return ddf_reference(input, channel_filter, spatial_filter, k, d, s, h, combine)
