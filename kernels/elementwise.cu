// Elementwise ops the autograd needs on a GPU: add, mul, scale, gradient accumulation (axpy into
// f32), bias add and its backward (column sums, deterministic).
//   ew_add_T:   out = a + b            ew_mul_T: out = a ⊙ b          ew_scale_T: out = s·a
//   axpy_T_f32: y += alpha·x (y f32: gradient accumulators)
//   bias_add_T: out[r, c] = x[r, c] + bias[c]
//   col_sum_T:  partial[chunk, c] (f32) = Σ_{r in chunk} x[r, c] (common.cuh's col_partial: a 2-D grid
//               of 32 columns × a row chunk per block), then col_reduce_f32: out[c] = Σ_chunk
//               partial[chunk, c] (+ out[c] when accumulate), in chunk order: deterministic.
//   copy_2d_T:  y[r·ldy + c] = x[r·ldx + c] for r < rows, c < cols: a strided block copy (zero-pad
//               or un-pad head dims for flash attention, narrow and its backward).
// Launch: grid-stride, block 256 (col_sum: grid (ceil(cols/32), chunks), block (32, 8); col_reduce:
// one thread per column).
// Roofline: memory bound; add/mul 3n·sizeof(T) bytes, scale 2n·sizeof(T), axpy n·(sizeof(T)+8),
// bias_add 2n·sizeof(T), col_sum n·sizeof(T) (+ 4·cols), copy_2d 2·rows·cols·sizeof(T). One FLOP per
// element (copy_2d: none).
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

template <class T> __device__ __forceinline__ void add_impl(const T* a, const T* b, T* out, long long n) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}
template <class T> __device__ __forceinline__ void mul_impl(const T* a, const T* b, T* out, long long n) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(a[i]) * to_f32(b[i]));
}
template <class T> __device__ __forceinline__ void scale_impl(const T* a, float s, T* out, long long n) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(s * to_f32(a[i]));
}
template <class T> __device__ __forceinline__ void axpy_impl(const T* x, float alpha, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] += alpha * to_f32(x[i]);
}
template <class T> __device__ __forceinline__ void bias_add_impl(const T* x, const T* bias, T* out, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) out[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % cols]));
}
template <class T> __device__ __forceinline__ void col_sum_impl(const T* x, float* partial, long long rows, int cols, int chunk) {
    col_partial([=](long long r, int c) { return to_f32(x[r * cols + c]); }, partial, rows, cols, chunk);
}

template <class T> __device__ __forceinline__ void copy_2d_impl(const T* x, long long ldx, T* y, long long ldy, long long rows,
                                                              long long cols) {
    GRID_STRIDE(i, rows * cols) {
        const long long r = i / cols, c = i % cols;
        y[r * ldy + c] = x[r * ldx + c];
    }
}

extern "C" __global__ void ew_add_bf16(const bf16* a, const bf16* b, bf16* out, long long n) { add_impl(a, b, out, n); }
extern "C" __global__ void ew_add_f32(const float* a, const float* b, float* out, long long n) { add_impl(a, b, out, n); }
extern "C" __global__ void ew_mul_bf16(const bf16* a, const bf16* b, bf16* out, long long n) { mul_impl(a, b, out, n); }
extern "C" __global__ void ew_mul_f32(const float* a, const float* b, float* out, long long n) { mul_impl(a, b, out, n); }
extern "C" __global__ void ew_scale_bf16(const bf16* a, float s, bf16* out, long long n) { scale_impl(a, s, out, n); }
extern "C" __global__ void ew_scale_f32(const float* a, float s, float* out, long long n) { scale_impl(a, s, out, n); }
extern "C" __global__ void axpy_bf16_f32(const bf16* x, float alpha, float* y, long long n) { axpy_impl(x, alpha, y, n); }
extern "C" __global__ void axpy_f32_f32(const float* x, float alpha, float* y, long long n) { axpy_impl(x, alpha, y, n); }
extern "C" __global__ void bias_add_bf16(const bf16* x, const bf16* bias, bf16* out, long long rows, int cols) {
    bias_add_impl(x, bias, out, rows, cols);
}
extern "C" __global__ void bias_add_f32(const float* x, const float* bias, float* out, long long rows, int cols) {
    bias_add_impl(x, bias, out, rows, cols);
}
extern "C" __global__ void col_sum_bf16(const bf16* x, float* partial, long long rows, int cols, int chunk) {
    col_sum_impl(x, partial, rows, cols, chunk);
}
extern "C" __global__ void col_sum_f32(const float* x, float* partial, long long rows, int cols, int chunk) {
    col_sum_impl(x, partial, rows, cols, chunk);
}
// Second pass of every column sum: out[c] = Σ_k partial[k, c] in k order (+ out[c] when accumulate).
extern "C" __global__ void col_reduce_f32(const float* partial, float* out, int chunks, int cols, int accumulate) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(long long)k * cols + c];
    out[c] = accumulate ? out[c] + s : s;
}
extern "C" __global__ void copy_2d_bf16(const bf16* x, long long ldx, bf16* y, long long ldy, long long rows, long long cols) {
    copy_2d_impl(x, ldx, y, ldy, rows, cols);
}
extern "C" __global__ void copy_2d_f32(const float* x, long long ldx, float* y, long long ldy, long long rows, long long cols) {
    copy_2d_impl(x, ldx, y, ldy, rows, cols);
}
