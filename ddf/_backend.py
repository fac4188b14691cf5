"""The one place that picks the DDF backend.

DDF_BACKEND=reference|compiled|auto (default auto). The compiled backend is
provided by ``ddf.ops`` (C++/CUDA custom ops); until it is importable, auto
falls back to the reference implementation.
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


def use_compiled(input: torch.Tensor) -> bool:
    """True when the compiled op should run for this input (placeholder: reference only)."""
    choice = requested_backend()
    if choice == "compiled":
        raise RuntimeError("DDF_BACKEND=compiled but the compiled DDF extension is not built yet")
    return False


def backend_info() -> str:
    """One line saying which DDF backend ``ddf()`` uses (placeholder until ddf.ops lands)."""
    return f"reference (requested: {requested_backend()}; compiled extension not available)"
