// Group-normalized GRPO advantage with the entropy bonus (SPEC §3).
//
//   A_i  = (r_i − mean_group(r)) / (std + 1e-6), std unbiased (0 when fewer than 2 samples);
//          scale_mode 0 = group std, 1 = batch std (all num_groups·G rewards), 2 = none (A = r − mean).
//   ψ_i  = min(λ·H_i, |A_i|/α),  A'_i = A_i + ψ_i   (H_i: mean CoT entropy of sequence i; null = 0).
//   zero_var[g] = 1 when all G rewards of the group are equal (the group gives no gradient).
//
// Launch grpo_advantage: grid = num_groups, block = G rounded up to a multiple of 32 (G <= 1024).
// Roofline: reads 2N floats (+ N per block in batch mode), writes 2N; negligible.
//
// Token granularity: A'_{i,t} = A_i + min(λ·H_{i,t}, |A_i|/α) over a [N, T] grid (grpo_advantage_token,
// elementwise, grid-stride, block 256); masked tokens (mask = 0) get 0.
// masked_row_mean: out[i] = Σ_t x[i,t]·mask[i,t] / Σ_t mask[i,t] (0 for an all-masked row); grid = rows,
// block 256. Gives H_i from per-token entropies and the think-segment mask.
#include "common.cuh"

__device__ __forceinline__ float batch_std(const float* r, int n, float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += r[i];
    float mean = block_sum(s, scratch) / (float)n;
    float q = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = r[i] - mean; q += d * d; }
    q = block_sum(q, scratch);
    return n > 1 ? sqrtf(q / (float)(n - 1)) : 0.0f;
}

extern "C" __global__ void grpo_advantage(const float* rewards, int num_groups, int G, int scale_mode,
                                          const float* h_seq, float lambda, float alpha,
                                          float* adv, float* adv_raw, int* zero_var) {
    __shared__ float scratch[32];
    const int g = blockIdx.x, i = threadIdx.x;
    const bool live = i < G;
    const float r = live ? rewards[(long long)g * G + i] : 0.0f;
    const float mean = block_sum(r, scratch) / (float)G;
    const float d = live ? r - mean : 0.0f;
    const float var = block_sum(d * d, scratch);
    float std = G > 1 ? sqrtf(var / (float)(G - 1)) : 0.0f;
    if (scale_mode == 1) std = batch_std(rewards, num_groups * G, scratch);
    const float rmin = -block_max(live ? -r : -FC_INF, scratch);
    const float rmax = block_max(live ? r : -FC_INF, scratch);
    if (!live) return;
    float a = scale_mode == 2 ? d : d / (std + 1e-6f);
    float h = h_seq ? h_seq[(long long)g * G + i] : 0.0f;
    float psi = fminf(lambda * h, fabsf(a) / alpha);
    if (adv_raw) adv_raw[(long long)g * G + i] = a;
    adv[(long long)g * G + i] = a + psi;
    if (zero_var && i == 0) zero_var[g] = rmin == rmax ? 1 : 0;
}

extern "C" __global__ void grpo_advantage_token(const float* adv_raw, const float* h_tok, const float* mask,
                                                int N, int T, float lambda, float alpha, float* out) {
    const long long n = (long long)N * T;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        float a = adv_raw[k / T];
        float m = mask ? mask[k] : 1.0f;
        out[k] = m != 0.0f ? a + fminf(lambda * h_tok[k], fabsf(a) / alpha) : 0.0f;
    }
}

extern "C" __global__ void masked_row_mean(const float* x, const float* mask, int cols, float* out) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    float s = 0.0f, c = 0.0f;
    for (int t = threadIdx.x; t < cols; t += blockDim.x) {
        float m = mask ? mask[row * cols + t] : 1.0f;
        s += x[row * cols + t] * m;
        c += m;
    }
    s = block_sum(s, scratch);
    c = block_sum(c, scratch);
    if (threadIdx.x == 0) out[row] = c > 0.0f ? s / c : 0.0f;
}
