"""The Triton backend of the DDF op: kernels (``kernels.py``), launchers (``launch.py``), AOT compile check
(``compile_check.py``). Runs CUDA tensors compiled, and CPU tensors under Triton's interpreter when
``TRITON_INTERPRET=1`` was set before ``import ddf``."""
from __future__ import annotations

from typing import Tuple

from .launch import INTERPRET, backward, forward

__all__ = ["forward", "backward", "available", "interpreter_active"]


def available() -> Tuple[bool, str]:
    """Triton imported (this module would not import otherwise)."""
    import triton

    return True, f"triton {triton.__version__}"


def interpreter_active() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors only)."""
    return INTERPRET
