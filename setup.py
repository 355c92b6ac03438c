"""Builds the optional CUDA extension ``fc_edge._C`` from csrc/ where a CUDA torch and nvcc exist.

FC_EDGE_CUDA=0 never builds it, =1 requires it (fails loudly), =auto (default) builds it when
``torch.cuda`` was compiled in and nvcc is found, and installs pure Python otherwise.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup


def _cufft(cuda_home: str | None) -> tuple[list, list, list, list]:
    """cuFFT headers and library: the toolkit's when it has them, else the nvidia-cufft wheel's
    (pip-installed CUDA torch), which ships only a versioned libcufft.so.N, linked by file name."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cufft.h")):
        return [], [], ["cufft"], []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cufft.h"))):
            base = os.path.dirname(os.path.dirname(header))
            libs = sorted(glob.glob(os.path.join(base, "lib", "libcufft.so.*")))
            if libs:
                lib_dir, name = os.path.split(libs[0])
                link_args = [f"-l:{name}", f"-Wl,-rpath,{lib_dir}"]
                return [os.path.dirname(header)], [lib_dir], [], link_args
    return [], [], ["cufft"], []


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
    include_dirs, library_dirs, libraries, link_args = _cufft(CUDA_HOME)
    # No -std here: torch picks the C++ standard its headers need (C++17 before 2.10, C++20 after).
    ext = CUDAExtension(
        name="fc_edge._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc"), *include_dirs],
        library_dirs=library_dirs,
        libraries=libraries,
        extra_link_args=link_args,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
