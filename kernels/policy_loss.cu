// Clipped GRPO policy loss with k3 KL and the aggregation weights (SPEC §3.5–3.7), fwd and bwd.
//
// Per completion token (i, t) with mask m ∈ {0,1}:
//   ρ = exp(logp − old), c = clamp(ρ, 1−ε_low, 1+ε_high), ℓ = −min(ρ·A, c·A)
//   k = exp(ref − logp) − (ref − logp) − 1 (only when ref != null and β != 0), L_t = ℓ + β·k
//   loss = Σ w_t·L_t with weights by aggregation mode:
//     0 token-mean: w = m / Σ_all m
//     1 seq-mean:   w = m / (N_i · n_seq), N_i = Σ_t m
//     2 srml:       think tokens (seg = 1) w = m·α_s / (N_think,i · n_seq),
//                   result tokens (seg = 2) w = m·(1−α_s) / (N_result,i · n_seq), others 0
//   ∂L_t/∂logp = −A·ρ when ρ·A <= c·A (unclipped branch) else 0, plus β·(1 − exp(ref − logp)).
// A is per sequence (adv_per_token = 0, index i) or per token (index i·T + t).
//
// Kernels (all: grid = n_seq, block = 256, one block per sequence; pl_finalize: grid 1, block 256):
//   pl_counts   -> counts[3i..3i+2] = (N_i, N_think,i, N_result,i)
//   pl_fwd      -> partial[4i..4i+3] = (Σ w·L, Σ m·k, Σ m·[clipped], Σ m)
//   pl_finalize -> out[0..3] = (loss, mean KL, clip fraction, tokens), summed in a fixed order
//   pl_bwd      -> dlogp[i·T+t] = dloss · w · ∂L_t/∂logp   (dloss read from device memory)
// Roofline: fwd reads ~5 floats per token (20 B) and writes nothing per token; bwd reads ~6,
// writes 1 (28 B); ~20 FLOPs + 2 exp per token. Memory bound and tiny next to the model.
#include "common.cuh"


__device__ __forceinline__ float pl_weight(int i, float m, int sg, const float* counts, int n_seq, float n_total,
                                           int mode, float alpha_s) {
    if (m == 0.0f) return 0.0f;
    if (mode == 0) return n_total > 0.0f ? m / n_total : 0.0f;
    if (mode == 1) { float c = counts[3 * i]; return c > 0.0f ? m / (c * (float)n_seq) : 0.0f; }
    // A sequence lacking one segment gives its whole weight to the other (a plain answer is
    // all result: it must not train at half the rate of one with reasoning).
    const float nt = counts[3 * i + 1], nr = counts[3 * i + 2];
    const float share = nt > 0.0f && nr > 0.0f ? (sg == 1 ? alpha_s : 1.0f - alpha_s) : 1.0f;
    const float c = sg == 1 ? nt : (sg == 2 ? nr : 0.0f);
    return c > 0.0f ? m * share / (c * (float)n_seq) : 0.0f;
}

__device__ __forceinline__ float total_tokens(const float* counts, int n_seq, float* scratch) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < n_seq; j += blockDim.x) s += counts[3 * j];
    return block_sum(s, scratch);
}

extern "C" __global__ void pl_counts(const float* mask, const int* seg, int T, float* counts) {
    __shared__ float scratch[32];
    const long long i = blockIdx.x;
    float n = 0.0f, nt = 0.0f, nr = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        float m = mask[i * T + t];
        int s = seg ? seg[i * T + t] : 0;
        n += m;
        nt += s == 1 ? m : 0.0f;
        nr += s == 2 ? m : 0.0f;
    }
    n = block_sum(n, scratch);
    nt = block_sum(nt, scratch);
    nr = block_sum(nr, scratch);
    if (threadIdx.x == 0) { counts[3 * i] = n; counts[3 * i + 1] = nt; counts[3 * i + 2] = nr; }
}

extern "C" __global__ void pl_fwd(const float* logp, const float* old_logp, const float* ref_logp, const float* adv,
                                  const float* mask, const int* seg, const float* counts, int n_seq, int T,
                                  int mode, int adv_per_token, float eps_low, float eps_high, float beta,
                                  float alpha_s, float* partial) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    const float n_total = total_tokens(counts, n_seq, scratch);
    float sl = 0.0f, sk = 0.0f, sc = 0.0f, sm = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const long long k = (long long)i * T + t;
        const float m = mask[k];
        if (m == 0.0f) continue;
        const float lp = logp[k];
        const float a = adv[adv_per_token ? k : i];
        const float rho = __expf(lp - (old_logp ? old_logp[k] : lp));
        const float c = fminf(fmaxf(rho, 1.0f - eps_low), 1.0f + eps_high);
        const float un = rho * a, cl = c * a;
        float L = -fminf(un, cl);
        float kl = 0.0f;
        if (ref_logp && beta != 0.0f) {
            float d = ref_logp[k] - lp;
            kl = __expf(d) - d - 1.0f;
            L += beta * kl;
        }
        const float w = pl_weight(i, m, seg ? seg[k] : 0, counts, n_seq, n_total, mode, alpha_s);
        sl += w * L;
        sk += m * kl;
        sc += un > cl ? m : 0.0f;
        sm += m;
    }
    sl = block_sum(sl, scratch);
    sk = block_sum(sk, scratch);
    sc = block_sum(sc, scratch);
    sm = block_sum(sm, scratch);
    if (threadIdx.x == 0) {
        partial[4 * i] = sl; partial[4 * i + 1] = sk; partial[4 * i + 2] = sc; partial[4 * i + 3] = sm;
    }
}

extern "C" __global__ void pl_finalize(const float* partial, int n_seq, float* out) {
    __shared__ float scratch[32];
    float a = 0.0f, b = 0.0f, c = 0.0f, d = 0.0f;
    for (int i = threadIdx.x; i < n_seq; i += blockDim.x) {
        a += partial[4 * i]; b += partial[4 * i + 1]; c += partial[4 * i + 2]; d += partial[4 * i + 3];
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    c = block_sum(c, scratch);
    d = block_sum(d, scratch);
    if (threadIdx.x == 0) {
        out[0] = a;
        out[1] = d > 0.0f ? b / d : 0.0f;
        out[2] = d > 0.0f ? c / d : 0.0f;
        out[3] = d;
    }
}

extern "C" __global__ void pl_bwd(const float* logp, const float* old_logp, const float* ref_logp, const float* adv,
                                  const float* mask, const int* seg, const float* counts, int n_seq, int T,
                                  int mode, int adv_per_token, float eps_low, float eps_high, float beta,
                                  float alpha_s, const float* dloss, float* dlogp) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    const float n_total = total_tokens(counts, n_seq, scratch);
    const float up = dloss ? dloss[0] : 1.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const long long k = (long long)i * T + t;
        const float m = mask[k];
        float g = 0.0f;
        if (m != 0.0f) {
            const float lp = logp[k];
            const float a = adv[adv_per_token ? k : i];
            const float rho = __expf(lp - (old_logp ? old_logp[k] : lp));
            const float c = fminf(fmaxf(rho, 1.0f - eps_low), 1.0f + eps_high);
            g = rho * a <= c * a ? -a * rho : 0.0f;
            if (ref_logp && beta != 0.0f) g += beta * (1.0f - __expf(ref_logp[k] - lp));
            g *= up * pl_weight(i, m, seg ? seg[k] : 0, counts, n_seq, n_total, mode, alpha_s);
        }
        dlogp[k] = g;
    }
}
