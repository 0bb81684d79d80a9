"""Test setup: without a CUDA device the Triton kernels run in the interpreter.

`@triton.jit` reads TRITON_INTERPRET when a kernel is defined, so it is set here, before
any test imports gpuad.kernels.triton."""
import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # torch is a test dependency; the numpy engine tests run without it
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
