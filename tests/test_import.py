"""gpuad imports from a bare source tree (no install): gpuad.kernels resolves to <root>/kernels,
and importing gpuad loads neither torch, triton nor CuPy."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_import_from_a_source_tree_without_install(tmp_path):
    for name in ("gpuad", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    code = ("import sys, gpuad, gpuad.kernels.reference as r, gpuad.kernels.tuning; "
            "print(r.__file__); print(sorted(m for m in ('torch', 'triton', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, loaded = out.stdout.splitlines()
    assert os.path.realpath(path) == os.path.realpath(tmp_path / "kernels" / "reference.py")
    assert loaded == "[]"
