// Dtype casts (round to nearest even, NaN preserved) and the reductions the trainer needs.
//   cast_A_B: out[i] = B(in[i]) over n elements. Grid-stride, block 256. Roofline: (sA+sB)·n bytes.
//   sumsq_partial_T: partial[block] = Σ x² over a grid-stride slice (grid ≤ 1024, block 256); then
//   sum_f32 (grid 1, block 1024) adds the partials in a fixed order: deterministic grad-norm².
//   Roofline: n·sizeof(T) bytes read, 2n FLOPs.
#include "common.cuh"

template <class A, class B>
__device__ __forceinline__ void cast_impl(const A* __restrict__ in, B* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = from_f32<B>(to_f32(in[i]));
}

// (Every kernel is spelled out: build.rs reads `extern "C" __global__` signatures, not macros.)
extern "C" __global__ void cast_f32_bf16(const float* in, bf16* out, long long n) { cast_impl(in, out, n); }
extern "C" __global__ void cast_bf16_f32(const bf16* in, float* out, long long n) { cast_impl(in, out, n); }
extern "C" __global__ void cast_f32_f16(const float* in, f16* out, long long n) { cast_impl(in, out, n); }
extern "C" __global__ void cast_f16_f32(const f16* in, float* out, long long n) { cast_impl(in, out, n); }
extern "C" __global__ void cast_bf16_f16(const bf16* in, f16* out, long long n) { cast_impl(in, out, n); }
extern "C" __global__ void cast_f16_bf16(const f16* in, bf16* out, long long n) { cast_impl(in, out, n); }

template <class T>
__device__ __forceinline__ void sumsq_impl(const T* __restrict__ x, long long n, float* __restrict__ partial) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = to_f32(x[i]);
        s += v * v;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void sumsq_partial_f32(const float* x, long long n, float* partial) { sumsq_impl(x, n, partial); }
extern "C" __global__ void sumsq_partial_bf16(const bf16* x, long long n, float* partial) { sumsq_impl(x, n, partial); }

extern "C" __global__ void sum_f32(const float* x, int n, float* out, int accumulate) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + s : s;
}
