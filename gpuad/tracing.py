"""Looking inside the tape: the recorded steps of a forward and backward pass, and the bytes the
tape keeps for backward.

    import gpuad as ad
    t = ad.trace(f, x)          # runs f(x), then backward; t.forward and t.backward are the steps
    print(t)                    # one line per op, then one per VJP, with its rule
    ad.saved_bytes(loss)        # bytes the VJPs behind `loss` keep: the activation memory

The steps come from the engine's inspection hook (``tensor._inspector``): a listener stack per
thread, installed only while someone listens, so the engine pays nothing otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import threading
import types
from dataclasses import dataclass, field

import numpy as np

from . import backend as B
from .tensor import Node, Tensor, check_not_in_transform, enable_grad

# --- the listeners ------------------------------------------------------------------------
T = importlib.import_module(".tensor", __package__)  # the module (gpuad.tensor is also a function's name)
_local = threading.local()  # .listeners: this thread's stack of listeners
_lock = threading.Lock()
_active = [0]  # listeners on every thread's stack together; the hook is installed while > 0


class _Dispatch:
    """The engine's inspector while any thread listens: passes each event to the listeners of
    the thread that caused it (an op recorded on another thread is not ours)."""

    def on_record(self, out, name, parents):
        for listener in getattr(_local, "listeners", ()):
            listener.on_record(out, name, parents)

    def on_vjp(self, node, g, grads):
        for listener in getattr(_local, "listeners", ()):
            listener.on_vjp(node, g, grads)


_DISPATCH = _Dispatch()


@contextlib.contextmanager
def listening(listener):
    """Within the block, `listener.on_record(out, name, parents)` runs after every op the calling
    thread makes (recorded or not: under no_grad too) and `listener.on_vjp(node, g, grads)` after
    every VJP its backward walks run."""
    stack = _local.__dict__.setdefault("listeners", [])
    with _lock:
        stack.append(listener)
        _active[0] += 1
        T._inspector = _DISPATCH
    try:
        yield listener
    finally:
        with _lock:
            stack.remove(listener)
            _active[0] -= 1
            if _active[0] == 0:
                T._inspector = None


# --- what the tape keeps --------------------------------------------------------------------
def _owner(a):
    """The array that owns `a`'s memory (a itself, or the array at the end of its .base chain)."""
    while B.backend_of(getattr(a, "base", None)) is not None:
        a = a.base
    return a


