"""The fused backward of a linear layer, y = x wᵀ + b: the launcher.

    x [..., K], w [N, K], dy [..., N]   (fp32 / fp16 / bf16, one dtype; leading dims flattened to M)
    dx = dy w, dw = dyᵀ x (or dw_accumulate += dyᵀ x), db = Σ_M dy

By default on an H100 (route "auto", the tuning defaults) the first call of a problem times the
fused kernel's tiles and splits against cuBLAS and keeps the fastest; fp32 without TF32 at
compute-bound sizes takes cuBLAS untimed. A sweep (``python -m bench.sweep``) can change every
tuning value: the tile per element size, the splits, programs per SM, the route rule.

The kernel and its design: ``linear_backward_kernel``; plans, routes and tuning:
``linear_backward_plan``; torch's precision flags: ``precision``.
"""
from __future__ import annotations

import torch

from .interop import as_given
from .linear_backward_kernel import (INTERPRETER_TILE, OP, SPLITS_DW, SPLITS_DX, TILES,  # noqa: F401 (re-exported)
                                     TUNING_DEFAULTS, TUNING_SPACE, Tile, geometry, split_factors, tiles_for)
from .linear_backward_plan import (ROUTES, auto_route, clear_plans, fused_choices, plan_for,  # noqa: F401
                                   plan_name, route_choices)


def linear_backward(x, w, dy, *, bias=True, dw_accumulate=None, need_dx=True, allow_tf32=False, route="auto"):
    """Gradients of y = x wᵀ + b: returns (dx, dw, db).

    x [..., K], w [N, K], dy [..., N]: torch tensors (CUDA, or CPU under TRITON_INTERPRET=1)
    or CuPy arrays, all fp32, all fp16 or all bf16, any strides. Accumulation is fp32; dx
    [..., K], dw [N, K] and db [N] come back in the input dtype and type (dx None when
    need_dx=False, db None when bias=False). dw_accumulate, an fp32 [N, K] buffer, receives
    dw += dyᵀ x in place and is itself returned as dw. fp32 inputs use exact fp32 products (FMA
    units) unless allow_tf32=True. M, N or K may be 0: the empty sums are zeros (db still sums dy
    when K = 0), as in torch. route: "auto" (see the module docstring), "fused" (the one Triton
    launch) or "cublas" (torch matmuls; fp32 inputs only with dw_accumulate).
    """
    plan, tensors, from_cupy = plan_for(x, w, dy, bias, dw_accumulate, need_dx, allow_tf32, route)
    if plan.switch_device and plan.prob.device.index != torch.cuda.current_device():
        with torch.cuda.device(plan.prob.device):  # Triton launches on the current device
            dx, dw, db = plan(*tensors)
    else:
        dx, dw, db = plan(*tensors)
    if dw_accumulate is not None:
        dw = dw_accumulate
    elif from_cupy:
        dw = as_given(dw, True)
    if from_cupy:
        dx, db = as_given(dx, True), as_given(db, True)
    return dx, dw, db
