// Clipped GRPO policy loss with k3 KL and the aggregation weights (SPEC §3.5–3.7), rollout
// correction (TIS/MIS) and GSPO's sequence-level ratio, fwd and bwd. The CPU reference and the
// sources of every formula: src/rl/policy_loss.rs, docs/training.md.
//
// Per completion token (i, t) with mask m ∈ {0,1}:
//   ρ = exp(logp − old)  (level 0, token)  or  s_i = exp(Σ_t m·(logp − old) / N_i)  (level 1, GSPO)
//   q = clamp(ρ, 1−ε_low, 1+ε_high), ℓ = −min(ρ·A, q·A)
//   rollout correction weight c (corr 0: c = 1), from r = exp(old − rollout) per token
//   (corr 1, 2) or r_i = exp(Σ_t m·(old − rollout) / N_i) per sequence (corr 3, 4):
//     TIS (corr 1, 3): c = min(r, C);  MIS (corr 2, 4): c = r > C ? 0 : 1
//   k = exp(ref − logp) − (ref − logp) − 1 (only when ref != null and β != 0), L_t = c·ℓ + β·k
//   loss = Σ w_t·L_t with weights by aggregation mode:
//     0 token-mean: w = m / Σ_all m
//     1 seq-mean:   w = m / (N_i · n_seq), N_i = Σ_t m
//     2 srml:       think tokens (seg = 1) w = m·α_s / (N_think,i · n_seq),
//                   result tokens (seg = 2) w = m·(1−α_s) / (N_result,i · n_seq), others 0
//   g_t = −A on the unclipped branch (ρ·A <= q·A) else 0;
//   ∂loss/∂logp_t = w_t·c_t·g_t·ρ_t (level 0)  or  m_t·s_i/N_i · Σ_u w_u·c_u·g_u (level 1),
//   plus w_t·β·(1 − exp(ref − logp)).
// A is per sequence (adv_per_token = 0, index i) or per token (index i·T + t).
//
// Kernels (all: grid = n_seq, block = 256, one block per sequence; pl_finalize: grid 1, block 256):
//   pl_counts   -> counts[3i..3i+2] = (N_i, N_think,i, N_result,i)
//   pl_fwd      -> partial[6i..6i+5] = (Σ w·L, Σ m·k, Σ m·[clipped], Σ m, Σ m·[masked], Σ m·[capped])
//   pl_finalize -> out[0..n_out) of (loss, mean KL, clip fraction, tokens, masked fraction,
//                  capped fraction), summed in a fixed order
//   pl_bwd      -> dlogp[i·T+t] = dloss · ∂loss/∂logp_t   (dloss read from device memory)
// Roofline (plain mode): fwd reads ~5 floats per token (20 B) and writes nothing per token; bwd
// reads ~6, writes 1 (28 B); ~20 FLOPs + 2 exp per token. Rollout correction reads one more
// float per token (the rollout log-prob); the sequence-level modes read logp/old/mask once more
// for their block sums. Memory bound and tiny next to the model.
#include "common.cuh"

#define PL_STATS 6

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

// Σ_t m·(a − b) / N_i over sequence i (0 when it has no tokens): the log of the geometric mean
// of its token ratios. Every thread of the block must call it.
__device__ __forceinline__ float seq_mean_log_ratio(const float* a, const float* b, const float* mask,
                                                    const float* counts, int i, int T, float* scratch) {
    float s = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const long long k = (long long)i * T + t;
        const float m = mask[k];
        if (m != 0.0f) s += m * (a[k] - b[k]);
    }
    s = block_sum(s, scratch);
    const float n = counts[3 * i];
    return n > 0.0f ? s / n : 0.0f;
}

// The per-sequence ratios a block needs: GSPO's log s_i (level 1) and the sequence rollout
// ratio r_i (corr 3, 4). Uniform over the block (its arguments are), so block_sum is safe.
struct SeqRatios { float log_s, r; };

__device__ __forceinline__ SeqRatios seq_ratios(const float* logp, const float* old_logp, const float* roll,
                                                const float* mask, const float* counts, int i, int T, int level,
                                                int corr, float* scratch) {
    SeqRatios q = {0.0f, 1.0f};
    if (level == 1) q.log_s = seq_mean_log_ratio(logp, old_logp, mask, counts, i, T, scratch);
    if (corr >= 3) q.r = __expf(seq_mean_log_ratio(old_logp, roll, mask, counts, i, T, scratch));
    return q;
}

