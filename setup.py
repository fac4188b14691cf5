"""Build script: pure-Python install, plus the in-tree extension ``ddf._C`` when torch is importable.

* ``pip install .`` (build isolation, torch not visible): pure Python; the extension is JIT-compiled on first
  import of ``ddf`` from the shipped ``ddf/csrc`` sources (cached by torch.utils.cpp_extension).
* ``pip install --no-build-isolation -e .`` (torch visible): builds ``ddf._C`` with the C++ CPU kernels, plus the
  CUDA kernels when a CUDA toolkit is found (CUDA_HOME) and ``DDF_BUILD_CUDA`` is not ``0``.
  ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) selects the GPU architectures. ``DDF_BUILD_EXT=0`` skips the extension.
"""
import os

from setuptools import setup


def _extension_kwargs():
    if os.environ.get("DDF_BUILD_EXT", "1") == "0":
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("ddf setup: torch is not importable at build time; installing pure Python "
              "(the extension is JIT-compiled on first use)")
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(here, "ddf", "csrc")]
    sources = ["ddf/csrc/ddf.cpp"]
    cxx_flags = ["-O3"] if os.name == "nt" else ["-O3", "-fopenmp-simd"]
    cuda_home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from `which nvcc`; a wrapper script there can point to a directory without headers
    cuda_ok = cuda_home is not None and os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h"))
    build_cuda = os.environ.get("DDF_BUILD_CUDA", "1") != "0" and cuda_ok
    if cuda_home is not None and not cuda_ok and os.environ.get("DDF_BUILD_CUDA", "1") != "0":
        print(f"ddf setup: CUDA_HOME={cuda_home} has no include/cuda_runtime.h; set CUDA_HOME to the toolkit "
              "to build the CUDA kernels")
    if build_cuda:
        sources.append("ddf/csrc/ddf_cuda.cu")
        cxx_flags.append("-DDDF_WITH_CUDA")
        ext = cpp_extension.CUDAExtension(
            "ddf._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DDDF_WITH_CUDA"]},
        )
    else:
        if os.environ.get("DDF_BUILD_CUDA") == "1":
            raise RuntimeError(f"DDF_BUILD_CUDA=1 but no usable CUDA toolkit was found (CUDA_HOME={cuda_home}); "
                               "set CUDA_HOME to the toolkit directory")
        ext = cpp_extension.CppExtension("ddf._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags})
    print(f"ddf setup: building ddf._C ({'C++ + CUDA' if build_cuda else 'C++ only'})")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_extension_kwargs())
