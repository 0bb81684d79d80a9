"""Walk through backprop on a 3-layer MLP, one step at a time: the forward pass left to right
(each layer's activations), then the backward pass right to left (the gradient at the right
multiplied by Wᵢᵀ at each linear layer and gated by the ReLU derivative). Each step prints the
formula it applies and the numbers, all read from one recorded trace (``gpuad.trace``).

    python -m gpuad walk                          # one step per Enter (q + Enter quits)
    python -m gpuad walk --no-pause               # every step at once
    python -m gpuad walk --html walk.html         # a page animating the same steps
    python -m gpuad walk --depth 100 [--residual] [--plot grads.png]

With --depth N: two stacks of N layers h -> act(W h) (plain) and h -> h + act(W h) (residual),
with the same weights σ·Q (Q random orthogonal, so each W has all its singular values at σ).
It prints, per layer, the norm of the gradient at the layer's input for the loss ⟨c, output⟩
(c a random unit vector) and the largest singular value of the layer's Jacobian (built with the
engine's VJPs), for the plain stack (the residual one with --residual); --plot draws both.
The norms come from vectors rescaled at every layer with their scales kept as log10, so they
are right far outside float64's range; one Jacobian is held at a time, and long runs print
their progress on stderr. A --sigma whose stack saturates tanh or leaves float64 is refused.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from . import backend as B
from . import diagnostics, nn
from .cli import CommandError, check_fits, number, output_file, require, seed_type
from .ops import softmax_cross_entropy
from .tensor import Tensor
from .tracing import trace

HELP = "step through backprop on a 3-layer MLP (or --html: an animated page; --depth N: vanishing gradients)"
SIZES = (4, 5, 5, 3)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "walk.html")
PROGRESS_VJPS = 20_000  # `walk --depth` prints progress (stderr) from this many VJPs on (about 5 s)

# one sentence per op and direction: what the step does
WHY = {
    ("linear", "forward"): "a linear layer mixes its inputs",
    ("relu", "forward"): "ReLU keeps the positive part",
    ("softmax_cross_entropy", "forward"): "the loss: minus the log-probability of the target class",
    ("softmax_cross_entropy", "backward"): "the loss gradient: the probabilities minus the one-hot target",
    ("linear", "backward"): "back through the layer: multiply by {W}ᵀ; {W}'s gradient is an outer product",
    ("relu", "backward"): "the ReLU derivative gates the gradient: 0 where {x} ≤ 0",
}


# --- the 3-layer walk -------------------------------------------------------------------------
def mlp_walk(seed=0, sizes=SIZES):
    """(model, x, target, trace) of one example through ``nn.MLP(sizes)`` (ReLU, float64, random
    weights from `seed`) and softmax cross-entropy against a fake target class."""
    rng = np.random.default_rng(seed)
    with B.use_backend("numpy"):
        model = nn.MLP(list(sizes), activation="relu", dtype="float64", rng=rng)
        x = Tensor(rng.standard_normal((1, sizes[0])), requires_grad=True)
        target = int(rng.integers(sizes[-1]))
        t = trace(lambda v: softmax_cross_entropy(model(v), np.array([target])), x, names={x: "x"}, values=True)
    return model, x, target, t


def _columns(t):
    """For each forward step, the (from, to) columns of the drawing: 0 is the input, k the k-th
    linear layer's units, one past the last the loss."""
    col, cols = 0, []
    for s in t.forward:
        if s.op in ("linear", "softmax_cross_entropy"):
            cols.append((col, col + 1))
            col += 1
        else:
            cols.append((col, col))
    return cols


def _why_backward(f):
    """WHY's backward sentence for forward step `f`, with its symbols."""
    return WHY.get((f.op, "backward"), "").format(W=f.names[1] if len(f.names) > 1 else "", x=f.names[0])


def _vec(a):
    a = np.asarray(a).reshape(-1) + 0.0  # + 0.0: no "-0.000" where a ReLU gate gave -0
    if a.size == 1:
        return f"{a[0]:.4f}"
    return np.array2string(a, precision=3, floatmode="fixed", sign=" ", max_line_width=200)


def _matrix_note(name, a):
    return f"a {'×'.join(map(str, a.shape))} matrix, ‖{name}‖ = {np.linalg.norm(a):.4f}"


