"""gpuad.kernels in a source tree: the package lives in <root>/kernels, beside gpuad/ (an
installed gpuad holds it as gpuad/kernels). A finder at the head of sys.meta_path maps the one
name ``gpuad.kernels`` to that folder; its subpackages then resolve through its ``__path__``.
Nothing else of the repository root becomes importable under ``gpuad.`` (not the bench), and
``kernels/__init__.py`` refuses any other name, so each kernels module is loaded once.
"""
import importlib.abc
import importlib.util
import os
import sys

_NAME = "gpuad.kernels"


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``gpuad.kernels`` (and only it) in `directory`."""

    def __init__(self, directory: str):
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        if name != _NAME:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(self.directory, "__init__.py"),
                                                      submodule_search_locations=[self.directory])


def find_kernels_in_source_tree():
    """Put the finder first on sys.meta_path when this gpuad runs from a source tree (a
    pyproject.toml and kernels/ beside it); an installed gpuad is left as it is."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    directory = os.path.join(root, "kernels")
    if not (os.path.isfile(os.path.join(directory, "__init__.py"))
            and os.path.isfile(os.path.join(root, "pyproject.toml"))):
        return
    if not any(isinstance(f, _KernelsFinder) and f.directory == directory for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsFinder(directory))
