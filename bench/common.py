"""What the op definitions (``ops``, ``lce_op``, ``chain_op``) and the measuring code
(``harness``, ``sweep``) share: the Unavailable error, a prepared implementation, dtypes, the
random inputs, and the inputs of an implementation on its library (``on_torch``, ``on_xp``,
``gpuad_inputs``).

It imports nothing of the bench itself, so no bench module imports one that imports it back
(``harness`` imports ``ops``; ``ops`` imports ``lce_op`` and ``chain_op``; all import this)."""
from __future__ import annotations

import importlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Elements per random chunk: each chunk has its own generator, so inputs are the same on every
#: machine whatever its thread count, and threads fill chunks in parallel.
RANDOM_CHUNK = 1 << 22


class Unavailable(Exception):
    """An implementation that cannot run here; the message is the reason."""


@dataclass
class Prepared:
    """An implementation ready to run on one case.

    ``fn()`` runs one timed call (cycling the input copies); ``outputs()`` runs one call
    on the first copy and returns ``{name: array}`` for the check; ``device`` is "cuda" or "cpu"."""
    fn: Callable[[], object]
    outputs: Callable[[], dict]
    device: str


def rotating(sets, call):
    """A no-argument function calling ``call(*s)`` on each input set in turn."""
    counter = itertools.count()
    n = len(sets)
    return lambda: call(*sets[next(counter) % n])


def try_import(name):
    """(module, None), or (None, a one-line reason) when it does not import."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a broken install raising anything else
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:160]


def np_dtype(name: str):
    if name == "bfloat16":
        ml, err = try_import("ml_dtypes")
        if ml is None:
            raise Unavailable(f"numpy bfloat16 needs ml_dtypes ({err})")
        return np.dtype(ml.bfloat16)
    return np.dtype(name)


def itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def quantize(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in `dtype`, so every impl and the float64
    reference see the same inputs."""
    if dtype in ("float32", "float64"):
        return a
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
        u = a.view(np.uint32)
        return ((u + (0x7FFF + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)).view(np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")


def normal(shape, seed, dtype: str, scale: float = 1.0) -> np.ndarray:
    """float32 N(0, scale²) samples of `shape`, rounded to values of `dtype` (see quantize).

    `seed` is an int or a tuple of ints. Chunk i of RANDOM_CHUNK elements comes from its own
    generator (spawned from ``SeedSequence(seed)``), and a pool of threads fills the chunks:
    numpy releases the GIL while it draws, so the billion-element logits of the GPU shapes take
    a fraction of the single-thread time, and the values do not depend on the thread count."""
    out = np.empty(int(np.prod(shape)), dtype=np.float32)
    n_chunks = max(1, -(-out.size // RANDOM_CHUNK))
    seqs = np.random.SeedSequence(seed).spawn(n_chunks)

    def fill(i):
        part = out[i * RANDOM_CHUNK:(i + 1) * RANDOM_CHUNK]
        np.random.default_rng(seqs[i]).standard_normal(out=part, dtype=np.float32)
        if scale != 1.0:
            part *= np.float32(scale)
        part[...] = quantize(part, dtype)

    if n_chunks == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(min(n_chunks, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(n_chunks)))
    return out.reshape(shape)


SEED = 0
SLICE_ROWS = 16  # rows of each output checked again on the host in float64 (ops' host_slice)


# --- arrays on each library --------------------------------------------------------------

def torch_dtype(torch, name):
    return getattr(torch, name)


def on_torch(torch, host, dtype, device, key=None):
    """A fresh torch tensor of `dtype` on `device` from a host array (integers stay int64).

    With `key`, `host` is a case's input dict and the array is host[key]: its copy on the
    device is made once per case and kept in that dict, so impls after the first convert on
    the device instead of crossing the bus again."""
    if key is not None:
        cached = host.get(("on", key, device))
        if cached is None:
            cached = host[("on", key, device)] = on_torch(torch, host[key], None, device)
        return cached.clone() if cached.dtype == torch.int64 else cached.to(torch_dtype(torch, dtype), copy=True)
    t = torch.from_numpy(np.ascontiguousarray(host)).to(device)
    return t if host.dtype.kind == "i" or dtype is None else t.to(torch_dtype(torch, dtype))


def drop_device_copies(host):
    """Forget the device copies on_torch kept in a case's input dict."""
    for k in [k for k in host if isinstance(k, tuple)]:
        del host[k]


def on_xp(xp, host, dtype):
    """A numpy or CuPy array of `dtype` from a host array (bfloat16 through ml_dtypes)."""
    a = host if host.dtype.kind == "i" else host.astype(np_dtype(dtype))
    return xp.asarray(a)


def to64(xp, a):
    """A float64 copy on `xp` of a host array: on a GPU the float32 values cross the bus and
    widen on the device (half the bytes, no host conversion)."""
    return xp.asarray(a).astype(xp.float64)


def host64(host, key, rows=slice(None)):
    return np.asarray(host[key][rows], dtype=np.float64)


def compile_fixed(torch, fn):
    """torch.compile for fixed shapes; every case recompiles the same code, so raise dynamo's
    recompile limit (named cache_size_limit in older torch) to keep each case compiled."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(fn, dynamic=False)


def import_kernels(module, who):
    try:
        return importlib.import_module(f"gpuad.kernels.{module}")
    except Exception as e:
        raise Unavailable(f"{who}: gpuad.kernels.{module} is not importable ({type(e).__name__}: {e})"[:300])


def gpuad_inputs(env, module, host, spec, n):
    """(kernel module, n input sets, device) for a gpuad impl; `spec` lists (host key, dtype).

    triton gets CUDA torch tensors (CPU ones in an Env made with interpret=True: the Triton
    interpreter); cupy, and reference on a GPU, CuPy arrays; reference without a GPU, numpy."""
    if module == "triton":
        if not env.interpret:
            env.require_cuda(module)
        torch = env.torch(module)
        K = import_kernels(module, module)
        return K, [tuple(on_torch(torch, host, dt, env.device, k) for k, dt in spec) for _ in range(n)], env.device
    xp, dev = (env.cupy(module), "cuda") if module == "cupy" or env.cuda else (np, "cpu")
    K = import_kernels(module, module)
    return K, [tuple(on_xp(xp, host[k], dt) for k, dt in spec) for _ in range(n)], dev
