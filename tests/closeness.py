"""Tolerances and the element-wise comparison shared by the CUDA C kernel tests (on a GPU in
test_cupy_kernels.py, emulated on the CPU in test_cuda_emulated.py)."""
import numpy as np

#: relative slack of dlogits by dtype: fp32 error plus one rounding of the output
GRAD_RTOL = {"float32": 2e-5, "float16": 1.5e-3, "bfloat16": 1e-2}
LOSS_RTOL, ROW_LOSS_ATOL = 2e-5, 5e-5


def assert_close(got, want, rtol, atol, what):
    """|got - want| <= atol + rtol |want| everywhere, and got finite (NaN / inf never pass);
    `got` and `want` are host arrays of any real dtype."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    assert np.isfinite(got).all(), (f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite elements, "
                                    f"first at {np.argwhere(~np.isfinite(got))[:3].tolist()}")
    err = np.abs(got - want)
    bad = err > atol + rtol * np.abs(want)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err, -1)), err.shape)
        raise AssertionError(f"{what}: {np.count_nonzero(bad)} of {bad.size} elements off (rtol {rtol}, "
                             f"atol {atol:.3g}); worst at {i}: got {got[i]!r}, want {want[i]!r}")


def grad_atol(dtype, want, unit=1.0):
    """Absolute slack: fp32 noise around 0 (relative to `unit`, the size of a one-hot entry
    of the gradient, and to the largest entry) plus, for fp16, the spacing of its subnormals."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    subnormal = 2.0**-24 if dtype == "float16" else 0.0
    return 1e-7 * unit + 1e-8 * scale + subnormal
