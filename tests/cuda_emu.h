// Host emulation of the CUDA builtins that the kernels of gpuad.kernels.cupy use, so that
// their exact source text (compile.source(), with its three inline-PTX conversions replaced
// by the emu_* functions below) compiles as C++20 and runs on the CPU. Used by
// tests/test_cuda_emulated.py, which generates the translation unit:
//     #include "cuda_emu.h"  +  the kernel source  +  one extern "C" emu_launch_<kernel> each.
//
// Model: one std::thread per CUDA thread of a block (a pool, created on first use and reused
// by every launch). The blocks of a grid run one after the other, in the order x, then y;
// between two blocks every thread waits on a barrier, so __shared__ memory (a static local
// here: one copy, shared by every thread) belongs to one block at a time. __syncthreads is a
// std::barrier of the block; __shfl_xor_sync a std::barrier of the warp (32 threads) around a
// double-buffered exchange array. A thread that returns from the kernel leaves the block's
// and its warp's barriers (arrive_and_drop), as an exited CUDA thread no longer takes part in
// bar.sync. A launch that does not finish within EMU_LAUNCH_TIMEOUT_S seconds (a barrier that
// not every thread reaches) aborts the process instead of hanging the test run.
#pragma once

#include <math.h>

#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <semaphore>
#include <thread>
#include <type_traits>
#include <utility>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;

// The entry points of a library (built with -fvisibility=hidden, which keeps the rest local).
#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#ifndef EMU_LAUNCH_TIMEOUT_S
#define EMU_LAUNCH_TIMEOUT_S 120
#endif

namespace emu {

constexpr unsigned MAX_THREADS = 1024;
constexpr unsigned WARP = 32;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

inline unsigned linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// Rebuilds the block's barriers and moves to the next block, while every thread of the block
// waits on the end-of-block barrier (so nobody is inside the barriers it replaces).
struct NextBlock {
    void operator()() noexcept;
};

inline std::optional<std::barrier<>> block_barrier;
inline std::optional<std::barrier<>> warp_barrier[MAX_THREADS / WARP];
inline std::optional<std::barrier<NextBlock>> end_barrier;
inline unsigned long long shfl_slots[2][MAX_THREADS];
inline thread_local unsigned shfl_parity = 0;

inline unsigned block_threads = 0;
inline unsigned long long blocks_left = 0;
inline void (*body_fn)(void*) = nullptr;
inline void* body_ctx = nullptr;

inline std::binary_semaphore* go[MAX_THREADS];  // worker i waits here between launches
inline unsigned pool_size = 0;
inline std::mutex done_mutex;
inline std::condition_variable done_cv;
inline unsigned running = 0;

inline void make_block_barriers() {
    const unsigned n = block_threads;
    block_barrier.emplace(n);
    for (unsigned w = 0; w * WARP < n; ++w) warp_barrier[w].emplace(std::min(WARP, n - w * WARP));
}

inline void NextBlock::operator()() noexcept {
    if (--blocks_left == 0) return;
    if (++blockIdx.x == gridDim.x) {
        blockIdx.x = 0;
        if (++blockIdx.y == gridDim.y) {
            blockIdx.y = 0;
            ++blockIdx.z;
        }
    }
    make_block_barriers();
}

inline void worker(unsigned tid) {
    for (;;) {
        go[tid]->acquire();
        threadIdx.x = tid % blockDim.x;
        threadIdx.y = (tid / blockDim.x) % blockDim.y;
        threadIdx.z = tid / (blockDim.x * blockDim.y);
        const unsigned long long n_blocks = blocks_left;  // read before the first barrier
        for (unsigned long long b = 0; b < n_blocks; ++b) {
            shfl_parity = 0;
            body_fn(body_ctx);
            block_barrier->arrive_and_drop();  // this thread has exited the kernel
            (void)warp_barrier[tid / WARP]->arrive_and_drop();
            end_barrier->arrive_and_wait();
        }
        {
            std::lock_guard<std::mutex> lock(done_mutex);
            if (--running == 0) done_cv.notify_one();
        }
    }
}

// The pool is never destroyed: its threads stay blocked on their semaphore until the
// process exits (no joinable std::thread is left to a static destructor).
inline void grow_pool(unsigned n) {
    while (pool_size < n) {
        go[pool_size] = new std::binary_semaphore(0);
        std::thread(worker, pool_size).detach();
        ++pool_size;
    }
}

// Runs f() once per thread of every block of `grid`; returns when all have finished.
template <class F>
void launch(dim3 grid, dim3 block, F&& f) {
    const unsigned long long n = 1ull * block.x * block.y * block.z;
    if (n == 0 || n > MAX_THREADS) fail("block size outside [1, 1024]");
    const unsigned long long n_blocks = 1ull * grid.x * grid.y * grid.z;
    if (n_blocks == 0) return;
    grow_pool((unsigned)n);
    gridDim = grid;
    blockDim = block;
    blockIdx = dim3{0, 0, 0};
    block_threads = (unsigned)n;
    blocks_left = n_blocks;
    make_block_barriers();
    end_barrier.emplace((std::ptrdiff_t)n);
    using Fn = std::remove_reference_t<F>;
    body_ctx = (void*)&f;
    body_fn = [](void* ctx) { (*static_cast<Fn*>(ctx))(); };
    running = (unsigned)n;
    for (unsigned i = 0; i < n; ++i) go[i]->release();
    std::unique_lock<std::mutex> lock(done_mutex);
    if (!done_cv.wait_for(lock, std::chrono::seconds(EMU_LAUNCH_TIMEOUT_S), [] { return running == 0; }))
        fail("a launch did not finish in time: a __syncthreads or shuffle that not every thread reaches?");
}

// Kernel arguments as CUDA's cuLaunchKernel takes them: args[i] points to the value of the
// i-th parameter. kinds[i] names its type ('P' pointer, 'q' int64, 'i' int32, 'f' float) and
// must match the kernel's parameter, as a check on the caller.
template <class A>
constexpr char kind_of() {
    if constexpr (std::is_pointer_v<A>) return 'P';
    else if constexpr (std::is_same_v<A, long long>) return 'q';
    else if constexpr (std::is_same_v<A, int>) return 'i';
    else if constexpr (std::is_same_v<A, float>) return 'f';
    else if constexpr (std::is_same_v<A, double>) return 'd';
    else return '?';
}

template <class A>
A arg(void* p) {
    A v;
    std::memcpy(&v, p, sizeof(A));
    return v;
}

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(arg<A>(args[I])...);
}

