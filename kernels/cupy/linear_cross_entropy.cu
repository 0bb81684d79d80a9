// Fused LM head, the part between the GEMMs: for one chunk of logits z [rows, V] (from
// x_chunk @ wᵀ, in the input dtype), the row losses, log-sum-exp, and dloss/dz in place.
// The launcher, linear_cross_entropy.py, runs the GEMMs (cuBLAS) around these kernels.
//
// Self-contained (no #include): NVRTC and nvcc compile this text after the prelude common.cuh.
//
// Kernels (suffix _f32 / _f16 / _bf16 for the dtype of z):
//   lce_rows_<T>        one block per row (grid-stride over rows). Per element the logit is
//                       v = z + bias (when given), soft-capped v <- cap·tanh(v / cap) when cap > 0.
//                       Pass 1: per-thread online max and Σexp, and Σv, merged across the block
//                       in a fixed order; lse = max + log Σexp;
//                       row_loss = lse - (1 - eps)·v_t - (eps / V)·Σv + z_coef·lse²  (0 if ignored),
//                       lse_out = lse (every row). Pass 2 (write_grad):
//                       z <- scale·(softmax·(1 + 2·z_coef·lse) - eps/V - (1 - eps)·onehot)·(1 - (v/cap)²),
//                       scale = scale_in[row] (row_scale) or scale_in[0]; ignored rows get zeros and
//                       are not read in pass 2. With class weights c (class_weight [V] fp32, its sum
//                       at class_weight_sum[0]; never with a z-loss), Σv becomes Σ c·v and
//                       row_loss = m·lse - (1 - eps)·c_t·v_t - (eps / V)·Σ c·v,
//                       z <- scale·(m·softmax - (eps / V)·c - (1 - eps)·c_t·onehot)·(1 - (v/cap)²),
//                       m = (1 - eps)·c_t + (eps / V)·Σ c.
//   lce_column_sum_<T>  db[c] += Σ_r dz[r, c] (fp32, rows in order: one thread per column).
// No atomics: the same inputs give the same bits on every run. 64-bit element offsets. A target
// outside [0, V) that is not ignore_index is never dereferenced: its row loss is NaN.

#define LCE_MAX_THREADS 1024
#define LCE_LOWEST (-3.402823466e+38f)

struct LceF32 {
    typedef float S;
    __device__ static float load(const S* p, i64 i) { return p[i]; }
    __device__ static void store(S* p, i64 i, float v) { p[i] = v; }
};
struct LceF16 {
    typedef u16 S;
    __device__ static float load(const S* p, i64 i) { return f16_to_f32(p[i]); }
    __device__ static void store(S* p, i64 i, float v) { p[i] = f32_to_f16(v); }
};
struct LceBF16 {
    typedef u16 S;
    __device__ static float load(const S* p, i64 i) { return bf16_to_f32(p[i]); }
    __device__ static void store(S* p, i64 i, float v) { p[i] = f32_to_bf16(v); }
};

// A running log-sum-exp: m the largest value seen, s = Σ exp(v - m); plus Σv.
struct LseState {
    float m, s, sum;
};

__device__ __forceinline__ LseState lse_combine(LseState a, LseState b) {
    LseState r;
    r.m = fmaxf(a.m, b.m);
    r.s = a.s * expf(a.m - r.m) + b.s * expf(b.m - r.m);
    r.sum = a.sum + b.sum;
    return r;
}

__device__ __forceinline__ LseState lse_shuffle(LseState a, int lane_mask) {
    LseState b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, lane_mask);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, lane_mask);
    b.sum = __shfl_xor_sync(0xffffffffu, a.sum, lane_mask);
    return b;
}

// Merge every thread's state in a fixed order (warp butterflies, then the warps' results by
// warp 0); every thread returns the block's state. blockDim.x: a multiple of 32, at most 1024.
__device__ __forceinline__ LseState lse_block_merge(LseState a) {
    __shared__ LseState warp_state[32];
    __shared__ LseState block_state;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) a = lse_combine(a, lse_shuffle(a, off));
    if (lane == 0) warp_state[warp] = a;
    __syncthreads();
    if (warp == 0) {
        LseState empty = {LCE_LOWEST, 0.0f, 0.0f};
        a = lane < (int)(blockDim.x >> 5) ? warp_state[lane] : empty;
        for (int off = 16; off > 0; off >>= 1) a = lse_combine(a, lse_shuffle(a, off));
        if (lane == 0) block_state = a;
    }
    __syncthreads();
    a = block_state;
    __syncthreads();  // block_state and warp_state are free again for the next row
    return a;
}

template <class T>
__device__ __forceinline__ float lce_logit(const typename T::S* row, const typename T::S* bias, i64 c, float cap) {
    float v = T::load(row, c);
    if (bias != 0) v += T::load(bias, c);
    if (cap > 0.0f) v = cap * tanhf(v / cap);
    return v;
}

