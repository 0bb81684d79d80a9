"""The backprop walker: ad.trace (steps, rules, numbers against a hand-written numpy backprop),
python -m gpuad walk (interactive through piped Enter, --no-pause, one-line errors) and its
--html page, driven in headless Chromium."""
import ast
import html.parser
import importlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpuad as ad
from gpuad import nn
from gpuad import __main__ as gpuad_main
from gpuad import tracing, walk

T = importlib.import_module("gpuad.tensor")  # the module: gpuad.tensor is also the function ad.tensor
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _walk_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gpuad", "walk", *args], env=_env(), input=stdin,
                          capture_output=True, text=True, timeout=120)


# --- ad.trace ---------------------------------------------------------------------------------
def _manual_backprop(model, x, target):
    """The MLP's forward and backward written out in numpy (column-vector formulas on rows)."""
    Ws = [m.weight.data for m in model if isinstance(m, nn.Linear)]
    bs = [m.bias.data for m in model if isinstance(m, nn.Linear)]
    zs, hs = [], [x]
    for i, (W, b) in enumerate(zip(Ws, bs)):
        zs.append(hs[-1] @ W.T + b)
        if i < len(Ws) - 1:
            hs.append(np.maximum(zs[-1], 0))
    z = zs[-1]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    loss = -np.log(p[0, target])
    dz = p.copy()
    dz[0, target] -= 1
    grads = {"dz": [None] * len(Ws), "dW": [None] * len(Ws), "dh": [None] * len(Ws)}
    for i in reversed(range(len(Ws))):
        grads["dz"][i] = dz
        grads["dW"][i] = dz.T @ hs[i]
        grads["dh"][i] = dz @ Ws[i]  # the gradient at layer i's input
        if i > 0:
            dz = grads["dh"][i] * (zs[i - 1] > 0)
    return zs, hs, loss, grads


