"""The one place that picks the DDF backend.

DDF_BACKEND=reference|compiled|auto (default auto):

* ``reference``: :func:`ddf.ddf` calls the plain PyTorch reference directly (no custom op).
* ``compiled``: requires the compiled C++/CUDA kernels (``torch.ops.ddf.ddf_forward``); a clear error otherwise.
* ``auto``: calls ``torch.ops.ddf.ddf_forward``, which runs the compiled kernels when the extension is
  available and the PyTorch reference otherwise (so FLOP counting and torch.compile see one op everywhere).
  Devices the op has no kernel for (e.g. CUDA tensors with a CPU-only build) use the reference directly.
"""
from __future__ import annotations

import os

import torch

_VALID = ("auto", "reference", "compiled")


def requested_backend() -> str:
    value = os.environ.get("DDF_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"DDF_BACKEND must be one of {_VALID}, got {value!r}")
    return value


def _op_supports(device: torch.device) -> bool:
    from . import ops

    if device.type in ("cpu", "meta"):
        return True
    if device.type == "cuda":
        return ops.cuda_kernels_available() or not ops.compiled_available()
    return False


def use_compiled(input: torch.Tensor) -> bool:
    """True when :func:`ddf.ddf` should call ``torch.ops.ddf.ddf_forward`` for this input."""
    choice = requested_backend()
    if choice == "reference":
        return False
    from . import ops

    if choice == "compiled":
        if not ops.compiled_available():
            raise RuntimeError(
                "DDF_BACKEND=compiled but the compiled DDF extension is not available "
                f"({ops.unavailable_reason()}); {ops.BUILD_HINT}"
            )
        if input.device.type == "cuda" and not ops.cuda_kernels_available():
            raise RuntimeError(
                "DDF_BACKEND=compiled with a CUDA input but the DDF extension was built without CUDA kernels; "
                "rebuild with CUDA_HOME set and DDF_BUILD_CUDA=1"
            )
        if input.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"DDF_BACKEND=compiled: no compiled DDF kernels for device {input.device}")
        return True
    return _op_supports(input.device)


def backend_info() -> str:
    """One line saying which DDF backend :func:`ddf.ddf` uses.

    e.g. ``"compiled (ddf._C, cpu+cuda kernels)"`` or ``"reference (DDF_BACKEND=reference)"``.
    """
    choice = requested_backend()
    if choice == "reference":
        return "reference (DDF_BACKEND=reference)"
    from . import ops

    return ops.info()
