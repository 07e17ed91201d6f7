// The CUDA execution model on the CPU, for the emu device.
//
// build.rs compiles every kernels/*.cu file as C++ with this header (FCGPU_EMU defined). A block
// runs as one cooperative fiber per CUDA thread on one OS thread (runtime.cpp); blocks of a grid
// are spread over OS threads. __shared__ variables are `static thread_local`: one instance per OS
// thread, which runs one block at a time, so exactly one instance per block, shared by its fibers.
// __syncthreads is a real barrier over the block's fibers; warp shuffles, votes, __syncwarp and
// the PTX wrappers (ptx_emu.h) are warp collectives: the live lanes of the warp rendezvous.
//
// build.rs compiles every kernel twice: plainly, and with FCEMU_CHECKED defined and GCC's
// -fsanitize=kernel-address instrumentation, whose per-access callbacks (__asan_load4_noabort, ...)
// kernels/emu/check.cpp implements (FCGPU_EMU_CHECK: memcheck, initcheck, racecheck). The checked
// copy's inline helpers live in the inline namespace fcemu_chk, so the linker never merges an
// instrumented copy of a helper with a plain one.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __constant__ static const

#ifdef FCEMU_CHECKED
#define FCEMU_NS_BEGIN inline namespace fcemu_chk {
#define FCEMU_NS_END }
// Not instrumented: atomics report their access through chk_atomic (a read-modify-write is no race).
#define FCEMU_NOCHECK __attribute__((no_sanitize_address, noinline))
#else
#define FCEMU_NS_BEGIN
#define FCEMU_NS_END
#define FCEMU_NOCHECK
#endif

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };

namespace fcemu {
struct BlockCtx {
    dim3 grid, block;
    uint3 idx;
};
struct ThreadCtx {
    uint3 tid;
    unsigned linear, lane, warp;
    const BlockCtx* blk;
};
extern thread_local ThreadCtx* cur;

void syncthreads(const char* file, int line);   // file:line of the call, for synccheck
// Rendezvous of the live lanes of the calling thread's warp; `mask` and `what` (the collective)
// are compared across the lanes by synccheck.
void warp_barrier(unsigned mask = 0xffffffffu, const char* what = "__syncwarp");
void chk_atomic(const void* p, unsigned bytes);   // memcheck/initcheck of an atomic's target
unsigned long long* warp_slots();    // 32 u64 exchange slots of the calling thread's warp
unsigned char* warp_scratch();       // 32 x 128 bytes of per-warp exchange space
unsigned warp_live_mask();           // lanes of the warp that exist and have not exited
unsigned char* dyn_smem();           // this block's dynamic shared memory
[[noreturn]] void trap(const char* what);
FCEMU_NS_BEGIN

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
// Every lane publishes v; lane l receives the value of lane src(l), or its own when src(l) < 0.
template <class T, class F> inline T shuffle(unsigned mask, const char* what, T v, F src) {
    unsigned long long* s = warp_slots();
    unsigned l = cur->lane;
    s[l] = to_bits(v);
    warp_barrier(mask, what);
    int from = src((int)l);
    unsigned long long r = from < 0 ? s[l] : s[from];
    warp_barrier(mask, what);
    return from_bits<T>(r);
}
FCEMU_NS_END
}  // namespace fcemu

// Qualified from the global namespace: build.rs wraps each checked kernel file in a namespace.
#define threadIdx (::fcemu::cur->tid)
#define blockIdx (::fcemu::cur->blk->idx)
#define blockDim (::fcemu::cur->blk->block)
#define gridDim (::fcemu::cur->blk->grid)
#define warpSize 32

#define __syncthreads() ::fcemu::syncthreads(__FILE__, __LINE__)
FCEMU_NS_BEGIN
inline void __syncwarp(unsigned mask = 0xffffffffu) { fcemu::warp_barrier(mask, "__syncwarp"); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() {}
inline void __trap() { fcemu::trap("__trap"); }

template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return fcemu::shuffle(mask, "__shfl_sync", v, [=](int l) { return (l & ~(width - 1)) + (src & (width - 1)); });
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return fcemu::shuffle(mask, "__shfl_xor_sync", v, [=](int l) {
        int s = l ^ m;
        return (s & ~(width - 1)) == (l & ~(width - 1)) ? s : -1;
    });
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return fcemu::shuffle(mask, "__shfl_down_sync", v, [=](int l) { return (l & (width - 1)) + (int)d < width ? l + (int)d : -1; });
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return fcemu::shuffle(mask, "__shfl_up_sync", v, [=](int l) { return (l & (width - 1)) - (int)d >= 0 ? l - (int)d : -1; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned long long* s = fcemu::warp_slots();
    unsigned l = fcemu::cur->lane;
    s[l] = pred ? 1 : 0;
    fcemu::warp_barrier(mask, "__ballot_sync");
    unsigned live = fcemu::warp_live_mask() & mask, r = 0;
    for (int i = 0; i < 32; i++)
        if (((live >> i) & 1) && s[i]) r |= 1u << i;
    fcemu::warp_barrier(mask, "__ballot_sync");
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    return __ballot_sync(mask, pred) == (fcemu::warp_live_mask() & mask);
}
inline unsigned __activemask() { return fcemu::warp_live_mask(); }

#ifdef FCEMU_CHECKED
#define FCEMU_CHK_ATOMIC(p) ::fcemu::chk_atomic(p, sizeof(*p))
#else
#define FCEMU_CHK_ATOMIC(p)
#endif
// Atomics: blocks run concurrently on OS threads; fibers of one block never interleave inside one.
FCEMU_NOCHECK inline float atomicAdd(float* p, float v) {
    FCEMU_CHK_ATOMIC(p);
    unsigned* u = (unsigned*)p;
    unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED), nv;
    do {
        float f;
        std::memcpy(&f, &old, 4);
        f += v;
        std::memcpy(&nv, &f, 4);
    } while (!__atomic_compare_exchange_n(u, &old, nv, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    float r;
    std::memcpy(&r, &old, 4);
    return r;
}
FCEMU_NOCHECK inline int atomicAdd(int* p, int v) { FCEMU_CHK_ATOMIC(p); return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
FCEMU_NOCHECK inline unsigned atomicAdd(unsigned* p, unsigned v) { FCEMU_CHK_ATOMIC(p); return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
FCEMU_NOCHECK inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { FCEMU_CHK_ATOMIC(p); return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
FCEMU_NOCHECK inline int atomicMax(int* p, int v) {
    FCEMU_CHK_ATOMIC(p);
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
    return old;
}
FCEMU_NOCHECK inline int atomicMin(int* p, int v) {
    FCEMU_CHK_ATOMIC(p);
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
    return old;
}
FCEMU_NOCHECK inline int atomicExch(int* p, int v) { FCEMU_CHK_ATOMIC(p); return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
FCEMU_NOCHECK inline int atomicCAS(int* p, int cmp, int v) {
    FCEMU_CHK_ATOMIC(p);
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
FCEMU_NOCHECK inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
    FCEMU_CHK_ATOMIC(p);
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}

FCEMU_NS_END

// Bit casts and math intrinsics (no memory access: the same in both copies; glibc declares some
// of these names at global scope, so they cannot move into the inline namespace).
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
