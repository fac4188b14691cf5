"""The one Python checker of the DDF op: argument checks, output size, layout rule, combine codes.

Used by the functional API (:func:`ddf.ddf`), the op body (direct ``torch.ops.ddf.*`` calls), the modules and
every backend, so that one rule holds everywhere. The C++ kernels mirror it in ``ddf/csrc/ddf_common.h``.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["COMBINES", "COMBINE_NAMES", "FILTER_NORM_EPS", "out_size", "use_channels_last", "memory_format_of",
           "check_int", "check_choice", "combine_code", "check_ddf_args", "check_grad_output",
           "empty_forward_output", "empty_backward_outputs"]

#: kernel_combine name -> integer code used in the op schema
COMBINES = {"mul": 0, "add": 1}
COMBINE_NAMES = {v: k for k, v in COMBINES.items()}
#: eps of FilterNorm (paper Eq. 3): (x - mean) / (std + eps)
FILTER_NORM_EPS = 1e-10


def out_size(n: int, stride: int) -> int:
    """Output size of a strided dimension of size ``n``: ``ceil(n / stride)``; an empty dimension stays empty."""
    return (n + stride - 1) // stride  # no branch: exact for symbolic sizes (torch.compile dynamic=True) and n = 0


def use_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` is processed (and its result returned) in channels_last layout."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if use_channels_last(t) else torch.contiguous_format


def check_int(owner: str, name: str, value, minimum: int, odd: bool = False) -> int:
    """``value`` as an int >= ``minimum`` (odd if asked); TypeError/ValueError naming ``owner: name``."""
    if type(value) is not int:  # plain ints (every call from the modules) skip the slow ABC checks
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{owner}: {name} must be an integer, got {type(value).__name__} {value!r}")
        value = int(value)
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{owner}: {name} must be odd, got {value}")
    return value


def check_choice(owner: str, name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def combine_code(kernel_combine) -> int:
    """'mul'/'add' (or their codes 0/1) -> code; ValueError otherwise."""
    if isinstance(kernel_combine, str) and kernel_combine in COMBINES:
        return COMBINES[kernel_combine]
    if type(kernel_combine) is int and kernel_combine in COMBINE_NAMES:  # the op's own codes: fast path
        return kernel_combine
    if not isinstance(kernel_combine, bool) and isinstance(kernel_combine, numbers.Integral) \
            and int(kernel_combine) in COMBINE_NAMES:
        return int(kernel_combine)
    raise ValueError(f"ddf: kernel_combine must be one of {tuple(COMBINES)} (codes 0/1 in the op), "
                     f"got {kernel_combine!r}")


def _check_tensors(input, channel_filter, spatial_filter) -> None:
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


def check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine,
                   spatial_norm: bool = False, spatial_gain: float = 1.0):
    """Validate the arguments of the DDF op; raise TypeError/ValueError naming the argument.

    Returns the normalised ``(kernel_size, dilation, stride, head, combine_code)``.
    """
    _check_tensors(input, channel_filter, spatial_filter)
    k = check_int("ddf", "kernel_size", kernel_size, 1, odd=True)
    d = check_int("ddf", "dilation", dilation, 1)
    s = check_int("ddf", "stride", stride, 1)
    h = check_int("ddf", "head", head, 1)
    combine = combine_code(kernel_combine)
    if not isinstance(spatial_norm, bool):
        raise TypeError(f"ddf: spatial_norm must be a bool, got {type(spatial_norm).__name__} {spatial_norm!r}")
    if spatial_norm and k < 3:
        raise ValueError(f"ddf: spatial_norm=True needs kernel_size >= 3 (the std over a single tap is undefined), "
                         f"got {k}")
    if type(spatial_gain) is not float and (isinstance(spatial_gain, bool)
                                            or not isinstance(spatial_gain, numbers.Real)):
        raise TypeError(f"ddf: spatial_gain must be a real number, got {type(spatial_gain).__name__}")

    B, C, H, W = input.shape
    if C % h != 0:
        raise ValueError(f"ddf: head={h} must divide the number of input channels C={C}")
    expected_ch = (B, C, k, k)
    if tuple(channel_filter.shape) != expected_ch:
        raise ValueError(
            f"ddf: channel_filter must have shape (B, C, k, k) = {expected_ch}, got {tuple(channel_filter.shape)}"
        )
    expected_sp = (B, h * k * k, out_size(H, s), out_size(W, s))
    if tuple(spatial_filter.shape) != expected_sp:
        raise ValueError(
            "ddf: spatial_filter must have shape (B, head*k*k, ceil(H/stride), ceil(W/stride)) = "
            f"{expected_sp}, got {tuple(spatial_filter.shape)}"
        )
    return k, d, s, h, combine


def check_grad_output(grad_output, input, stride: int) -> None:
    """grad_output of ``ddf_backward``: a tensor of shape (B, C, Ho, Wo), the input's dtype and device."""
    B, C, H, W = input.shape
    expected = (B, C, out_size(H, stride), out_size(W, stride))
    if not isinstance(grad_output, torch.Tensor) or tuple(grad_output.shape) != expected:
        got = tuple(grad_output.shape) if isinstance(grad_output, torch.Tensor) else type(grad_output).__name__
        raise ValueError(f"ddf: grad_output must have shape (B, C, Ho, Wo) = {expected}, got {got}")
    if grad_output.dtype != input.dtype or grad_output.device != input.device:
        raise TypeError(f"ddf: grad_output must have the dtype and device of input ({input.dtype}, {input.device}), "
                        f"got ({grad_output.dtype}, {grad_output.device})")


def empty_forward_output(input: torch.Tensor, stride: int) -> torch.Tensor:
    """Uninitialised op output (B, C, Ho, Wo) in the input's dtype, device and memory format."""
    B, C, H, W = input.shape
    return torch.empty((B, C, out_size(H, stride), out_size(W, stride)), dtype=input.dtype, device=input.device,
                       memory_format=memory_format_of(input))


def empty_backward_outputs(input: torch.Tensor, channel_filter: torch.Tensor, spatial_filter: torch.Tensor):
    """Uninitialised (grad_input, grad_channel, grad_spatial) with the op's layout rule."""
    gin = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format_of(input))
    gch = torch.empty(channel_filter.shape, dtype=input.dtype, device=input.device)
    gsp = torch.empty(spatial_filter.shape, dtype=input.dtype, device=input.device,
                      memory_format=memory_format_of(spatial_filter))
    return gin, gch, gsp
