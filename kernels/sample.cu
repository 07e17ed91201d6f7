// Next-token sampling on the device, one block per row of logits (no V-sized copy to the host).
//   sample_rows_T: temperature + optional top-p (nucleus) by inverse CDF with a host-given
//     uniform u ∈ [0, 1) per row. Weights w_k = exp(z_k/T − max); the nucleus is {w ≥ τ} with τ
//     the largest threshold whose kept mass reaches top_p·Σw (bisection on log τ, 40 steps: the
//     most-likely-first prefix of the CPU sampler, up to ties at the boundary); the draw is the
//     first token (in id order) whose cumulative kept mass exceeds u·kept.
//   argmax_rows_T: greedy, first index of the maximum (as torch.argmax).
// Log-prob and entropy of the drawn token come from lpe_fwd afterwards (full distribution).
//   draw_rows_T: what the rollout's device sampler launches, one block per drawn sample (several
//     samples may read one row: rows[i] is sample i's row of logits). Greedy (greedy = 1: the
//     first maximum, stats at T = 1), or temperature, then top-k (0 = off: the tokens whose
//     weight reaches the k-th largest, by bisection on log τ as for top-p, so ties at the
//     boundary are all kept), then top-p on what top-k kept, then the inverse-CDF draw with u[i]
//     as sample_rows_T does. It also writes log softmax(z/T)[token] and the entropy of the full
//     softmax(z/T), before truncation (what the CPU sampler reports), so one launch per step
//     samples and only 12 bytes per sample come back.
//     NaN logits count as −inf (never drawn, no mass). A row whose maximum is not finite (every
//     logit −inf or NaN, or a +inf) has no distribution: token 0, log-prob and entropy NaN (the
//     CPU sampler's rule too), never a read outside the row or a hang.
//   Launch: grid = samples, block = 256. Roofline per sample: (3 + 40·[top_k] + 40·[top_p < 1])
//   reads of the row.
// Launch: grid = rows, block = 256. Roofline per row: (2 + 40·[top_p < 1] + 1)·V·sizeof(T)
// bytes read (the bisection re-reads the row, L2 resident for V ≤ ~1M), ~3 FLOPs per read.
#include "common.cuh"

template <class T>
__device__ __forceinline__ float row_max(const T* z, int V, float inv_temp, float* scratch) {
    float m = -FC_INF;
    for (int k = threadIdx.x; k < V; k += blockDim.x) m = fmaxf(m, to_f32(z[k]) * inv_temp);
    return block_max(m, scratch);
}

template <class T>
__device__ __forceinline__ float kept_mass(const T* z, int V, float inv_temp, float m, float tau, float* scratch) {
    float s = 0.0f;
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const float w = __expf(to_f32(z[k]) * inv_temp - m);
        s += w >= tau ? w : 0.0f;
    }
    return block_sum(s, scratch);
}

template <class T>
__device__ __forceinline__ void sample_impl(const T* __restrict__ logits, long long ld, int V, float inv_temp, float top_p,
                                            const float* __restrict__ u, int* __restrict__ tokens) {
    __shared__ float scratch[32];
    __shared__ float chunk_sum[1024];
    __shared__ int pick;
    const long long row = blockIdx.x;
    const T* z = logits + row * ld;
    const float m = row_max(z, V, inv_temp, scratch);
    const float total = kept_mass(z, V, inv_temp, m, 0.0f, scratch);
    float tau = 0.0f;
    if (top_p < 1.0f) {
        const float target = top_p * total;
        float lo = 0.0f, hi = 88.0f;  // τ = exp(−λ): λ = 0 keeps only the maximum
        if (kept_mass(z, V, inv_temp, m, 1.0f, scratch) >= target) {
            hi = 0.0f;
        } else {
            for (int it = 0; it < 40; it++) {
                const float mid = 0.5f * (lo + hi);
                if (kept_mass(z, V, inv_temp, m, __expf(-mid), scratch) >= target) hi = mid; else lo = mid;
            }
        }
        tau = __expf(-hi);
    }
    // contiguous chunks per thread, so that the scan order is token-id order
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int b0 = threadIdx.x * chunk, b1 = min(V, b0 + chunk);
    float cs = 0.0f;
    for (int k = b0; k < b1; k++) {
        const float w = __expf(to_f32(z[k]) * inv_temp - m);
        cs += w >= tau ? w : 0.0f;
    }
    chunk_sum[threadIdx.x] = cs;
    __syncthreads();
    if (threadIdx.x == 0) {
        float kept = 0.0f;
        for (int i = 0; i < (int)blockDim.x; i++) kept += chunk_sum[i];
        const float target = u[row] * kept;
        float acc = 0.0f;
        int j = 0, last = -1;
        for (j = 0; j < (int)blockDim.x; j++) {
            if (chunk_sum[j] > 0.0f) last = j;
            if (acc + chunk_sum[j] > target && chunk_sum[j] > 0.0f) break;
            acc += chunk_sum[j];
        }
        if (j == (int)blockDim.x) j = last;  // rounding: the last chunk with mass
        // No chunk has mass when every logit is NaN or -inf (last < 0): token 0, what the cpu's
        // argmax returns for such a row, instead of reading before the row.
        if (j < 0) j = 0;
        int tok = 0;
        const int c0 = j * chunk, c1 = min(V, c0 + chunk);
        for (int k = c0; k < c1; k++) {
            const float w = __expf(to_f32(z[k]) * inv_temp - m);
            if (w >= tau && w > 0.0f) {
                tok = k;
                acc += w;
                if (acc > target) break;
            }
        }
        pick = tok;
    }
    __syncthreads();
    if (threadIdx.x == 0) tokens[row] = pick;
}

