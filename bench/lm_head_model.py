"""A byte-and-FLOP model of the fused LM head's schedules (linear + cross-entropy, forward and
backward) at N×D→V: what each kernel of a schedule reads, writes and computes, its time at
given ceilings, and the memory the schedule holds beyond its inputs and outputs.

Every schedule runs three GEMMs of 2·N·D·V FLOPs at least (logits, dx = g·w, dw = gᵀ·x: the
floor, 6·N·D·V). They differ in what they move and what they recompute:

- ``token`` chunks of c rows (the current driver, chunk c): per chunk the logits GEMM writes
  a [c, V] buffer, a row pass reads it twice (log-sum-exp, then the gradient) and writes the
  gradient over it, the dx GEMM writes dx's rows, and the dw GEMM adds gᵀ·x into the fp32 [V, D]
  accumulator: a read and a write of it (8·V·D bytes) a chunk.
- ``token_lse``: token chunks whose logits GEMM also writes each row's (max, Σexp) per column
  tile of TILE_N columns from its epilogue; the row pass then has the log-sum-exp and reads
  the buffer once (needs a GEMM with that epilogue instead of cuBLAS).
- ``token_epilogue``: token chunks with the gradient formed in the GEMM's epilogue: a first
  logits GEMM keeps only the row partials (no buffer write), a second forms the gradient in
  its epilogue and writes it; no row pass, one more GEMM (8·N·D·V FLOPs).
- ``vocab`` chunks of u columns: a first logits GEMM over all of V gives the log-sum-exp
  (partials from the epilogue), then per vocab chunk a logits GEMM forms the gradient in its
  epilogue, dw's u rows are complete in one GEMM (one accumulator read and write in all), and
  dx accumulates in an fp32 [N, D] buffer (a read and a write of it a chunk).

Time of a kernel: max(FLOPs / matmul ceiling, operand bytes / copy ceiling) + epilogue bytes /
copy ceiling. The epilogue's writes (and the accumulator's read-modify-write) are counted
after the main loop, not under it: ``overlap=True`` puts them under it (the lower bound). A
row pass is memory-bound: its bytes / copy ceiling. Bytes are DRAM traffic with every operand
of a GEMM read once (tiles re-read from L2) and, by default, the row pass reading each logits
chunk twice (``row_reads``: L2 hits of its second pass lower it). The copy ceiling is the
bench's (read + write bytes per second); the matmul ceiling the dense GEMM rate of the dtype.

Extra memory: bytes held beyond the inputs (x, w, targets), the outputs (loss, dx, dw in the
input dtype) and the caller's fp32 dw accumulator (``dw_accumulate``, a trainer's main grad):
the logits buffer, the row statistics, and the fp32 accumulators the schedule makes itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

TILE_N = 128  # columns of a GEMM tile whose epilogue writes one (max, Σexp) pair a row
TILE_STATS = 12  # bytes a row and column tile the token_lse statistics hold: (max, Σexp, Σz) fp32
ROW_STATS = 12  # bytes a row: its loss, lse and gradient scale (fp32)
KINDS = ("token", "token_lse", "token_epilogue", "vocab")


@dataclass(frozen=True)
class Kernel:
    """One launch: its FLOPs, operand bytes (read under the main loop) and epilogue bytes."""
    name: str
    flops: float = 0.0
    main_bytes: float = 0.0
    epilogue_bytes: float = 0.0

    def ms(self, gbps: float, tflops: float, overlap: bool = False) -> float:
        if overlap:
            return max(self.flops / tflops / 1e9, (self.main_bytes + self.epilogue_bytes) / gbps / 1e6)
        return max(self.flops / tflops / 1e9, self.main_bytes / gbps / 1e6) + self.epilogue_bytes / gbps / 1e6


@dataclass
class Schedule:
    """A schedule at one shape: its kernels in launch order and its extra memory (bytes)."""
    kind: str
    chunk: int
    kernels: list = field(default_factory=list)
    extra_bytes: int = 0

    @property
    def name(self) -> str:
        unit = "columns" if self.kind == "vocab" else "rows"
        return f"{self.kind} chunks of {self.chunk} {unit}"

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.main_bytes + k.epilogue_bytes for k in self.kernels)

    def ms(self, gbps: float, tflops: float, overlap: bool = False) -> float:
        return sum(k.ms(gbps, tflops, overlap) for k in self.kernels)


def _pieces(total: int, chunk: int):
    return [min(chunk, total - i) for i in range(0, total, chunk)]


def _check(n, d, v, itemsize, chunk):
    for name, val in (("n", n), ("d", d), ("v", v), ("itemsize", itemsize), ("chunk", chunk)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def _dw_tail(v, d, b, dw_accumulate):
    """The fp32 dw accumulator's cast to the input dtype when the schedule owns it (b < 4)."""
    return [] if dw_accumulate or b == 4 else [Kernel("dw cast", main_bytes=4 * v * d + b * v * d)]


