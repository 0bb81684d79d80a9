// Bias gradient of a linear layer: db[n] = sum over m of dy[m, n], dy a C-contiguous [M, N].
//
// Self-contained on purpose (no #include): NVRTC, through cupy.RawModule, and nvcc, in the
// test suite, compile this exact text alike (after the prelude common.cuh, which
// compile.source puts in front). fp16 and bf16 are stored as unsigned short and
// converted with inline PTX (cvt.rn.bf16.f32 needs sm_80 or newer).
//
// Deterministic, no atomics: the grid is (column tiles of 32, row splits). Block (32, 8):
// thread (tx, ty) of split k sums rows start_k + ty, start_k + ty + 8, ... of column
// 32 * blockIdx.x + tx in fp32 (a warp reads 32 adjacent columns of one row), then the 8
// partial sums of a column are added in the order ty = 0..7. With one split the block writes
// db in the output dtype; otherwise it writes partial[k, n] (fp32) and bias_grad_finish_<T>
// adds the splits in the order k = 0, 1, ... The split count depends only on (M, N), so the
// bits are the same on every run and on every GPU. Offsets are 64-bit.


#define BG_TILE_N 32
#define BG_ROWS 8

__device__ __forceinline__ float f32_to_f32(float f) { return f; }

template <class S, float (*LOAD)(S), S (*STORE)(float)>
__device__ __forceinline__ void bias_grad_partial(const S* dy, float* partial, S* db, i64 n_rows,
                                                  i64 n_cols, i64 rows_per_split) {
    __shared__ float sh[BG_ROWS][BG_TILE_N + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 col = (i64)blockIdx.x * BG_TILE_N + tx;
    const i64 split = blockIdx.y;
    const i64 start = split * rows_per_split;
    i64 stop = start + rows_per_split;
    if (stop > n_rows) stop = n_rows;
    float acc = 0.0f;
    if (col < n_cols) {
#pragma unroll 4
        for (i64 r = start + ty; r < stop; r += BG_ROWS) acc += LOAD(dy[r * n_cols + col]);
    }
    sh[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < n_cols) {
        float total = sh[0][tx];
#pragma unroll
        for (int k = 1; k < BG_ROWS; ++k) total += sh[k][tx];
        if (partial != 0)
            partial[split * n_cols + col] = total;
        else
            db[col] = STORE(total);
    }
}

template <class S, S (*STORE)(float)>
__device__ __forceinline__ void bias_grad_finish(const float* partial, S* db, i64 n_cols,
                                                 i64 n_splits) {
    const i64 col = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= n_cols) return;
    float total = 0.0f;
    for (i64 k = 0; k < n_splits; ++k) total += partial[k * n_cols + col];
    db[col] = STORE(total);
}

#define BG_DEFINE(SUFFIX, S, LOAD, STORE)                                                       \
    extern "C" __global__ void __launch_bounds__(BG_TILE_N * BG_ROWS) bias_grad_##SUFFIX(        \
        const S* dy, float* partial, S* db, i64 n_rows, i64 n_cols, i64 rows_per_split) {       \
        bias_grad_partial<S, LOAD, STORE>(dy, partial, db, n_rows, n_cols, rows_per_split);     \
    }                                                                                           \
    extern "C" __global__ void bias_grad_finish_##SUFFIX(const float* partial, S* db,          \
                                                         i64 n_cols, i64 n_splits) {            \
        bias_grad_finish<S, STORE>(partial, db, n_cols, n_splits);                              \
    }

BG_DEFINE(f32, float, f32_to_f32, f32_to_f32)
BG_DEFINE(f16, u16, f16_to_f32, f32_to_f16)
BG_DEFINE(bf16, u16, bf16_to_f32, f32_to_bf16)
