"""Compiler and linker flags of the C++ CPU kernels: the one home shared by setup.py (ahead-of-time build) and
ddf/backends/cpp.py (JIT build). Plain data, loaded with runpy (no package import).

OpenMP is required for speed: ``at::parallel_for`` is a header template that only runs in parallel when the
including translation unit is compiled with OpenMP (without it every kernel runs on one thread, whatever
``torch.set_num_threads`` says). On Linux, linking with ``-fopenmp`` resolves to the ``libgomp.so.1`` that torch
already loaded (same soname), so the kernels share torch's thread pool. Apple clang has no ``-fopenmp``: there the
kernels build without it and run on one thread (``ddf.backend_info()`` reports the thread count).
"""
import os
import sys

if os.name == "nt":
    CFLAGS = ["/O2", "/openmp"]
    LDFLAGS: list = []
elif sys.platform == "darwin":
    CFLAGS = ["-O3", "-fopenmp-simd"]
    LDFLAGS = []
else:
    CFLAGS = ["-O3", "-fopenmp"]
    LDFLAGS = ["-fopenmp"]
