// Decode attention: one new query token per sequence against its KV cache (generation).
//   q [B, q_heads, D], k_cache/v_cache (bf16, or f32 for `--dtype f32`) addressed as b·batch_stride + pos·pos_stride +
//   kv_head·head_stride + d (elements): [B, max_len, kv_heads, D] has pos_stride = kv_heads·D,
//   head_stride = D; [B, kv_heads, max_len, D] (one head contiguous) has pos_stride = D,
//   head_stride = max_len·D. lens [B]: keys 0..len-1 are attended (the new token's own k/v must
//   already be in the cache). o [B, q_heads, D] (the cache's dtype).
//   o = softmax(q·kᵀ·scale)·v, f32 accumulation; D <= 256.
// Launch: grid = (q_heads, B), block = 128 (4 warps); each warp walks keys warp, warp+4, ... with
// an online softmax (lanes split D), then the 4 partial states merge through shared memory.
// Roofline per (sequence, head): reads 2·len·D·2 bytes of cache (GQA heads of a group re-read the
// same kv rows, mostly from L2), 4·len·D FLOPs: memory bound (≈1 FLOP/byte).
// decode_attn_bf16 and decode_attn_f32 are one template on the element type.
// decode_attn_batch_T: the same per (sequence, head) against paged caches (src/model/kv_cache.rs),
// each sequence's blocks found through the decode step's table (one launch per layer for the
// whole batch; the layout is in decode_step.cu). The per-op decoder launches it too, for one
// sequence at a time.
#include "common.cuh"

__device__ __forceinline__ float da_ld(bf16 x) { return bf16_to_f32(x); }
__device__ __forceinline__ float da_ld(float x) { return x; }
__device__ __forceinline__ void da_st(bf16* p, float x) { *p = f32_to_bf16(x); }
__device__ __forceinline__ void da_st(float* p, float x) { *p = x; }

// Where key/value j of one (sequence, kv head) lies: a strided cache (position 0 of the head
// already offset by the caller) ...
template <typename T>
struct StridedKv {
    const T* kc;
    const T* vc;
    long long pos_stride;
    __device__ __forceinline__ const T* k(int j) const { return kc + j * pos_stride; }
    __device__ __forceinline__ const T* v(int j) const { return vc + j * pos_stride; }
};

// ... or a paged one: `tab` the sequence's block addresses, `lofs` the offset of (layer, slot 0,
// kv head) in a block, `row` elements per slot, values `vofs` elements after the keys.
template <typename T>
struct PagedKv {
    const long long* tab;
    int bs;
    long long lofs, row, vofs;
    __device__ __forceinline__ const T* k(int j) const { return (const T*)tab[j / bs] + lofs + (j % bs) * row; }
    __device__ __forceinline__ const T* v(int j) const { return k(j) + vofs; }
};

// One (sequence, q head) block: query row qr against `len` keys of one cache, output row orow.
template <typename T, typename Kv>
__device__ __forceinline__ void decode_attn_row(const T* qr, const Kv& kv, int len, T* orow, int D, float scale) {
    __shared__ float sm_m[4], sm_l[4];
    __shared__ float sm_acc[4][256];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float qv[8], acc[8];
    const int per = (D + 31) / 32;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int d = lane + 32 * i;
        qv[i] = (i < per && d < D) ? da_ld(qr[d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -FC_INF, l = 0.0f;
    for (int j = warp; j < len; j += 4) {
        const T* kr = kv.k(j);
        const T* vr = kv.v(j);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            if (i < per && d < D) s += qv[i] * da_ld(kr[d]);
        }
        s = warp_sum(s);
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            acc[i] = acc[i] * corr + ((i < per && d < D) ? p * da_ld(vr[d]) : 0.0f);
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
        c[w] = sm_m[w] == -FC_INF ? 0.0f : expf(sm_m[w] - gm);
        gl += sm_l[w] * c[w];
    }
    const float inv = gl > 0.0f ? 1.0f / gl : 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float x = (sm_acc[0][d] * c[0] + sm_acc[1][d] * c[1] + sm_acc[2][d] * c[2] + sm_acc[3][d] * c[3]) * inv;
        da_st(&orow[d], x);
    }
}

template <typename T>
__device__ __forceinline__ void decode_attn_impl(const T* q, const T* k_cache, const T* v_cache, const int* lens, T* o,
                                                 int q_heads, int kv_heads, int D, int max_len, long long batch_stride,
                                                 long long pos_stride, long long head_stride, float scale) {
    const int h = blockIdx.x, b = blockIdx.y;
    const int kvh = h / (q_heads / kv_heads);
    const long long at = ((long long)b * q_heads + h) * D;
    const long long base = b * batch_stride + kvh * head_stride;
    const StridedKv<T> kv{k_cache + base, v_cache + base, pos_stride};
    decode_attn_row(q + at, kv, min(lens[b], max_len), o + at, D, scale);
}

// The whole batch of a decode step in one launch: sequence b's blocks are
// blocks[b·(*nblk) ..]; keys 0..lens[b]-1 of layer `layer` are attended.
template <typename T>
__device__ __forceinline__ void decode_attn_batch_impl(const T* q, const long long* blocks, const int* nblk,
                                                       const int* lens, T* o, int layer, int q_heads, int kv_heads,
                                                       int D, int bs, long long vofs, float scale) {
    const int h = blockIdx.x, b = blockIdx.y;
    const int kvh = h / (q_heads / kv_heads);
    const long long at = ((long long)b * q_heads + h) * D;
    const long long row = (long long)kv_heads * D;
    const PagedKv<T> kv{blocks + (long long)b * nblk[0], bs, (long long)layer * bs * row + (long long)kvh * D, row, vofs};
    decode_attn_row(q + at, kv, lens[b], o + at, D, scale);
}

extern "C" __global__ void __launch_bounds__(128) decode_attn_bf16(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                                                                   const int* lens, bf16* o, int q_heads, int kv_heads,
                                                                   int D, int max_len, long long batch_stride,
                                                                   long long pos_stride, long long head_stride, float scale) {
    decode_attn_impl<bf16>(q, k_cache, v_cache, lens, o, q_heads, kv_heads, D, max_len, batch_stride, pos_stride,
                           head_stride, scale);
}

extern "C" __global__ void __launch_bounds__(128) decode_attn_f32(const float* q, const float* k_cache, const float* v_cache,
                                                                  const int* lens, float* o, int q_heads, int kv_heads,
                                                                  int D, int max_len, long long batch_stride,
                                                                  long long pos_stride, long long head_stride, float scale) {
    decode_attn_impl<float>(q, k_cache, v_cache, lens, o, q_heads, kv_heads, D, max_len, batch_stride, pos_stride,
                            head_stride, scale);
}

extern "C" __global__ void __launch_bounds__(128) decode_attn_batch_bf16(const bf16* q, const long long* blocks,
                                                                         const int* nblk, const int* lens, bf16* o,
                                                                         int layer, int q_heads, int kv_heads, int D,
                                                                         int bs, long long vofs, float scale) {
    decode_attn_batch_impl<bf16>(q, blocks, nblk, lens, o, layer, q_heads, kv_heads, D, bs, vofs, scale);
}

extern "C" __global__ void __launch_bounds__(128) decode_attn_batch_f32(const float* q, const long long* blocks,
                                                                        const int* nblk, const int* lens, float* o,
                                                                        int layer, int q_heads, int kv_heads, int D,
                                                                        int bs, long long vofs, float scale) {
    decode_attn_batch_impl<float>(q, blocks, nblk, lens, o, layer, q_heads, kv_heads, D, bs, vofs, scale);
}