def token(n, d, v, itemsize, chunk, *, lse_epilogue=False, dw_accumulate=True, row_reads=2.0):
    """Token chunks of `chunk` rows (see the module docstring); lse_epilogue: ``token_lse``."""
    _check(n, d, v, itemsize, chunk)
    b, ks = itemsize, []
    for i, r in enumerate(_pieces(n, chunk)):
        partials = 8 * r * math.ceil(v / TILE_N) if lse_epilogue else 0
        ks.append(Kernel("logits gemm", 2 * r * d * v, b * (r * d + v * d), b * r * v + partials))
        reads = 1.0 if lse_epilogue else row_reads
        ks.append(Kernel("row pass", main_bytes=(reads + 1) * b * r * v + partials + ROW_STATS * r))
        ks += _backward_gemms(r, d, v, b, first=i == 0, dw_accumulate=dw_accumulate)
    ks += _dw_tail(v, d, b, dw_accumulate)
    c = min(chunk, n)
    extra = b * c * v + ROW_STATS * n + (TILE_STATS * c * math.ceil(v / TILE_N) if lse_epilogue else 0)
    extra += 0 if dw_accumulate or b == 4 else 4 * v * d
    return Schedule("token_lse" if lse_epilogue else "token", chunk, ks, extra)


def _backward_gemms(r, d, v, b, first, dw_accumulate):
    """dx rows = g·w and dw += gᵀ·x for a token chunk of r rows (the gradient g in the buffer)."""
    acc = 4 * v * d if first and not dw_accumulate else 8 * v * d  # a fresh accumulator is only written
    return [Kernel("dx gemm", 2 * r * d * v, b * (r * v + v * d), b * r * d),
            Kernel("dw gemm", 2 * r * d * v, b * (r * v + r * d), acc)]


def token_epilogue(n, d, v, itemsize, chunk, *, dw_accumulate=True):
    """Token chunks with the gradient formed in a second logits GEMM's epilogue."""
    _check(n, d, v, itemsize, chunk)
    b, ks = itemsize, []
    for i, r in enumerate(_pieces(n, chunk)):
        partials = 8 * r * math.ceil(v / TILE_N)
        ks.append(Kernel("lse gemm", 2 * r * d * v, b * (r * d + v * d), partials))
        ks.append(Kernel("lse combine", main_bytes=partials + ROW_STATS * r))
        ks.append(Kernel("gradient gemm", 2 * r * d * v, b * (r * d + v * d), b * r * v))
        ks += _backward_gemms(r, d, v, b, first=i == 0, dw_accumulate=dw_accumulate)
    ks += _dw_tail(v, d, b, dw_accumulate)
    c = min(chunk, n)
    extra = b * c * v + ROW_STATS * n + 8 * c * math.ceil(v / TILE_N)
    extra += 0 if dw_accumulate or b == 4 else 4 * v * d
    return Schedule("token_epilogue", chunk, ks, extra)


def vocab(n, d, v, itemsize, chunk, *, dw_accumulate=True):
    """Vocab chunks of `chunk` columns: dw's rows complete per chunk, dx accumulated in fp32."""
    _check(n, d, v, itemsize, chunk)
    b, tiles = itemsize, math.ceil(v / TILE_N)
    ks = [Kernel("lse gemm", 2 * n * d * v, b * (n * d + v * d), 8 * n * tiles),
          Kernel("lse combine", main_bytes=8 * n * tiles + ROW_STATS * n)]
    for i, u in enumerate(_pieces(v, chunk)):
        dw_out = 8 * u * d if dw_accumulate else b * u * d
        dx_acc = 4 * n * d if i == 0 else 8 * n * d
        ks += [Kernel("gradient gemm", 2 * n * d * u, b * (n * d + u * d), b * n * u),
               Kernel("dw gemm", 2 * n * d * u, b * (n * u + n * d), dw_out),
               Kernel("dx gemm", 2 * n * d * u, b * (n * u + u * d), dx_acc)]
    if b < 4:
        ks.append(Kernel("dx cast", main_bytes=4 * n * d + b * n * d))
    extra = b * n * min(chunk, v) + ROW_STATS * n + 8 * n * tiles + 4 * n * d
    return Schedule("vocab", chunk, ks, extra)