def walk_lines(t, target):
    """The walk as a list of steps, each a list of lines (the first names the step)."""
    steps = []
    n_fwd, n_bwd = len(t.forward), len(t.backward)
    for s in t.forward:
        why = WHY.get((s.op, "forward"), "")
        lines = [f"forward {s.index + 1}/{n_fwd}  {s.op}: {s.formula}    ({why})"]
        if s.op == "softmax_cross_entropy":
            z = t.forward[s.sources[0]].value.reshape(-1) if s.sources[0] is not None else None
            if z is not None:
                p = np.exp(z - z.max())
                lines.append(f"    p = softmax({s.names[0]}) = {_vec(p / p.sum())},  y* = {target}")
        norm = f"    ‖{s.out}‖ = {s.norm:.4f}" if s.value.size > 1 else ""
        lines.append(f"    {s.out} = {_vec(s.value)}{norm}    tape +{s.saved_bytes} B (total {s.tape_bytes} B)")
        steps.append(lines)
    for k, s in enumerate(t.backward):
        f = t.forward[s.op]
        why = _why_backward(f)
        lines = [f"backward {k + 1}/{n_bwd}  {f.op}: ∇{f.out} = {_vec(s.cotangent)} arrives    ({why})"]
        for rule, (_, shape, _), value in zip(s.rules, s.grads, s.grad_values):
            if len(shape) == 2 and min(shape) > 1:
                lines.append(f"    {rule}:  {_matrix_note(rule.split(' = ')[0], value)}")
            else:
                lines.append(f"    {rule}  =  {_vec(value)}")
        steps.append(lines)
    return steps


def run_walk(seed, pause, out=None, stdin=None):
    """Print the walk to `out` (stdout), one step per line read from `stdin` (stdin) when `pause`."""
    out = sys.stdout if out is None else out
    stdin = sys.stdin if stdin is None else stdin
    model, x, target, t = mlp_walk(seed)
    print(f"A {len(SIZES) - 1}-layer MLP {' → '.join(map(str, SIZES))} with ReLU, random weights (seed {seed}), "
          f"one input x and a fake target y* = {target}; float64. The formulas are per example, as column "
          f"vectors (z = W x + b).", file=out)
    print(f"After the forward pass the tape keeps {t.saved_bytes} bytes for backward (activations; leaves "
          f"that need a gradient, the weights and x, are not counted). Loss L = {float(t.output):.4f}.", file=out)
    if pause:
        print("Enter: next step, q then Enter: quit.", file=out)
    for lines in walk_lines(t, target):
        print("\n".join(lines), file=out, flush=True)
        if pause:
            answer = stdin.readline()
            if answer == "":  # end of input: show the rest without waiting
                pause = False
            elif answer.strip().lower() == "q":
                return
    W1 = model[0].weight
    print(f"The first layer's gradient ∇W1 = ∇z1 xᵀ (the engine's W1.grad):\n"
          f"{np.array2string(W1.grad, precision=4, floatmode='fixed', sign=' ')}", file=out)


# --- the page -----------------------------------------------------------------------------------
def page_data(seed=0):
    """The numbers the page animates, from the same trace as the text walk."""
    model, x, target, t = mlp_walk(seed)
    cols = _columns(t)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    forward = [{"op": s.op, "formula": s.formula, "why": WHY.get((s.op, "forward"), ""), "name": s.out,
                "value": s.value.reshape(-1).tolist(), "norm": s.norm, "bytes": s.saved_bytes,
                "from": c[0], "to": c[1]} for s, c in zip(t.forward, cols)]
    backward = []
    for s in t.backward:
        f = t.forward[s.op]
        c = cols[s.op]
        grads = [{"rule": r, "name": r.split(" = ")[0], "shape": list(shape), "norm": n,
                  "value": v.reshape(-1).tolist()} for r, (_, shape, n), v in zip(s.rules, s.grads, s.grad_values)]
        why = _why_backward(f)
        backward.append({"op": f.op, "name": f"∇{f.out}", "cotangent": s.cotangent.reshape(-1).tolist(),
                         "why": why, "grads": grads, "from": c[1], "to": c[0]})
    return {
        "sizes": list(SIZES), "seed": seed, "target": target, "loss": float(t.output),
        "saved_bytes": t.saved_bytes, "x": x.data.reshape(-1).tolist(),
        "weights": [m.weight.data.tolist() for m in linears],
        "forward": forward, "backward": backward,
    }


def write_page(path, seed=0):
    """Write the self-contained page (inline SVG, CSS and script; the trace as JSON) to `path`."""
    with open(PAGE, encoding="utf-8") as f:
        template = f.read()
    data = json.dumps(page_data(seed)).replace("</", "<\\/")
    with open(path, "w", encoding="utf-8") as f:
        f.write(template.replace("/*TRACE*/null", data))


