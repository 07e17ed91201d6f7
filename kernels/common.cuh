// fcgpu kernel helpers shared by every kernels/*.cu file.
//
// No CUDA toolkit header is needed: NVRTC supplies the device builtins (__expf, __shfl_xor_sync,
// atomicAdd, ...) and, under the emu device (FCGPU_EMU defined by build.rs), kernels/emu/cuda_emu.h
// supplies them on the CPU. Storage types (bf16, f16) are plain 16-bit structs with explicit,
// round-to-nearest-even conversions, so both compilers produce bit-identical values.
#pragma once

#ifdef FCGPU_EMU
#include "emu/cuda_emu.h"
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
typedef long long i64;

#define FULL_MASK 0xffffffffu
#define WARP 32
#define FC_INF __int_as_float(0x7f800000)

struct __align__(2) bf16 { u16 bits; };
struct __align__(2) f16 { u16 bits; };

__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float(((u32)h.bits) << 16); }

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = (u16)((u >> 16) | 0x40u); return r; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                      // RNE
    r.bits = (u16)(u >> 16);
    return r;
}

__device__ __forceinline__ float f16_to_f32(f16 h) {
    u32 s = ((u32)h.bits & 0x8000u) << 16, e = ((u32)h.bits >> 10) & 0x1fu, m = (u32)h.bits & 0x3ffu;
    if (e == 0) {                      // zero / subnormal: m * 2^-24
        float v = (float)m * 5.9604644775390625e-08f;
        return s ? -v : v;
    }
    if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
    return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}

__device__ __forceinline__ f16 f32_to_f16(float f) {
    u32 u = __float_as_uint(f), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    f16 r;
    if (a > 0x7f800000u) { r.bits = (u16)(s | 0x7e00u); return r; }
    if (a >= 0x477ff000u) { r.bits = (u16)(s | 0x7c00u); return r; }  // rounds to >= 65520: inf
    if (a < 0x38800000u) {             // below the smallest normal (2^-14): subnormal, RNE
        float v = __uint_as_float(a) * 16777216.0f;                  // in units of 2^-24
        u32 q = (u32)v; float rem = v - (float)q;
        if (rem > 0.5f || (rem == 0.5f && (q & 1u))) q++;
        r.bits = (u16)(s | q);
        return r;
    }
    u32 m = a + 0xc8000fffu + ((a >> 13) & 1u);                       // rebias (-112<<23) and RNE
    r.bits = (u16)(s | (m >> 13));
    return r;
}

// Load/store in the compute type (f32) from any storage type.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return bf16_to_f32(x); }
__device__ __forceinline__ float to_f32(f16 x) { return f16_to_f32(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return f32_to_f16(x); }

// Pack two floats into a bf16x2 register (low half = first element), as mma.sync expects.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo).bits | ((u32)f32_to_bf16(hi).bits << 16);
}

// 16-byte vector for wide global loads/stores (8 bf16 or 4 f32).
struct __align__(16) u32x4 { u32 x, y, z, w; };

// Unpack 16 bytes into floats: 8 for bf16, 4 for f32 (the count is 16 / sizeof(T)).
__device__ __forceinline__ void unpack16(const u32x4& v, float* out, const bf16*) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; i++) { out[2 * i] = __uint_as_float(w[i] << 16); out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
}
__device__ __forceinline__ void unpack16(const u32x4& v, float* out, const float*) {
    out[0] = __uint_as_float(v.x); out[1] = __uint_as_float(v.y); out[2] = __uint_as_float(v.z); out[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ u32x4 pack16(const float* in, const bf16*) {
    u32x4 v;
    v.x = pack_bf16x2(in[0], in[1]); v.y = pack_bf16x2(in[2], in[3]);
    v.z = pack_bf16x2(in[4], in[5]); v.w = pack_bf16x2(in[6], in[7]);
    return v;
}
__device__ __forceinline__ u32x4 pack16(const float* in, const float*) {
    u32x4 v;
    v.x = __float_as_uint(in[0]); v.y = __float_as_uint(in[1]); v.z = __float_as_uint(in[2]); v.w = __float_as_uint(in[3]);
    return v;
}

// Warp-collective reductions (all 32 lanes must call).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide sum of one float per thread; blockDim.x a multiple of 32, <= 1024. `scratch` is a
// __shared__ float[32]. Every thread gets the total. Contains __syncthreads: call uniformly.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();                    // scratch may still be read by a previous call
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : -FC_INF;
    return warp_max(t);
}

// Column sums over many rows, first pass (a 2-D grid, so a narrow matrix still fills the GPU):
// block (32, 8) sums columns blockIdx.x·32 + threadIdx.x over row chunk blockIdx.y
// (rows [y·chunk, (y+1)·chunk)); each of the 8 row lanes walks every 8th row of the chunk, then
// lane 0 adds the 8 lane sums in order and writes partial[blockIdx.y·cols + c]. `term(r, c)` is
// the value summed. Fixed order everywhere, so the result is deterministic; the second pass
// (`col_reduce_f32` in elementwise.cu) adds the partials of a column in chunk order.
#define COL_LANES 8
template <class F>
__device__ __forceinline__ void col_partial(F term, float* __restrict__ partial, long long rows, int cols, int chunk) {
    __shared__ float acc[COL_LANES][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float s = 0.0f;
    if (c < cols)
        for (long long r = r0 + threadIdx.y; r < r1; r += COL_LANES) s += term(r, c);
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.0f;
        for (int k = 0; k < COL_LANES; k++) t += acc[k][threadIdx.x];
        partial[(long long)blockIdx.y * cols + c] = t;
    }
}

// Dynamic shared memory: `FC_DYN_SMEM(float, smem);` declares `float* smem`.
#ifdef FCGPU_EMU
#define FC_DYN_SMEM(T, name) T* name = (T*)fcemu::dyn_smem()
#else
#define FC_DYN_SMEM(T, name) extern __shared__ __align__(16) unsigned char fc_dyn_smem_[]; T* name = (T*)fc_dyn_smem_
#endif
