"""The launchers' per-problem plans (results identical to the full path, under the interpreter)
and python -m bench --host-overhead (a subprocess with the compiled launch path over bench's stub
driver: calls after the first skip JITFunction.run; a misaligned input goes back through it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gpuad.kernels.triton import cross_entropy as ce  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _full_path(monkeypatch):
    monkeypatch.setattr(ce, "_rows_plan", lambda *a: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("opts", [
    dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1),
    dict(ignore_index=3), dict(ignore_index=None), dict(grad=False), dict(inplace=True),
    dict(inplace=True, grad=False),
    dict(reduction="mean", label_smoothing=0.2, ignore_index=1, check_targets=False),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_ce_plan_gives_the_full_paths_bits(monkeypatch, dtype, opts):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 37, generator=g) * 3).to(dtype)
    t = torch.randint(0, 37, (7,), generator=g)
    t[2] = 3
    ce.clear_plans()
    got = [ce.softmax_cross_entropy(x.clone(), t, **opts) for _ in range(2)]  # planned, then from the cache
    assert len(ce._plans) == 1 and next(iter(ce._plans.values())) is not None
    _full_path(monkeypatch)
    want = ce.softmax_cross_entropy(x.clone(), t, **opts)
    for run in got:
        for a, b in zip(run, want):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_ce_plan_inplace_returns_the_logits():
    x, t = torch.randn(4, 9), torch.tensor([0, 1, 2, 3])
    ce.clear_plans()
    loss, g = ce.softmax_cross_entropy(x, t, inplace=True)
    assert g is x


@pytest.mark.parametrize("case", ["weight", "overlap", "targets-strided", "3-d", "subclass", "transposed"])
def test_ce_plan_leaves_what_it_does_not_serve_to_the_full_path(case):
    x, t, kw = torch.randn(6, 8), torch.arange(6), {}
    if case == "weight":
        kw = dict(weight=torch.ones(8))
    elif case == "overlap":
        x = torch.randn(1, 8).expand(6, 8)
    elif case == "targets-strided":
        t = torch.arange(6).repeat_interleave(2)[::2]
    elif case == "3-d":
        x, t = torch.randn(2, 8, 3), torch.zeros(2, 3, dtype=torch.long)
    elif case == "subclass":
        x = torch.nn.Parameter(x, requires_grad=False)
    elif case == "transposed":
        x = torch.randn(8, 6).t()
    ce.clear_plans()
    ce.softmax_cross_entropy(x, t, **kw)
    assert all(p is None for p in ce._plans.values())


def test_ce_plan_still_checks_targets_and_arguments():
    x = torch.randn(3, 5)
    ce.clear_plans()
    ce.softmax_cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError):  # same problem, planned: the targets are checked per call
        ce.softmax_cross_entropy(x, torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match="reduction"):
        ce.softmax_cross_entropy(x, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.softmax_cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=2.0)


_SCRIPT = textwrap.dedent("""
    import json, torch
    from triton.runtime.jit import JITFunction
    import bench.host_overhead as h
    from gpuad.kernels import triton as kt
    from gpuad.kernels.triton import cross_entropy as ce, linear_backward_plan as lbp

    runs, launches = [0], h.launches
    real_run = JITFunction.run
    def counted(self, *a, **k):
        runs[0] += 1
        return real_run(self, *a, **k)
    JITFunction.run = counted

    x, w, dy = torch.randn(8, 16), torch.randn(24, 16), torch.randn(8, 24)
    logits, t = torch.randn(4, 40), torch.tensor([0, 5, 39, 2])
    cases = [("triton.linear_backward", "8x16->24 fp32", lambda: kt.linear_backward(x, w, dy, route="fused")),
             ("triton.softmax_cross_entropy", "4x40 fp32", lambda: kt.softmax_cross_entropy(logits, t))]
    def plain(a):  # a launch argument, tensors by layout, empty launch hooks and their metadata as None
        if isinstance(a, tuple):
            return [plain(b) for b in a]
        if isinstance(a, torch.Tensor):
            return ["tensor", str(a.dtype), list(a.shape), list(a.stride())]
        if type(a).__name__ in ("HookChain", "LazyDict"):
            return None if not getattr(a, "calls", ()) else repr(a)
        return a if isinstance(a, (int, float, str, type(None))) else type(a).__name__

    out = {"lines": h.lines(calls=3, rounds=3, cases=cases)}
    with h.stub_driver():
        for name, fn, clear in (("linear", cases[0][2], lbp.clear_plans), ("ce", cases[1][2], ce.clear_plans)):
            runs[0] = launches[0] = 0
            fn()
            out[name] = (runs[0], launches[0])
            out[name + "-args"] = plain(h.last_launch[0])
            clear()
            fn()  # planned anew: its first launch goes through JITFunction.run and Triton's launcher
            out[name + "-jit-args"] = plain(h.last_launch[0])
        odd = torch.randn(8 * 16 + 1)[1:].view(8, 16)  # 4 bytes off 16-byte alignment
        runs[0] = launches[0] = 0
        kt.linear_backward(odd, w, dy, route="fused")
        out["misaligned"] = (runs[0], launches[0])
        acc = torch.zeros(24 * 16 + 1)
        kt.linear_backward(x, w, dy, dw_accumulate=acc[:-1].view(24, 16), route="fused")  # planned, bound
        runs[0] = 0
        kt.linear_backward(x, w, dy, dw_accumulate=acc[1:].view(24, 16), route="fused")  # the same plan
        out["misaligned-accumulator"] = runs[0]
    print("RESULT" + json.dumps(out))