def _held_arrays(obj, found):
    """Add to `found` (id -> array) the memory owners of every array that `obj` holds: through
    closures and default arguments of functions, bound methods (an array's ``__rmul__``, say),
    partials, tuples, lists, dicts and Tensors."""
    seen, stack = set(), [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if B.backend_of(o) is not None:
            owner = _owner(o)
            found[id(owner)] = owner
        elif isinstance(o, Tensor):
            stack.append(o.data)
        elif isinstance(o, types.FunctionType):
            for cell in o.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # a cell not filled yet
                    pass
            stack.extend(o.__defaults__ or ())
            stack.extend((o.__kwdefaults__ or {}).values())
        elif isinstance(o, (types.MethodWrapperType, types.BuiltinMethodType, types.MethodType)):
            stack.append(o.__self__)
            stack.append(getattr(o, "__func__", None))
        elif isinstance(o, functools.partial):
            stack += [o.func, *o.args, *o.keywords.values()]
        elif type(o) in (tuple, list):
            stack.extend(o)
        elif type(o) is dict:
            stack.extend(o.values())


_NODE_STRUCTURE = frozenset(("name", "edges", "shape", "dtype", "out", "guarded", "__weakref__"))


def node_arrays(node) -> tuple[dict, set]:
    """(kept, parameters) of one tape node: `kept` maps id -> memory owner of every array its
    VJP holds (its closures, and any slot of the node beyond its structure); `parameters` holds
    the ids of the memory owners of its leaf inputs that require grad, which the model keeps
    anyway and are not counted as activation memory."""
    kept = {}
    if node.vjp is None:  # ran its last VJP: it keeps nothing
        return kept, set()
    for slot in type(node).__slots__:
        if slot not in _NODE_STRUCTURE:
            _held_arrays(getattr(node, slot, None), kept)
    parameters = {id(_owner(e.data)) for e in node.edges if isinstance(e, Tensor)}
    return kept, parameters


def _nbytes(arrays: dict, parameters: set) -> int:
    return int(sum(a.nbytes for k, a in arrays.items() if k not in parameters))


def _live_nodes(outputs):
    """The nodes behind `outputs` (Tensors), or every tape node alive in the program."""
    if not outputs:
        return [o for o in gc.get_objects() if type(o) is Node]
    nodes, stack, seen = [], [], set()
    for t in outputs:
        if not isinstance(t, Tensor):
            raise TypeError(f"saved_bytes: expected Tensors, got {type(t).__name__}")
        if type(t._node) is Node:
            stack.append(t._node)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(e for e in node.edges or () if type(e) is Node)
    return nodes


def saved_bytes(*outputs) -> int:
    """The bytes that the tape keeps for backward: the activation memory of reverse mode.

    Counts every array that the VJPs of the graph behind `outputs` hold (with no argument: of
    every graph alive in the program, found through the garbage collector's list of objects,
    a diagnostic that costs one pass over the live objects), each memory buffer once (a view
    counts its whole base). Parameters (leaf inputs that require grad) are not counted: the
    model holds them whether or not a graph is alive. A graph whose backward has run keeps
    nothing (unless it was retained)."""
    kept, parameters = {}, set()
    for node in _live_nodes(outputs):
        k, p = node_arrays(node)
        kept.update(k)
        parameters |= p
    return _nbytes(kept, parameters)


# --- the rules ------------------------------------------------------------------------------
# op name -> (output symbol, input symbols, forward formula, VJP formula per input). The formulas
# are written per example, with column vectors as on a blackboard (the engine stores rows: y = x Wᵀ
# + b); over a batch, a parameter's gradient is the sum over the rows and a mean divides by their
# count. "{+b}" stands for " + b" when the op has that input and for nothing otherwise.
RULES = {
    "linear": ("z", ("x", "W", "b"), "{y} = {W} {x}{+b}", ("∇{x} = {W}ᵀ ∇{y}", "∇{W} = ∇{y} {x}ᵀ", "∇{b} = ∇{y}")),
    "matmul": ("y", ("a", "b"), "{y} = {a} {b}", ("∇{a} = ∇{y} {b}ᵀ", "∇{b} = {a}ᵀ ∇{y}")),
    "add": ("y", ("a", "b"), "{y} = {a} + {b}", ("∇{a} = ∇{y}", "∇{b} = ∇{y}")),
    "sub": ("y", ("a", "b"), "{y} = {a} − {b}", ("∇{a} = ∇{y}", "∇{b} = −∇{y}")),
    "mul": ("y", ("a", "b"), "{y} = {a} ⊙ {b}", ("∇{a} = {b} ⊙ ∇{y}", "∇{b} = {a} ⊙ ∇{y}")),
    "div": ("y", ("a", "b"), "{y} = {a} / {b}", ("∇{a} = ∇{y} / {b}", "∇{b} = −∇{y} ⊙ {y} / {b}")),
    "add_scalar": ("y", ("x",), "{y} = {x} + c", ("∇{x} = ∇{y}",)),
    "sub_scalar": ("y", ("x",), "{y} = {x} − c", ("∇{x} = ∇{y}",)),
    "rsub_scalar": ("y", ("x",), "{y} = c − {x}", ("∇{x} = −∇{y}",)),
    "mul_scalar": ("y", ("x",), "{y} = c {x}", ("∇{x} = c ∇{y}",)),
    "div_scalar": ("y", ("x",), "{y} = {x} / c", ("∇{x} = ∇{y} / c",)),
    "neg": ("y", ("x",), "{y} = −{x}", ("∇{x} = −∇{y}",)),
    "pow": ("y", ("x",), "{y} = {x}ᵖ", ("∇{x} = p {x}ᵖ⁻¹ ⊙ ∇{y}",)),
    "exp": ("y", ("x",), "{y} = exp({x})", ("∇{x} = {y} ⊙ ∇{y}",)),
    "log": ("y", ("x",), "{y} = log {x}", ("∇{x} = ∇{y} / {x}",)),
    "tanh": ("h", ("z",), "{y} = tanh({z})", ("∇{z} = (1 − {y}²) ⊙ ∇{y}",)),
    "sigmoid": ("h", ("z",), "{y} = σ({z})", ("∇{z} = {y} ⊙ (1 − {y}) ⊙ ∇{y}",)),
    "relu": ("h", ("z",), "{y} = max({z}, 0)", ("∇{z} = 1[{z} > 0] ⊙ ∇{y}",)),
    "gelu": ("h", ("z",), "{y} = {z} Φ({z})", ("∇{z} = gelu′({z}) ⊙ ∇{y}",)),
    "where": ("y", ("a", "b"), "{y} = where(c, {a}, {b})", ("∇{a} = where(c, ∇{y}, 0)", "∇{b} = where(c, 0, ∇{y})")),
    "sum": ("s", ("x",), "{y} = Σ {x}", ("∇{x} = broadcast(∇{y})",)),
    "mean": ("s", ("x",), "{y} = mean({x})", ("∇{x} = broadcast(∇{y}) / n",)),
    "reshape": ("y", ("x",), "{y} = reshape({x})", ("∇{x} = reshape(∇{y})",)),
    "transpose": ("y", ("x",), "{y} = {x}ᵀ", ("∇{x} = (∇{y})ᵀ",)),
    "getitem": ("y", ("x",), "{y} = {x}[i]", ("∇{x} = scatter_add(∇{y}, i)",)),
    "softmax": ("p", ("z",), "{y} = softmax({z})", ("∇{z} = {y} ⊙ (∇{y} − ⟨{y}, ∇{y}⟩)",)),
    "log_softmax": ("y", ("z",), "{y} = log softmax({z})", ("∇{z} = ∇{y} − softmax({z}) Σ∇{y}",)),
    "logsumexp": ("y", ("z",), "{y} = log Σ exp({z})", ("∇{z} = softmax({z}) ∇{y}",)),
    "sq_norm": ("L", ("x",), "{y} = ½‖{x}‖²", ("∇{x} = {x} ∇{y}",)),
    "softmax_cross_entropy": ("L", ("z",), "{y} = −log softmax({z})[y*]", ("∇{z} = (p − y*) ∇{y}",)),
    "linear_cross_entropy": ("L", ("x", "W", "b"), "{y} = −log softmax({W} {x}{+b})[y*]",
                             ("∇{x} = {W}ᵀ (p − y*) ∇{y}", "∇{W} = (p − y*) {x}ᵀ ∇{y}", "∇{b} = (p − y*) ∇{y}")),
    "to": ("y", ("x",), "{y} = {x} on another backend", ("∇{x} = ∇{y}, copied back",)),
    "checkpoint": ("y", (), "{y} = f({inputs}), its intermediates dropped",
                   "∇{x} = ∂{y}/∂{x}ᵀ ∇{y}, f recomputed"),
}
_UNNUMBERED = ("L",)  # a loss is "L", not "L1"


def _rule(name, n_inputs):
    """(output symbol, n input symbols, forward formula, n VJP formulas) for op `name`."""
    out, ins, fwd, vjps = RULES.get(name, ("y", (), f"{{y}} = {name}({{inputs}})", "∇{x} = ∂{y}/∂{x}ᵀ ∇{y}"))
    if len(ins) < n_inputs:  # an op of any arity: x1, x2, ..., one generic rule for each
        ins = tuple(f"x{i + 1}" for i in range(n_inputs)) if n_inputs > 1 else ("x",)
        generic = vjps if isinstance(vjps, str) else "∇{x} = ∂{y}/∂{x}ᵀ ∇{y}"
        vjps = tuple(generic.replace("{x}", "{" + s + "}") for s in ins)
    return out, ins[:n_inputs], fwd, vjps


def _fill(template, symbols, names, out_name):
    """`template` with the step's names in place of its symbols ({x} -> h1, ...)."""
    mapping = {"y": out_name, "inputs": ", ".join(names), "+b": ""}
    for s, n in zip(symbols, names):
        mapping[s] = n
        mapping["+" + s] = f" + {n}"
    return template.format_map(mapping)


# --- the trace ------------------------------------------------------------------------------
def _norm(a) -> float:
    """‖a‖ (all entries), computed in float64 where the array lives."""
    xp = B.array_module(a)
    return float(xp.sqrt((xp.asarray(a).astype(np.float64) ** 2).sum()))


def _host(a):
    return np.array(B.to_host(a), dtype=np.float64) if a is not None else None


@dataclass
class OpStep:
    """One op of the forward pass, in the order it ran. ``inputs`` are the input shapes (None
    for none), ``sources`` the index of the step that made each input (None: a leaf or a
    constant), ``names`` the inputs' symbols and ``out`` the output's (z1, h1, W1, ...);
    ``norm`` is the activation norm ‖output‖; ``saved_bytes`` what its VJP adds to the tape
    (buffers that no earlier step keeps, parameters excluded) and ``tape_bytes`` the tape's
    total after it. ``value``: the output on the host (float64), with ``trace(values=True)``."""

    index: int
    op: str
    formula: str
    inputs: list
    sources: list
    names: list
    out: str
    shape: tuple
    dtype: str
    norm: float
    saved_bytes: int
    tape_bytes: int
    recomputed: bool = False
    value: np.ndarray | None = None


@dataclass
class VJPStep:
    """One VJP of the backward pass, in the order it ran: the op of forward step ``op`` (an
    index into ``trace.forward``, or into ``trace.recomputed`` when ``recomputed``), the rule of
    each input it gave a cotangent (``rules``, with ``grads``: (input position, shape, norm)),
    and the cotangent ∇y it received (``shape``, ``norm``). With ``trace(values=True)``,
    ``cotangent`` and ``grad_values`` hold the numbers (host, float64)."""

    op: int | None
    name: str
    rules: list
    grads: list
    shape: tuple
    norm: float
    recomputed: bool = False
    cotangent: np.ndarray | None = None
    grad_values: list = field(default_factory=list)


@dataclass
class Trace:
    """What :func:`trace` recorded: ``forward`` (OpSteps), ``backward`` (VJPSteps), ``recomputed``
    (ops that a checkpoint ran again during backward), ``output`` (f's value, host float64),
    ``saved_bytes`` (what the tape kept for backward when f returned) and ``leaves`` (symbol ->
    leaf Tensor, the parameters and inputs named in the formulas)."""

    forward: list = field(default_factory=list)
    backward: list = field(default_factory=list)
    recomputed: list = field(default_factory=list)
    output: np.ndarray | None = None
    saved_bytes: int = 0
    leaves: dict = field(default_factory=dict)

    def format(self) -> str:
        """The steps as plain text: forward (op, formula, output shape, ‖output‖, tape bytes),
        then backward (op, rule per input, ‖∇‖)."""
        lines = [f"forward: {len(self.forward)} ops; the tape keeps {self.saved_bytes} bytes for backward"]
        for s in self.forward:
            lines.append(f"  {s.index + 1:>3}  {s.op:<22} {s.formula:<34} {str(s.shape):<10} "
                         f"‖{s.out}‖ = {s.norm:<10.4g} +{s.saved_bytes} B")
        lines.append(f"backward: {len(self.backward)} VJPs, each with the cotangent it receives and its rules")
        for s in self.backward:
            where = "" if s.op is None else ("r" if s.recomputed else "") + str(s.op + 1)
            op = (self.recomputed if s.recomputed else self.forward)[s.op] if s.op is not None else None
            received = f"∇{op.out}" if op is not None else "∇y"
            lines.append(f"  {where:>3}  {s.name:<22} {received} {s.shape}: ‖{received}‖ = {s.norm:.4g}")
            for rule, (_, shape, norm) in zip(s.rules, s.grads):
                lines.append(f"  {'':>3}  {'':<22}   {rule:<32} {str(shape):<10} ‖{rule.split(' = ')[0]}‖ = {norm:.4g}")
        return "\n".join(lines)

    __str__ = format


class _Recorder:
    """The listener behind :func:`trace`."""

    def __init__(self, trace_, names, values):
        self.trace, self.values = trace_, values
        self.leaf_names = {id(t): n for t, n in (names or {}).items()}
        self.held = []  # every Tensor and node named here, kept alive so that no id is reused
        self.steps = {}  # id(node) -> (recomputed, index)
        self.counters = {}
        self.kept, self.parameters = {}, set()
        self.backward_started = False

    def _name_leaf(self, p, symbol, number):
        name = self.leaf_names.get(id(p))
        if name is None:
            join = "_" if symbol[-1].isdigit() and number != "" else ""  # x2 of layer 1: x2_1
            name = self.leaf_names[id(p)] = f"{symbol}{join}{number}"
            self.held.append(p)
        self.trace.leaves.setdefault(name, p)
        return name

    def on_record(self, out, name, parents):
        node = out._node
        if type(node) is not Node:  # not on the tape (no input needs a gradient, or no_grad)
            return
        out_symbol, symbols, fwd, _ = _rule(name, len(parents))
        k = self.counters[out_symbol] = self.counters.get(out_symbol, 0) + 1
        number = "" if out_symbol in _UNNUMBERED else k
        out_name = f"{out_symbol}{number}"
        names, sources = [], []
        for p, s in zip(parents, symbols):
            step = self.steps.get(id(p._node))
            if step is not None:
                names.append(step[2])
                sources.append(None if step[0] != self.backward_started else step[1])
            else:
                names.append(self._name_leaf(p, s, number))
                sources.append(None)
        kept, params = node_arrays(node)
        new = {k_: a for k_, a in kept.items() if k_ not in self.kept}
        self.kept.update(kept)
        self.parameters |= params
        added = _nbytes(new, self.parameters)
        steps = self.trace.recomputed if self.backward_started else self.trace.forward
        tape = (steps[-1].tape_bytes if steps else 0) + added
        steps.append(OpStep(index=len(steps), op=name, formula=_fill(fwd, symbols, names, out_name),
                            inputs=[p.shape for p in parents], sources=sources, names=names, out=out_name,
                            shape=out.shape, dtype=str(out.dtype), norm=_norm(out.data), saved_bytes=added,
                            tape_bytes=tape, recomputed=self.backward_started,
                            value=_host(out.data) if self.values else None))
        self.steps[id(node)] = (self.backward_started, len(steps) - 1, out_name)
        self.held.append(node)

    def on_vjp(self, node, g, grads):
        found = self.steps.get(id(node))
        recomputed, index = (found[0], found[1]) if found else (False, None)
        step = None
        if found:
            step = (self.trace.recomputed if recomputed else self.trace.forward)[index]
        _, symbols, _, vjps = _rule(node.name, len(node.edges))
        names = step.names if step else list(symbols)
        out_name = step.out if step else "y"
        rules, norms, values = [], [], []
        for i, (e, gp) in enumerate(zip(node.edges, grads)):
            if e is None or gp is None:
                continue
            rules.append(_fill(vjps[i], symbols, names, out_name))
            norms.append((i, tuple(gp.shape), _norm(gp)))
            if self.values:
                values.append(_host(gp))
        self.trace.backward.append(VJPStep(op=index, name=node.name, rules=rules, grads=norms, shape=tuple(g.shape),
                                           norm=_norm(g), recomputed=recomputed,
                                           cotangent=_host(g) if self.values else None, grad_values=values))


def trace(f, *args, names=None, values=False, cotangent=None) -> Trace:
    """Run ``out = f(*args)``, then ``out.backward(cotangent)``, and return the recorded steps.

    Arguments that are arrays become leaf Tensors that require grad (their gradient is in the
    trace); Tensors are used as they are (a parameter's ``.grad`` accumulates as in any
    backward). f may use parameters of its own (a Module's). `names` maps leaf Tensors to the
    symbols used in the formulas ({W: "W1"}); others are named after their role and layer (W1,
    b1, x1, ...) and op outputs after their op (z1 for linear, h1 for activations, L for a
    loss). ``values=True`` keeps every output, cotangent and gradient on the host too (small
    networks: the walker shows the numbers). Records even inside ``ad.no_grad()``."""
    check_not_in_transform("ad.trace")
    xs = [a if isinstance(a, Tensor) else Tensor(B.module_for(B.get_backend()).asarray(a)
                                                if B.backend_of(a) is None else a, requires_grad=True)
          for a in args]
    result = Trace()
    recorder = _Recorder(result, names, values)
    with listening(recorder):
        with enable_grad():
            out = f(*xs)
        if not isinstance(out, Tensor):
            raise TypeError(f"trace: f must return a Tensor, got {type(out).__name__}")
        result.output = _host(out.data)
        result.saved_bytes = saved_bytes(out)
        recorder.backward_started = True
        out.backward(cotangent)
    recorder.held.clear()
    return result