template <class T>
__device__ __forceinline__ void argmax_impl(const T* __restrict__ logits, long long ld, int V, int* __restrict__ tokens) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const long long row = blockIdx.x;
    const T* z = logits + row * ld;
    float bv = -FC_INF;
    int bi = 0x7fffffff;
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const float x = to_f32(z[k]);
        if (x > bv) { bv = x; bi = k; }  // strided: the first maximum of this thread's indices
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sv[wid] = bv; si[wid] = bi; }
    __syncthreads();
    if (wid == 0) {
        bv = lane < nw ? sv[lane] : -FC_INF;
        bi = lane < nw ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) tokens[row] = bi == 0x7fffffff ? 0 : bi;
    }
}

// Logit k of row z at inverse temperature s, NaN read as −inf.
template <class T>
__device__ __forceinline__ float draw_x(const T* z, int k, float s) {
    const float x = to_f32(z[k]) * s;
    return x != x ? -FC_INF : x;
}

// Σ w over weights w ≥ tau (count = 0) or how many there are (count = 1).
template <class T>
__device__ __forceinline__ float draw_mass(const T* z, int V, float s, float m, float tau, int count, float* scratch) {
    float acc = 0.0f;
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const float w = __expf(draw_x(z, k, s) - m);
        acc += w >= tau ? (count ? 1.0f : w) : 0.0f;
    }
    return block_sum(acc, scratch);
}

// Smallest λ in [0, hi] (τ = e^−λ) whose kept amount (mass or count) reaches `target`, by 40
// bisection steps; λ = 0 keeps only the maximum's ties.
template <class T>
__device__ __forceinline__ float draw_lambda(const T* z, int V, float s, float m, float hi, float target, int count,
                                             float* scratch) {
    if (draw_mass(z, V, s, m, 1.0f, count, scratch) >= target) return 0.0f;
    float lo = 0.0f;
    for (int it = 0; it < 40; it++) {
        const float mid = 0.5f * (lo + hi);
        if (draw_mass(z, V, s, m, __expf(-mid), count, scratch) >= target) hi = mid; else lo = mid;
    }
    return hi;
}

