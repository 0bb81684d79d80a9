"""Every CUDA C source of gpuad.kernels.cupy compiles with nvcc for sm_80 and sm_90.

The options come from the same constant the CuPy launchers give NVRTC
(``gpuad.kernels.cupy.compile.NVRTC_OPTIONS``), so a kernel that does not compile cannot land
even on a machine without a GPU. Also checked: every kernel a launcher requests is an
``.entry`` of the compiled PTX, the sources include nothing (NVRTC and nvcc must see the same
text), and ptxas reports no register spills. Skipped when nvcc is not found (PATH, then
CUDA_HOME / CUDA_PATH).
"""
import importlib
import os
import re
import shutil
import subprocess

import pytest

from gpuad.kernels.cupy import compile as cc

ARCHS = ("80", "90")
SOURCES = sorted(p.name for p in cc.HERE.glob("*.cu"))
# by module path: the package re-exports functions under the names of the modules
LAUNCHERS = tuple(importlib.import_module(f"gpuad.kernels.cupy.{name}")
                  for name in ("cross_entropy", "linear_backward"))


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            candidate = os.path.join(root, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in CUDA_HOME/CUDA_PATH: "
                                                     "cannot compile the CUDA sources here")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(source, arch) -> (ptx text, ptxas -v report), compiled on first use."""
    out_dir = tmp_path_factory.mktemp("cuda_build")
    cache = {}

    def build(source, arch):
        if (source, arch) not in cache:
            stem = f"{source[:-3]}_sm{arch}"
            src = out_dir / f"{stem}.cu"  # exactly the text NVRTC gets: prelude + file
            src.write_text(cc.source(source))
            src = str(src)
            opts = cc.nvcc_options()
            ptx_path = out_dir / f"{stem}.ptx"
            cubin_path = out_dir / f"{stem}.cubin"
            runs = [
                [NVCC, f"-arch=sm_{arch}", "--ptx", *opts, src, "-o", str(ptx_path)],
                [NVCC, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", *opts, src, "-o", str(cubin_path)],
            ]
            reports = []
            for cmd in runs:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, (f"nvcc failed on {source} for sm_{arch}:\n{' '.join(cmd)}\n"
                                              f"{proc.stdout}\n{proc.stderr}")
                reports.append(proc.stdout + proc.stderr)
            cache[source, arch] = (ptx_path.read_text(), reports[1])
        return cache[source, arch]

    return build


def _entries(ptx: str) -> set:
    return set(re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", ptx))


def test_sources_exist_and_launchers_name_them():
    assert SOURCES, f"no .cu files found in {cc.HERE}"
    for launcher in LAUNCHERS:
        assert launcher.SOURCE in SOURCES, f"{launcher.__name__} loads {launcher.SOURCE}, which is missing"


def test_nvcc_options_translate_every_nvrtc_option():
    opts = cc.nvcc_options()
    assert "-std=c++17" in opts
    assert not any(o.startswith("-arch") for o in cc.NVRTC_OPTIONS), "CuPy adds -arch itself"


@pytest.mark.parametrize("source", SOURCES)
def test_sources_are_self_contained(source):
    text = cc.source(source)
    assert not re.search(r"^\s*#\s*include\b", text, flags=re.M), (
        f"{source} has an #include: NVRTC and nvcc would not see the same code")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_source_compiles(builds, source, arch):
    ptx, _ = builds(source, arch)
    assert _entries(ptx), f"{source} defines no kernel"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda m: m.__name__.rpartition(".")[2])
def test_requested_kernels_exist(builds, launcher, arch):
    ptx, _ = builds(launcher.SOURCE, arch)
    missing = set(launcher.KERNEL_NAMES) - _entries(ptx)
    assert not missing, f"{launcher.SOURCE} (sm_{arch}) lacks the kernels {sorted(missing)}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_no_register_spills(builds, source, arch):
    _, report = builds(source, arch)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, f"no ptxas -v report for {source}:\n{report}"
    assert all(s == "0" and l == "0" for s, l in spills), f"register spills in {source} (sm_{arch}):\n{report}"
