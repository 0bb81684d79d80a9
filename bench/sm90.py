"""What the sm_90 (H100/H200) compiles of representative Triton kernels use and cost: registers
and shared memory a block, so occupancy (blocks an SM holds at once), and the seconds each
compile took on the CPU that measured it. The sweep drops candidates that cannot change
anything by occupancy (bench/sweep_plan.py); the GPU check's plan counts compile seconds
(bench/plan.py).

The figures live in bench/sm90_kernels.json, written by

    python -m bench.sm90 --measure        (on a CPU: compiles ahead of time, no GPU needed)

which runs the variants named in MEASURED through tests/test_triton_compile.py (triton.compile
for sm_90 with the ptxas of the triton wheel, ptxas -v for the registers) and reads back each
variant's report line and its pytest call duration: the compile time, plus the second ptxas -v
run the test makes when triton prints no report. The first compile of the process also pays
the compiler's start-up; the table keeps it as measured and says which one it was.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "bench", "sm90_kernels.json")
COMPILE_TEST = "tests/test_triton_compile.py"

# sm_90 limits per SM (CUDA occupancy rules): 64 K 32-bit registers allocated in 256-register
# units a warp, 228 KB of shared memory with 1 KB reserved a block, 2048 threads, 32 blocks.
REGISTERS, REG_UNIT, SHARED, SHARED_RESERVED, THREADS, BLOCKS = 65536, 256, 233472, 1024, 2048, 32

#: (tuning op, pytest id of tests/test_triton_compile.py): the start points of the swept Triton
#: kernels at the sweep's shapes, a few other values of their most promising parameters, the
#: linear backward's default tile and its largest-register tile, and the LM head's logits GEMM
#: and one-pass row kernel at the target shape.
MEASURED = (
    ("triton.softmax_cross_entropy", "test_cross_entropy_compiles_for_hopper[bf16-chunked-V50257-BLOCK16384-w16-s1-"
                                     "COUNT0-ALIGNED0-HAS_GRAD1-MEAN1-SMOOTH0-ti64]"),
    ("triton.softmax_cross_entropy", "test_cross_entropy_compiles_for_hopper[bf16-lanes-V50257-ROWS1-BLOCK8192-w16-s1-"
                                     "COUNT0-ALIGNED0-HAS_GRAD1-MEAN1-SMOOTH0-ti64]"),
    ("triton.softmax_cross_entropy", "test_cross_entropy_compiles_for_hopper[fp32-chunked-V32000-BLOCK8192-w16-s1-"
                                     "COUNT0-ALIGNED1-HAS_GRAD1-MEAN1-SMOOTH0-ti64]"),
    ("triton.softmax_cross_entropy", "test_cross_entropy_compiles_for_hopper[bf16-rows-widest-rows-ROWS1-BLOCK16384-"
                                     "w16-ALIGNED1-HAS_GRAD1-MEAN1-SMOOTH1-ti64]"),
    ("triton.softmax_cross_entropy", "test_cross_entropy_compiles_for_hopper[bf16-chunked-V50257-BLOCK16384-w16-s3-"
                                     "COUNT0-ALIGNED0-HAS_GRAD1-MEAN1-SMOOTH1-ti64]"),
    ("triton.linear_backward", "test_linear_backward_compiles_for_hopper[bf16-128x128x64-w8-s3(default)-contig-"
                               "NEED_DX1-HAS_BIAS1-ACCUMULATE0-SPLIT_W0-SPLIT_X0-INT640-ieee]"),
    ("triton.linear_backward", "test_linear_backward_compiles_for_hopper[bf16-64x128x64-w4-s4-contig-NEED_DX1-"
                               "HAS_BIAS1-ACCUMULATE1-SPLIT_W1-SPLIT_X1-INT640-ieee]"),
    ("triton.linear_cross_entropy", "test_lm_head_token_lse_compiles_for_hopper[bf16-lce-logits-V128256-off-ieee]"),
    ("triton.linear_cross_entropy", "test_lm_head_token_lse_compiles_for_hopper[bf16-lce-lse-rows-V128256-on]"),
)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_REPORT = re.compile(r"^\.?(\S+): (\{.*\})$", re.M)
_DURATION = re.compile(r"^([\d.]+)s call\s+\S+::(\S+)$", re.M)


def blocks_per_sm(registers: int, shared: int, warps: int) -> int:
    """Blocks of `warps` warps an sm_90 SM holds at once with `registers` a thread and `shared`
    bytes of shared memory a block: the least of the register, shared-memory, thread and
    block limits."""
    if registers < 1 or shared < 0 or warps < 1:
        raise ValueError(f"registers must be >= 1, shared >= 0 and warps >= 1, got {registers}, {shared}, {warps}")
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    return max(0, min(REGISTERS // (per_warp * warps), SHARED // (shared + SHARED_RESERVED),
                      THREADS // (32 * warps), BLOCKS))


def parse_variant(test_id: str) -> dict:
    """Kernel, dtype, tile, warps and stages named by a tests/test_triton_compile.py id. The LM
    head's ids name no warps or stages (num_warps and num_stages None: the compile report has
    them)."""
    vid = test_id[test_id.index("[") + 1:test_id.rindex("]")]
    parts = vid.split("-")
    out = {"dtype": _DTYPES[parts[0]], "variant": vid}
    if parts[1] == "lce":
        kernel = "_lce_logits_kernel" if parts[2] == "logits" else "_lce_lse_rows_kernel"
        return dict(out, kernel=kernel, num_warps=None, num_stages=None)
    w = re.search(r"-w(\d+)-", vid)
    s = re.search(r"-s(\d+)", vid)
    out.update(num_warps=int(w.group(1)), num_stages=int(s.group(1)) if s else 1)
    tile = re.match(r"(\d+)x(\d+)x(\d+)$", parts[1])
    if tile:
        out.update(kernel="linear_backward", tile=parts[1])
    else:
        out.update(kernel=f"_ce_{parts[1]}_kernel", BLOCK=int(re.search(r"BLOCK(\d+)", vid).group(1)),
                   ROWS=int(re.search(r"ROWS(\d+)", vid).group(1)) if "ROWS" in vid else 1)
    return out


def parse_log(text: str) -> dict:
    """{variant id: {registers, shared, compile_s, ...}} from a `pytest -s --durations=0` log."""
    reports = {vid: json.loads(rep.replace("'", '"').replace("True", "true").replace("False", "false"))
               for vid, rep in _REPORT.findall(text)}
    for secs, test in _DURATION.findall(text):
        vid = test[test.index("[") + 1:test.rindex("]")]
        if vid in reports:
            reports[vid]["compile_s"] = float(secs)
    return reports


def table_from(log_text: str, cpu: str, versions: dict) -> dict:
    reports = parse_log(log_text)
    kernels = []
    for i, (op, test_id) in enumerate(MEASURED):
        v = parse_variant(test_id)
        r = reports.get(v["variant"])
        if r is None:
            raise RuntimeError(f"no report for {v['variant']} in the pytest log")
        if v["num_warps"] is None:
            v.update(num_warps=r["num_warps"], num_stages=r["num_stages"])
        kernels.append(dict(v, op=op, registers=r["registers"], shared=r["shared"], compile_s=r.get("compile_s"),
                            first_in_process=i == 0,
                            blocks_per_sm=blocks_per_sm(r["registers"], r["shared"], v["num_warps"])))
    return {"how": f"python -m bench.sm90 --measure: {COMPILE_TEST} run on these variants with -s --durations=0 "
                   "(triton.compile for sm_90 + ptxas -v, one worker process, compiled one at a time); compile_s "
                   "is each test's call duration",
            "cpu": cpu, "versions": versions, "kernels": kernels}


def load(path: str = TABLE) -> dict:
    with open(path) as f:
        return json.load(f)


def lookup(table: dict, kernel: str, dtype: str, meta: dict):
    """The table's entry for a CE kernel of `dtype` at this tile, warps and stages (the flags,
    which change a few registers, are those of the entry's variant), or None."""
    for k in table["kernels"]:
        if (k["kernel"], k["dtype"], k.get("BLOCK"), k.get("ROWS", 1), k["num_warps"], k["num_stages"]) == (
                kernel, dtype, meta.get("BLOCK"), meta.get("ROWS", 1), meta.get("num_warps"),
                meta.get("NUM_STAGES", 1)):
            return k
    return None


def compile_seconds(table: dict, op: str) -> float:
    """The median compile seconds of `op`'s measured variants, leaving out a process's first."""
    times = sorted(k["compile_s"] for k in table["kernels"]
                   if k["op"] == op and k.get("compile_s") and not k.get("first_in_process"))
    if not times:
        raise ValueError(f"bench/sm90_kernels.json has no compile time of {op}")
    return times[len(times) // 2]


def measure(out=TABLE):
    """Run the compile tests of MEASURED and write the table."""
    ids = [f"{COMPILE_TEST}::{t}" for _, t in MEASURED]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "--durations=0",
                           *ids], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-2000:])
    import triton
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    table = table_from(proc.stdout, f"{cpu}, {os.cpu_count()} cores", {"triton": triton.__version__})
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return table


if __name__ == "__main__":
    if sys.argv[1:] != ["--measure"]:
        raise SystemExit("usage: python -m bench.sm90 --measure")
    for k in measure()["kernels"]:
        print(f"{k['variant']}: {k['registers']} registers, {k['shared']} B shared, {k['blocks_per_sm']} blocks/SM, "
              f"compiled in {k['compile_s']} s")
