"""The Triton backend of the DDF op: kernels (``kernels.py``), launchers (``launch.py``), AOT compile check
(``compile_check.py``).

On a GPU, :func:`forward`/:func:`backward` are the launchers themselves: called inside the op's body, their
``wrap_triton`` launches are visible to ``torch.compile``. Under Triton's interpreter (``TRITON_INTERPRET=1`` set
before ``import ddf``; CPU tensors) the kernels cannot be traced with fake tensors, so the launchers are wrapped in
opaque ops of their own, ``torch.ops.ddf_triton_interpreter.forward/backward``, with fake kernels that only
allocate: eager calls, ``torch.compile`` and ``opcheck`` then all run the interpreted kernels for real.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import _checks
from . import launch
from .launch import INTERPRET

__all__ = ["forward", "backward", "available", "interpreter_active"]


def available() -> Tuple[bool, str]:
    """Triton imported (this module would not import otherwise)."""
    import triton

    return True, f"triton {triton.__version__}"


def interpreter_active() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors only)."""
    return INTERPRET


def _define_interpreter_ops():
    @torch.library.custom_op("ddf_triton_interpreter::forward", mutates_args=())
    def interp_forward(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int,
                       dilation: int, stride: int, head: int, combine: int, spatial_norm: bool,
                       spatial_gain: float) -> Tensor:
        return launch.forward(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                              spatial_norm, spatial_gain)

    @interp_forward.register_fake
    def _(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm,
          spatial_gain):
        return _checks.empty_forward_output(input, stride)

    @torch.library.custom_op("ddf_triton_interpreter::backward", mutates_args=())
    def interp_backward(grad_output: Tensor, input: Tensor, channel_filter: Tensor, spatial_filter: Tensor,
                        kernel_size: int, dilation: int, stride: int, head: int, combine: int, spatial_norm: bool,
                        spatial_gain: float) -> tuple[Tensor, Tensor, Tensor]:
        return launch.backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                               head, combine, spatial_norm, spatial_gain)

    @interp_backward.register_fake
    def _(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
          spatial_norm, spatial_gain):
        return _checks.empty_backward_outputs(input, channel_filter, spatial_filter)

    return interp_forward, interp_backward


if INTERPRET:
    forward, backward = _define_interpreter_ops()
else:
    forward, backward = launch.forward, launch.backward
