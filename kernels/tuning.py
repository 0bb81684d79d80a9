"""Tuned launch parameters per GPU, read by the kernel launchers as their defaults.

Each launcher module declares its tuning space once, at import:

    tuning.register("triton.softmax_cross_entropy",
                    {"programs_per_sm": (1, 2, 4), "chunk_bytes": (8192, 16384)},   # allowed values
                    {"programs_per_sm": 1, "chunk_bytes": 16384})                    # fallback defaults

and reads a value per call with ``tuning.value(op, param, device_name)``. The value comes from,
in order: an active ``tuning.override(...)`` (the sweep, tests), the checked-in table of the GPU
(``kernels/tuned/<GPU name with non-alphanumerics as _>.json``, written by
``python -m bench --sweep``; the environment variable GPUAD_TUNED_DIR, when set, names another
folder of such tables), and the fallback default. An unknown GPU, or no GPU, takes the
fallbacks. A table naming an unknown op or parameter, or a value outside the declared space,
is refused with a ValueError naming it.

Table format: ``{"gpu": "<name>", "ops": {op: {param: value}}, "measured": {...}}``. A value
that JSON cannot hold as such (a tuple, say a tile config) is written as a list and read back as
the tuple. "measured" is not read by the launchers; the sweep writes there, per op, the date,
versions, the shapes, every candidate's params and ms per shape (null: not measured), its
geometric mean and status, and the winner.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading

TUNED_DIR = os.environ.get("GPUAD_TUNED_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")

_SPACES: dict[str, dict[str, tuple]] = {}
_DEFAULTS: dict[str, dict] = {}
_local = threading.local()


def register(op: str, space: dict, defaults: dict) -> None:
    """Declare `op`'s parameters: `space` maps each to its allowed values, `defaults` to its
    fallback (which must be allowed)."""
    space = {k: tuple(v) for k, v in space.items()}
    if set(defaults) != set(space):
        raise ValueError(f"tuning.register({op!r}): defaults {sorted(defaults)} must name every parameter "
                         f"of the space {sorted(space)}")
    for k, v in defaults.items():
        if v not in space[k]:
            raise ValueError(f"tuning.register({op!r}): default {k}={v!r} is not among {space[k]}")
    _SPACES[op] = space
    _DEFAULTS[op] = dict(defaults)
    reload()


def spaces() -> dict:
    """{op: {param: allowed values}} of every registered op (the sweep's candidates)."""
    return {op: dict(s) for op, s in _SPACES.items()}


def defaults(op: str) -> dict:
    return dict(_DEFAULTS[op])


def file_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3.json'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def validate(table: dict, where: str = "table") -> dict:
    """Check a table's {op: {param: value}} against the registered spaces; return it."""
    if not isinstance(table, dict) or not isinstance(table.get("ops"), dict):
        raise ValueError(f"{where}: expected an object with an 'ops' object")
    for op, params in table["ops"].items():
        if op not in _SPACES:
            raise ValueError(f"{where}: unknown op {op!r}; known: {', '.join(sorted(_SPACES))}")
        if not isinstance(params, dict):
            raise ValueError(f"{where}: ops.{op} must be an object of parameters")
        for k, v in params.items():
            if k not in _SPACES[op]:
                raise ValueError(f"{where}: unknown parameter {op}.{k}; known: {', '.join(_SPACES[op])}")
            params[k] = v = _freeze(v)
            if v not in _SPACES[op][k]:
                raise ValueError(f"{where}: {op}.{k} = {v!r} is not among the allowed {_SPACES[op][k]}")
    return table


def _freeze(v):
    """JSON lists back to the tuples a space declares."""
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def load_table(device_name: str | None, tuned_dir: str | None = None) -> dict:
    """The validated table of `device_name`, or {"ops": {}} when there is none."""
    if not device_name:
        return {"ops": {}}
    path = os.path.join(tuned_dir or TUNED_DIR, file_name(device_name))
    if not os.path.exists(path):
        return {"ops": {}}
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate(table, path)


@functools.lru_cache(maxsize=None)
def _resolved(op: str, device_name: str | None) -> dict:
    out = dict(_DEFAULTS[op])
    out.update(load_table(device_name)["ops"].get(op, {}))
    return out


def value(op: str, param: str, device_name: str | None = None):
    """The value of `param` for `op` on the GPU named `device_name` (None: the fallback)."""
    over = getattr(_local, "overrides", None)
    if over and param in over.get(op, ()):
        return over[op][param]
    return _resolved(op, device_name)[param]


def active_overrides(op: str):
    """This thread's tuning.override(...) values of `op` as a sorted tuple of (param, value)
    pairs, or None outside one: hashable, for a launcher's cache key (cheap: no copy without
    an override)."""
    if not _open_overrides[0]:  # no override open in any thread: skip the thread-local lookup
        return None
    over = getattr(_local, "overrides", None)
    mine = over.get(op) if over else None
    return tuple(sorted(mine.items())) if mine else None


def values(op: str, device_name: str | None = None) -> dict:
    """Every parameter of `op` as `value` would give it."""
    return {k: value(op, k, device_name) for k in _SPACES[op]}


_launch_cache: dict = {}


def launch_values(op: str, device_name: str | None = None) -> dict:
    """`values(op, device_name)` for a launcher's hot path: cached per (op, GPU), a dictionary
    lookup a call, and read afresh while an override of `op` is active. Read-only."""
    over = getattr(_local, "overrides", None)
    if over and op in over:
        return values(op, device_name)
    got = _launch_cache.get((op, device_name))
    if got is None:
        got = _launch_cache[(op, device_name)] = values(op, device_name)
    return got


@contextlib.contextmanager
def override(op: str, **params):
    """Within the block (this thread), `op`'s named parameters take these values; each is
    checked against the declared space."""
    if op not in _SPACES:
        raise ValueError(f"tuning.override: unknown op {op!r}; known: {', '.join(sorted(_SPACES))}")
    validate({"ops": {op: params}}, "tuning.override")
    prev = getattr(_local, "overrides", None)
    merged = {k: dict(v) for k, v in (prev or {}).items()}
    merged.setdefault(op, {}).update(params)
    with _lock:
        _open_overrides[0] += 1
    _local.overrides = merged
    try:
        yield
    finally:
        _local.overrides = prev
        with _lock:
            _open_overrides[0] -= 1


_open_overrides = [0]  # override blocks open in all threads
_lock = threading.Lock()


#: Bumped by reload(): the launchers' per-problem plans carry it in their keys, so a plan made
#: from an older table is not used after a reload.
generation = 0


def reload() -> None:
    """Forget the cached tables (after a table file changed)."""
    global generation
    _resolved.cache_clear()
    _launch_cache.clear()
    generation += 1
