// Fused softmax cross-entropy: loss and dlogits = p - y* without forming p in memory.
//
// Self-contained on purpose (no #include): NVRTC, through cupy.RawModule, and nvcc, in the
// test suite, compile this exact text alike (after the prelude common.cuh, which
// compile.source puts in front). fp16 and bf16 are stored as unsigned short and
// converted with inline PTX (cvt.rn.bf16.f32 needs sm_80 or newer).
//
// Row kernels, one per (layout, logits dtype, vector width): ce_<layout>_<f32|f16|bf16>_v<4|8|16>
//   layout "block": one block per row (a grid-stride loop over rows: a grid smaller than B is
//                   a persistent grid), for wide rows;
//   layout "warp":  one warp per row, blockDim.x / 32 rows a block (no __syncthreads, no shared
//                   memory), for narrow rows where a block would leave most threads idle.
// Each row: pass 1 reads the row once with loads of <width> bytes (the row's aligned body; its
// misaligned head and tail, < width bytes each, element by element), keeping a per-thread
// online max and sum of exp plus the plain sum of the logits (for label smoothing), merged by
// warp shuffles (and, for a block, shared memory) in a fixed order; it writes the row loss to
// row_loss[B] (fp32). With write_grad, pass 2 reads the row again (forward, or last vector
// first with reverse = 1: the end of the row is the likeliest to be still in L2) and writes
// dlogits (may alias logits: inplace). Bytes: one read and one write per element when pass 2
// hits L2 (1.0x a copy of the logits), 1.5x when it re-reads HBM.
// and, dtype-free:
//   ce_count_valid     number of rows whose target != ignore_index, to one int64 on the device.
//   ce_reduce_loss     fp64-accumulated, fixed-order sum of row_loss, divided by max(n_valid, 1)
//                      when n_valid is given (reduction "mean"), to one fp32.
// No float atomics anywhere: the same inputs give the same bits on every run.
// All element offsets are 64-bit. Targets outside [0, V) that are not ignore_index are never
// dereferenced: their row loss is NaN and their gradient lacks the one-hot term.


#define CE_LOG2E 1.4426950408889634f
#define CE_MAX_THREADS 1024
#define CE_LOWEST (-3.402823466e+38f)

// W 32-bit words loaded or stored as one vector (4, 8 or 16 bytes).
template <int W>
struct alignas(4 * W) Pack {
    u32 w[W];
};


// Storage traits: element type, elements per 32-bit word, scalar and pack conversions.
struct TypeF32 {
    typedef float S;
    static const int PER_WORD = 1;
    __device__ static float to_f32(S v) { return v; }
    __device__ static S from_f32(float v) { return v; }
    template <int W>
    __device__ static void unpack(const Pack<W>& p, float* v) {
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] = __uint_as_float(p.w[i]);
    }
    template <int W>
    __device__ static Pack<W> pack(const float* v) {
        Pack<W> p;
#pragma unroll
        for (int i = 0; i < W; ++i) p.w[i] = __float_as_uint(v[i]);
        return p;
    }
};

template <float (*LOAD)(u16), u16 (*STORE)(float)>
struct Type16 {
    typedef u16 S;
    static const int PER_WORD = 2;
    __device__ static float to_f32(S v) { return LOAD(v); }
    __device__ static S from_f32(float v) { return STORE(v); }
    template <int W>
    __device__ static void unpack(const Pack<W>& p, float* v) {
#pragma unroll
        for (int i = 0; i < W; ++i) {
            v[2 * i] = LOAD((u16)(p.w[i] & 0xffffu));
            v[2 * i + 1] = LOAD((u16)(p.w[i] >> 16));
        }
    }
    template <int W>
    __device__ static Pack<W> pack(const float* v) {
        Pack<W> p;
#pragma unroll
        for (int i = 0; i < W; ++i)
            p.w[i] = (u32)STORE(v[2 * i]) | ((u32)STORE(v[2 * i + 1]) << 16);
        return p;
    }
};
typedef Type16<f16_to_f32, f32_to_f16> TypeF16;
typedef Type16<bf16_to_f32, f32_to_bf16> TypeBF16;

