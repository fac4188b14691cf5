"""The DDF custom ops ``torch.ops.ddf.ddf_forward`` / ``torch.ops.ddf.ddf_backward``.

On import this module makes sure both ops exist:

1. the prebuilt extension ``ddf._C`` (``pip install --no-build-isolation -e .``) is imported; it defines the
   schema and the C++ CPU (and, when built with CUDA, CUDA) kernels;
2. otherwise the same sources (shipped in ``ddf/csrc``) are JIT-compiled with
   ``torch.utils.cpp_extension.load`` and cached (disable with ``DDF_JIT=0``);
3. if that fails too, the schema is defined from Python with kernels implemented by the plain PyTorch
   reference, and one warning says why and how to build.

In every case the fake (meta) implementations and the autograd formula are registered here, so
``torch.compile(fullgraph=True)``, ``torch.library.opcheck`` and FLOP counting work with either kernel set.
"""
from __future__ import annotations

import os
import warnings

import torch

from .reference import ddf_reference, ddf_reference_backward

__all__ = ["ddf_op", "compiled_available", "cuda_kernels_available", "info", "COMBINES"]

COMBINES = {"mul": 0, "add": 1}
_COMBINE_NAMES = {v: k for k, v in COMBINES.items()}

FORWARD_SCHEMA = (
    "ddf_forward(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, "
    "int stride, int head, int combine) -> Tensor"
)
BACKWARD_SCHEMA = (
    "ddf_backward(Tensor grad_output, Tensor input, Tensor channel_filter, Tensor spatial_filter, "
    "int kernel_size, int dilation, int stride, int head, int combine) -> (Tensor, Tensor, Tensor)"
)

_SRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; CUDA kernels also need "
    "CUDA_HOME), or let it JIT-compile on import (needs a C++ compiler and ninja; DDF_JIT=1)"
)

_state = {"kind": None, "where": "", "cuda": False, "reason": "", "module": None}


def _op_exists() -> bool:
    try:
        torch.ops.ddf.ddf_forward  # noqa: B018
        torch.ops.ddf.ddf_backward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_prebuilt():
    from . import _C  # noqa: F401  (registers the ops)

    return _C


def _load_jit(verbose: bool = False):
    from torch.utils import cpp_extension

    sources = [os.path.join(_SRC_DIR, "ddf.cpp")]
    cflags = ["-O3"] if os.name == "nt" else ["-O3", "-fopenmp-simd"]
    with_cuda = (
        torch.cuda.is_available()
        and cpp_extension.CUDA_HOME is not None
        and os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h"))
        and os.environ.get("DDF_BUILD_CUDA", "1") != "0"
    )
    if with_cuda:
        sources.append(os.path.join(_SRC_DIR, "ddf_cuda.cu"))
        cflags.append("-DDDF_WITH_CUDA")
    return cpp_extension.load(
        name="ddf_C_jit_cuda" if with_cuda else "ddf_C_jit",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-DDDF_WITH_CUDA"],
        extra_include_paths=[_SRC_DIR],
        with_cuda=with_cuda,
        verbose=verbose,
    )


def _define_reference_ops():
    """Define the schema from Python, kernels = the plain PyTorch reference (CPU and CUDA)."""
    lib = torch.library.Library("ddf", "DEF")
    lib.define(FORWARD_SCHEMA)
    lib.define(BACKWARD_SCHEMA)

    def forward_impl(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine):
        _check_op_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine)
        return ddf_reference(
            input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, _COMBINE_NAMES[combine]
        )

    def backward_impl(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                      combine):
        _check_op_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine)
        B, C, H, W = input.shape
        expected = (B, C, (H - 1) // stride + 1, (W - 1) // stride + 1)
        if not isinstance(grad_output, torch.Tensor) or tuple(grad_output.shape) != expected:
            got = tuple(grad_output.shape) if isinstance(grad_output, torch.Tensor) else type(grad_output).__name__
            raise ValueError(f"ddf: grad_output must have shape (B, C, Ho, Wo) = {expected}, got {got}")
        if grad_output.dtype != input.dtype or grad_output.device != input.device:
            raise TypeError("ddf: grad_output must have the dtype and device of input")
        return ddf_reference_backward(
            grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
            _COMBINE_NAMES[combine],
        )

    for key in ("CPU", "CUDA"):
        lib.impl("ddf_forward", forward_impl, key)
        lib.impl("ddf_backward", backward_impl, key)
    return lib


def _check_op_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine):
    """Checks for direct torch.ops.ddf.* calls on the Python-defined ops (mirror of the C++ TORCH_CHECKs)."""
    from .functional import check_ddf_args

    if combine not in _COMBINE_NAMES:
        raise ValueError(f"ddf: combine must be 0 ('mul') or 1 ('add'), got {combine!r}")
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                   _COMBINE_NAMES[combine])


