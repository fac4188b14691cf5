"""The one place that chooses which kernels run the DDF op.

Backends: ``cpp`` (C++ CPU kernels), ``triton`` (Triton kernels: CUDA tensors, or CPU tensors under Triton's
interpreter, ``TRITON_INTERPRET=1`` set before ``import ddf``), ``reference`` (plain PyTorch, any device).
``DDF_BACKEND`` (see :mod:`ddf.backends.settings`) or :func:`use_backend` selects one; ``auto`` picks ``cpp`` on
CPU and ``triton`` on CUDA and falls back to ``reference`` (with one warning) when those cannot run; a forced
backend that cannot run raises a clear error and never falls back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from types import ModuleType
from typing import Tuple

import torch

from . import cpp, settings
from .settings import BACKENDS

__all__ = ["BACKENDS", "choose", "kernels", "can_run_cpp", "can_run_triton", "use_backend", "backend_info",
           "requested_backend", "op_label", "require_compiled"]


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend` if active, else ``DDF_BACKEND`` (default ``auto``)."""
    return settings.get().backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the DDF op with backend ``name`` (one of :data:`BACKENDS`) inside the block."""
    settings.push(dataclasses.replace(settings.get(), backend=settings.parse_backend(name, "use_backend(name)")))
    try:
        yield
    finally:
        settings.pop()


def can_run_cpp(device: torch.device) -> Tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the C++ kernels run on CPU tensors only, got a {device.type} tensor"
    if not cpp.load():
        return False, f"the C++ extension is unavailable: {cpp.unavailable_reason()}"
    return True, cpp.where()


def _triton_module():
    try:
        from . import triton as triton_backend
    except ImportError as exc:
        return None, f"Triton is not importable ({exc}); `pip install triton`"
    return triton_backend, ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_triton(device: torch.device) -> Tuple[bool, str]:
    mod, why = _triton_module()
    if mod is None:
        return False, why
    ok, why = mod.available()
    if not ok:
        return False, why
    if device.type == "cuda":
        if _interpreting():
            return False, "TRITON_INTERPRET=1 is set: Triton's interpreter runs CPU tensors only"
        return True, "compiled Triton kernels"
    if device.type == "cpu":
        if mod.interpreter_active():
            return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        return False, ("Triton kernels run on CUDA tensors; on CPU tensors only under Triton's interpreter: set "
                       "TRITON_INTERPRET=1 before `import ddf`")
    return False, f"no Triton kernels for device type {device.type!r}"


_CAN_RUN = {"cpp": can_run_cpp, "triton": can_run_triton}
_AUTO = {"cpu": "cpp", "cuda": "triton"}
_warned = set()


def choose(device: torch.device) -> str:
    """Name of the backend that runs the op for tensors on ``device``: 'cpp', 'triton', 'reference' or 'meta'."""
    if device.type == "meta":
        return "meta"
    name = requested_backend()
    if name == "reference":
        return name
    if name != "auto":
        ok, why = _CAN_RUN[name](device)
        if not ok:
            raise RuntimeError(f"ddf: backend {name!r} was requested (DDF_BACKEND or use_backend) but cannot run "
                               f"on {device.type}: {why}")
        return name
    preferred = _AUTO.get(device.type)
    if preferred is None:
        return "reference"
    ok, why = _CAN_RUN[preferred](device)
    if ok:
        return preferred
    if (preferred, why) not in _warned:
        _warned.add((preferred, why))
        warnings.warn(f"ddf: the {preferred} kernels cannot run on {device.type} ({why}); the slow PyTorch "
                      "reference runs instead", RuntimeWarning, stacklevel=3)
    return "reference"


def kernels(name: str) -> ModuleType:
    """The module with ``forward(...)``/``backward(...)`` of backend ``name`` ('cpp', 'triton', 'reference')."""
    if name == "cpp":
        return cpp
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend
    from . import reference_kernels

    return reference_kernels


def _describe(device_type: str) -> str:
    try:
        name = choose(torch.device(device_type))
    except RuntimeError as exc:
        return f"error ({exc})"
    if name == "reference":
        return "reference (PyTorch)"
    ok, why = _CAN_RUN[name](torch.device(device_type))
    if name == "cpp":
        why += f", {cpp.parallel_threads()} of {torch.get_num_threads()} threads"
    return f"{name} ({why})"


def backend_info() -> str:
    """One line saying which kernels the op uses on each device, and why.

    e.g. ``"DDF_BACKEND=auto; cpu: cpp (ddf._C (prebuilt)); cuda: no CUDA device"``.
    """
    parts = [f"DDF_BACKEND={requested_backend()}", f"cpu: {_describe('cpu')}"]
    if torch.cuda.is_available():
        parts.append(f"cuda: {_describe('cuda')}")
    else:
        parts.append("cuda: no CUDA device")
    return "; ".join(parts)


def op_label(device) -> str:
    """The run header's word for the op's kernels on ``device``: ``cpp (compiled)``, ``triton`` or
    ``reference (slow)`` (``DDF_BACKEND=reference``, or ``auto`` when the compiled kernels cannot run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        name = choose(torch.device(device))
    return {"cpp": "cpp (compiled)", "triton": "triton"}.get(name, "reference (slow)")


def require_compiled(device) -> str:
    """:func:`op_label` for a training run: a RuntimeError when ``auto`` would fall back to the slow reference
    because the compiled kernels are unavailable (a failed or interrupted build), unless the reference was asked
    for (``DDF_BACKEND=reference``)."""
    device = torch.device(device)
    label = op_label(device)
    if label.startswith("reference") and requested_backend() == "auto" and device.type in _AUTO:
        _, why = _CAN_RUN[_AUTO[device.type]](device)
        raise RuntimeError(f"the compiled DDF kernels ({_AUTO[device.type]}) are unavailable on {device.type}: "
                           f"{why}. Fix that and rerun (a failed build is retried on the next start), or set "
                           "DDF_BACKEND=reference (or --ddf-backend reference) to train on the slow reference op")
    return label
