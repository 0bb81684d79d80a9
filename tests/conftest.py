"""Test setup: without a CUDA device the Triton kernels run in the interpreter.

`@triton.jit` reads TRITON_INTERPRET when a kernel is defined, so it is set here, before
any test imports gpuad.kernels.triton."""
import json
import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # torch is a test dependency; the numpy engine tests run without it
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--test-lines", metavar="PATH", default=None,
                     help="append a JSON line to PATH as each test starts and as each of its phases ends "
                          "(a run killed by a time limit still names what failed and what was running)")


_TEST_LINES = []  # the --test-lines path of this process, when it writes them


def pytest_configure(config):
    # xdist workers report to the controller, which writes the lines: one writer per file
    path = config.getoption("--test-lines", None)
    _TEST_LINES[:] = [path] if path and not hasattr(config, "workerinput") else []


def _test_line(**fields):
    if _TEST_LINES:
        with open(_TEST_LINES[0], "a") as f:
            f.write(json.dumps(fields) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _test_line(nodeid=nodeid, when="start", outcome="started")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)  # "AssertionError: ..."
        text = (crash or report.longreprtext or "").strip() if report.failed else ""
        _test_line(nodeid=report.nodeid, when=report.when, outcome=report.outcome, duration=round(report.duration, 3),
                   message=text.splitlines()[0][:300] if text else None)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    """Run a test once per backend (Chainer-style injection): numpy always, cupy on a GPU.

    The test body creates its arrays with ad.tensor(...) (the active backend) and reads
    results back with .numpy() or gpuad.backend.to_host."""
    import gpuad as ad

    if request.param == "cupy":
        pytest.importorskip("cupy", reason="the cupy backend needs CuPy")
    with ad.use_backend(request.param):
        yield request.param
