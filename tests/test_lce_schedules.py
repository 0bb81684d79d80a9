"""The fused LM head's schedules (tuning space "triton.linear_cross_entropy"): "token_lse"
(the Triton logits GEMM whose epilogue writes per-tile row statistics, then one pass over the
logits) held to the float64 reference for every option and to "token", in the interpreter at
small odd shapes (N = 37, D = 24, V = 203, chunks of 16 rows) with small tiles, so that rows,
columns, the reduction and the statistics all span several tiles or steps. Fresh float buffers
are NaN (the Recorder), so an output element no kernel writes shows up."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from test_linear_cross_entropy import TRITON_TOL, Recorder, as_np, assert_close, assert_outputs

from gpuad.kernels import lm_head, tuning
from gpuad.kernels import reference as ref

L = importlib.import_module("gpuad.kernels.triton.linear_cross_entropy")
N, D, V, CHUNK = 37, 24, 203, 16
SCHEDULES = L.SPACE["schedule"]
#: name -> keyword arguments; "b", "cw", "gs", "gs_rows" name the arrays made by `inputs`
OPTIONS = {
    "plain": {},
    "bias+softcap": {"bias": "b", "softcap": 2.5},
    "smooth": {"label_smoothing": 0.15},
    "zloss": {"z_loss": 1e-2},
    "all": {"bias": "b", "label_smoothing": 0.1, "z_loss": 3e-3, "softcap": 4.0},
    "class_weight": {"class_weight": "cw"},
    "class_weight+smooth+softcap": {"class_weight": "cw", "label_smoothing": 0.2, "softcap": 3.0, "bias": "b"},
    "ignore_none": {"ignore_index": None},
    "grad_scale": {"grad_scale": "gs"},
}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """GEMM tiles of 8 x 64 x 16 (2 row tiles a chunk, 4 column tiles, 2 reduction steps), the
    statistics of 2 tiles and 64 columns a step of the row kernels."""
    monkeypatch.setattr(L, "GEMM_TILES", {2: (8, 64, 16, 4, 1), 4: (8, 64, 16, 4, 1)})
    monkeypatch.setattr(L, "MAX_TILES", 2)
    monkeypatch.setattr(L, "MAX_BLOCK", 64)


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::6] = -100
    arrays = {"b": (torch.randn(V, generator=g) * 0.5).to(dtype), "cw": torch.rand(V, generator=g) + 0.25,
              "gs": torch.tensor(0.75), "gs_rows": torch.linspace(-1.0, 2.0, N)}
    return x, w, t, arrays


def resolve(opts, arrays):
    return {k: arrays[v] if isinstance(v, str) else v for k, v in opts.items()}


def run(schedule, x, w, t, **kw):
    """The Triton LM head under `schedule` and the NaN-filling recorder, with lse."""
    with tuning.override(L.OP, schedule=schedule), Recorder():
        return L.linear_cross_entropy(x, w, t, return_lse=True, chunk=kw.pop("chunk", CHUNK), **kw)


def want(x, w, t, **kw):
    """The float64 reference on the same (rounded) inputs."""
    kw = {k: (as_np(a) if isinstance(a, torch.Tensor) else a) for k, a in kw.items()}
    if kw.get("ignore_index", -100) is None:
        kw["check_targets"] = False
    return ref.linear_cross_entropy(as_np(x), as_np(w), t.numpy(), return_lse=True, **kw)


@pytest.mark.parametrize("dtype, opts", [(torch.float32, o) for o in OPTIONS]
                         + [(torch.float16, o) for o in ("plain", "all", "class_weight+smooth+softcap")], ids=str)
def test_token_lse_matches_reference(dtype, opts, schedule="token_lse"):
    """Every option ("token" is held to the same reference in test_linear_cross_entropy.py)."""
    x, w, t, arrays = inputs(dtype, seed=len(opts))
    kw = resolve(OPTIONS[opts], arrays)
    if kw.get("ignore_index", -100) is None:
        t = t.clamp(min=0)  # no ignored row without an ignore_index
    out = run(schedule, x, w, t, **kw)
    assert out[0].dtype == torch.float32 and all(a.dtype == dtype for a in out[1:4] if a is not None)
    assert_outputs(out, want(x, w, t, **kw), *TRITON_TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_lse_reductions_grad_scale_dw_accumulate_need_dx(reduction, schedule="token_lse"):
    x, w, t, arrays = inputs(torch.float32, seed=7)
    kw = dict(bias=arrays["b"], label_smoothing=0.1, softcap=3.0,
              grad_scale=arrays["gs_rows"] if reduction == "none" else arrays["gs"])
    acc = torch.randn(V, D)
    acc0 = acc.clone()
    loss, dx, dw, db, lse = run(schedule, x, w, t, reduction=reduction, dw_accumulate=acc, need_dx=False, **kw)
    assert dx is None and dw is acc
    expect = want(x, w, t, reduction=reduction, **kw)
    assert_outputs((loss, None, None, db, lse), (expect[0], None, None, expect[3], expect[4]),
                   *TRITON_TOL[torch.float32])
    assert_close(as_np(acc - acc0), expect[2], *TRITON_TOL[torch.float32], "dw_accumulate")
    loss, dx, dw, db, lse = run(schedule, x, w, t, reduction=reduction, grad=False, **kw)
    assert dx is None and dw is None and db is None
    assert_outputs((loss, lse), (expect[0], expect[4]), *TRITON_TOL[torch.float32], names=("loss", "lse"))


def test_token_lse_all_ignored_inputs_unchanged_and_deterministic(schedule="token_lse"):
    x, w, t, arrays = inputs(torch.float32, seed=3)
    kw = dict(bias=arrays["b"], label_smoothing=0.1, z_loss=1e-2, softcap=2.0)
    before = [a.clone() for a in (x, w, t, arrays["b"])]
    first = run(schedule, x, w, t, **kw)
    second = run(schedule, x, w, t, **kw)
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip((x, w, t, arrays["b"]), before))
    loss, dx, dw, db, lse = run(schedule, x, w, torch.full_like(t, -100), **kw)
    for a in (loss, dx, dw, db):
        assert torch.isfinite(a).all() and (a == 0).all()
    assert torch.isfinite(lse).all()


def test_token_lse_matches_token_closely():
    """Both schedules round the same logits to the input dtype and reduce them in fp32: fp16
    results within a few of its ulps of each other."""
    x, w, t, arrays = inputs(torch.float16, seed=5)
    kw = dict(bias=arrays["b"], label_smoothing=0.1, softcap=4.0)
    a, b = (run(s, x, w, t, **kw) for s in SCHEDULES)
    for p, q, name in zip(a, b, ("loss", "dx", "dw", "db", "lse")):
        assert_close(as_np(p), as_np(q), 1e-2, 2e-3, name)


def test_tuning_space_and_rows_per_chunk(monkeypatch):
    """The space and its defaults (today's schedule); rows_per_chunk is the chunk function's
    row count when `chunk` is None, and `chunk` overrides it."""
    assert tuning.spaces()[L.OP] == {"schedule": ("token", "token_lse"), "rows_per_chunk": (2048, 4096)}
    assert tuning.defaults(L.OP) == {"schedule": "token", "rows_per_chunk": 2048}
    seen = []

    def chunk_fn(n, v, itemsize, free, rows):
        seen.append(rows)
        return 8
    monkeypatch.setattr(lm_head, "linear_cross_entropy_chunk", chunk_fn)
    x, w, t, _ = inputs(torch.float32)
    for rows in (2048, 4096):
        with tuning.override(L.OP, rows_per_chunk=rows):
            L.linear_cross_entropy(x, w, t, chunk=None)
            L.linear_cross_entropy(x, w, t, chunk=5)
    assert seen == [2048, 4096]
    assert ref.linear_cross_entropy_chunk(8192, 128256, 2, rows=4096) == 4096
    assert ref.linear_cross_entropy_chunk(8192, 128256, 2) == 2048
    assert ref.linear_cross_entropy_chunk(8192, 128256, 4, rows=4096) == 2048  # the 1 GiB cap


def test_token_lse_statistics_buffer_and_gemm_meta():
    """The statistics are 3 fp32 a row and column tile of BN; fp32 GEMMs stay IEEE unless
    allow_tf32."""
    assert L._n_tiles(128256, 2) == 2004 and L._n_tiles(V, 4) == 4  # BN = 64 here (small_tiles)
    meta = L._gemm_meta(torch.float32, has_bias=False, label_smoothing=0.0, softcap=None, has_weight=False,
                        allow_tf32=False)
    assert meta["PRECISION"] == "ieee" and meta["BN"] == 64
    assert L._gemm_meta(torch.float32, has_bias=True, label_smoothing=0.1, softcap=1.0, has_weight=True,
                        allow_tf32=True)["PRECISION"] == "tf32"
    assert L._gemm_meta(torch.float16, has_bias=True, label_smoothing=0.0, softcap=None, has_weight=False,
                        allow_tf32=True)["PRECISION"] == "ieee"
    lse_meta = L._lse_meta(203, 4, grad=True, label_smoothing=0.0, z_loss=0.0, softcap=None, row_scale=False)
    assert "HAS_BIAS" not in lse_meta and lse_meta["TILES"] == 2 and lse_meta["BLOCK"] == 64
    steps = L._TorchLseSteps(torch.zeros(4, 3), torch.zeros(V, 3), None, ignore_index=-100, smoothing=0.0,
                             z_coef=0.0, softcap=None, grad=True, row_scale=False, allow_tf32=False)
    z, stats = steps.buffer(5)
    assert stats.shape == (5, 4, 3) and stats.dtype == torch.float32 and z.shape == (5, 256)
    assert np.all(as_np(z[:, V:]) == 0)