def _init():
    if _op_exists():  # e.g. the module was reloaded
        _state.update(kind="compiled", where="already registered")
        return
    errors = []
    try:
        mod = _load_prebuilt()
        _state.update(kind="compiled", where="ddf._C", cuda=bool(mod.cuda_built()), module=mod)
        return
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        errors.append(f"prebuilt ddf._C not importable ({exc})")
    if os.environ.get("DDF_JIT", "1") != "0":
        try:
            mod = _load_jit(verbose=os.environ.get("DDF_JIT_VERBOSE", "0") == "1")
            _state.update(kind="compiled", where=f"JIT {mod.__name__}", cuda=bool(mod.cuda_built()), module=mod)
            return
        except Exception as exc:  # compiler / ninja missing, build error
            first = str(exc).strip().splitlines()
            errors.append(f"JIT build failed ({type(exc).__name__}: {first[-1] if first else ''})")
    else:
        errors.append("JIT disabled by DDF_JIT=0")
    _state["lib"] = _define_reference_ops()
    _state.update(kind="reference-op", where="python", cuda=False, reason="; ".join(errors))
    warnings.warn(
        "ddf: the compiled DDF extension is unavailable, torch.ops.ddf.* run the slow PyTorch reference. "
        f"Reason: {_state['reason']}. To fix: {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


_init()


# ----------------------------------------------------------------------------------------------- fake + autograd
def _memory_format(t: torch.Tensor):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("ddf::ddf_forward")
def _forward_fake(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine):
    torch._check(input.dim() == 4, lambda: f"ddf: input must be 4-D, got {input.dim()}-D")
    torch._check(channel_filter.dtype == input.dtype, lambda: "ddf: channel_filter dtype must match input")
    torch._check(spatial_filter.dtype == input.dtype, lambda: "ddf: spatial_filter dtype must match input")
    B, C, H, W = input.shape
    Ho = (H - 1) // stride + 1
    Wo = (W - 1) // stride + 1
    return torch.empty(
        (B, C, Ho, Wo), dtype=input.dtype, device=input.device, memory_format=_memory_format(input)
    )


@torch.library.register_fake("ddf::ddf_backward")
def _backward_fake(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine):
    gin = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(input))
    gch = torch.empty(channel_filter.shape, dtype=input.dtype, device=input.device)
    gsp = torch.empty(
        spatial_filter.shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(spatial_filter)
    )
    return gin, gch, gsp


def _setup_context(ctx, inputs, output):
    input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine = inputs
    ctx.save_for_backward(input, channel_filter, spatial_filter)
    ctx.args = (kernel_size, dilation, stride, head, combine)


def _backward(ctx, grad_output):
    input, channel_filter, spatial_filter = ctx.saved_tensors
    gin, gch, gsp = torch.ops.ddf.ddf_backward(grad_output, input, channel_filter, spatial_filter, *ctx.args)
    need = ctx.needs_input_grad
    return (gin if need[0] else None, gch if need[1] else None, gsp if need[2] else None,
            None, None, None, None, None)


torch.library.register_autograd("ddf::ddf_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------- public API
def compiled_available() -> bool:
    """True when torch.ops.ddf.* run the compiled C++ kernels."""
    return _state["kind"] == "compiled"


def cuda_kernels_available() -> bool:
    """True when the compiled extension contains the CUDA kernels."""
    return compiled_available() and _state["cuda"]


def info() -> str:
    """Where the ops come from, e.g. ``compiled (ddf._C, cpu+cuda kernels)``."""
    if compiled_available():
        return f"compiled ({_state['where']}, {'cpu+cuda' if _state['cuda'] else 'cpu'} kernels)"
    return f"reference (torch.ops.ddf defined from Python, kernels = PyTorch reference; {_state['reason']})"


def unavailable_reason() -> str:
    return _state["reason"]


def ddf_op(input, channel_filter, spatial_filter, kernel_size, dilation=1, stride=1, head=1, kernel_combine="mul"):
    """Call ``torch.ops.ddf.ddf_forward`` (no argument checks beyond the op's own; see :func:`ddf.ddf`)."""
    return torch.ops.ddf.ddf_forward(
        input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, COMBINES[kernel_combine]
    )
