"""Compiler and linker flags of the C++ CPU kernels: the one home shared by setup.py (ahead-of-time build) and
ddf/backends/cpp.py (JIT build). Plain data, loaded with runpy (no package import).

OpenMP is required, not optional: ``at::parallel_for`` is a header template that only runs in parallel when the
including translation unit is compiled with OpenMP (without it every kernel runs on one thread, whatever
``torch.set_num_threads`` says). Linking ``-fopenmp`` resolves to the ``libgomp.so.1`` that torch already loaded
(same soname), so the kernels share torch's thread pool.
"""
import os

if os.name == "nt":
    CFLAGS = ["/O2", "/openmp"]
    LDFLAGS: list = []
else:
    CFLAGS = ["-O3", "-fopenmp"]
    LDFLAGS = ["-fopenmp"]
