"""One ignore_index contract at every entry point (an integer or None; anything else a TypeError
naming the argument, never a truncated float), exact target compares whatever the targets'
integer dtype, and outputs or accumulators whose elements share memory refused by every launcher."""
import importlib

import numpy as np
import pytest

import gpuad as ad
from gpuad import nn
from gpuad.kernels import checks
from gpuad.kernels import reference as ref

torch = pytest.importorskip("torch")

try:
    from gpuad.kernels import triton as tk
except ImportError:
    tk = None
needs_triton = pytest.mark.skipif(tk is None or torch.cuda.is_available(),
                                  reason="needs triton, and the interpreter (CPU tensors, no CUDA device)")


def _lce_inputs(n=5, d=3, v=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((v, d)).astype(np.float32),
            np.array([0, 1, 2, 1, 3][:n]))


def _entry_points():
    """name -> call(ignore_index) for every entry point that takes an ignore_index."""
    x, w, t = _lce_inputs()
    z = x @ w.T
    calls = {
        "reference.softmax_cross_entropy": lambda i: ref.softmax_cross_entropy(z, t, ignore_index=i),
        "reference.linear_cross_entropy": lambda i: ref.linear_cross_entropy(x, w, t, ignore_index=i),
        "ad.softmax_cross_entropy": lambda i: ad.softmax_cross_entropy(ad.tensor(z), t, ignore_index=i),
        "ad.linear_cross_entropy": lambda i: ad.linear_cross_entropy(ad.tensor(x), ad.tensor(w), t, ignore_index=i),
        "nn.CrossEntropyLoss": lambda i: nn.CrossEntropyLoss(ignore_index=i)(ad.tensor(z), t),
    }
    if tk is not None and not torch.cuda.is_available():
        zt, xt, wt, tt = (torch.from_numpy(a) for a in (z, x, w, t))
        calls["triton.softmax_cross_entropy"] = lambda i: tk.softmax_cross_entropy(zt, tt, ignore_index=i)
        calls["triton.linear_cross_entropy"] = lambda i: tk.linear_cross_entropy(xt, wt, tt, ignore_index=i)
    return calls


def _loss(out):
    out = out[0] if isinstance(out, tuple) else out
    return float(out.numpy() if hasattr(out, "numpy") else out)


@pytest.mark.parametrize("bad", [1.7, 1.0, True, "1", [1], np.float32(1.0)], ids=repr)
@pytest.mark.parametrize("entry", sorted(_entry_points()))
def test_a_non_integer_ignore_index_is_a_type_error(entry, bad):
    with pytest.raises(TypeError, match="ignore_index must be an integer or None"):
        _entry_points()[entry](bad)


@pytest.mark.parametrize("entry", sorted(_entry_points()))
def test_ignore_index_none_ignores_nothing_and_integers_of_any_type_work(entry):
    call = _entry_points()[entry]
    nothing = _loss(call(-100))  # no target is -100
    np.testing.assert_allclose(_loss(call(None)), nothing, rtol=1e-6)
    ones_ignored = _loss(call(1))
    assert ones_ignored != pytest.approx(nothing)
    for i in (np.int64(1), np.int16(1)):
        np.testing.assert_allclose(_loss(call(i)), ones_ignored, rtol=1e-6)


def test_checks_ignore_index_arg():
    assert checks.ignore_index_arg(np.int32(-100)) == -100 and type(checks.ignore_index_arg(np.int32(3))) is int
    assert checks.ignore_index_arg(None) is None
    with pytest.raises(TypeError, match="weird must be an integer or None, got float 2.5"):
        checks.ignore_index_arg(2.5, "weird")


# --- targets against an ignore_index their dtype cannot hold ------------------------------------------
@pytest.mark.parametrize("ignore_index", [2 ** 32 + 1, 2 ** 40 + 1, -2 ** 32 + 1, None])
def test_int32_targets_and_an_ignore_index_outside_int32_ignore_nothing(ignore_index):
    """torch compares an int32 tensor with 2**32 + 1 as with 1: the LM head's mean divided by the
    count of rows whose target is not 1 (twice the loss here)."""
    x, w, t = _lce_inputs()
    want = ref.linear_cross_entropy(x, w, t, ignore_index=-100)
    results = {"reference": ref.linear_cross_entropy(x, w, t.astype(np.int32), ignore_index=ignore_index)}
    if tk is not None and not torch.cuda.is_available():
        xt, wt, t32 = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(t.astype(np.int32))
        results["triton"] = tk.linear_cross_entropy(xt, wt, t32, ignore_index=ignore_index)
    for name, got in results.items():
        for g, e, what in zip(got, want, ("loss", "dx", "dw")):
            np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-6, err_msg=f"{name} {what}")