template <class T>
__device__ __forceinline__ void lce_rows(typename T::S* z, const typename T::S* bias, const i64* targets,
                                         float* row_loss, float* lse_out, const float* scale_in,
                                         const float* class_weight, const float* class_weight_sum, i64 n_rows,
                                         i64 n_cols, i64 ignore_index, float eps, float z_coef, float cap,
                                         int write_grad, int row_scale) {
    const i64 tid = threadIdx.x, nthreads = blockDim.x;
    for (i64 r = blockIdx.x; r < n_rows; r += gridDim.x) {
        typename T::S* row = z + r * n_cols;
        const i64 t = targets[r];
        const bool valid = t != ignore_index;
        const bool in_range = t >= 0 && t < n_cols;
        // The target's logit, read before the barriers of the merge: pass 2 overwrites it.
        float v_t = 0.0f;
        if (tid == 0 && in_range) v_t = lce_logit<T>(row, bias, t, cap);

        LseState st = {LCE_LOWEST, 0.0f, 0.0f};
        for (i64 c = tid; c < n_cols; c += nthreads) {
            const float v = lce_logit<T>(row, bias, c, cap);
            if (v > st.m) {
                st.s = st.s * expf(st.m - v) + 1.0f;
                st.m = v;
            } else {
                st.s += expf(v - st.m);
            }
            st.sum += class_weight != 0 ? class_weight[c] * v : v;
        }
        st = lse_block_merge(st);
        const float log_s = logf(st.s);
        const float lse = st.m + log_s;
        // the target's class weight c_t and the row's target mass m (both 1 without weights)
        const float c_t = class_weight != 0 && in_range ? class_weight[t] : 1.0f;
        const float mass = class_weight != 0 ? (1.0f - eps) * c_t + eps / (float)n_cols * class_weight_sum[0] : 1.0f;
        if (tid == 0) {
            float loss = 0.0f;
            if (valid) {
                loss = in_range ? mass * lse - (1.0f - eps) * c_t * v_t : __int_as_float(0x7fffffff);
                if (eps != 0.0f) loss -= eps / (float)n_cols * st.sum;
                if (z_coef != 0.0f) loss += z_coef * lse * lse;
            }
            row_loss[r] = loss;
            lse_out[r] = lse;
        }
        if (!write_grad) continue;

        if (!valid) {
            for (i64 c = tid; c < n_cols; c += nthreads) T::store(row, c, 0.0f);
            continue;
        }
        const float scale = scale_in[row_scale ? r : 0];
        const float coef = (1.0f + 2.0f * z_coef * lse) * mass;
        const float uniform = eps / (float)n_cols;
        const i64 t_col = in_range ? t : -1;
        for (i64 c = tid; c < n_cols; c += nthreads) {
            const float v = lce_logit<T>(row, bias, c, cap);
            float g = expf((v - st.m) - log_s) * coef - (class_weight != 0 ? uniform * class_weight[c] : uniform);
            if (c == t_col) g -= (1.0f - eps) * c_t;
            if (cap > 0.0f) g *= 1.0f - (v / cap) * (v / cap);
            T::store(row, c, g * scale);
        }
    }
}

template <class T>
__device__ __forceinline__ void lce_column_sum(const typename T::S* dz, float* db, i64 n_rows, i64 n_cols) {
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n_cols) return;
    float acc = 0.0f;
    for (i64 r = 0; r < n_rows; ++r) acc += T::load(dz, r * n_cols + c);
    db[c] += acc;
}

#define LCE_DEFINE(SUFFIX, TRAITS)                                                                      \
    extern "C" __global__ void __launch_bounds__(LCE_MAX_THREADS) lce_rows_##SUFFIX(                   \
        TRAITS::S* z, const TRAITS::S* bias, const i64* targets, float* row_loss, float* lse_out,      \
        const float* scale_in, const float* class_weight, const float* class_weight_sum, i64 n_rows,    \
        i64 n_cols, i64 ignore_index, float eps, float z_coef, float cap, int write_grad,               \
        int row_scale) {                                                                                \
        lce_rows<TRAITS>(z, bias, targets, row_loss, lse_out, scale_in, class_weight, class_weight_sum, \
                         n_rows, n_cols, ignore_index, eps, z_coef, cap, write_grad, row_scale);        \
    }                                                                                                   \
    extern "C" __global__ void lce_column_sum_##SUFFIX(const TRAITS::S* dz, float* db, i64 n_rows,      \
                                                        i64 n_cols) {                                   \
        lce_column_sum<TRAITS>(dz, db, n_rows, n_cols);                                                 \
    }

LCE_DEFINE(f32, LceF32)
LCE_DEFINE(f16, LceF16)
LCE_DEFINE(bf16, LceBF16)
