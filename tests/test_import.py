"""gpuad imports from a bare source tree (no install): gpuad.kernels resolves to <root>/kernels,
and importing gpuad loads neither torch, triton nor CuPy."""
import ast
import glob
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


def test_kernels_have_one_name_and_the_bench_is_not_under_gpuad():
    """From the repository root, gpuad.kernels is the only name of the kernels (a second name would
    load every module twice, with two registries of tuned tiles), and gpuad holds no bench."""
    code = ("import sys, gpuad.kernels.tuning\n"
            "for name in ('kernels', 'kernels.tuning', 'gpuad.bench'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "        print(name, 'imported')\n"
            "    except ImportError as e:\n"
            "        print(name, 'refused:', e)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'bench')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "kernels refused: the kernels are the package gpuad.kernels: import gpuad.kernels, not kernels"
    assert lines[1].startswith("kernels.tuning refused:")
    assert lines[2] == "gpuad.bench refused: No module named 'gpuad.bench'"
    assert lines[3] == "[]"


def _bench_imports():
    """{module: the bench modules it imports (relative imports)} for bench/*.py."""
    paths = glob.glob(os.path.join(ROOT, "bench", "*.py"))
    names = {os.path.basename(p)[:-3] for p in paths}
    graph = {}
    for path in paths:
        deps = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else (a.name for a in node.names))
        graph[os.path.basename(path)[:-3]] = deps & names
    return graph


def test_no_bench_module_imports_one_that_imports_it_back():
    graph = _bench_imports()
    assert graph["lce_op"] and "common" in graph["ops"]  # the walk below reads real imports

    def reaches(start, goal, seen):
        for m in graph[start] - seen:
            seen.add(m)
            if m == goal or reaches(m, goal, seen):
                return True
        return False
    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert circles == [], f"bench modules in an import circle: {circles}"
