// Fused softmax cross-entropy: loss and dlogits = p - y* without forming p in memory.
//
// Self-contained on purpose (no #include): NVRTC, through cupy.RawModule, and nvcc, in the
// test suite, compile this exact text alike (after the prelude common.cuh, which
// compile.source puts in front). fp16 and bf16 are stored as unsigned short and
// converted with inline PTX (cvt.rn.bf16.f32 needs sm_80 or newer).
//
// Kernels (one per logits dtype, suffix _f32 / _f16 / _bf16):
//   ce_forward_<T>     one block per row (grid-stride over rows): pass 1 reads the row once,
//                      keeping a per-thread online max and sum of exp plus the plain sum of the
//                      logits (for label smoothing), merged by warp shuffles and shared memory in
//                      a fixed order; writes the row loss to row_loss[B] (fp32). With write_grad,
//                      pass 2 reads the row again and writes dlogits (may alias logits: inplace).
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

struct alignas(16) Pack16 {
    u32 w[4];
};


// Storage traits: element type, elements per 16-byte pack, scalar and pack conversions.
struct TypeF32 {
    typedef float S;
    static const int PACK = 4;
    __device__ static float to_f32(S v) { return v; }
    __device__ static S from_f32(float v) { return v; }
    __device__ static void unpack(const Pack16& p, float* v) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(p.w[i]);
    }
    __device__ static Pack16 pack(const float* v) {
        Pack16 p;
#pragma unroll
        for (int i = 0; i < 4; ++i) p.w[i] = __float_as_uint(v[i]);
        return p;
    }
};

template <float (*LOAD)(u16), u16 (*STORE)(float)>
struct Type16 {
    typedef u16 S;
    static const int PACK = 8;
    __device__ static float to_f32(S v) { return LOAD(v); }
    __device__ static S from_f32(float v) { return STORE(v); }
    __device__ static void unpack(const Pack16& p, float* v) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = LOAD((u16)(p.w[i] & 0xffffu));
            v[2 * i + 1] = LOAD((u16)(p.w[i] >> 16));
        }
    }
    __device__ static Pack16 pack(const float* v) {
        Pack16 p;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            p.w[i] = (u32)STORE(v[2 * i]) | ((u32)STORE(v[2 * i + 1]) << 16);
        return p;
    }
};
typedef Type16<f16_to_f32, f32_to_f16> TypeF16;
typedef Type16<bf16_to_f32, f32_to_bf16> TypeBF16;

// Elements before the first 16-byte boundary of a row (rows are element-aligned).
template <class S>
__device__ __forceinline__ i64 head_elements(const S* row, i64 n) {
    u32 mis = (u32)((unsigned long long)row & 15ull);
    i64 head = mis ? (i64)((16u - mis) / sizeof(S)) : 0;
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

// Butterfly merge of (m, s, z) across a warp; every lane gets the warp's result.
__device__ __forceinline__ void warp_reduce(float& m, float& s, float& z) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        float z2 = __shfl_xor_sync(0xffffffffu, z, off);
        online_merge(m, s, m2, s2);
        z += z2;
    }
}

// Block-wide merge of (m, s, z) in a fixed order; every thread gets the result.
// Needs blockDim.x a multiple of 32 and at most CE_MAX_THREADS.
__device__ __forceinline__ void block_reduce(float& m, float& s, float& z) {
    __shared__ float sh_m[32], sh_s[32], sh_z[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    warp_reduce(m, s, z);
    if (lane == 0) {
        sh_m[warp] = m;
        sh_s[warp] = s;
        sh_z[warp] = z;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < n_warps ? sh_m[lane] : CE_LOWEST;
        s = lane < n_warps ? sh_s[lane] : 0.0f;
        z = lane < n_warps ? sh_z[lane] : 0.0f;
        warp_reduce(m, s, z);
        if (lane == 0) {
            sh_m[0] = m;
            sh_s[0] = s;
            sh_z[0] = z;
        }
    }
    __syncthreads();
    m = sh_m[0];
    s = sh_s[0];
    z = sh_z[0];
    __syncthreads();  // the shared slots are free again for the next row
}

template <class D>
__device__ __forceinline__ void ce_rows(const typename D::S* logits, typename D::S* dlogits,
                                        const i64* targets, float* row_loss, const i64* n_valid,
                                        i64 n_rows, i64 n_cols, i64 ignore_index, float smoothing,
                                        int write_grad) {
    typedef typename D::S S;
    const int PACK = D::PACK;
    const i64 tid = threadIdx.x, nthreads = blockDim.x;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const i64 offset = row * n_cols;  // 64-bit: B * V may exceed 2^31
        const S* x = logits + offset;
        S* y = write_grad ? dlogits + offset : (S*)0;
        const i64 target = targets[row];
        const i64 head = head_elements(x, n_cols);
        const i64 n_packs = (n_cols - head) / PACK;
        const i64 tail_start = head + n_packs * PACK;
        const Pack16* xv = reinterpret_cast<const Pack16*>(x + head);
        // dlogits rows share the logits rows' 16-byte phase unless logits is an offset view.
        const bool y_vec = write_grad && ((((unsigned long long)y) & 15ull) == (((unsigned long long)x) & 15ull));

        if (target == ignore_index) {
            if (tid == 0) row_loss[row] = 0.0f;
            if (write_grad) {
                const S zero = D::from_f32(0.0f);
                if (y_vec) {
                    Pack16 zp;
                    zp.w[0] = zp.w[1] = zp.w[2] = zp.w[3] = 0u;
                    Pack16* yv = reinterpret_cast<Pack16*>(y + head);
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
        // Read the target logit before the block reduction's barriers: with inplace=True the
        // gradient pass overwrites it afterwards.
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
            D::unpack(xv[p], v);
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
        block_reduce(m, s, z);

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
            Pack16* yv = reinterpret_cast<Pack16*>(y + head);
            if (tid < head) {
                float p = exp2f(fmaf(D::to_f32(x[tid]) - m, CE_LOG2E, -log2_s));
                float g = p - uniform - (tid == t_col ? hit : 0.0f);
                y[tid] = D::from_f32(g * scale);
            }
#pragma unroll 2
            for (i64 p = tid; p < n_packs; p += nthreads) {
                float v[PACK];
                D::unpack(xv[p], v);
                const i64 c0 = head + p * PACK;
#pragma unroll
                for (int i = 0; i < PACK; ++i) {
                    float q = exp2f(fmaf(v[i] - m, CE_LOG2E, -log2_s));
                    v[i] = (q - uniform - (c0 + i == t_col ? hit : 0.0f)) * scale;
                }
                yv[p] = D::pack(v);
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

#define CE_DEFINE_FORWARD(SUFFIX, TRAITS)                                                          \
    extern "C" __global__ void __launch_bounds__(CE_MAX_THREADS) ce_forward_##SUFFIX(              \
        const TRAITS::S* logits, TRAITS::S* dlogits, const i64* targets, float* row_loss,          \
        const i64* n_valid, i64 n_rows, i64 n_cols, i64 ignore_index, float smoothing,             \
        int write_grad) {                                                                          \
        ce_rows<TRAITS>(logits, dlogits, targets, row_loss, n_valid, n_rows, n_cols, ignore_index, \
                        smoothing, write_grad);                                                    \
    }

CE_DEFINE_FORWARD(f32, TypeF32)
CE_DEFINE_FORWARD(f16, TypeF16)
CE_DEFINE_FORWARD(bf16, TypeBF16)

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