// 0 on success; -1: wrong number of arguments; -2 - i: argument i has the wrong kind.
template <class... A>
int launch_kernel(void (*kernel)(A...), dim3 grid, dim3 block, void** args, const char* kinds, int n_args) {
    if (n_args != (int)sizeof...(A)) return -1;
    const char expected[] = {kind_of<A>()..., 0};
    for (int i = 0; i < n_args; ++i)
        if (kinds[i] != expected[i]) return -2 - i;
    launch(grid, block, [&] { call(kernel, args, std::index_sequence_for<A...>{}); });
    return 0;
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of at most 8 bytes");
    if (mask != 0xffffffffu || width != 32) emu::fail("only full-warp __shfl_xor_sync is emulated");
    const unsigned tid = emu::linear_tid(), warp = tid / emu::WARP, lane = tid % emu::WARP;
    const unsigned src = warp * emu::WARP + (lane ^ (unsigned)(lane_mask & 31));
    if (src >= emu::block_threads) emu::fail("shuffle from a lane beyond the block");
    // Slot set p is written again two shuffles later, after this warp's next barrier: by then
    // every lane has read it.
    unsigned long long* slots = emu::shfl_slots[emu::shfl_parity];
    emu::shfl_parity ^= 1u;
    std::memcpy(&slots[tid], &v, sizeof(T));
    emu::warp_barrier[warp]->arrive_and_wait();
    T r;
    std::memcpy(&r, &slots[src], sizeof(T));
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

// Host stand-ins for the prelude's inline PTX (cvt.f32.f16, cvt.rn.f16.f32, cvt.rn.bf16.f32):
// exact widening, round to nearest even; NaN becomes the canonical NaN 0x7fff.
inline float emu_f16_to_f32(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
inline unsigned short emu_f32_to_f16(float f) {
    if (std::isnan(f)) return 0x7fff;
    const _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
inline unsigned short emu_f32_to_bf16(float f) {
    if (std::isnan(f)) return 0x7fff;
    const unsigned u = __float_as_uint(f);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
