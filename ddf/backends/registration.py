"""The DDF op, registered once: ``torch.ops.ddf.ddf_forward`` and ``torch.ops.ddf.ddf_backward``.

Both are defined from Python with :func:`torch.library.triton_op` (one name and schema for every device). The op
body checks its arguments and calls the kernels that :func:`ddf.backends.choose` picks for the input's device:
the C++ CPU kernels (``torch.ops.ddf_cpp.*``, opaque to torch.compile, with their own fake kernels), the Triton
kernels (launched through ``wrap_triton``, so ``torch.compile`` sees and optimises them) or the reference. The body
is also the fake kernel (triton_op's rule), so ``torch.compile``/``torch.export`` trace it with fake tensors.

Autograd: the backward of ``ddf_forward`` is ``ddf_backward``; the backward of ``ddf_backward`` (double backward)
is computed through the differentiable reference (the op is linear in each input).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..reference import ddf_reference_backward
from . import choose, kernels

__all__ = ["ddf_forward", "ddf_backward"]

_N_ARGS = 7  # kernel_size, dilation, stride, head, combine, spatial_norm, spatial_gain


@torch.library.triton_op("ddf::ddf_forward", mutates_args=())
def ddf_forward(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int, dilation: int,
                stride: int, head: int, combine: int, spatial_norm: bool = False,
                spatial_gain: float = 1.0) -> Tensor:
    """DDF forward (see :func:`ddf.ddf`); ``combine`` 0 = mul, 1 = add."""
    _checks.check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                           spatial_norm, spatial_gain)
    name = choose(input.device)
    if name == "meta":
        return _checks.empty_forward_output(input, stride)
    return kernels(name).forward(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                                 combine, spatial_norm, spatial_gain)


@torch.library.triton_op("ddf::ddf_backward", mutates_args=())
def ddf_backward(grad_output: Tensor, input: Tensor, channel_filter: Tensor, spatial_filter: Tensor,
                 kernel_size: int, dilation: int, stride: int, head: int, combine: int, spatial_norm: bool = False,
                 spatial_gain: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ddf_forward` w.r.t. input, channel filter and (raw) spatial filter."""
    _checks.check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                           spatial_norm, spatial_gain)
    _checks.check_grad_output(grad_output, input, stride)
    name = choose(input.device)
    if name == "meta":
        return _checks.empty_backward_outputs(input, channel_filter, spatial_filter)
    return kernels(name).backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                                  stride, head, combine, spatial_norm, spatial_gain)


def _setup_forward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.args = inputs[3:]


def _backward(ctx, grad_output):
    input, channel_filter, spatial_filter = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not any(need[:3]):
        return (None,) * (3 + _N_ARGS)
    grads = torch.ops.ddf.ddf_backward(grad_output, input, channel_filter, spatial_filter, *ctx.args)
    return tuple(g if n else None for g, n in zip(grads, need[:3])) + (None,) * _N_ARGS


def _setup_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.args = inputs[4:]


def _double_backward(ctx, gg_input, gg_channel, gg_spatial):
    """Second-order gradients through the differentiable reference."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in saved]
        grads = ddf_reference_backward(*leaves, *ctx.args, create_graph=True)
        pairs = [(g, gg) for g, gg in zip(grads, (gg_input, gg_channel, gg_spatial)) if gg is not None]
        if not pairs:
            return (None,) * (4 + _N_ARGS)
        outs = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
    need = ctx.needs_input_grad
    return tuple(None if (g is None or not n) else g for g, n in zip(outs, need[:4])) + (None,) * _N_ARGS


ddf_forward.register_autograd(_backward, setup_context=_setup_forward)
ddf_backward.register_autograd(_double_backward, setup_context=_setup_backward)