# --- vanishing gradients --------------------------------------------------------------------------
def depth_report(depth, width=32, sigma=0.5, activation="tanh", seed=0, progress=None, setup=None):
    """Per stack ("plain", "residual"), a diagnostics.StackProfile for the loss ⟨c, output⟩
    (c a random unit vector): log10 of the gradient norm at each layer's input (layer 1
    first, then the output's), σ₁ of each layer's Jacobian and log10 of the product's σ.
    ``progress(kind, k)`` is called after the k-th Jacobian of each stack; `setup` is
    depth_setup's (weights, x, c) for these arguments when it was drawn already."""
    weights, x, c = setup if setup is not None else depth_setup(depth, width, sigma, seed)
    report = {}
    for kind in ("plain", "residual"):
        tick = None if progress is None else (lambda k, kind=kind: progress(kind, k))
        report[kind] = diagnostics.stack_profile(diagnostics.stack_layers(weights, activation, kind == "residual"),
                                                 x, c, progress=tick)
    return report


def depth_setup(depth, width, sigma, seed):
    """(weights, x, c) of `walk --depth`: σ·Q per layer, the input and the unit cotangent."""
    rng = np.random.default_rng(seed)
    weights = diagnostics.orthogonal_weights(depth, width, sigma, rng)
    x = rng.standard_normal(width)
    c = rng.standard_normal(width)
    return weights, x, c / np.linalg.norm(c)


_ACT = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0), "linear": lambda z: z}


def depth_memory_bytes(depth, width):
    """About the most memory `walk --depth` holds: the weights, every layer's input, and a
    few width×width matrices (a Jacobian, the scaled product, their SVDs' work)."""
    return 8 * (depth * width * width + 2 * (depth + 1) * width + 8 * width * width)


def stack_problem(setup, sigma, activation):
    """Why `walk --depth` cannot give right figures for depth_setup's (weights, x, c) (a
    sentence naming --sigma), or None: found by the stacks' forward pass alone."""
    weights, x, _ = setup
    act = _ACT[activation]
    tiny = np.finfo(np.float64).tiny
    for kind in ("plain", "residual"):
        h = x
        for k, W in enumerate(weights, 1):
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below
                z = W @ h
            a = act(z)
            where = f"at layer {k} of the {kind} stack"
            if kind == "plain" and activation == "tanh" and np.all(a * a == 1.0):
                return (f"--sigma {sigma:g} saturates tanh {where}: every unit's |W h| is above 19, where tanh' "
                        f"rounds to 0 in float64, so every gradient below it would be exactly 0; use a smaller "
                        f"--sigma")
            if activation == "relu" and h.any() and np.abs(z).max() < tiny:
                return (f"--sigma {sigma:g} underflows float64 {where}: W h falls below {tiny:.0e}, so ReLU's "
                        f"derivative would read 0 there; use a larger --sigma or a smaller --depth")
            with np.errstate(over="ignore", invalid="ignore"):
                h = h + a if kind == "residual" else a
            if not np.isfinite(h).all():
                return (f"--sigma {sigma:g} overflows float64 {where} (the activations reach inf); use a "
                        f"smaller --sigma or a smaller --depth")
    return None


def _exp10(log10_value, digits=4):
    """10**log10_value in e-notation ("1.2345e-2000"), also outside float64's range; 0 for -inf."""
    if log10_value == -math.inf:
        return f"{0.0:.{digits}e}"
    exponent = math.floor(log10_value)
    mantissa = round(10.0 ** (log10_value - exponent), digits)
    if mantissa >= 10.0:
        mantissa, exponent = mantissa / 10.0, exponent + 1
    return f"{mantissa:.{digits}f}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


_LAYER = {"plain": "act(W x)", "residual": "x + act(W x)"}


def plot_depth(report, path, title):
    """Both stacks' log10 gradient norm per layer and σ₁ per layer, side by side, to `path`."""
    figure = require("matplotlib.figure", "matplotlib", "train")
    fig = figure.Figure(figsize=(10, 4))
    ax_g, ax_s = fig.subplots(1, 2)
    colors = {"plain": "#7c3aed", "residual": "#db2777"}
    for kind, r in report.items():
        layers = np.arange(1, len(r.sigma1) + 1)
        ax_g.plot(layers, r.log10_grad_norms[:-1], color=colors[kind], label=f"{kind}: y = {_LAYER[kind]}")
        ax_s.plot(layers, r.sigma1, color=colors[kind], label=kind)
    ax_g.set(xlabel="layer", ylabel="log₁₀ ‖∇ at the layer's input‖", title="gradient norm per layer")
    ax_s.set(xlabel="layer", ylabel="σ₁ of the layer's Jacobian", title="largest singular value per layer")
    ax_s.set_ylim(bottom=0)
    for ax in (ax_g, ax_s):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _ratio(report, kind):
    """The first layer's gradient over the last layer's, as printed."""
    g = report[kind].log10_grad_norms
    if g[-2] == -math.inf:
        return "undefined (the gradient at the last layer's input is exactly 0)"
    return _exp10(g[0] - g[-2])


