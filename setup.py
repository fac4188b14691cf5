"""Build script: pure-Python install, plus the in-tree C++ extension ``ddf._C`` when torch is importable.

* ``pip install .`` / ``pip install -e .`` (build isolation, torch not visible): pure Python; the C++ CPU kernels
  are JIT-compiled on first use from the shipped ``ddf/csrc`` sources (announced, cached by torch). The GPU
  kernels are Triton kernels: nothing to compile at install time.
* ``pip install --no-build-isolation -e .`` (torch visible): also builds ``ddf._C`` with the C++ CPU kernels ahead
  of time. ``DDF_BUILD_EXT=0`` skips it.
"""
import os
import runpy

from setuptools import setup


def _extension_kwargs():
    if os.environ.get("DDF_BUILD_EXT", "1") == "0":
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("ddf setup: torch is not importable at build time; installing pure Python "
              "(the C++ kernels are JIT-compiled on first use)")
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    flags = runpy.run_path(os.path.join(here, "ddf", "csrc", "build_flags.py"))
    ext = cpp_extension.CppExtension("ddf._C", ["ddf/csrc/ddf.cpp"], include_dirs=[os.path.join(here, "ddf", "csrc")],
                                     extra_compile_args={"cxx": flags["CFLAGS"]}, extra_link_args=flags["LDFLAGS"])
    print("ddf setup: building ddf._C (C++ CPU kernels)")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_extension_kwargs())