// Elements before the first BYTES-byte boundary of a row (rows are element-aligned).
template <int BYTES, class S>
__device__ __forceinline__ i64 head_elements(const S* row, i64 n) {
    u32 mis = (u32)((unsigned long long)row & (unsigned long long)(BYTES - 1));
    i64 head = mis ? (i64)((BYTES - mis) / sizeof(S)) : 0;
    return head < n ? head : n;
}

// (m, s): running max and sum of exp(x - m). m starts at the lowest finite float, so -inf
// logits add exactly 0 and NaN logits turn s into NaN.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * exp2f((m - x) * CE_LOG2E) + 1.0f;
        m = x;
    } else {
        s += exp2f((x - m) * CE_LOG2E);
    }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    if (m2 > m) {
        s = s * exp2f((m - m2) * CE_LOG2E) + s2;
        m = m2;
    } else {
        s += s2 * exp2f((m2 - m) * CE_LOG2E);
    }
}

// Butterfly merge of (m, s) and N plain sums z across a warp; every lane gets the warp's result.
template <int N>
__device__ __forceinline__ void warp_reduce_n(float& m, float& s, float* z) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        float z2[N];
#pragma unroll
        for (int i = 0; i < N; ++i) z2[i] = __shfl_xor_sync(0xffffffffu, z[i], off);
        online_merge(m, s, m2, s2);
#pragma unroll
        for (int i = 0; i < N; ++i) z[i] += z2[i];
    }
}

// Block-wide merge of (m, s) and N plain sums z in a fixed order; every thread gets the result.
// Needs blockDim.x a multiple of 32 and at most CE_MAX_THREADS.
template <int N>
__device__ __forceinline__ void block_reduce_n(float& m, float& s, float* z) {
    __shared__ float sh_m[32], sh_s[32], sh_z[N][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    warp_reduce_n<N>(m, s, z);
    if (lane == 0) {
        sh_m[warp] = m;
        sh_s[warp] = s;
#pragma unroll
        for (int i = 0; i < N; ++i) sh_z[i][warp] = z[i];
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < n_warps ? sh_m[lane] : CE_LOWEST;
        s = lane < n_warps ? sh_s[lane] : 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) z[i] = lane < n_warps ? sh_z[i][lane] : 0.0f;
        warp_reduce_n<N>(m, s, z);
        if (lane == 0) {
            sh_m[0] = m;
            sh_s[0] = s;
#pragma unroll
            for (int i = 0; i < N; ++i) sh_z[i][0] = z[i];
        }
    }
    __syncthreads();
    m = sh_m[0];
    s = sh_s[0];
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = sh_z[i][0];
    __syncthreads();  // the shared slots are free again for the next row
}

__device__ __forceinline__ void warp_reduce(float& m, float& s, float& z) { warp_reduce_n<1>(m, s, &z); }
__device__ __forceinline__ void block_reduce(float& m, float& s, float& z) { block_reduce_n<1>(m, s, &z); }

// The threads that share a row: a whole block (BlockRow) or one warp of it (WarpRow).
struct BlockRow {
    __device__ static i64 rank() { return threadIdx.x; }
    __device__ static i64 size() { return blockDim.x; }
    __device__ static i64 first_row() { return blockIdx.x; }
    __device__ static i64 row_step() { return gridDim.x; }
    __device__ static void reduce(float& m, float& s, float& z) { block_reduce(m, s, z); }
    template <int N>
    __device__ static void reduce_n(float& m, float& s, float* z) { block_reduce_n<N>(m, s, z); }
};

