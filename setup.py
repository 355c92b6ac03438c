"""Builds the optional CUDA extension ``fc_edge._C`` from csrc/ where a CUDA torch and nvcc exist.

FC_EDGE_CUDA=0 never builds it, =1 requires it (fails loudly), =auto (default) builds it when
``torch.cuda`` was compiled in and nvcc is found, and installs pure Python otherwise.

GPU code: ``TORCH_CUDA_ARCH_LIST`` when set, else the Jetson's own architecture on a Jetson, else
:data:`DEFAULT_ARCHS`. Each architecture is checked against what this nvcc can build
(``nvcc --list-gpu-code``) and one line says what is built, with which nvcc (docs/cuda.md).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess

from setuptools import setup

#: sm_80 code (A100, A10, L4: every 8.x GPU runs 8.0 code), sm_87 (Jetson Orin), sm_90 (H100,
#: H200) and PTX of 9.0 (+PTX), which the driver compiles at load time on a newer GPU (sm_100,
#: sm_120, ...) instead of failing with "no kernel image is available for execution".
DEFAULT_ARCHS = "8.0;8.7;9.0+PTX"
#: Jetson Xavier (sm_72): CUDA 13 dropped Volta-generation code (sm_70/72), so only a CUDA <= 12
#: nvcc (JetPack 5) builds for it.
XAVIER_NOTE = "Jetson Xavier (sm_72) needs a CUDA <= 12 nvcc (JetPack 5): CUDA 13 dropped sm_72"


class ArchError(RuntimeError):
    """An architecture this nvcc cannot build (the message is one line)."""


def nvcc_version(nvcc: str) -> tuple[int, int]:
    """(major, minor) of ``nvcc --version`` ("release 13.0, V13.0.88")."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        raise ArchError(f"cannot read the CUDA release from `{nvcc} --version`")
    return int(found.group(1)), int(found.group(2))


def nvcc_archs(nvcc: str) -> set[str] | None:
    """Architectures this nvcc emits code for, as "8.7" ("sm_87" in ``--list-gpu-code``); None
    when it cannot say (an nvcc older than the option)."""
    done = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    found = re.findall(r"sm_(\d+)", done.stdout) if done.returncode == 0 else []
    return {f"{m[:-1]}.{m[-1]}" for m in found} or None


def jetson_arch() -> str | None:
    """The architecture of the Jetson this runs on (Xavier 7.2, else Orin 8.7), or None."""
    if platform.machine() != "aarch64" or not os.path.exists("/etc/nv_tegra_release"):
        return None
    try:
        with open("/proc/device-tree/model", encoding="utf-8", errors="replace") as f:
            model = f.read()
    except OSError:
        model = ""
    return "7.2" if "Xavier" in model else "8.7"


def cuda_arch_list(requested: str | None, supported: set[str] | None,
                   version: tuple[int, int], jetson: str | None = None) -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` to build: ``requested`` if given, else ``jetson``, else
    :data:`DEFAULT_ARCHS`; :class:`ArchError` naming an architecture this nvcc (``version``,
    building ``supported``; None: unknown, nothing checked) cannot build."""
    archs = requested or jetson or DEFAULT_ARCHS
    for entry in re.split(r"[;\s]+", archs.strip()) if supported is not None else []:
        arch = entry.removesuffix("+PTX")
        if re.fullmatch(r"\d+\.\d+", arch) and arch not in supported:  # not names ("Hopper")
            release = f"{version[0]}.{version[1]}"
            known = sorted(supported, key=lambda a: tuple(int(v) for v in a.split(".")))
            hint = f"; {XAVIER_NOTE}" if arch == "7.2" else ""
            raise ArchError(f"nvcc {release} cannot build sm_{arch.replace('.', '')} "
                            f"(it builds {', '.join(known)}){hint}")
    return archs


def describe(archs: str, version: tuple[int, int]) -> str:
    """One line: nvcc release, what is built, and the Xavier note from CUDA 13 on."""
    parts = []
    for entry in re.split(r"[;\s]+", archs.strip()):
        if entry:
            arch = entry.removesuffix("+PTX").replace(".", "")
            parts.append(f"sm_{arch}" + (f" + compute_{arch} PTX" if entry.endswith("+PTX")
                                          else ""))
    line = f"fc_edge._C: nvcc {version[0]}.{version[1]}, building {' '.join(parts)}"
    return line + (f"; {XAVIER_NOTE}" if version[0] >= 13 else "")


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
    nvcc = next((path for path in (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"),
                                    shutil.which("nvcc")) if path and os.path.exists(path)), "nvcc")
    try:
        version = nvcc_version(nvcc)
        archs = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), nvcc_archs(nvcc), version,
                               jetson_arch())
    except (ArchError, OSError, subprocess.CalledProcessError) as e:
        if mode == "1":
            raise SystemExit(f"fc_edge._C: {e}") from None
        print(f"fc_edge._C not built: {e}")
        return [], {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(describe(archs, version))
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


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the functions
    ext_modules, cmdclass = _cuda_extension()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
