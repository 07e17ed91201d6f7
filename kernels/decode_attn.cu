// Decode attention: one new query token per sequence against its KV cache (generation).
//   q [B, q_heads, D], k_cache/v_cache (bf16) addressed as b·batch_stride + pos·pos_stride +
//   kv_head·head_stride + d (elements): [B, max_len, kv_heads, D] has pos_stride = kv_heads·D,
//   head_stride = D; [B, kv_heads, max_len, D] (one head contiguous) has pos_stride = D,
//   head_stride = max_len·D. lens [B]: keys 0..len-1 are attended (the new token's own k/v must
//   already be in the cache). o [B, q_heads, D] (bf16).
//   o = softmax(q·kᵀ·scale)·v, f32 accumulation; D <= 256.
// Launch: grid = (q_heads, B), block = 128 (4 warps); each warp walks keys warp, warp+4, ... with
// an online softmax (lanes split D), then the 4 partial states merge through shared memory.
// Roofline per (sequence, head): reads 2·len·D·2 bytes of cache (GQA heads of a group re-read the
// same kv rows, mostly from L2), 4·len·D FLOPs: memory bound (≈1 FLOP/byte).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128) decode_attn_bf16(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                                                                   const int* lens, bf16* o, int q_heads, int kv_heads,
                                                                   int D, int max_len, long long batch_stride,
                                                                   long long pos_stride, long long head_stride, float scale) {
    __shared__ float sm_m[4], sm_l[4];
    __shared__ float sm_acc[4][256];
    const int h = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = h / (q_heads / kv_heads);
    const int len = min(lens[b], max_len);
    const bf16* qr = q + ((long long)b * q_heads + h) * D;
    float qv[8], acc[8];
    const int per = (D + 31) / 32;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        qv[i] = (i < per && d < D) ? bf16_to_f32(qr[d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -FC_INF, l = 0.0f;
    for (int j = warp; j < len; j += 4) {
        const long long base = b * batch_stride + j * pos_stride + kvh * head_stride;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            if (i < per && d < D) s += qv[i] * bf16_to_f32(k_cache[base + d]);
        }
        s = warp_sum(s);
        const float mn = fmaxf(m, s);
        const float corr = __expf(m - mn), p = __expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            acc[i] = acc[i] * corr + ((i < per && d < D) ? p * bf16_to_f32(v_cache[base + d]) : 0.0f);
        }
        m = mn;
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        if (i < per && d < D) sm_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float gm = fmaxf(fmaxf(sm_m[0], sm_m[1]), fmaxf(sm_m[2], sm_m[3]));
    float c[4], gl = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        c[w] = sm_m[w] == -FC_INF ? 0.0f : __expf(sm_m[w] - gm);
        gl += sm_l[w] * c[w];
    }
    const float inv = gl > 0.0f ? 1.0f / gl : 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float x = (sm_acc[0][d] * c[0] + sm_acc[1][d] * c[1] + sm_acc[2][d] * c[2] + sm_acc[3][d] * c[3]) * inv;
        o[((long long)b * q_heads + h) * D + d] = f32_to_bf16(x);
    }
}