struct WarpRow {
    __device__ static i64 rank() { return threadIdx.x & 31; }
    __device__ static i64 size() { return 32; }
    __device__ static i64 first_row() { return (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }
    __device__ static i64 row_step() { return (i64)gridDim.x * (blockDim.x >> 5); }
    __device__ static void reduce(float& m, float& s, float& z) { warp_reduce(m, s, z); }
};

// One thread per row: the rows of a warp are side by side in memory when the classes are
// not ([B, C, T] layouts), so each class step is one coalesced load across the warp.
struct ThreadRow {
    __device__ static i64 rank() { return 0; }
    __device__ static i64 size() { return 1; }
    __device__ static i64 first_row() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
    __device__ static i64 row_step() { return (i64)gridDim.x * blockDim.x; }
    template <int N>
    __device__ static void reduce_n(float&, float&, float*) {}
};

template <class D, int W, class G>
__device__ __forceinline__ void ce_rows(const typename D::S* logits, typename D::S* dlogits,
                                        const i64* targets, float* row_loss, const i64* n_valid,
                                        i64 n_rows, i64 n_cols, i64 ignore_index, float smoothing,
                                        int write_grad, int reverse) {
    typedef typename D::S S;
    typedef Pack<W> P;
    const int PACK = W * D::PER_WORD;  // elements a vector
    const int BYTES = 4 * W;
    const i64 tid = G::rank(), nthreads = G::size();
    for (i64 row = G::first_row(); row < n_rows; row += G::row_step()) {
        const i64 offset = row * n_cols;  // 64-bit: B * V may exceed 2^31
        const S* x = logits + offset;
        S* y = write_grad ? dlogits + offset : (S*)0;
        const i64 target = targets[row];
        const i64 head = head_elements<BYTES>(x, n_cols);
        const i64 n_packs = (n_cols - head) / PACK;
        const i64 tail_start = head + n_packs * PACK;
        const P* xv = reinterpret_cast<const P*>(x + head);
        // dlogits rows share the logits rows' phase unless logits is an offset view.
        const bool y_vec = write_grad && ((((unsigned long long)y) & (BYTES - 1)) ==
                                          (((unsigned long long)x) & (BYTES - 1)));

        if (target == ignore_index) {
            if (tid == 0) row_loss[row] = 0.0f;
            if (write_grad) {
                const S zero = D::from_f32(0.0f);
                if (y_vec) {
                    P zp;
#pragma unroll
                    for (int i = 0; i < W; ++i) zp.w[i] = 0u;
                    P* yv = reinterpret_cast<P*>(y + head);
                    if (tid < head) y[tid] = zero;
                    for (i64 v = tid; v < n_packs; v += nthreads) yv[v] = zp;
                    for (i64 c = tail_start + tid; c < n_cols; c += nthreads) y[c] = zero;
                } else {
                    for (i64 c = tid; c < n_cols; c += nthreads) y[c] = zero;
                }
            }
            continue;
        }
        const bool in_range = target >= 0 && target < n_cols;
        // Read the target logit before the reduction's barriers (or shuffles): with
        // inplace=True the gradient pass overwrites it afterwards.
        float z_target = 0.0f;
        if (tid == 0 && in_range) z_target = D::to_f32(x[target]);

        // Pass 1: online max / sum of exp, and the plain sum of the logits.
        float m = CE_LOWEST, s = 0.0f, z = 0.0f;
        if (tid < head) {
            float v = D::to_f32(x[tid]);
            online_add(m, s, v);
            z += v;
        }
#pragma unroll 2
        for (i64 p = tid; p < n_packs; p += nthreads) {
            float v[PACK];
            D::template unpack<W>(xv[p], v);
            float pm = v[0];
#pragma unroll
            for (int i = 1; i < PACK; ++i) pm = fmaxf(pm, v[i]);
            if (pm > m) {
                s *= exp2f((m - pm) * CE_LOG2E);
                m = pm;
            }
#pragma unroll
            for (int i = 0; i < PACK; ++i) {
                s += exp2f((v[i] - m) * CE_LOG2E);
                z += v[i];
            }
        }
        for (i64 c = tail_start + tid; c < n_cols; c += nthreads) {
            float v = D::to_f32(x[c]);
            online_add(m, s, v);
            z += v;
        }
        G::reduce(m, s, z);

        if (tid == 0) {
            // logsumexp - (1 - eps) z_t - eps mean(z), arranged so that close terms cancel first
            float loss = logf(s) + (m - z_target);
            if (in_range) {
                if (smoothing != 0.0f) loss += smoothing * (z_target - z / (float)n_cols);
            } else {
                loss = __int_as_float(0x7fffffff);  // NaN: a bad target, never read
            }
            row_loss[row] = loss;
        }
        if (!write_grad) continue;

        // Pass 2: dlogits = scale * (p - eps/V - (1 - eps) * onehot), p = 2^((x - m) log2e - log2 s).
        const float log2_s = log2f(s);
        float scale = 1.0f;
        if (n_valid != 0) {
            i64 count = *n_valid;
            scale = 1.0f / (float)(count > 1 ? count : 1);
        }
        const float uniform = smoothing / (float)n_cols;
        const float hit = in_range ? (1.0f - smoothing) : 0.0f;
        const i64 t_col = in_range ? target : -1;
        if (y_vec) {
            P* yv = reinterpret_cast<P*>(y + head);
            if (tid < head) {
                float p = exp2f(fmaf(D::to_f32(x[tid]) - m, CE_LOG2E, -log2_s));
                float g = p - uniform - (tid == t_col ? hit : 0.0f);
                y[tid] = D::from_f32(g * scale);
            }
#pragma unroll 2
            for (i64 i = tid; i < n_packs; i += nthreads) {
                const i64 p = reverse ? n_packs - 1 - i : i;
                float v[PACK];
                D::template unpack<W>(xv[p], v);
                const i64 c0 = head + p * PACK;
#pragma unroll
                for (int k = 0; k < PACK; ++k) {
                    float q = exp2f(fmaf(v[k] - m, CE_LOG2E, -log2_s));
                    v[k] = (q - uniform - (c0 + k == t_col ? hit : 0.0f)) * scale;
                }
                yv[p] = D::template pack<W>(v);
            }
            for (i64 c = tail_start + tid; c < n_cols; c += nthreads) {
                float p = exp2f(fmaf(D::to_f32(x[c]) - m, CE_LOG2E, -log2_s));
                y[c] = D::from_f32((p - uniform - (c == t_col ? hit : 0.0f)) * scale);
            }
        } else {
            for (i64 c = tid; c < n_cols; c += nthreads) {
                float p = exp2f(fmaf(D::to_f32(x[c]) - m, CE_LOG2E, -log2_s));
                y[c] = D::from_f32((p - uniform - (c == t_col ? hit : 0.0f)) * scale);
            }
        }
    }
}

#define CE_DEFINE_ROWS(LAYOUT, GROUP, SUFFIX, TRAITS, BYTES)                                       \
    extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS) ce_##LAYOUT##_##SUFFIX##_v##BYTES( \
        const TRAITS::S* logits, TRAITS::S* dlogits, const i64* targets, float* row_loss,           \
        const i64* n_valid, i64 n_rows, i64 n_cols, i64 ignore_index, float smoothing,              \
        int write_grad, int reverse) {                                                              \
        ce_rows<TRAITS, BYTES / 4, GROUP>(logits, dlogits, targets, row_loss, n_valid, n_rows,      \
                                          n_cols, ignore_index, smoothing, write_grad, reverse);    \
    }