""")


def test_host_overhead_calls_skip_jit_run_and_print_one_line_per_launcher():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["linear"] == [0, 1]  # planned: no JITFunction.run, one launch
    assert out["ce"] == [0, 3]  # count, row kernel, finish
    assert out["misaligned"] == [1, 1]  # the alignment the compile assumed fails: through Triton
    assert out["misaligned-accumulator"] == 1  # the caller's dw_accumulate is checked too
    for name in ("linear", "ce"):  # the direct launch hands the driver what Triton's launcher does
        assert out[name + "-args"] == out[name + "-jit-args"]
    assert [line.split()[:3] for line in out["lines"]] == [
        ["host-overhead", "triton.linear_backward", "8x16->24"],
        ["host-overhead", "triton.softmax_cross_entropy", "4x40"]]
    for line in out["lines"]:
        assert line.endswith(" us/call") and float(line.split()[-2]) > 0


def test_host_overhead_refuses_the_interpreter():
    import bench.host_overhead as h

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        h.lines(cases=[])


def test_cupy_launchers_run_over_the_stand_in_and_leave_no_trace():
    import bench.host_overhead as h
    import bench.host_overhead_cupy as hc
    from gpuad.backend import is_cupy_array

    if "cupy" in sys.modules:
        pytest.skip("CuPy is imported here: the stand-in refuses to shadow it")
    with hc.stub_cupy() as cp:
        found = hc.cases(cp)
        assert [name for name, _, _ in found] == ["cupy.linear_backward", "cupy.softmax_cross_entropy"]
        for name, shape, fn in found:
            hc.launched.clear()
            out = fn()
            assert hc.launched and all(o is None or is_cupy_array(o) for o in out)  # gpuad's kernels were called
            assert h.per_call_us(fn, calls=2, rounds=2) > 0
        assert hc.launched[0][0].startswith("ce_")
    assert "cupy" not in sys.modules and not is_cupy_array(cp.empty(3))


# ------------------------------------------------------------------ GPU: the direct launch against Triton's

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_planned_calls_give_the_bits_of_triton_launches_and_replay_in_a_graph(dtype, monkeypatch):
    """On a GPU: the calls after the first (the compiled kernels' C launch called directly) give
    the bits of the first (through JITFunction.run), and both launchers replay in a CUDA graph."""
    from gpuad.kernels import triton as kt
    from gpuad.kernels.triton import linear_backward_plan as lbp

    monkeypatch.setenv("GPUAD_TRITON_AUTOTUNE", "0")
    g = torch.Generator(device="cuda").manual_seed(5)
    x, w, dy = (torch.randn(s, generator=g, device="cuda").to(dtype) for s in ((256, 1024), (1024, 1024), (256, 1024)))
    logits = torch.randn(64, 50257, generator=g, device="cuda").to(dtype)
    targets = torch.randint(0, 50257, (64,), generator=g, device="cuda")
    calls = {"linear": lambda: kt.linear_backward(x, w, dy, route="fused"),
             "ce": lambda: kt.softmax_cross_entropy(logits, targets, check_targets=False)}
    for name, fn in calls.items():
        lbp.clear_plans()
        ce.clear_plans()
        first, again = fn(), fn()
        for a, b in zip(first, again):
            assert (a is None and b is None) or torch.equal(a, b), name
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # the capture stream's first call (scratch and workspace made outside the capture)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = fn()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(first, captured):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_host_overhead_command_refuses_the_interpreter_with_a_usage_error(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--host-overhead"])
    assert e.value.code == 2 and "unset TRITON_INTERPRET" in capsys.readouterr().err
