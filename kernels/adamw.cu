// Fused AdamW step on f32 master weights, decoupled weight decay, bias correction, optional bf16
// copy of the updated weights (what the bf16 forward reads).
//   g = grad·grad_scale·(*scale_ptr if scale_ptr != null) (grad clipping folds in here; the device
//   factor comes from grad_clip_scale, so clipping needs no host round trip)
//   p ← p − lr·wd·p
//   m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²
//   p ← p − lr·(m/bc1)/(sqrt(v/bc2) + eps),  bc1 = 1−β1^step, bc2 = 1−β2^step (passed in)
// Launch: grid-stride, block 256. Roofline per parameter: reads p, m, v (f32) + grad, writes p, m, v
// (+ bf16 copy): 26 B (bf16 grad, bf16 copy) / 28 B (f32 grad), ~15 FLOPs. Memory bound.
#include "common.cuh"

template <class G>
__device__ __forceinline__ void adamw_impl(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                           const G* __restrict__ grad, bf16* __restrict__ copy, long long n, float lr,
                                           float beta1, float beta2, float eps, float wd, float bc1, float bc2,
                                           float grad_scale, const float* __restrict__ scale_ptr) {
    if (scale_ptr) grad_scale *= *scale_ptr;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = to_f32(grad[i]) * grad_scale;
        float w = p[i];
        w -= lr * wd * w;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        w -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = w; m[i] = mi; v[i] = vi;
        if (copy) copy[i] = f32_to_bf16(w);
    }
}

extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* grad, bf16* copy, long long n, float lr,
                                     float beta1, float beta2, float eps, float wd, float bc1, float bc2, float grad_scale,
                                     const float* scale_ptr) {
    adamw_impl(p, m, v, grad, copy, n, lr, beta1, beta2, eps, wd, bc1, bc2, grad_scale, scale_ptr);
}
extern "C" __global__ void adamw_bf16grad(float* p, float* m, float* v, const bf16* grad, bf16* copy, long long n, float lr,
                                          float beta1, float beta2, float eps, float wd, float bc1, float bc2, float grad_scale,
                                     const float* scale_ptr) {
    adamw_impl(p, m, v, grad, copy, n, lr, beta1, beta2, eps, wd, bc1, bc2, grad_scale, scale_ptr);
}

// Global-norm clipping factor from Σg² (sum_f32 output): scale = min(1, max_norm / (sqrt(Σg²) + 1e-6)),
// also writing the norm. grid 1, block 1 (any block works; thread 0 writes).
extern "C" __global__ void grad_clip_scale(const float* sumsq, float max_norm, float* scale, float* norm) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const float nrm = sqrtf(sumsq[0]);
    if (norm) norm[0] = nrm;
    scale[0] = max_norm > 0.0f ? fminf(1.0f, max_norm / (nrm + 1e-6f)) : 1.0f;
}