#define CE_DEFINE_WIDTHS(LAYOUT, GROUP, SUFFIX, TRAITS) \
    CE_DEFINE_ROWS(LAYOUT, GROUP, SUFFIX, TRAITS, 4)    \
    CE_DEFINE_ROWS(LAYOUT, GROUP, SUFFIX, TRAITS, 8)    \
    CE_DEFINE_ROWS(LAYOUT, GROUP, SUFFIX, TRAITS, 16)

CE_DEFINE_WIDTHS(block, BlockRow, f32, TypeF32)
CE_DEFINE_WIDTHS(block, BlockRow, f16, TypeF16)
CE_DEFINE_WIDTHS(block, BlockRow, bf16, TypeBF16)
CE_DEFINE_WIDTHS(warp, WarpRow, f32, TypeF32)
CE_DEFINE_WIDTHS(warp, WarpRow, f16, TypeF16)
CE_DEFINE_WIDTHS(warp, WarpRow, bf16, TypeBF16)

// F.cross_entropy in full: ce_general_<block|thread>_<dtype>. Row r = (b, s) of [B, C, S]
// logits addressed by strides (x_sb, x_sc, x_ss; the gradient by g_*, probability targets by
// q_*), so [B, C, T] layouts are read in place. targets: class indices [B*S] (probs null) or
// probs: class probabilities in the logits' dtype; weight: fp32 [C] or null; denom: the
// mean's divisor (ce_general_denominator, or the row count for probabilities) or null.
// With a the row's weighted target distribution (indices: (1-eps) w_t [c = t] + (eps/C) w_c;
// probabilities: w_c ((1-eps) q_c + eps/C)), A = sum a: loss = A (max + log sum exp(z - max))
// - sum a z, gradient (A softmax - a) / denom. A zero a_c adds nothing, even for z_c = -inf;
// a row with A = 0 has loss 0 and gradient 0.
// hit is (1-eps) w_t for class indices, 1 - eps for probabilities.
template <class D>
__device__ __forceinline__ float target_mass(const typename D::S* q, i64 q_sc, const float* weight, i64 c,
                                             i64 target, float hit, float uniform) {
    const float w = weight ? weight[c] : 1.0f;
    if (q) return (D::to_f32(q[c * q_sc]) * hit + uniform) * w;
    return (c == target ? hit : 0.0f) + uniform * w;
}

