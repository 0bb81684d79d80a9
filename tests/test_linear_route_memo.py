"""The route memo of the Triton linear_backward: each launch of a problem (fused candidate, or
cuBLAS) is timed once, whichever candidate set asks for it (a sweep's candidates share tiles);
the choice is the fastest of the set asked for. Timed with a stub timer that counts."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gpuad.kernels.triton import linear_backward_plan as lb_plan  # noqa: E402
from gpuad.kernels.triton.linear_backward_kernel import TILES  # noqa: E402

M, N, K = 256, 192, 256
FAKE_MS = {"cublas": 10.0}  # fused plans: 1 ms + their place in TILES (the first is the fastest)


@pytest.fixture
def timed(monkeypatch):
    """The names handed to the timer, one list per call of it; the memo and the choices start
    empty and are put back as they were (other tests read route_choices)."""
    calls = []

    def fake_fastest(launchers):
        calls.append(sorted(launchers))
        times = {name: FAKE_MS[name] if name in FAKE_MS else
                 1.0 + next(i for i, t in enumerate(TILES) if t.name in name) for name in launchers}
        return min(times, key=times.get), times

    monkeypatch.setattr(lb_plan, "_fastest", fake_fastest)
    memos = (lb_plan._measured, lb_plan._times, lb_plan._route_choices, lb_plan._fused_choices)
    saved = [dict(m) for m in memos]
    for memo in memos:
        memo.clear()
    yield calls
    for memo, old in zip(memos, saved):
        memo.clear()
        memo.update(old)


def _plans(tiles, programs=4):
    x2, w, dy2 = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
    prob = lb_plan._Problem(M, N, K, torch.float32, x2.device, True, True, False, False, (M,))
    strides = x2.stride() + w.stride() + dy2.stride() + (K, 1, K, 1)
    plans = [lb_plan._Plan(prob, "fused", (True, True), TILES[i], (1, 1), programs, strides) for i in tiles]
    return plans, (x2, w, dy2)


def _choose(tiles, route="auto", programs=4):
    plans, (x2, w, dy2) = _plans(tiles, programs)
    key = ("memo-test", M, N, K)
    return lb_plan._measure(plans, route, key, x2, w, dy2, None).name


def test_each_launch_is_timed_once_per_problem(timed):
    a, b, c = (f"fused {TILES[i].name} split 1x1" for i in (1, 4, 5))
    assert _choose([1, 4]) == a
    assert timed == [sorted([a, b, "cublas"])]
    assert _choose([4, 5]) == b  # the fastest of the set asked for; only the new tile is timed
    assert timed[1:] == [[c]]
    assert _choose([5]) == c  # all timed: nothing more
    assert _choose([1, 4]) == a
    assert _choose([4], route="fused") == b
    assert len(timed) == 2
    assert _choose([5], programs=8) == c  # another grid is another launch
    assert timed[2:] == [[c]]


def test_cublas_is_chosen_from_its_one_timing(timed, monkeypatch):
    monkeypatch.setitem(FAKE_MS, "cublas", 0.5)
    assert _choose([1]) == "cublas"
    assert _choose([4]) == "cublas"
    assert timed == [sorted([f"fused {TILES[1].name} split 1x1", "cublas"]), [f"fused {TILES[4].name} split 1x1"]]