def test_valid_targets_is_exact_for_every_integer_dtype():
    t = np.array([1, -100, 5])
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint8):
        td = t.astype(dtype)
        for ignore in (1, 2 ** 32 + 1, 2 ** 8 + 1, -2 ** 63, None):
            want = np.array([int(v) != ignore for v in td])
            np.testing.assert_array_equal(checks.valid_targets(td, ignore), want)
            np.testing.assert_array_equal(checks.valid_targets(torch.from_numpy(td), ignore).numpy(), want)


# --- outputs and accumulators sharing memory ------------------------------------------------------
def _shared_accumulators(n, k):
    """fp32 [n, k] buffers whose elements share memory: a stride-0 expand and an as_strided view."""
    rows = np.zeros((1, k), np.float32)
    buf = np.zeros(n + k, np.float32)
    return {"expanded": np.broadcast_to(rows, (n, k)),
            "as_strided": np.lib.stride_tricks.as_strided(buf, (n, k), (4, 4), writeable=True)}


@pytest.mark.parametrize("kind", ["expanded", "as_strided"])
def test_reference_refuses_an_accumulator_sharing_memory(kind):
    x, w, t = _lce_inputs()
    dy = np.ones((5, 4), np.float32)
    acc = _shared_accumulators(4, 3)[kind]
    with pytest.raises(ValueError, match="dw_accumulate has elements that share memory"):
        ref.linear_backward(x, w, dy, dw_accumulate=acc)
    with pytest.raises(ValueError, match="dw_accumulate has elements that share memory"):
        ref.linear_cross_entropy(x, w, t, dw_accumulate=acc)


@needs_triton
@pytest.mark.parametrize("kind", ["expanded", "as_strided"])
def test_triton_refuses_an_accumulator_sharing_memory(kind):
    x, w, t = (torch.from_numpy(a) for a in _lce_inputs())
    dy = torch.ones(5, 4)
    acc = torch.from_numpy(np.ascontiguousarray(_shared_accumulators(4, 3)["expanded"]))
    acc = acc[:1].expand(4, 3) if kind == "expanded" else torch.zeros(7).as_strided((4, 3), (1, 1))
    lb = importlib.import_module("gpuad.kernels.triton.linear_backward")
    for route in ("fused", "cublas"):
        with pytest.raises(ValueError, match="dw_accumulate has elements that share memory"):
            lb.linear_backward(x, w, dy, dw_accumulate=acc, route=route)
    with pytest.raises(ValueError, match="dw_accumulate has elements that share memory"):
        tk.linear_cross_entropy(x, w, t, dw_accumulate=acc)


def test_reference_in_place_gradient_refuses_logits_sharing_memory():
    buf = np.zeros(6, np.float32)
    logits = np.lib.stride_tricks.as_strided(buf, (4, 3), (4, 4), writeable=True)  # rows overlap
    with pytest.raises(ValueError, match="logits \\(written in place\\) has elements that share memory"):
        ref.softmax_cross_entropy(logits, np.array([0, 1, 2, 0]), inplace=True)
    assert not buf.any()


def test_accumulators_of_every_dense_layout_are_accepted():
    """Transposed, padded and sliced accumulators hold each element once: accepted, and summed into."""
    x, w, t = _lce_inputs()
    dy = np.ones((5, 4), np.float32)
    want = ref.linear_backward(x, w, dy)[1]
    padded = np.zeros((4, 5), np.float32)[:, :3]
    for acc in (np.zeros((3, 4), np.float32).T, padded, np.zeros((8, 3), np.float32)[::2]):
        np.testing.assert_allclose(ref.linear_backward(x, w, dy, dw_accumulate=acc)[1], want, rtol=1e-6)
    empty = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (4, 0), (0, 0), writeable=True)
    np.testing.assert_array_equal(ref.linear_backward(x[:, :0], w[:, :0], dy, dw_accumulate=empty)[1], empty)