template <class D, class G>
__device__ __forceinline__ void ce_general(const typename D::S* logits, typename D::S* dlogits, const i64* targets,
                                           const typename D::S* probs, const float* weight, float* row_loss,
                                           const float* denom, i64 n_rows, i64 n_cols, i64 n_spatial, i64 x_sb,
                                           i64 x_sc, i64 x_ss, i64 g_sb, i64 g_sc, i64 g_ss, i64 q_sb, i64 q_sc,
                                           i64 q_ss, i64 ignore_index, float smoothing, int write_grad) {
    typedef typename D::S S;
    const i64 tid = G::rank(), nthreads = G::size();
    const float uniform = smoothing / (float)n_cols;
    for (i64 row = G::first_row(); row < n_rows; row += G::row_step()) {
        const i64 b = row / n_spatial, sp = row - b * n_spatial;
        const S* x = logits + b * x_sb + sp * x_ss;
        S* y = write_grad ? dlogits + b * g_sb + sp * g_ss : (S*)0;
        const S* q = probs ? probs + b * q_sb + sp * q_ss : (const S*)0;
        const i64 target = probs ? -1 : targets[row];
        if (!probs && target == ignore_index) {
            if (tid == 0) row_loss[row] = 0.0f;
            if (write_grad)
                for (i64 c = tid; c < n_cols; c += nthreads) y[c * g_sc] = D::from_f32(0.0f);
            continue;
        }
        const bool in_range = probs || (target >= 0 && target < n_cols);
        const float w_t = probs ? 1.0f : (weight ? (in_range ? weight[target] : 0.0f) : 1.0f);
        const float hit = (1.0f - smoothing) * w_t;

        // Pass 1: online max / sum of exp, A = sum a and sum a z.
        float m = CE_LOWEST, s = 0.0f, z[2] = {0.0f, 0.0f};
        for (i64 c = tid; c < n_cols; c += nthreads) {
            const float v = D::to_f32(x[c * x_sc]);
            online_add(m, s, v);
            const float a = target_mass<D>(q, q_sc, weight, c, target, hit, uniform);
            z[0] += a;
            if (a != 0.0f) z[1] += a * v;
        }
        G::template reduce_n<2>(m, s, z);
        const float mass = z[0];
        const bool live = mass != 0.0f;  // no target mass (every factor 0): loss and gradient 0
        if (tid == 0)
            row_loss[row] = !in_range ? __int_as_float(0x7fffffff) : live ? mass * logf(s) + (mass * m - z[1]) : 0.0f;
        if (!write_grad) continue;

        // Pass 2: dlogits = (A p - a) / denom, p = 2^((x - m) log2e - log2 s).
        const float log2_s = log2f(s);
        const float scale = denom ? 1.0f / *denom : 1.0f;
        for (i64 c = tid; c < n_cols; c += nthreads) {
            const float p = exp2f(fmaf(D::to_f32(x[c * x_sc]) - m, CE_LOG2E, -log2_s));
            const float a = target_mass<D>(q, q_sc, weight, c, target, hit, uniform);
            y[c * g_sc] = D::from_f32(live ? (mass * p - a) * scale : 0.0f);
        }
    }
}

