"""FLOP formula of the DDF op for ``torch.utils.flop_counter.FlopCounterMode``.

The paper (Sec. 4.1) counts the filter combination and application of one DDF op as
``3 * n * c * k**2`` FLOPs (``n`` output pixels, ``c`` channels, ``k`` filter size): per output
value and tap one combine (mul or add), one multiply with the input and one add. That is the
number :func:`ddf_flops` returns for ``torch.ops.ddf.ddf_forward``.

The formula can only be registered once the op exists (``torch.ops.ddf.ddf_forward`` is defined
by ``ddf.backends.registration``). :func:`register_ddf_flop_formula` does it at most once; ``import ddf``
calls it with ``strict=True`` so that a missing op is an error rather than a silent count of 0.

Note that ``FlopCounterMode`` counts a convolution's multiply-add as 2 FLOPs while the paper's
tables count it as 1 (multiply-adds); ``tables.py`` therefore reports ``conv/linear FLOPs / 2 +
DDF FLOPs`` (see :func:`paper_flops`).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

__all__ = ["ddf_flops", "ddf_op_packet", "register_ddf_flop_formula", "is_registered", "paper_flops", "model_flops",
           "DDFOpUnavailable"]

_registered = False


class DDFOpUnavailable(RuntimeError):
    """The custom op ``torch.ops.ddf.ddf_forward`` does not exist (its registration module is missing or broken)."""


def ddf_flops(input_shape, channel_filter_shape, spatial_filter_shape, kernel_size, *args,
              out_shape=None, **kwargs) -> int:
    """``3 * n * c * k**2`` with ``n = B * Ho * Wo`` output pixels (paper Sec. 4.1)."""
    k = int(kernel_size)
    if out_shape is not None:
        b, c, ho, wo = out_shape
    else:  # derive from the spatial filter (B, head*k*k, Ho, Wo) and the input (B, C, H, W)
        b, c = input_shape[0], input_shape[1]
        ho, wo = spatial_filter_shape[2], spatial_filter_shape[3]
    return 3 * int(b) * int(c) * int(ho) * int(wo) * k * k


def ddf_op_packet(import_ops: bool = True):
    """Return ``torch.ops.ddf.ddf_forward`` (importing its registration first); raise DDFOpUnavailable."""
    if import_ops:
        try:
            importlib.import_module("ddf.backends.registration")
        except ImportError as e:
            raise DDFOpUnavailable(
                "the DDF op is not available: `import ddf.backends.registration` failed "
                f"({type(e).__name__}: {e}). It defines torch.ops.ddf.ddf_forward; without it "
                "FLOPs of DDF layers cannot be counted.") from e
    try:
        return torch.ops.ddf.ddf_forward
    except (AttributeError, RuntimeError) as e:
        raise DDFOpUnavailable(
            "torch.ops.ddf.ddf_forward is not registered (its registration module defines no such op): "
            f"{e}") from e


def register_ddf_flop_formula(strict: bool = False) -> bool:
    """Register :func:`ddf_flops` for ``torch.ops.ddf.ddf_forward`` with FlopCounterMode, once.

    Returns True when the formula is registered. With ``strict=False`` a missing op returns False;
    with ``strict=True`` it raises :class:`DDFOpUnavailable` with the reason.
    Must run before the ``FlopCounterMode`` is constructed (it copies the registry).
    """
    global _registered
    if _registered:
        return True
    try:
        packet = ddf_op_packet(import_ops=strict)
    except DDFOpUnavailable:
        if strict:
            raise
        return False
    from torch.utils import flop_counter

    if packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(packet)(ddf_flops)
    _registered = True
    return True


def is_registered() -> bool:
    return _registered


def paper_flops(flop_counts: Dict, ddf_packet: Optional[object] = None) -> Dict[str, int]:
    """Split ``FlopCounterMode.get_flop_counts()['Global']`` into the paper's convention.

    Returns ``{'conv_linear_macs': ..., 'ddf': ..., 'total': ...}`` where conv/linear FLOPs (2 per
    multiply-add in FlopCounterMode) are halved and DDF FLOPs (already ``3nck^2``) are kept.
    """
    if ddf_packet is None:
        try:
            ddf_packet = torch.ops.ddf.ddf_forward
        except (AttributeError, RuntimeError):
            ddf_packet = None
    ddf = 0
    other = 0
    for op, count in flop_counts.items():
        if ddf_packet is not None and (op is ddf_packet or str(op) == str(ddf_packet)):
            ddf += int(count)
        else:
            other += int(count)
    macs = other // 2
    return {"conv_linear_macs": macs, "ddf": ddf, "total": macs + ddf}


def model_flops(model: torch.nn.Module, input_size) -> Dict[str, int]:
    """:func:`paper_flops` of one eval-mode forward of ``model`` on a ``(1, *input_size)`` input, counted on the
    meta device: the parameters and buffers are swapped for meta tensors of the same shapes through
    ``torch.func.functional_call``, so nothing is computed, whatever the size, and the model is not copied.
    Raises whatever the forward raises on meta tensors (e.g. a module holding a plain tensor attribute)."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tensors = {name: torch.empty_like(t, device="meta") for name, t in named}
    dtype = next((t.dtype for _, t in named if t.is_floating_point()), torch.float32)
    x = torch.empty((1, *[int(n) for n in input_size]), device="meta", dtype=dtype)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            functional_call(model, tensors, (x,), strict=False)
    finally:
        model.train(was_training)
    return paper_flops(counter.get_flop_counts().get("Global", {}))
