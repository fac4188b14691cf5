"""The C++ CPU kernels: ``torch.ops.ddf_cpp.forward`` / ``backward`` from ``ddf._C`` (prebuilt) or a JIT build.

Loaded lazily, on the first CPU call (so ``import ddf`` stays fast):

1. the prebuilt extension ``ddf._C`` (built by ``pip install --no-build-isolation -e .`` or a wheel build with
   torch visible) is imported;
2. otherwise the shipped sources ``ddf/csrc`` are JIT-compiled once with ``torch.utils.cpp_extension.load``
   (needs a C++ compiler and ninja; announced on stderr with its duration) into one folder per
   :func:`build_key` (sources, flags, torch/Python version) under ``TORCH_EXTENSIONS_DIR``, so several checkouts
   share a build and concurrent first uses build once (torch's lock); a failed build is reported and retried
   on the next start; ``DDF_JIT=0`` disables it;
3. if both fail, :func:`load` returns False and :func:`unavailable_reason` says why; ``auto`` then runs the
   PyTorch reference on CPU with one warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import runpy
import shutil
import sys
import time

import torch

from .. import _checks
from . import settings

__all__ = ["load", "available", "build_key", "build_directory", "unavailable_reason", "where", "parallel_threads", "forward", "backward"]

_SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_state = {"loaded": None, "where": "", "reason": ""}
_BUILT_MARKER = "ddf_build_ok"


def _op_exists() -> bool:
    try:
        torch.ops.ddf_cpp.forward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_prebuilt() -> str:
    from .. import _C  # noqa: F401  (registers torch.ops.ddf_cpp.*)

    return "ddf._C (prebuilt)"


_SOURCE_SUFFIXES = (".cpp", ".h", ".py")


def _source_files(src_dir: str):
    return sorted(n for n in os.listdir(src_dir) if n.endswith(_SOURCE_SUFFIXES))


def build_key(src_dir: str = None, flags: dict = None) -> str:
    """The JIT build's cache key: a hash of the sources' bytes, the compiler/linker flags, torch's version (and
    its CUDA tag), the Python version and the machine; never the checkout's path, so clones and installs with
    the same sources share one build, and a different source or torch gets its own."""
    src_dir = src_dir or _SRC_DIR
    flags = flags if flags is not None else runpy.run_path(os.path.join(src_dir, "build_flags.py"))
    h = hashlib.sha256()
    for name in _source_files(src_dir):
        with open(os.path.join(src_dir, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(repr((list(flags["CFLAGS"]), list(flags["LDFLAGS"]), torch.__version__, torch.version.cuda,
                   sys.version_info[:2], platform.machine(), sys.platform)).encode())
    return h.hexdigest()[:16]


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported here only. Its import looks for CUDA and, on a machine without a
    CUDA runtime but with a CUDA toolkit, logs ``No CUDA runtime is found, using CUDA_HOME=...``: irrelevant to
    these CPU-only kernels, and it reads like an error, so without a CUDA device that logger is held at ERROR for
    the import (its level is restored after; the build's own warnings still show)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    if not torch.cuda.is_available():
        log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def build_directory(key: str) -> str:
    """``$TORCH_EXTENSIONS_DIR/ddf_C_<key>`` (default ``~/.cache/torch_extensions/py<ver>_<accel>/ddf_C_<key>``,
    torch's own layout): one folder per cache key."""
    cpp_extension = _cpp_extension()

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        root = os.path.join(cpp_extension.get_default_build_root(), f"py{sys.version_info[0]}{sys.version_info[1]}_{accel}")
    return os.path.join(root, f"ddf_C_{key}")


def _stage_sources(src_dir: str, build_dir: str) -> str:
    """Copy the sources into ``build_dir/src`` (atomically per file, same bytes whoever writes them), so the
    build never names a checkout's path and a second checkout finds it up to date."""
    staged = os.path.join(build_dir, "src")
    os.makedirs(staged, exist_ok=True)
    for name in _source_files(src_dir):
        target = os.path.join(staged, name)
        if os.path.exists(target):
            continue
        tmp = f"{target}.{os.getpid()}.tmp"
        shutil.copyfile(os.path.join(src_dir, name), tmp)
        os.replace(tmp, target)
    return staged


def _load_jit(src_dir: str = None) -> str:
    cpp_extension = _cpp_extension()

    src_dir = src_dir or _SRC_DIR
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts the binary on PATH via its bin dir)
        except ImportError:
            raise RuntimeError("ninja is not installed (`pip install ninja`)") from None
    flags = runpy.run_path(os.path.join(src_dir, "build_flags.py"))
    key = build_key(src_dir, flags)
    build_dir = build_directory(key)
    cached = os.path.exists(os.path.join(build_dir, _BUILT_MARKER))
    if not cached:
        print(f"ddf: compiling the C++ CPU kernels of the DDF op into {build_dir} (once per source/flags/torch "
              "version, ~1-3 min; later runs and other checkouts with the same sources load this build) ...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    staged = _stage_sources(src_dir, build_dir)
    # torch's load() takes a file lock in build_dir: concurrent first uses build once, the others wait and load.
    cpp_extension.load(
        name=f"ddf_C_{key}",
        sources=[os.path.join(staged, "ddf.cpp")],
        extra_cflags=flags["CFLAGS"],
        extra_ldflags=flags["LDFLAGS"],
        extra_include_paths=[staged],
        build_directory=build_dir,
        verbose=settings.get().jit_verbose,
    )
    with open(os.path.join(build_dir, _BUILT_MARKER), "w") as f:  # written only after a successful load
        f.write(f"{torch.__version__}\n")
    if not cached:
        print(f"ddf: C++ kernels compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return f"JIT build {build_dir}" + (" (cached)" if cached else "")


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
            errors.append(f"JIT build failed ({type(exc).__name__}: {lines[-1] if lines else ''}; it is retried "
                          "on the next start)")
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