// First index of the row's maximum of x (ties: the lowest index).
template <class T>
__device__ __forceinline__ int draw_argmax(const T* z, int V, float s) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float bv = -FC_INF;
    int bi = 0x7fffffff;
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const float x = draw_x(z, k, s);
        if (x > bv) { bv = x; bi = k; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { sv[wid] = bv; si[wid] = bi; }
    __syncthreads();
    bv = lane < nw ? sv[lane] : -FC_INF;
    bi = lane < nw ? si[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    return bi == 0x7fffffff ? 0 : bi;
}

// Inverse-CDF draw over the weights ≥ tau in token-id order (contiguous chunks per thread).
template <class T>
__device__ __forceinline__ int draw_pick(const T* z, int V, float s, float m, float tau, float u) {
    __shared__ float chunk_sum[1024];
    __shared__ int pick;
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int b0 = threadIdx.x * chunk, b1 = min(V, b0 + chunk);
    float cs = 0.0f;
    for (int k = b0; k < b1; k++) {
        const float w = __expf(draw_x(z, k, s) - m);
        cs += w >= tau ? w : 0.0f;
    }
    chunk_sum[threadIdx.x] = cs;
    __syncthreads();
    if (threadIdx.x == 0) {
        float kept = 0.0f;
        for (int i = 0; i < (int)blockDim.x; i++) kept += chunk_sum[i];
        const float target = u * kept;
        float acc = 0.0f;
        int j = 0, last = 0;
        for (j = 0; j < (int)blockDim.x; j++) {
            if (chunk_sum[j] > 0.0f) last = j;
            if (acc + chunk_sum[j] > target && chunk_sum[j] > 0.0f) break;
            acc += chunk_sum[j];
        }
        if (j == (int)blockDim.x) j = last;  // rounding: the last chunk with mass
        int tok = -1;
        const int c0 = j * chunk, c1 = min(V, c0 + chunk);
        for (int k = c0; k < c1; k++) {
            const float w = __expf(draw_x(z, k, s) - m);
            if (w >= tau && w > 0.0f) {
                tok = k;
                acc += w;
                if (acc > target) break;
            }
        }
        pick = tok < 0 ? 0 : tok;
    }
    __syncthreads();
    return pick;
}

template <class T>
__device__ __forceinline__ void draw_impl(const T* __restrict__ logits, long long ld, int V, const int* __restrict__ rows,
                                          float inv_temp, float top_p, int top_k, int greedy, const float* __restrict__ u,
                                          int* __restrict__ tokens, float* __restrict__ logp, float* __restrict__ entropy) {
    __shared__ float scratch[32];
    const int i = blockIdx.x;
    const T* z = logits + (long long)rows[i] * ld;
    const float s = greedy ? 1.0f : inv_temp;
    float m = -FC_INF;
    for (int k = threadIdx.x; k < V; k += blockDim.x) m = fmaxf(m, draw_x(z, k, s));
    m = block_max(m, scratch);
    if (!(m > -FC_INF && m < FC_INF)) {  // no distribution (see the header)
        if (threadIdx.x == 0) { tokens[i] = 0; logp[i] = __int_as_float(0x7fc00000); entropy[i] = __int_as_float(0x7fc00000); }
        return;
    }
    // Σw and Σw·(x − m) of the full distribution: its log-normaliser and entropy.
    float sw = 0.0f, sx = 0.0f;
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const float d = draw_x(z, k, s) - m;
        const float w = __expf(d);
        sw += w;
        sx += w > 0.0f ? w * d : 0.0f;
    }
    sw = block_sum(sw, scratch);
    sx = block_sum(sx, scratch);
    int tok;
    if (greedy) {
        tok = draw_argmax(z, V, s);
    } else {
        float lam = 88.0f;  // e^−88: below it a weight is 0 for the draw anyway
        if (top_k > 0 && top_k < V) lam = draw_lambda(z, V, s, m, lam, (float)top_k, 1, scratch);
        if (top_p < 1.0f) {
            const float kept = draw_mass(z, V, s, m, __expf(-lam), 0, scratch);
            lam = draw_lambda(z, V, s, m, lam, top_p * kept, 0, scratch);
        }
        const float tau = lam >= 88.0f ? 0.0f : __expf(-lam);
        tok = draw_pick(z, V, s, m, tau, u[i]);
    }
    if (threadIdx.x == 0) {
        const float lz = logf(sw);
        tokens[i] = tok;
        logp[i] = (draw_x(z, tok, s) - m) - lz;
        entropy[i] = lz - sx / sw;
    }
}

extern "C" __global__ void draw_rows_bf16(const bf16* logits, long long ld, int V, const int* rows, float inv_temp,
                                          float top_p, int top_k, int greedy, const float* u, int* tokens, float* logp,
                                          float* entropy) {
    draw_impl(logits, ld, V, rows, inv_temp, top_p, top_k, greedy, u, tokens, logp, entropy);
}
extern "C" __global__ void draw_rows_f32(const float* logits, long long ld, int V, const int* rows, float inv_temp,
                                         float top_p, int top_k, int greedy, const float* u, int* tokens, float* logp,
                                         float* entropy) {
    draw_impl(logits, ld, V, rows, inv_temp, top_p, top_k, greedy, u, tokens, logp, entropy);
}

extern "C" __global__ void sample_rows_bf16(const bf16* logits, long long ld, int V, float inv_temp, float top_p, const float* u,
                                            int* tokens) {
    sample_impl(logits, ld, V, inv_temp, top_p, u, tokens);
}
extern "C" __global__ void sample_rows_f32(const float* logits, long long ld, int V, float inv_temp, float top_p, const float* u,
                                           int* tokens) {
    sample_impl(logits, ld, V, inv_temp, top_p, u, tokens);
}
extern "C" __global__ void argmax_rows_bf16(const bf16* logits, long long ld, int V, int* tokens) { argmax_impl(logits, ld, V, tokens); }
extern "C" __global__ void argmax_rows_f32(const float* logits, long long ld, int V, int* tokens) { argmax_impl(logits, ld, V, tokens); }
