"""The C++ CPU kernels: ``torch.ops.ddf_cpp.forward`` / ``backward`` from ``ddf._C`` (prebuilt) or a JIT build.

Loaded lazily, on the first CPU call (so ``import ddf`` stays fast):

1. the prebuilt extension ``ddf._C`` (built by ``pip install --no-build-isolation -e .`` or a wheel build with
   torch visible) is imported;
2. otherwise the shipped sources ``ddf/csrc`` are JIT-compiled once with ``torch.utils.cpp_extension.load``
   (needs a C++ compiler and ninja; announced on stderr with its duration; cached by torch in
   ``TORCH_EXTENSIONS_DIR``); ``DDF_JIT=0`` disables it;
3. if both fail, :func:`load` returns False and :func:`unavailable_reason` says why; ``auto`` then runs the
   PyTorch reference on CPU with one warning.
"""
from __future__ import annotations

import os
import runpy
import shutil
import sys
import time

import torch

from .. import _checks
from . import settings

__all__ = ["load", "available", "unavailable_reason", "where", "parallel_threads", "forward", "backward"]

_SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_state = {"loaded": None, "where": "", "reason": ""}


def _op_exists() -> bool:
    try:
        torch.ops.ddf_cpp.forward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_prebuilt() -> str:
    from .. import _C  # noqa: F401  (registers torch.ops.ddf_cpp.*)

    return "ddf._C (prebuilt)"


def _load_jit() -> str:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts the binary on PATH via its bin dir)
        except ImportError:
            raise RuntimeError("ninja is not installed (`pip install ninja`)") from None
    print("ddf: loading the C++ CPU kernels of the DDF op (the first use compiles them, ~1-3 min; later runs load "
          "the cached build) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    flags = runpy.run_path(os.path.join(_SRC_DIR, "build_flags.py"))
    cpp_extension.load(
        name="ddf_C_jit",
        sources=[os.path.join(_SRC_DIR, "ddf.cpp")],
        extra_cflags=flags["CFLAGS"],
        extra_ldflags=flags["LDFLAGS"],
        extra_include_paths=[_SRC_DIR],
        verbose=settings.get().jit_verbose,
    )
    print(f"ddf: C++ kernels ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return "JIT build of ddf/csrc"


def _install_hint() -> str:
    return ("install a C++ compiler and ninja (`pip install ninja`) and let ddf compile the kernels on first use, "
            "or build them ahead of time in a source checkout with `pip install --no-build-isolation -e .`")


def load() -> bool:
    """Make ``torch.ops.ddf_cpp.*`` exist (once); True on success."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    errors = []
    if _op_exists():
        return _loaded("already registered")
    try:
        return _loaded(_load_prebuilt())
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        errors.append(f"prebuilt ddf._C not importable ({exc})")
    if settings.get().jit:
        try:
            return _loaded(_load_jit())
        except Exception as exc:  # compiler / ninja missing, build error
            lines = str(exc).strip().splitlines()
            errors.append(f"JIT build failed ({type(exc).__name__}: {lines[-1] if lines else ''})")
    else:
        errors.append("JIT build disabled by DDF_JIT=0")
    _state.update(loaded=False, reason="; ".join(errors) + ". To fix: " + _install_hint())
    return False


def available() -> bool:
    return load()


def unavailable_reason() -> str:
    load()
    return _state["reason"]


def where() -> str:
    load()
    return _state["where"]


def parallel_threads(n: int = 64) -> int:
    """Threads the C++ kernels' ``at::parallel_for`` uses for ``n`` chunks (torch's intra-op thread count, capped
    by n; 1 would mean a build without OpenMP)."""
    load()
    return int(torch.ops.ddf_cpp.parallel_threads(n))


def forward(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm,
            spatial_gain):
    return torch.ops.ddf_cpp.forward(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                                     combine, spatial_norm, spatial_gain)


def backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
             spatial_norm, spatial_gain):
    return torch.ops.ddf_cpp.backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                                      stride, head, combine, spatial_norm, spatial_gain)


def _register_fakes() -> None:
    """Fake (meta) kernels of the C++ ops, so torch.compile/export can trace through the op body on CPU."""

    @torch.library.register_fake("ddf_cpp::forward")
    def _forward_fake(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
                      spatial_norm, spatial_gain):
        return _checks.empty_forward_output(input, stride)

    @torch.library.register_fake("ddf_cpp::backward")
    def _backward_fake(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head,
                       combine, spatial_norm, spatial_gain):
        return _checks.empty_backward_outputs(input, channel_filter, spatial_filter)


def _loaded(where_from: str) -> bool:
    try:
        _register_fakes()
    except RuntimeError:  # already registered (the extension was loaded before this module, e.g. on reload)
        pass
    _state.update(loaded=True, where=where_from)
    return True