def _progress_printer(depth, err):
    """A progress(kind, k) writing "plain stack: 100/1000 layers" to `err` about every 10%."""
    step = max(1, depth // 10)

    def progress(kind, k):
        if k % step == 0 or k == depth:
            print(f"{kind} stack: Jacobians of {k}/{depth} layers", file=err, flush=True)
    return progress


def run_depth(args, out=None, err=None, setup=None):
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    show = not args.no_progress and 2 * args.depth * args.width >= PROGRESS_VJPS
    report = depth_report(args.depth, args.width, args.sigma, args.activation, args.seed,
                          progress=_progress_printer(args.depth, err) if show else None, setup=setup)
    kind = "residual" if args.residual else "plain"
    r = report[kind]
    title = (f"{args.depth} layers of width {args.width}, W = {args.sigma:g}·Q (Q orthogonal), {args.activation}, "
             f"seed {args.seed}")
    print(f"{kind} stack, y = {_LAYER[kind]}: {title}", file=out)
    print(f"{'layer':>6}  {'‖∇ at its input‖':>18}  {'σ₁(J)':>8}", file=out)
    shown = sorted({1, args.depth} | set(range(0, args.depth + 1, max(1, args.depth // 10))) - {0})
    for i in shown:
        print(f"{i:>6}  {_exp10(r.log10_grad_norms[i - 1]):>18}  {r.sigma1[i - 1]:>8.4f}", file=out)
    print(f"output  {_exp10(r.log10_grad_norms[-1]):>18}", file=out)
    print(f"σ of the product J_{args.depth}⋯J_1: largest {_exp10(r.log10_product_sigma[0])}, smallest "
          f"{_exp10(r.log10_product_sigma[1])}", file=out)
    for k in ("plain", "residual"):
        note = f" (σ^(depth-1) = {_exp10((args.depth - 1) * math.log10(args.sigma))})" if k == "plain" else ""
        print(f"{k}: first layer's gradient / last layer's = {_ratio(report, k)}{note}", file=out)
    if args.plot is not None:
        plot_depth(report, args.plot, title)
        print(f"wrote {args.plot}", file=out)


# --- the command ----------------------------------------------------------------------------------
def add_arguments(p):
    d = "(default: %(default)s)"
    p.add_argument("--no-pause", action="store_true", help="print every step at once instead of one per Enter")
    p.add_argument("--html", metavar="FILE.html",
                   help="write one self-contained page (no external assets) that draws the network and animates "
                        "the same steps with Forward and Backward buttons, then exit")
    p.add_argument("--seed", type=seed_type, default=2,
                   help=f"seed of the random weights, input and target (2: most ReLU units are active) {d}")
    p.add_argument("--depth", type=number(int, 1, 1000), metavar="N",
                   help="instead of the walk: gradient norm and largest singular value per layer of N-layer plain "
                        "and residual stacks")
    p.add_argument("--residual", action="store_true",
                   help="with --depth: print the residual stack y = x + act(W x) instead of the plain one")
    p.add_argument("--plot", metavar="FILE.png",
                   help="with --depth: draw both stacks' gradient norms and singular values per layer (matplotlib)")
    p.add_argument("--width", type=number(int, 1, 512), default=32, help=f"with --depth: the layers' width {d}")
    p.add_argument("--sigma", type=number(float, 0, low_open=True), default=0.5,
                   help=f"with --depth: every singular value of each weight matrix {d}")
    p.add_argument("--activation", choices=sorted(diagnostics.ACTIVATIONS), default="tanh",
                   help=f"with --depth: the layers' activation {d}")
    p.add_argument("--no-progress", action="store_true",
                   help="with --depth: no progress lines on stderr (printed for runs of more than a few seconds)")


def run(args):
    if args.depth is None:
        for flag, value in (("--residual", args.residual), ("--plot", args.plot)):
            if value:
                raise CommandError(f"{flag} needs --depth N (it describes the N-layer stacks)")
        if args.html is not None:
            output_file(args.html, "--html", ".html")
            write_page(args.html, args.seed)
            print(f"wrote {args.html}: open it in a browser and press Forward, then Backward")
            return 0
        run_walk(args.seed, pause=not args.no_pause)
        return 0
    if args.html is not None:
        raise CommandError("--html draws the 3-layer walk and does not combine with --depth")
    if args.plot is not None:
        output_file(args.plot, "--plot", ".png")
        require("matplotlib", "matplotlib", "train")
    check_fits(depth_memory_bytes(args.depth, args.width), f"--depth {args.depth} --width {args.width}")
    setup = depth_setup(args.depth, args.width, args.sigma, args.seed)
    problem = stack_problem(setup, args.sigma, args.activation)
    if problem is not None:
        raise CommandError(problem)
    run_depth(args, setup=setup)
    return 0
