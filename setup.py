"""Builds the optional CUDA extension ``fc_edge._C`` from csrc/ where a CUDA torch and nvcc exist.

FC_EDGE_CUDA=0 never builds it, =1 requires it (fails loudly), =auto (default) builds it when
``torch.cuda`` was compiled in and nvcc is found, and installs pure Python otherwise.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup


def _cuda_extension() -> tuple[list, dict]:
    mode = os.environ.get("FC_EDGE_CUDA", "auto").lower()
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise
        return [], {}
    have = torch.version.cuda is not None and (CUDA_HOME or shutil.which("nvcc"))
    if not have:
        if mode == "1":
            raise RuntimeError("FC_EDGE_CUDA=1 but no CUDA torch / nvcc was found")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/kernels/*.cu"))
    if not sources:
        return [], {}
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.7;8.9;9.0"
    ext = CUDAExtension(
        name="fc_edge._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        libraries=["cufft"],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
