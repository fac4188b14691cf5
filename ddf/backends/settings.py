"""Environment flags of the DDF op, parsed once (on first use) and overridable from Python.

* ``DDF_BACKEND``: ``auto`` (default: C++ kernels on CPU, Triton kernels on CUDA, PyTorch reference elsewhere
  or when those are unavailable), ``reference``, ``cpp`` or ``triton`` (forced: an error if unavailable).
* ``DDF_JIT``: ``0`` disables the JIT build of the C++ kernels (default ``1``).
* ``DDF_JIT_VERBOSE``: ``1`` shows the compiler output of the JIT build.
"""
from __future__ import annotations

import dataclasses
import os

__all__ = ["BACKENDS", "Settings", "get", "parse_backend"]

BACKENDS = ("auto", "reference", "cpp", "triton")


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    jit: bool = True
    jit_verbose: bool = False


def parse_backend(value, source: str = "DDF_BACKEND") -> str:
    name = str(value).strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {value!r}")
    return name


def _flag(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _from_env() -> Settings:
    return Settings(backend=parse_backend(os.environ.get("DDF_BACKEND", "auto")),
                    jit=_flag("DDF_JIT", "1"), jit_verbose=_flag("DDF_JIT_VERBOSE", "0"))


_current = []


def get() -> Settings:
    if not _current:
        _current.append(_from_env())
    return _current[-1]


def push(settings: Settings) -> None:
    get()
    _current.append(settings)


def pop() -> None:
    if len(_current) > 1:
        _current.pop()
