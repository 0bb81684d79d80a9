"""bench/lm_head_model.py: bytes, FLOPs, times and memory of the LM-head schedules, checked
against counts made by hand at a small shape (N=4, D=2, V=8, 2-byte inputs)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a top-level folder, not installed

from bench import lm_head_model as M  # noqa: E402

# ceilings at which a kernel's ms is its FLOPs or bytes themselves: 1e-6 GB/s, 1e-9 TFLOP/s
UNIT = dict(gbps=1e-6, tflops=1e-9)


def test_token_chunks_by_hand():
    s = M.token(4, 2, 8, 2, 2)
    # per chunk of 2 rows: logits GEMM 64 FLOPs, reads x rows 8 B + w 32 B, writes 32 B;
    # row pass reads 32 B twice, writes 32 B, 24 B of row stats; dx GEMM reads g 32 B + w 32 B,
    # writes 8 B; dw GEMM reads g 32 B + x 8 B, reads and writes the fp32 accumulator 2x64 B
    assert [(k.name, k.flops, k.main_bytes, k.epilogue_bytes) for k in s.kernels[:4]] == [
        ("logits gemm", 64, 40, 32), ("row pass", 0, 120, 0), ("dx gemm", 64, 64, 8), ("dw gemm", 64, 40, 128)]
    assert len(s.kernels) == 8 and s.flops == 6 * 4 * 2 * 8 and s.bytes == 2 * 432
    assert s.extra_bytes == 2 * 2 * 8 + 12 * 4  # the [2, 8] buffer and the row stats
    assert s.ms(**UNIT) == 2 * (96 + 120 + 72 + 192)  # max(FLOPs, operands) + epilogue, summed
    assert s.ms(**UNIT, overlap=True) == 2 * (72 + 120 + 72 + 168)


def test_token_chunks_without_a_caller_accumulator():
    s = M.token(4, 2, 8, 2, 2, dw_accumulate=False)
    dw = [k for k in s.kernels if k.name == "dw gemm"]
    assert [k.epilogue_bytes for k in dw] == [64, 128]  # the first chunk writes the fresh accumulator
    assert s.kernels[-1].name == "dw cast" and s.kernels[-1].main_bytes == 64 + 32
    assert s.extra_bytes == 32 + 48 + 64


def test_lse_from_the_epilogue_reads_the_buffer_once():
    plain, lse = M.token(4, 2, 8, 2, 4), M.token(4, 2, 8, 2, 4, lse_epilogue=True)
    # one read of the [4, 8] buffer less, 8 B of (max, Σexp) a row written and read back
    assert plain.bytes - lse.bytes == 2 * 4 * 8 - 2 * 8 * 4
    assert lse.flops == plain.flops and lse.kind == "token_lse"
    # the statistics held: 12 B (max, Σexp, Σz) a row of the chunk and column tile
    assert lse.extra_bytes - plain.extra_bytes == M.TILE_STATS * 4 * 1


def test_current_is_the_tuned_schedule_and_chunk():
    assert M.current(8192, 4096, 128256, 2, schedule="token_lse", rows_per_chunk=4096).name == \
        "token_lse chunks of 4096 rows"
    assert M.current(8192, 4096, 128256, 4, rows_per_chunk=4096).chunk == 2048  # the 1 GiB buffer cap


def test_gradient_in_the_epilogue_by_hand():
    s = M.token_epilogue(4, 2, 8, 2, 4)
    assert [(k.name, k.flops, k.main_bytes, k.epilogue_bytes) for k in s.kernels] == [
        ("lse gemm", 128, 48, 32), ("lse combine", 0, 80, 0), ("gradient gemm", 128, 48, 64),
        ("dx gemm", 128, 96, 16), ("dw gemm", 128, 80, 128)]
    assert s.flops == 8 * 4 * 2 * 8


def test_vocab_chunks_by_hand():
    s = M.vocab(4, 2, 8, 2, 4)
    assert s.flops == 8 * 4 * 2 * 8
    # lse GEMM 48 + 32, combine 80, two chunks (the first writes the fp32 dx accumulator, the
    # second reads and writes it), the dx cast 48
    assert s.bytes == 48 + 32 + 80 + (32 + 32 + 48 + 64 + 48 + 32) + (32 + 32 + 48 + 64 + 48 + 64) + 48
    assert s.extra_bytes == 2 * 4 * 4 + 48 + 32 + 4 * 4 * 2


def test_bigger_token_chunks_save_the_accumulator_and_weight_traffic():
    n, d, v, b = 8192, 4096, 128256, 2
    small, big = M.token(n, d, v, b, 2048), M.token(n, d, v, b, 4096)
    # two chunks fewer: each read and wrote the fp32 accumulator and read w twice
    assert small.bytes - big.bytes == 2 * (8 * v * d + 2 * b * v * d)
    assert big.extra_bytes - small.extra_bytes == b * 2048 * v


def test_rank_filters_by_memory_and_sorts():
    ranked = M.rank(8192, 4096, 128256, 2, 3000.0, 700.0, max_extra_bytes=1.18e9)
    assert ranked and all(s.extra_bytes <= 1.18e9 for _, s in ranked)
    assert [ms for ms, _ in ranked] == sorted(ms for ms, _ in ranked)
    assert len(M.rank(8192, 4096, 128256, 2, 3000.0, 700.0)) > len(ranked)
    assert M.current(8192, 4096, 128256, 2).chunk == 2048


@pytest.mark.parametrize("bad", [dict(n=0), dict(chunk=-1), dict(itemsize=2.5)])
def test_bad_sizes_are_refused_by_name(bad):
    args = {**dict(n=4, d=2, v=8, itemsize=2, chunk=2), **bad}
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        M.token(**args)


def test_rank_refuses_missing_ceilings():
    with pytest.raises(ValueError, match="gbps"):
        M.rank(4, 2, 8, 2, 0.0, 1.0)


def test_the_lm_head_doc_quotes_the_model():
    """docs/lm-head.md's table of schedules is the model's output at the ceilings its command names."""
    import re
    doc = (Path(__file__).resolve().parents[1] / "docs" / "lm-head.md").read_text()
    n, d, v, b, gbps, tflops = 8192, 4096, 128256, 2, 2953.7, 731.07
    assert f"python -m bench.lm_head_model {n} {d} {v} {b} {gbps} {tflops} 1.18" in doc
    cell = r"\s*([\d.]+) \|"
    rows = re.findall(r"^\| (token\w*), (\d+)[^|]*\|" + cell * 5 + "$", doc, re.M)
    assert len(rows) == 4
    floor = 6 * n * d * v / tflops / 1e9
    for kind, chunk, ms, ratio, overlapped, moved, extra in rows:
        s = M.BUILDERS[kind](n, d, v, b, int(chunk))
        assert (ms, ratio) == (f"{s.ms(gbps, tflops):.3f}", f"{s.ms(gbps, tflops) / floor:.3f}")
        assert (overlapped, moved) == (f"{s.ms(gbps, tflops, True):.3f}", f"{s.bytes / 1e9:.2f}")
        assert extra == f"{s.extra_bytes / 1e9:.3f}"