#define CE_DEFINE_GENERAL(LAYOUT, GROUP, SUFFIX, TRAITS)                                                     \
    extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS) ce_general_##LAYOUT##_##SUFFIX(           \
        const TRAITS::S* logits, TRAITS::S* dlogits, const i64* targets, const TRAITS::S* probs,            \
        const float* weight, float* row_loss, const float* denom, i64 n_rows, i64 n_cols, i64 n_spatial,    \
        i64 x_sb, i64 x_sc, i64 x_ss, i64 g_sb, i64 g_sc, i64 g_ss, i64 q_sb, i64 q_sc, i64 q_ss,           \
        i64 ignore_index, float smoothing, int write_grad) {                                                \
        ce_general<TRAITS, GROUP>(logits, dlogits, targets, probs, weight, row_loss, denom, n_rows, n_cols, \
                                  n_spatial, x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, q_sb, q_sc, q_ss,          \
                                  ignore_index, smoothing, write_grad);                                     \
    }

CE_DEFINE_GENERAL(block, BlockRow, f32, TypeF32)
CE_DEFINE_GENERAL(block, BlockRow, f16, TypeF16)
CE_DEFINE_GENERAL(block, BlockRow, bf16, TypeBF16)
CE_DEFINE_GENERAL(thread, ThreadRow, f32, TypeF32)
CE_DEFINE_GENERAL(thread, ThreadRow, f16, TypeF16)
CE_DEFINE_GENERAL(thread, ThreadRow, bf16, TypeBF16)

// Sum of v over one block in a fixed order (warp butterflies, then warps 0, 1, ... by
// thread 0); the total is valid in thread 0. Needs blockDim.x a multiple of 32.
template <class T>
__device__ __forceinline__ T one_block_sum(T v) {
    __shared__ T sh[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    T total = 0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += sh[w];
    }
    return total;
}

// One block. out[0] = number of rows whose target != ignore_index (integer sums: exact).
extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS)
    ce_count_valid(const i64* targets, i64 n_rows, i64 ignore_index, i64* out) {
    i64 count = 0;
    for (i64 r = threadIdx.x; r < n_rows; r += blockDim.x) count += targets[r] != ignore_index;
    const i64 total = one_block_sum(count);
    if (threadIdx.x == 0) out[0] = total;
}

// One block. out[0] = sum(row_loss) (fp64 accumulation, fixed order), divided by
// max(n_valid[0], 1) when n_valid is not null.
extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS)
    ce_reduce_loss(const float* row_loss, i64 n_rows, const i64* n_valid, float* out) {
    double acc = 0.0;
    for (i64 r = threadIdx.x; r < n_rows; r += blockDim.x) acc += (double)row_loss[r];
    double total = one_block_sum(acc);
    if (threadIdx.x == 0) {
        if (n_valid != 0) {
            i64 count = n_valid[0];
            total /= (double)(count > 1 ? count : 1);
        }
        out[0] = (float)total;
    }
}

// One block. out[0] = sum of weight[t] (fp64, fixed order; weight null: 1 each) over the rows
// whose target != ignore_index, or 1 where that is 0 (every row ignored: loss 0).
extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS)
    ce_general_denominator(const i64* targets, const float* weight, i64 n_rows, i64 n_cols, i64 ignore_index,
                           float* out) {
    double acc = 0.0;
    for (i64 r = threadIdx.x; r < n_rows; r += blockDim.x) {
        const i64 t = targets[r];
        if (t == ignore_index) continue;
        acc += weight ? (double)weight[t < 0 ? 0 : (t >= n_cols ? n_cols - 1 : t)] : 1.0;
    }
    const double total = one_block_sum(acc);
    if (threadIdx.x == 0) out[0] = total == 0.0 ? 1.0f : (float)total;
}

// One block. out[0] = sum(row_loss) (fp64, fixed order), divided by denom[0] when denom is not null.
extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS)
    ce_general_reduce_loss(const float* row_loss, i64 n_rows, const float* denom, float* out) {
    double acc = 0.0;
    for (i64 r = threadIdx.x; r < n_rows; r += blockDim.x) acc += (double)row_loss[r];
    const double total = one_block_sum(acc);
    if (threadIdx.x == 0) out[0] = (float)(denom != 0 ? total / (double)denom[0] : total);
}
