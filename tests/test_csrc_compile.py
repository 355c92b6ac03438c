"""The CUDA extension's sources compile and its index math is right, on a machine without a GPU.

- every ``csrc/kernels/*.cu`` compiles with nvcc (one arch, sm_80), torch-free, against the
  cuFFT headers of the CUDA toolkit or, failing that, of the ``nvidia-cufft`` wheel;
- ``csrc/tests/layout_emulation.cpp`` (the kernels' buffer layouts, cuFFT strides and
  gather/expand index maps, run on the host with a float64 DFT in place of cuFFT) matches a
  direct 2-D DFT: a wrong stride fails here, not first on a GPU;
- ``csrc/tests/plan_cache_emulation.cpp`` runs the plan cache (leases, eviction, CUDA-graph
  capture rules) on the host against recording stubs of the CUDA runtime and cuFFT;
- ``csrc/ops.cpp`` passes ``g++ -fsyntax-only`` against the installed torch's headers;
- setup.py's GPU code: torch turns its default list into -gencode flags for sm_80, sm_87, sm_90
  and compute_90 PTX, and nvcc itself (its dry run's fatbinary images) confirms that is what a
  build embeds; an architecture the nvcc cannot build (Xavier's sm_72 on CUDA 13) is one line.
Without nvcc (or a host compiler) the tests skip and say why.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = sorted((CSRC / "kernels").glob("*.cu"))
ARCH = os.environ.get("FC_EDGE_CI_ARCH", "sm_80")


def _cuda_home() -> Path | None:
    """The toolkit root: $CUDA_HOME / $CUDA_PATH, nvcc's parent (if nvcc is not a wrapper
    script elsewhere), or /usr/local/cuda."""
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1])
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime_api.h").exists():
            return home
    return None


def _nvcc() -> str | None:
    home = _cuda_home()
    found = shutil.which("nvcc")
    if found:
        return found
    if home and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return None


def _cufft_include() -> Path | None:
    """cufft.h: the toolkit's, else the nvidia-cufft wheel's (nvidia/cu13/include, or
    nvidia/cufft/include for the CUDA 12 wheels)."""
    home = _cuda_home()
    if home and (home / "include" / "cufft.h").exists():
        return home / "include"
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cufft.h"))):
            return Path(header).parent
    return None


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _require_nvcc_and_cufft() -> tuple[str, Path]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit): the kernels are not compiled here")
    include = _cufft_include()
    if include is None:
        pytest.skip("cufft.h not found: install the CUDA toolkit or `pip install nvidia-cufft`")
    return nvcc, include


def test_there_are_kernels() -> None:
    assert KERNELS, "csrc/kernels/*.cu is empty"


@pytest.mark.parametrize("source", KERNELS, ids=[p.name for p in KERNELS])
def test_kernel_compiles_with_nvcc(source: Path, tmp_path: Path) -> None:
    nvcc, include = _require_nvcc_and_cufft()
    cmd = [
        nvcc,
        "-std=c++17",
        "-O2",
        f"-arch={ARCH}",
        "-Xcompiler",
        "-Wall",
        f"-I{include}",
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
    ]
    done = _run(cmd)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    assert "warning" not in done.stderr.lower(), done.stderr


def _host_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build_and_run(cmd: list[str], exe: Path, expect: str, build_s: float = 120,
                   run_s: float = 60) -> None:
    """Build a host test program with ``cmd`` (writing ``exe``), run it: it must exit 0 and
    print ``expect``."""
    built = _run(cmd, timeout=build_s)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr[-4000:]}"
    ran = _run([str(exe)], timeout=run_s)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert expect in ran.stdout


def test_layout_emulation_matches_direct_dft(tmp_path: Path) -> None:
    cxx = _host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) to build the layout emulation")
    exe = tmp_path / "layout_emulation"
    cmd = [
        cxx,
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        str(CSRC / "tests" / "layout_emulation.cpp"),
        "-o",
        str(exe),
    ]
    _build_and_run(cmd, exe, "geometries ok")


def test_plan_cache_leases_and_capture_rules_on_host(tmp_path: Path) -> None:
    """plan_cache.cu (host code only) linked with stub CUDA runtime / cuFFT calls that record
    what happens: 8 threads on 5 shapes with capacity 2 never share a plan or destroy a leased
    one, plans are made without cuFFT's own work area, and a capturing stream makes and destroys
    no plan, pins what it uses and refuses a miss with a warm-up hint."""
    cxx = _host_compiler()
    home = _cuda_home()
    if cxx is None or home is None:
        pytest.skip("needs a host C++ compiler and the CUDA runtime headers")
    _, include = _require_nvcc_and_cufft()
    exe = tmp_path / "plan_cache_emulation"
    cmd = [
        cxx,
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pthread",
        "-isystem",
        str(home / "include"),
        "-isystem",
        str(include),
        "-x",
        "c++",
        str(CSRC / "kernels" / "plan_cache.cu"),
        "-x",
        "none",
        str(CSRC / "tests" / "plan_cache_emulation.cpp"),
        "-o",
        str(exe),
    ]
    _build_and_run(cmd, exe, "0 violations", build_s=180, run_s=120)


def test_ops_cpp_syntax_against_torch_headers(tmp_path: Path) -> None:
    """ops.cpp against the installed torch's headers. A CPU torch ships c10/cuda but not the
    generated cuda_cmake_macros.h, so an empty stand-in is put behind the real include paths."""
    cxx = _host_compiler()
    home = _cuda_home()
    if cxx is None or home is None or not (home / "include" / "cuda_runtime_api.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA runtime headers")
    _, include = _require_nvcc_and_cufft()
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is None or torch_spec.origin is None:
        pytest.skip("torch is not installed")
    torch_inc = Path(torch_spec.origin).parent / "include"
    if not (torch_inc / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"
    cmd = [
        cxx,
        std,
        "-fsyntax-only",
        "-Wall",
        f"-I{torch_inc}",
        f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{tmp_path / 'stub'}",
        f"-I{home / 'include'}",
        f"-I{include}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{CSRC}",
        str(CSRC / "ops.cpp"),
    ]
    done = _run(cmd, timeout=180)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"


def _setup_module() -> ModuleType:
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("fc_edge_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_arch_list_embeds_sm80_sm87_sm90_and_ptx(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The default list through torch's own flag builder (what BuildExtension passes nvcc), then
    nvcc's dry run of a kernel with those flags: its fatbinary command names the images a build
    embeds. Independent of setup.py: torch parses the list, nvcc says what comes out."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit): no arch flags to check")
    from torch.utils import cpp_extension

    setup_py = _setup_module()
    version = setup_py.nvcc_version(nvcc)
    archs = setup_py.cuda_arch_list(None, setup_py.nvcc_archs(nvcc), version, jetson=None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    flags = cpp_extension._get_cuda_arch_flags()
    assert sorted(flags) == sorted([
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_87,code=sm_87",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ])
    kernel = tmp_path / "k.cu"
    kernel.write_text("__global__ void k(float* x) { x[threadIdx.x] = 1.0f; }\n")
    done = _run([nvcc, "-dryrun", *flags, "-c", str(kernel), "-o", str(tmp_path / "k.o")])
    assert done.returncode == 0, done.stderr
    images = set(re.findall(r"--image3=kind=(elf|ptx),sm=(\d+)", done.stdout + done.stderr))
    assert images == {("elf", "80"), ("elf", "87"), ("elf", "90"), ("ptx", "90")}
    line = setup_py.describe(archs, version)
    assert "\n" not in line and f"nvcc {version[0]}.{version[1]}" in line
    assert "sm_80 sm_87 sm_90 + compute_90 PTX" in line


def test_xavier_needs_a_cuda12_nvcc(tmp_path: Path) -> None:
    """sm_72 (Jetson Xavier): refused in one line naming the fix when this nvcc cannot build it
    (CUDA 13), built when it can; nvcc itself agrees (it compiles -arch=sm_72 or it does not)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")
    setup_py = _setup_module()
    version = setup_py.nvcc_version(nvcc)
    supported = setup_py.nvcc_archs(nvcc)
    kernel = tmp_path / "k.cu"
    kernel.write_text("__global__ void k(float* x) { x[threadIdx.x] = 1.0f; }\n")
    nvcc_builds_it = _run([nvcc, "-dryrun", "-arch=sm_72", "-c", str(kernel), "-o",
                           str(tmp_path / "k.o")]).returncode == 0
    if version[0] >= 13:
        assert not nvcc_builds_it and "7.2" not in supported
        with pytest.raises(setup_py.ArchError) as err:
            setup_py.cuda_arch_list(None, supported, version, jetson="7.2")
        assert "\n" not in str(err.value)
        assert "sm_72" in str(err.value) and "CUDA <= 12" in str(err.value)
        assert "Xavier" in setup_py.describe("8.7", version)
    else:
        assert nvcc_builds_it and "7.2" in supported
        assert setup_py.cuda_arch_list(None, supported, version, jetson="7.2") == "7.2"
    # an explicit list wins over the Jetson default; architecture names pass to torch unchecked
    assert setup_py.cuda_arch_list("9.0", supported, version, jetson="7.2") == "9.0"
    assert setup_py.cuda_arch_list("Hopper", supported, version) == "Hopper"
    # an nvcc that cannot list its architectures: nothing is checked, torch and nvcc decide
    assert setup_py.cuda_arch_list("7.2", None, (10, 2)) == "7.2"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
