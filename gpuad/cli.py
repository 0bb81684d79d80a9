"""Shared pieces of ``python -m gpuad <verb>``: one-line errors and optional dependencies.

A verb is a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``
(returning an exit status or None); it raises :class:`CommandError` for bad input or a
missing dependency, which ``python -m gpuad`` prints as one line.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import tempfile


class CommandError(Exception):
    """A user-facing error: printed as one line, then the command exits with ``code``."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def require(module, package, extra):
    """Import `module`, or raise a CommandError naming the pip package and gpuad's extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CommandError(f"this needs {package}, which is not installed: pip install {package} "
                           f"(or pip install -e \".[{extra}]\" in gpuad's tree)", code=1) from None


def number(kind, low, high=None, low_open=False):
    """An argparse type: `kind` (int or float) within [low, high] ((low, high] if low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or not math.isfinite(value):
            if high is not None:
                need = f"lie in {'(' if low_open else '['}{low}, {high}]"
            else:
                need = f"be {'a finite number ' if kind is float else ''}{'>' if low_open else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must {need}, got {text}")
        return value
    return parse


SEED_MAX = 2 ** 32 - 1  # numpy's and scikit-learn's seeds are unsigned 32-bit integers


def seed_type(text):
    """An argparse type for --seed: an integer in [0, 2³² − 1]."""
    return number(int, 0, SEED_MAX)(text)


def output_file(path, flag, suffix):
    """Check, before any work, that `path` (given to `flag`) ends in `suffix` and that its folder
    exists; raise a CommandError saying which otherwise."""
    if not path.lower().endswith(suffix):
        raise CommandError(f"{flag} {path}: the file name must end in {suffix}")
    writable_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")


def writable_folder(folder, what, create=False):
    """Check, before any work, that `folder` exists (made when `create`) and can be written to;
    raise a CommandError starting with `what` otherwise."""
    if create and not os.path.exists(folder):
        try:
            os.makedirs(folder)
        except OSError as e:
            raise CommandError(f"{what}: cannot create folder {folder} ({e.strerror})") from None
    if not os.path.exists(folder):
        raise CommandError(f"{what}: folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise CommandError(f"{what}: {folder} is not a folder")
    try:  # a file made and removed: os.access says yes to root where writes still fail (a read-only mount)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CommandError(f"{what}: cannot write into folder {folder} ({e.strerror})") from None


def available_memory():
    """Bytes of memory a new allocation can get (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(nbytes, what):
    """Raise a CommandError when `what` (about `nbytes` bytes) cannot fit in available memory."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise CommandError(f"{what} needs about {nbytes / 2 ** 30:.3g} GiB of memory, more than the "
                           f"{available / 2 ** 30:.3g} GiB available")