BUILDERS = {"token": token, "token_lse": lambda *a, **k: token(*a, lse_epilogue=True, **k),
            "token_epilogue": token_epilogue, "vocab": vocab}


def schedules(n, d, v, itemsize, token_chunks=(1024, 2048, 4096, 8192), vocab_chunks=(8192, 16384, 32768),
              dw_accumulate=True):
    """Every schedule the model knows at N×D→V: each token kind at each token chunk (at most N
    rows; N itself once), vocab chunks at each vocab chunk (at most V)."""
    rows = sorted({min(c, n) for c in token_chunks})
    cols = sorted({min(c, v) for c in vocab_chunks})
    out = [BUILDERS[k](n, d, v, itemsize, c, dw_accumulate=dw_accumulate)
           for k in ("token", "token_lse", "token_epilogue") for c in rows]
    return out + [vocab(n, d, v, itemsize, c, dw_accumulate=dw_accumulate) for c in cols]


def current(n, d, v, itemsize, dw_accumulate=True, schedule="token", rows_per_chunk=None):
    """The driver's schedule: `schedule` ("token" or "token_lse", the Triton LM head's tuning
    parameters) in its default chunks of at most `rows_per_chunk` rows (None: the fallback;
    no free-memory cap)."""
    from gpuad.kernels.reference import LCE_ROWS_PER_CHUNK, linear_cross_entropy_chunk
    c = linear_cross_entropy_chunk(n, v, itemsize, rows=rows_per_chunk or LCE_ROWS_PER_CHUNK)
    return BUILDERS[schedule](n, d, v, itemsize, c, dw_accumulate=dw_accumulate)


def rank(n, d, v, itemsize, gbps, tflops, max_extra_bytes=None, overlap=False, **kw):
    """[(ms, schedule)] fastest first, of the schedules within `max_extra_bytes` (None: all)."""
    if not (gbps > 0 and tflops > 0):
        raise ValueError(f"gbps and tflops must be positive, got {gbps!r} and {tflops!r}")
    out = [(s.ms(gbps, tflops, overlap), s) for s in schedules(n, d, v, itemsize, **kw)
           if max_extra_bytes is None or s.extra_bytes <= max_extra_bytes]
    return sorted(out, key=lambda t: t[0])


def report_lines(n, d, v, itemsize, gbps, tflops, max_extra_bytes=None, dw_accumulate=True):
    """A ranked table, one line a schedule: ms (epilogue after the main loop, and under it),
    × the GEMM floor, FLOPs, DRAM bytes and extra memory; the current schedule marked."""
    floor = 6 * n * d * v / tflops / 1e9
    cur = current(n, d, v, itemsize, dw_accumulate).name
    lines = [f"LM head model at {n}x{d}->{v}, {itemsize}-byte inputs, copy {gbps:.4g} GB/s, matmul "
             f"{tflops:.4g} TFLOP/s: GEMM floor {floor:.3f} ms"
             + (f"; extra memory at most {max_extra_bytes / 1e9:.3g} GB" if max_extra_bytes else "")]
    for ms, s in rank(n, d, v, itemsize, gbps, tflops, max_extra_bytes, dw_accumulate=dw_accumulate):
        lines.append(f"  {s.name:<38} {ms:8.3f} ms ({s.ms(gbps, tflops, True):7.3f} overlapped) "
                     f"{ms / floor:5.3f}x floor  {s.flops / 1e12:7.2f} TFLOP  {s.bytes / 1e9:7.2f} GB moved  "
                     f"+{s.extra_bytes / 1e9:.3f} GB" + ("  (current)" if s.name == cur else ""))
    return lines


def main(argv=None):
    """python -m bench.lm_head_model N D V ITEMSIZE GBPS TFLOPS [MAX_EXTRA_GB]"""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (6, 7):
        raise SystemExit(main.__doc__)
    n, d, v, b = (int(a) for a in args[:4])
    extra = float(args[6]) * 1e9 if len(args) == 7 else None
    print("\n".join(report_lines(n, d, v, b, float(args[4]), float(args[5]), extra)))


if __name__ == "__main__":
    main()
