// Next-token sampling on the device, one block per row of logits (no V-sized copy to the host).
//   sample_rows_T: temperature + optional top-p (nucleus) by inverse CDF with a host-given
//     uniform u ∈ [0, 1) per row. Weights w_k = exp(z_k/T − max); the nucleus is {w ≥ τ} with τ
//     the largest threshold whose kept mass reaches top_p·Σw (bisection on log τ, 40 steps: the
//     most-likely-first prefix of the CPU sampler, up to ties at the boundary); the draw is the
//     first token (in id order) whose cumulative kept mass exceeds u·kept.
//   argmax_rows_T: greedy, first index of the maximum (as torch.argmax).
// Log-prob and entropy of the drawn token come from lpe_fwd afterwards (full distribution).
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
