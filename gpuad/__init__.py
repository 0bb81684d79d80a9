"""gpuad: a minimal autodiff tape engine over numpy / CuPy arrays, whose two hottest
gradients (linear backward, softmax cross-entropy) run as fused GPU kernels.

    import gpuad as ad
    x = ad.tensor([[1.0, 2.0]], requires_grad=True)
    loss = ad.sq_norm(ad.tanh(x))
    loss.backward()          # x.grad is a numpy array (a CuPy array on the cupy backend)

Importing gpuad imports numpy only; CuPy, torch and Triton load when first used.
"""
from ._source_tree import find_kernels_in_source_tree as _find_kernels_in_source_tree

_find_kernels_in_source_tree()
from .backend import get_backend, get_kernels, set_backend, set_kernels, use_backend
from .gradcheck import GradcheckError, gradcheck
from .ops import (add, div, exp, gelu, getitem, linear, log, log_softmax, logsumexp, matmul, mean, mul, neg,
                  pow, relu, reshape, sigmoid, softmax, softmax_cross_entropy, sq_norm, sub, sum, tanh, to,
                  transpose, unbroadcast, where)
from .ops import linear_cross_entropy  # the fused LM head
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad
from .transforms import grad, jacobian, jvp, value_and_grad, vjp
from .tracing import saved_bytes, trace  # the recorded steps, and the tape's activation memory
from .checkpointing import checkpoint
from . import diagnostics
from . import backend as _backend

__version__ = "0.1.0"


def tensor(data, requires_grad=False, dtype=None) -> Tensor:
    """A Tensor on the active backend holding a copy of `data` (a list, scalar, numpy or
    CuPy array, or Tensor), optionally cast to `dtype`."""
    if isinstance(data, Tensor):
        data = data.data
    xp = _backend.module_for(get_backend())
    if _backend.is_cupy_array(data) and xp is _backend.np:
        data = data.get()
    arr = xp.array(data, dtype=dtype)
    return Tensor(arr, requires_grad=requires_grad)


def from_dlpack(x, requires_grad=False) -> Tensor:
    """A Tensor sharing memory with `x` (a torch tensor, CuPy array, or any DLPack producer):
    CUDA memory lands on the cupy backend, host memory on numpy. No copy is made."""
    if _backend.is_cupy_array(x):
        return Tensor(x, requires_grad=requires_grad)
    device_type = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else 1
    if device_type == 1:  # kDLCPU
        return Tensor(_backend.np.from_dlpack(x), requires_grad=requires_grad)
    cupy = _backend.module_for("cupy")
    return Tensor(cupy.from_dlpack(x), requires_grad=requires_grad)


__all__ = [
    "Tensor", "tensor", "from_dlpack", "no_grad", "enable_grad", "is_grad_enabled",
    "set_backend", "get_backend", "use_backend", "set_kernels", "get_kernels",
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "linear", "exp", "log", "tanh", "sigmoid", "relu",
    "gelu", "sum", "mean", "reshape", "transpose", "getitem", "where", "softmax", "log_softmax", "logsumexp",
    "sq_norm", "softmax_cross_entropy", "to", "unbroadcast",
    "grad", "value_and_grad", "vjp", "jvp", "jacobian", "gradcheck", "GradcheckError",
]
__all__ += ["linear_cross_entropy"]
__all__ += ["trace", "saved_bytes", "checkpoint", "diagnostics"]
