// Rotary position embedding, Hugging Face rotate-half convention, cos/sin given per token:
//   x: [tokens, heads, D], cos/sin: [tokens, D/2] (f32, one angle per rotated pair, any
//   attention scaling folded in), h = D/2, i < h:
//   y[i]   = x[i]·cos[i] − x[i+h]·sin[i]
//   y[i+h] = x[i+h]·cos[i] + x[i]·sin[i]
// Backward (the transpose: rotation by −angle):
//   dx[i]   = dy[i]·cos[i] + dy[i+h]·sin[i]
//   dx[i+h] = dy[i+h]·cos[i] − dy[i]·sin[i]
// In place is allowed (y == x). Launch: grid-stride over tokens·heads·h pairs, block 256.
// Roofline: reads and writes x (2·D·sizeof(T) per head-row) plus cos/sin (cached across heads);
// 6 FLOPs per pair. Memory bound.
#include "common.cuh"

template <class T>
__device__ __forceinline__ void rope_impl(const T* x, const float* __restrict__ cs, const float* __restrict__ sn, T* y,
                                          int tokens, int heads, int D, int backward) {
    const int h = D / 2;
    const long long n = (long long)tokens * heads * h;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < n; p += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(p % h);
        const long long th = p / h;              // token * heads + head
        const long long tok = th / heads;
        const long long base = th * D;
        const float a = to_f32(x[base + i]), b = to_f32(x[base + i + h]);
        const float c = cs[tok * h + i];
        const float s = backward ? -sn[tok * h + i] : sn[tok * h + i];
        const float ya = a * c - b * s, yb = b * c + a * s;
        y[base + i] = from_f32<T>(ya);
        y[base + i + h] = from_f32<T>(yb);
    }
}

extern "C" __global__ void rope_bf16(const bf16* x, const float* cs, const float* sn, bf16* y, int tokens, int heads, int D,
                                     int backward) {
    rope_impl(x, cs, sn, y, tokens, heads, D, backward);
}
extern "C" __global__ void rope_f32(const float* x, const float* cs, const float* sn, float* y, int tokens, int heads, int D,
                                    int backward) {
    rope_impl(x, cs, sn, y, tokens, heads, D, backward);
}
