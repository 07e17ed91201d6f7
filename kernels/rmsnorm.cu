// RMSNorm: y = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps), over the last dimension D.
// Backward: dx_j = rstd·(w_j·dy_j) − x_j·rstd³·(Σ_k w_k·dy_k·x_k)/D; dw_j = Σ_rows dy_j·x_j·rstd.
//
// rmsnorm_fwd_*: grid = rows, block = 256; saves rstd (f32) per row.
//   Roofline: reads D·(sizeof(T)) per row + D weights (cached), writes D: ~4·D bytes (bf16), 4D FLOPs.
// rmsnorm_bwd_dx_*: grid = rows, block = 256. Reads x, dy (and w), writes dx: ~6·D bytes (bf16).
// rmsnorm_bwd_dw_*: the first pass of a column sum (common.cuh's col_partial): grid (ceil(D/32),
//   chunks), block (32, 8), partial sums per row chunk in f32; elementwise.cu's col_reduce_f32 adds
//   them per column in chunk order (accumulate = 1 adds to dw). Deterministic, and a narrow D
//   (Qwen3's q/k norms: 128) still spreads over rows/chunk blocks.
#include "common.cuh"

template <class T>
__device__ __forceinline__ void rms_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                        float* __restrict__ rstd, int D, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * D;
    float s = 0.0f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { float v = to_f32(xr[j]); s += v * v; }
    s = block_sum(s, scratch);
    const float r = rsqrtf(s / (float)D + eps);
    for (int j = threadIdx.x; j < D; j += blockDim.x) y[row * D + j] = from_f32<T>(to_f32(xr[j]) * r * to_f32(w[j]));
    if (threadIdx.x == 0 && rstd) rstd[row] = r;
}

template <class T>
__device__ __forceinline__ void rms_bwd_dx(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                                           const float* __restrict__ rstd, T* __restrict__ dx, int D) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const float r = rstd[row];
    float s = 0.0f;
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        s += to_f32(w[j]) * to_f32(dy[row * D + j]) * to_f32(x[row * D + j]);
    s = block_sum(s, scratch);
    const float c = r * r * r * s / (float)D;
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        dx[row * D + j] = from_f32<T>(r * to_f32(w[j]) * to_f32(dy[row * D + j]) - to_f32(x[row * D + j]) * c);
}

template <class T>
__device__ __forceinline__ void rms_bwd_dw(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ rstd,
                                           float* __restrict__ partial, long long rows, int D, int chunk) {
    col_partial([=](long long r, int j) { return to_f32(dy[r * D + j]) * to_f32(x[r * D + j]) * rstd[r]; }, partial, rows, D,
                chunk);
}

extern "C" __global__ void rmsnorm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, float* rstd, int D, float eps) {
    rms_fwd(x, w, y, rstd, D, eps);
}
extern "C" __global__ void rmsnorm_fwd_f32(const float* x, const float* w, float* y, float* rstd, int D, float eps) {
    rms_fwd(x, w, y, rstd, D, eps);
}
extern "C" __global__ void rmsnorm_bwd_dx_bf16(const bf16* x, const bf16* w, const bf16* dy, const float* rstd, bf16* dx, int D) {
    rms_bwd_dx(x, w, dy, rstd, dx, D);
}
extern "C" __global__ void rmsnorm_bwd_dx_f32(const float* x, const float* w, const float* dy, const float* rstd, float* dx, int D) {
    rms_bwd_dx(x, w, dy, rstd, dx, D);
}
extern "C" __global__ void rmsnorm_bwd_dw_bf16(const bf16* x, const bf16* dy, const float* rstd, float* partial, long long rows,
                                               int D, int chunk) {
    rms_bwd_dw(x, dy, rstd, partial, rows, D, chunk);
}
extern "C" __global__ void rmsnorm_bwd_dw_f32(const float* x, const float* dy, const float* rstd, float* partial, long long rows,
                                              int D, int chunk) {
    rms_bwd_dw(x, dy, rstd, partial, rows, D, chunk);
}