def test_trace_records_every_step_with_its_rule_and_numbers():
    model, x, target, t = walk.mlp_walk(seed=2)
    zs, hs, loss, grads = _manual_backprop(model, x.data, target)
    assert [s.op for s in t.forward] == ["linear", "relu", "linear", "relu", "linear", "softmax_cross_entropy"]
    assert [s.formula for s in t.forward] == ["z1 = W1 x + b1", "h1 = max(z1, 0)", "z2 = W2 h1 + b2",
                                              "h2 = max(z2, 0)", "z3 = W3 h2 + b3", "L = −log softmax(z3)[y*]"]
    assert t.forward[0].inputs == [(1, 4), (5, 4), (5,)] and t.forward[0].shape == (1, 5)
    assert t.forward[2].sources == [1, None, None]  # z2 reads h1, made by step 2
    outputs = [zs[0], hs[1], zs[1], hs[2], zs[2], loss]
    for s, want in zip(t.forward, outputs):
        np.testing.assert_allclose(s.value.reshape(np.shape(want)), want, rtol=1e-12)
        assert s.norm == pytest.approx(np.linalg.norm(want), rel=1e-12)
    assert float(t.output) == pytest.approx(loss, rel=1e-12)
    # backward: one VJP per op, in reverse order, with the rules of the inputs that need a gradient
    assert [s.op for s in t.backward] == [5, 4, 3, 2, 1, 0]
    assert t.backward[0].rules == ["∇z3 = (p − y*) ∇L"] and t.backward[0].norm == 1.0
    assert t.backward[1].rules == ["∇h2 = W3ᵀ ∇z3", "∇W3 = ∇z3 h2ᵀ", "∇b3 = ∇z3"]
    assert t.backward[2].rules == ["∇z2 = 1[z2 > 0] ⊙ ∇h2"]
    assert t.backward[5].rules == ["∇x = W1ᵀ ∇z1", "∇W1 = ∇z1 xᵀ", "∇b1 = ∇z1"]
    for layer, step in zip((2, 1, 0), (t.backward[1], t.backward[3], t.backward[5])):
        np.testing.assert_allclose(step.cotangent, grads["dz"][layer], rtol=1e-12)
        assert step.norm == pytest.approx(np.linalg.norm(grads["dz"][layer]), rel=1e-12)
        np.testing.assert_allclose(step.grad_values[0], grads["dh"][layer], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(step.grad_values[1], grads["dW"][layer], rtol=1e-12, atol=1e-15)
        assert [g[1] for g in step.grads] == [step.grad_values[i].shape for i in range(3)]
    np.testing.assert_array_equal(t.backward[5].grad_values[1], model[0].weight.grad)  # the engine's own ∇W1
    assert T._inspector is None  # the hook is gone once the trace is done


def test_trace_saved_bytes_and_arrays_as_inputs():
    """Arrays become leaves that require grad; the tape's bytes are those each op's VJP keeps."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
    during = []  # ad.saved_bytes while the forward pass records

    def f(x, W):
        z = ad.linear(x, W)
        during.append(ad.saved_bytes(z))
        h = ad.relu(z)
        during.append(ad.saved_bytes(h))
        s = h.sum()
        during.append(ad.saved_bytes(s))
        return s

    t = ad.trace(f, x, W)
    assert [s.op for s in t.forward] == ["linear", "relu", "sum"]
    assert during == [s.tape_bytes for s in t.forward] == [0, 6 * 4 * 8, 6 * 4 * 8]
    # linear keeps x and W (leaves that need a gradient: not counted), relu its input z, sum nothing
    assert [s.saved_bytes for s in t.forward] == [0, 6 * 4 * 8, 0] and t.saved_bytes == 6 * 4 * 8
    assert t.backward[-1].rules == ["∇x1 = W1ᵀ ∇z1", "∇W1 = ∇z1 x1ᵀ"]
    assert t.forward[1].formula == "h1 = max(z1, 0)" and t.backward[1].rules == ["∇z1 = 1[z1 > 0] ⊙ ∇h1"]
    assert "forward: 3 ops" in str(t) and "∇W1 = ∇z1 x1ᵀ" in str(t)
    t = ad.trace(lambda z: ad.tanh(z).sum(), ad.tensor(np.ones(3), requires_grad=True))
    assert t.forward[0].formula == "h1 = tanh(z1)" and t.backward[1].rules == ["∇z1 = (1 − h1²) ⊙ ∇h1"]


def test_trace_ignores_other_threads_and_cleans_up_after_an_error():
    def f(x):
        other = threading.Thread(target=lambda: ad.exp(ad.tensor([1.0], requires_grad=True)).sum().backward())
        other.start()
        other.join()
        return ad.sq_norm(x)

    t = ad.trace(f, np.ones(3))
    assert [s.op for s in t.forward] == ["sq_norm"] and len(t.backward) == 1

    def bad(x):
        raise KeyError("inside f")

    with pytest.raises(KeyError):
        ad.trace(bad, np.ones(3))
    assert T._inspector is None
    with pytest.raises(TypeError, match="must return a Tensor"):
        ad.trace(lambda x: 3.0, np.ones(3))


def test_every_op_has_a_rule():
    """Each name that gpuad/ops.py records has its formulas in tracing.RULES."""
    source = open(os.path.join(ROOT, "gpuad", "ops.py"), encoding="utf-8").read()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("record", "_unary") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    assert len(names) > 20
    assert names - set(tracing.RULES) == set()


# --- python -m gpuad walk ---------------------------------------------------------------------
def test_walk_help_describes_every_flag():
    out = _walk_cli("--help")
    assert out.returncode == 0
    for flag in ("--no-pause", "--html", "--seed", "--depth", "--residual", "--plot", "--width", "--sigma",
                 "--activation", "--no-progress"):
        assert re.search(re.escape(flag) + r"[^\n]*\n?\s+\S", out.stdout), flag


@pytest.mark.parametrize("args, message", [
    (["--residual"], "--residual needs --depth"),
    (["--plot", "g.png"], "--plot needs --depth"),
    (["--depth", "0"], "--depth: must lie in [1, 1000], got 0"),
    (["--depth", "3", "--plot", "g.txt"], "the file name must end in .png"),
    (["--html", "no/such/folder/w.html"], "does not exist"),
    (["--depth", "3", "--html", "w.html"], "does not combine with --depth"),
    (["--activation", "swish", "--depth", "3"], "invalid choice"),
    (["--seed", "-1"], "--seed: must lie in [0, 4294967295], got -1"),
    (["--depth", "3", "--seed", "4294967296"], "--seed: must lie in [0, 4294967295]"),
    (["--depth", "30", "--sigma", "1000"], "--sigma 1000 saturates tanh at layer"),  # was a ZeroDivisionError
    (["--depth", "400", "--sigma", "10", "--activation", "linear"],
     "--sigma 10 overflows float64 at layer 308 of the plain"),
    (["--depth", "300", "--sigma", "0.01", "--activation", "relu"], "--sigma 0.01 underflows float64 at layer"),
    (["--depth", "3", "--plot", "no/such/folder/g.png"], "does not exist"),
])
def test_walk_bad_input_is_one_line(args, message):
    out = _walk_cli(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr


def _depth_rows(stdout):
    return {int(r[0]): r[1] for r in re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)$", stdout, flags=re.M)}


def test_walk_depth_600_prints_gradient_norms_below_1e_154():
    """Linear layers 0.5·Q: the gradient at layer i's input is exactly 0.5^(depth - i + 1) (c is a
    unit vector). Its float64 square underflows below 1e-154: the norms were printed as 0."""
    out = _walk_cli("--depth", "600", "--width", "4", "--activation", "linear")
    assert out.returncode == 0, out.stderr
    rows = _depth_rows(out.stdout)
    assert sorted(rows) == [1] + list(range(60, 601, 60))
    for layer, text in rows.items():
        assert float(text) == pytest.approx(0.5 ** (601 - layer), rel=1e-9), layer
    p, ratio = f"{0.5 ** 600:.4e}", f"{0.5 ** 599:.4e}"  # 2.4099e-181 and 4.8198e-181, within float64
    assert f"σ of the product J_600⋯J_1: largest {p}, smallest {p}" in out.stdout
    assert f"plain: first layer's gradient / last layer's = {ratio} (σ^(depth-1) = {ratio})" in out.stdout


def test_walk_depth_figures_beyond_float64_range():
    """0.01·Q, 1000 linear layers: the gradient at the first layer's input is 1e-2000, far below
    float64; printed from its log10."""
    report = walk.depth_report(1000, width=2, sigma=0.01, activation="linear", seed=1)
    plain = report["plain"]
    np.testing.assert_allclose(plain.log10_grad_norms, -2.0 * np.arange(1000, -1, -1), atol=1e-9)
    np.testing.assert_allclose(plain.log10_product_sigma, (-2000.0, -2000.0), atol=1e-9)
    assert walk._exp10(plain.log10_grad_norms[0]) == "1.0000e-2000"
    assert walk._exp10(-math.inf) == "0.0000e+00" and walk._exp10(math.log10(9.99996)) == "1.0000e+01"


def test_walk_depth_shows_progress_on_stderr_and_not_with_no_progress(monkeypatch):
    """Large runs print progress lines to stderr (the largest, depth 1000 and width 512, ran
    minutes in silence); --no-progress turns them off; stdout is the same."""
    monkeypatch.setattr(walk, "PROGRESS_VJPS", 40)
    outs = []
    for extra in ([], ["--no-progress"]):
        out, err = io.StringIO(), io.StringIO()
        args = gpuad_main.build_parser().parse_args(["walk", "--depth", "20", "--width", "2", *extra])
        walk.run_depth(args, out=out, err=err)
        outs.append((out.getvalue(), err.getvalue()))
    assert outs[0][0] == outs[1][0] and outs[1][1] == ""
    assert outs[0][1].splitlines() == [f"{kind} stack: Jacobians of {k}/20 layers" for kind in ("plain", "residual")
                                       for k in range(2, 21, 2)]


def test_walk_depth_that_cannot_fit_is_refused_before_any_work(monkeypatch, capsys):
    """The largest walk (depth 1000, width 512) holds 2 GiB of weights: refused, before the
    weights are drawn, where that much memory is not available."""
    from gpuad import cli
    monkeypatch.setattr(cli, "available_memory", lambda: 2 ** 30)
    monkeypatch.setattr(walk, "depth_setup", lambda *a: pytest.fail("work started"))
    assert gpuad_main.main(["walk", "--depth", "1000", "--width", "512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m gpuad walk: error: --depth 1000 --width 512 needs about 1.98 GiB of memory, "
                          "more than the 1 GiB available"), err
    assert walk.depth_memory_bytes(1000, 512) >= 8 * 1000 * 512 * 512  # the weights alone


def test_walk_steps_one_per_enter():
    everything = _walk_cli("--no-pause")
    assert everything.returncode == 0, everything.stderr
    steps = re.findall(r"^(forward|backward) (\d+)/(\d+)", everything.stdout, flags=re.M)
    assert [s[0] for s in steps] == ["forward"] * 6 + ["backward"] * 6
    assert "Enter" not in everything.stdout
    # piped Enter: the same output, with the prompt; q stops after the step it answers
    paced = _walk_cli(stdin="\n" * 12)
    assert paced.returncode == 0
    assert paced.stdout.replace("Enter: next step, q then Enter: quit.\n", "") == everything.stdout
    quit_early = _walk_cli(stdin="\n\nq\n")
    assert quit_early.returncode == 0
    assert len(re.findall(r"^(forward|backward) \d+/", quit_early.stdout, flags=re.M)) == 3
    # the formulas and numbers of the walk: the gradient at the right, multiplied by Wᵢᵀ, gated by ReLU
    text = everything.stdout
    for line in ("∇h2 = W3ᵀ ∇z3", "∇z2 = 1[z2 > 0] ⊙ ∇h2", "∇h1 = W2ᵀ ∇z2", "∇x = W1ᵀ ∇z1", "∇W1 = ∇z1 xᵀ"):
        assert line in text
    model, x, target, _ = walk.mlp_walk(seed=2)
    printed = text.split("(the engine's W1.grad):\n", 1)[1]
    values = np.array([float(v) for v in re.findall(r"-?\d+\.\d+", printed)]).reshape(5, 4)
    np.testing.assert_allclose(values, model[0].weight.grad, atol=5e-5)


# --- the page, in headless Chromium -------------------------------------------------------------
def _chromium():
    """Debian's chromium (.ci/run installs it). Where it is absent the page's test skips, saying
    why; under CI (the environment variable CI set, as .ci/run's runner sets it) it fails instead,
    so that CI never passes without having run the page."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    reason = "no chromium command on PATH (the walker page's test needs Debian's chromium: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run this test")
    pytest.skip(reason)


def test_page_test_skips_without_chromium_and_fails_under_ci(monkeypatch):
    """Nothing is installed: without chromium the page's test skips with its reason, and under
    CI it fails instead."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs Debian's chromium"):
        _chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test"):
        _chromium()


def _check_labels(dom):
    """Every number label sits on a white chip drawn after every edge (so no edge runs through
    it), and no two chips overlap or come within 4 px of each other."""
    svg = dom.split('<svg id="net"', 1)[1].split("</svg>", 1)[0]
    last_edge = max(m.start() for m in re.finditer(r"<line ", svg))
    chips = []
    for m in re.finditer(r'<rect class="chip( empty)?" x="([-\d.]+)" y="([-\d.]+)" width="([\d.]+)" height="([\d.]+)"'
                         r'[^>]*>(?:</rect>)?<text class="(g?val)"[^>]*>([^<]*)</text>', svg):
        empty, text = m.group(1), m.group(7)
        assert bool(empty) == (text == ""), m.group(0)  # a chip shows exactly while its label has text
        if text:
            assert m.start() > last_edge
            chips.append(tuple(float(m.group(i)) for i in range(2, 6)))
    assert len(chips) == 2 * (4 + 5 + 5 + 3) + 1  # activations and gradients of every unit, and the loss
    for i, (x, y, w, h) in enumerate(chips):
        for x2, y2, w2, h2 in chips[i + 1:]:
            assert x + w + 4 <= x2 or x2 + w2 + 4 <= x or y + h + 4 <= y2 or y2 + h2 + 4 <= y, (x, y, x2, y2)


def test_page_text_and_style():
    """The page says how ?play and ?speed work; the numbers box is hidden while empty (before
    Forward); the formula uses the page's font."""
    text = open(walk.PAGE, encoding="utf-8").read()
    note = re.search(r'<p class="note" id="play-note">(.*?)</p>', text, re.S).group(1)
    assert "?play" in note and "?speed=MS" in note
    assert "#numbers:empty { display: none; }" in text
    assert "font-family" not in re.search(r"#formula \{[^}]*\}", text).group(0)


class _Cells(html.parser.HTMLParser):
    """The data-value and text of every cell of table#grad-first-layer, and body's data-state."""

    def __init__(self):
        super().__init__()
        self.in_table, self.cell, self.values, self.texts, self.state = False, None, [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.state = attrs.get("data-state")
        if tag == "table" and attrs.get("id") == "grad-first-layer":
            self.in_table = True
        if self.in_table and tag == "td":
            self.values.append(attrs["data-value"])
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False
        if tag == "td" and self.cell is not None:
            self.texts.append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_html_page_in_headless_chromium(tmp_path):
    """Press Forward, then Backward (?play), and read the first layer's gradient off the page:
    it equals the engine's ∇W1 bit for bit (float64, one example: each entry is one product).
    The screenshot is kept in GPUAD_TEST_ARTIFACTS (a folder) when set, else in pytest's tmp_path."""
    chromium = _chromium()
    page = tmp_path / "walk.html"
    out = _walk_cli("--html", str(page))
    assert out.returncode == 0, out.stderr
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=|@import|url\(|https?://(?!www\.w3\.org/2000/svg)""", text)  # self-contained
    folder = os.environ.get("GPUAD_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    shot = os.path.join(folder, "walk-page.png")
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=60000",
                          "--window-size=1200,840", f"--screenshot={shot}", "--dump-dom", page.as_uri() + "?play"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    print(f"screenshot of the page after Forward and Backward: {shot}")
    cells = _Cells()
    cells.feed(run.stdout)
    assert cells.state == "backward-done"
    model, _, _, _ = walk.mlp_walk(seed=2)
    engine = model[0].weight.grad
    shown = np.array([float(v) for v in cells.values]).reshape(engine.shape)
    np.testing.assert_array_equal(shown, engine)
    np.testing.assert_allclose(np.array([float(v) for v in cells.texts]).reshape(engine.shape), engine, rtol=5e-4,
                               atol=1e-12)
    assert np.count_nonzero(engine) >= 8  # a gradient with something in it
    assert "largest difference from the engine's ∇W1 in the trace: 0<" in run.stdout
    _check_labels(run.stdout)
    with open(shot, "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


# --- docs/walker.md and docs/memory.md --------------------------------------------------------------
def _doc(name):
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def test_docs_show_real_output(capsys):
    """The walker excerpt (docs/walker.md) is the command's output, line for line, and the
    checkpoint snippet's number (docs/memory.md) is what it prints."""
    excerpt = re.search(r"excerpt of `python -m gpuad walk --no-pause`:\n\n```\n(.*?)```", _doc("walker.md"),
                        re.S).group(1)
    out = io.StringIO()
    walk.run_walk(2, pause=False, out=out)
    lines = out.getvalue().splitlines()
    start = lines.index(excerpt.splitlines()[0])
    assert lines[start:start + len(excerpt.splitlines())] == excerpt.splitlines()
    code = re.search(r"```python\n(.*?)```", _doc("memory.md"), re.S).group(1)
    exec(compile(code, "docs/memory.md", "exec"), {})
    printed = int(capsys.readouterr().out)
    exec(compile(code.replace("ad.checkpoint(block, h)", "block(h)"), "docs/memory.md", "exec"), {})
    plain = int(capsys.readouterr().out)
    assert f"print(ad.saved_bytes(loss))   # {printed} (21 arrays of 64×256 fp32); {plain} (40 arrays)" in code
    assert printed == 21 * 64 * 256 * 4 and plain == 40 * 64 * 256 * 4
