"""Every CUDA C source of gpuad.kernels.cupy compiles with nvcc, and with NVRTC (the compiler
CuPy's RawModule uses), for sm_80 and sm_90.

The options come from the same constant the CuPy launchers give NVRTC
(``gpuad.kernels.cupy.compile.NVRTC_OPTIONS``), so a kernel that does not compile cannot land
even on a machine without a GPU. Also checked: every kernel a launcher requests is an
``.entry`` of the compiled PTX, the sources include nothing (NVRTC and nvcc must see the same
text), and ptxas reports no register spills. The nvcc tests skip when nvcc is not found (PATH,
then CUDA_HOME / CUDA_PATH); the NVRTC tests skip when no libnvrtc is found (the
``nvidia-cuda-nvrtc`` wheel, which .ci/run installs, then CUDA_HOME / CUDA_PATH).
"""
import ctypes
import glob
import importlib
import importlib.util
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


def _find_nvrtc():
    """The path of a libnvrtc shared library, or None."""
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += [os.path.join(loc, "*", "lib") for loc in spec.submodule_search_locations]  # nvidia/cu13/lib
        roots += [os.path.join(loc, "cuda_nvrtc", "lib") for loc in spec.submodule_search_locations]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(os.path.join(os.environ[var], "lib64"))
    for root in roots:
        found = sorted(p for p in glob.glob(os.path.join(root, "libnvrtc.so*")) if ".alt." not in p)
        if found:
            return found[0]
    return None


NVRTC = _find_nvrtc()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")


def nvrtc_compile(source: str, arch: str) -> str:
    """Compile cc.source(source) with NVRTC and cc.NVRTC_OPTIONS plus -arch=compute_<arch>, as CuPy
    would; returns the PTX. Fails the test with NVRTC's log on an error."""
    for builtins in glob.glob(os.path.join(os.path.dirname(NVRTC), "libnvrtc-builtins.so*")):
        if ".alt." not in builtins:  # NVRTC dlopens it by name: load it first, from the same folder
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(NVRTC)
    prog = ctypes.c_void_p()
    text = cc.source(source).encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), text, source.encode(), 0, None, None) == 0
    try:
        opts = [o.encode() for o in cc.NVRTC_OPTIONS] + [f"-arch=compute_{arch}".encode()]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC failed on {source} for compute_{arch} (rc {rc}):\n{log.value.decode()}"
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda m: m.__name__.rpartition(".")[2])
def test_nvrtc_compiles_requested_kernels(launcher, arch):
    missing = set(launcher.KERNEL_NAMES) - _entries(nvrtc_compile(launcher.SOURCE, arch))
    assert not missing, f"NVRTC: {launcher.SOURCE} (compute_{arch}) lacks the kernels {sorted(missing)}"
