// SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g); and its backward.
//
// Launch: 1-D grid-stride, block 256, grid = min(ceil(n/256), 65535 * 4). Elementwise over n.
// Roofline (bf16): fwd moves 6n bytes (read gate, up; write out), ~6n FLOPs (exp counted as 1);
// bwd moves 10n bytes (read gate, up, dout; write dgate, dup), ~12n FLOPs. Memory bound.
#include "common.cuh"

template <class T>
__device__ __forceinline__ void swiglu_fwd_impl(const T* __restrict__ gate, const T* __restrict__ up,
                                                T* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = to_f32(gate[i]), u = to_f32(up[i]);
        float s = 1.0f / (1.0f + __expf(-g));
        out[i] = from_f32<T>(g * s * u);
    }
}

// d/dg [g*sig(g)] = sig(g) * (1 + g*(1 - sig(g))).
template <class T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* __restrict__ gate, const T* __restrict__ up,
                                                const T* __restrict__ dout, T* __restrict__ dgate,
                                                T* __restrict__ dup, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dout[i]);
        float s = 1.0f / (1.0f + __expf(-g));
        dgate[i] = from_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = from_f32<T>(d * g * s);
    }
}

extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* out, long long n) {
    swiglu_fwd_impl(gate, up, out, n);
}
extern "C" __global__ void swiglu_fwd_f32(const float* gate, const float* up, float* out, long long n) {
    swiglu_fwd_impl(gate, up, out, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dout, bf16* dgate,
                                           bf16* dup, long long n) {
    swiglu_bwd_impl(gate, up, dout, dgate, dup, n);
}
extern "C" __global__ void swiglu_bwd_f32(const float* gate, const float* up, const float* dout, float* dgate,
                                          float* dup, long long n) {
    swiglu_bwd_impl(gate, up, dout, dgate, dup, n);
}
