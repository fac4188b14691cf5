"""The ``reference`` backend: the plain PyTorch implementation behind the op's launcher interface."""
from __future__ import annotations

from ..reference import ddf_reference, ddf_reference_backward

__all__ = ["forward", "backward"]


def forward(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm,
            spatial_gain):
    return ddf_reference(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                         spatial_norm, spatial_gain)


def backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
             spatial_norm, spatial_gain):
    return ddf_reference_backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                  head, combine, spatial_norm, spatial_gain)