// Rollout correction weight of token k; sets *masked / *capped when MIS drops it / TIS caps it.
__device__ __forceinline__ float pl_correction(const float* old_logp, const float* roll, long long k, int corr,
                                               float cap, float r_seq, bool* masked, bool* capped) {
    *masked = false;
    *capped = false;
    if (corr == 0) return 1.0f;
    const float r = corr >= 3 ? r_seq : __expf(old_logp[k] - roll[k]);
    if (r > cap) {
        if (corr == 2 || corr == 4) { *masked = true; return 0.0f; }
        *capped = true;
        return cap;
    }
    return corr == 2 || corr == 4 ? 1.0f : r;
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
                                  float alpha_s, const float* roll, int level, int corr, float cap,
                                  float* partial) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    const float n_total = total_tokens(counts, n_seq, scratch);
    const SeqRatios q = seq_ratios(logp, old_logp, roll, mask, counts, i, T, level, corr, scratch);
    const float s_i = __expf(q.log_s);
    float acc[PL_STATS] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const long long k = (long long)i * T + t;
        const float m = mask[k];
        if (m == 0.0f) continue;
        const float lp = logp[k];
        const float a = adv[adv_per_token ? k : i];
        const float rho = level == 1 ? s_i : __expf(lp - old_logp[k]);
        const float c = fminf(fmaxf(rho, 1.0f - eps_low), 1.0f + eps_high);
        const float un = rho * a, cl = c * a;
        bool masked, capped;
        const float w_is = pl_correction(old_logp, roll, k, corr, cap, q.r, &masked, &capped);
        float L = -fminf(un, cl) * w_is;
        float kl = 0.0f;
        if (ref_logp && beta != 0.0f) {
            float d = ref_logp[k] - lp;
            kl = __expf(d) - d - 1.0f;
            L += beta * kl;
        }
        const float w = pl_weight(i, m, seg ? seg[k] : 0, counts, n_seq, n_total, mode, alpha_s);
        acc[0] += w * L;
        acc[1] += m * kl;
        acc[2] += un > cl ? m : 0.0f;
        acc[3] += m;
        acc[4] += masked ? m : 0.0f;
        acc[5] += capped ? m : 0.0f;
    }
    for (int j = 0; j < PL_STATS; j++) {
        const float s = block_sum(acc[j], scratch);
        if (threadIdx.x == 0) partial[PL_STATS * i + j] = s;
    }
}

extern "C" __global__ void pl_finalize(const float* partial, int n_seq, int n_out, float* out) {
    __shared__ float scratch[32];
    float s[PL_STATS];
    for (int j = 0; j < PL_STATS; j++) {
        float a = 0.0f;
        for (int i = threadIdx.x; i < n_seq; i += blockDim.x) a += partial[PL_STATS * i + j];
        s[j] = block_sum(a, scratch);
    }
    if (threadIdx.x == 0) {
        const float d = s[3];
        const float v[PL_STATS] = {s[0], d > 0.0f ? s[1] / d : 0.0f, d > 0.0f ? s[2] / d : 0.0f, d,
                                   d > 0.0f ? s[4] / d : 0.0f, d > 0.0f ? s[5] / d : 0.0f};
        for (int j = 0; j < n_out && j < PL_STATS; j++) out[j] = v[j];
    }
}

extern "C" __global__ void pl_bwd(const float* logp, const float* old_logp, const float* ref_logp, const float* adv,
                                  const float* mask, const int* seg, const float* counts, int n_seq, int T,
                                  int mode, int adv_per_token, float eps_low, float eps_high, float beta,
                                  float alpha_s, const float* roll, int level, int corr, float cap,
                                  const float* dloss, float* dlogp) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    const float n_total = total_tokens(counts, n_seq, scratch);
    const SeqRatios q = seq_ratios(logp, old_logp, roll, mask, counts, i, T, level, corr, scratch);
    const float s_i = __expf(q.log_s);
    const float up = dloss ? dloss[0] : 1.0f;
    // GSPO: every token's gradient carries s_i/N_i · Σ_u w_u·c_u·g_u (the sequence's share).
    float seq_g = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const long long k = (long long)i * T + t;
        const float m = mask[k];
        float g = 0.0f;
        if (m != 0.0f) {
            const float lp = logp[k];
            const float a = adv[adv_per_token ? k : i];
            const float rho = level == 1 ? s_i : __expf(lp - old_logp[k]);
            const float c = fminf(fmaxf(rho, 1.0f - eps_low), 1.0f + eps_high);
            bool masked, capped;
            const float w_is = pl_correction(old_logp, roll, k, corr, cap, q.r, &masked, &capped);
            const float gp = rho * a <= c * a ? -a * w_is : 0.0f;
            const float w = pl_weight(i, m, seg ? seg[k] : 0, counts, n_seq, n_total, mode, alpha_s);
            seq_g += w * gp;
            g = level == 1 ? 0.0f : gp * rho;
            if (ref_logp && beta != 0.0f) g += beta * (1.0f - __expf(ref_logp[k] - lp));
            g *= up * w;
        }
        dlogp[k] = g;
    }
    if (level != 1) return;
    seq_g = block_sum(seq_g, scratch);
    const float n = counts[3 * i];
    if (n <= 0.0f) return;
    const float share = up * s_i / n * seq_g;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const long long k = (long long)i * T + t;
        dlogp[k] += mask[k] * share;
    }
}
