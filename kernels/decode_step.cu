// The fused pieces of a batched decode step (one new token per sequence, every sequence of the
// batch in one launch), so a layer costs a fixed number of launches whatever the batch size.
//
// KV caches are paged (src/model/kv_cache.rs): a block of bs positions is one allocation, keys
// then values (vofs elements later), each [layer][bs][kv_head][D]. The step's table gives, per
// sequence b, its block table blocks[b·(*nblk) + i] (64-bit block addresses; *nblk entries per
// sequence, read from the table so a captured graph serves any length) and the position of the
// new token (pos[b]): position p of layer l is slot p % bs of block p / bs.
//
// decode_qkv_T: after the q, k and v projections (no bias, [B, heads·D] each): per head row,
//   + bias (Qwen2), RMSNorm over the head (Qwen3's q/k norms, weights qn/kn [D]), RoPE
//   (rotate-half, cos/sin [B, D/2]); q is rotated in place, k and v are written into the cache
//   at position pos[b] of layer `layer` (the KV append: no per-sequence copies). Every stage
//   rounds to T exactly where the per-op path (bias_add, rmsnorm_fwd, rope) stores T, and the
//   norm sums in rmsnorm_fwd's order (one element per thread, the same block size), so the
//   result is bit-identical to it.
//   Launch: grid = (q_heads + 2·kv_heads, B), block = D rounded up to a warp (≤ 256).
//   Roofline per token: reads and writes (q_heads + 2·kv_heads)·D·sizeof(T), ~10 FLOPs each.
// add_rmsnorm_T: x += y (the residual, in place, rounded to T as ew_add does), then
//   h = RMSNorm(x)·w (as rmsnorm_fwd). One launch for the add and the next norm.
//   Launch: grid = rows, block = D rounded up to a warp, ≤ 256 (rmsnorm_fwd's). Roofline per
//   row: reads 2·D, writes 2·D elements; ~5 FLOPs each. Memory bound.
// kv_append_T: the KV append of the per-op decoder (src/model/decode_gpu.rs): n token rows of k
//   and v ([n, kv_heads·D], row = kv_heads·D elements) into paged caches, token t at the address
//   slots[t] of its (layer 0, slot) key row plus lofs = layer·bs·row; its values vofs later.
//   Launch: grid = n, block = 128. Roofline: a copy, 4·row·sizeof(T) bytes moved per token.
#include "common.cuh"

template <class T>
__device__ __forceinline__ float round_to(float x) {
    return to_f32(from_f32<T>(x));
}

template <class T>
__device__ __forceinline__ void decode_qkv_impl(T* q, const T* k, const T* v, const T* bq, const T* bk, const T* bv,
                                                const T* qn, const T* kn, const float* cs, const float* sn,
                                                const long long* blocks, const int* nblk, const int* pos, int bs,
                                                long long vofs, int layer, int q_heads, int kv_heads, int D,
                                                float eps) {
    __shared__ float scratch[32];
    __shared__ float row[256];
    const int b = blockIdx.y, hh = blockIdx.x, j = threadIdx.x;
    // Which of q, k, v this head row belongs to, its source row and its bias / norm weights.
    const int kind = hh < q_heads ? 0 : (hh < q_heads + kv_heads ? 1 : 2);
    const int head = kind == 0 ? hh : (kind == 1 ? hh - q_heads : hh - q_heads - kv_heads);
    const int width = kind == 0 ? q_heads : kv_heads;
    const T* src = kind == 0 ? q : (kind == 1 ? k : v);
    const T* bias = kind == 0 ? bq : (kind == 1 ? bk : bv);
    const T* norm = kind == 0 ? qn : (kind == 1 ? kn : nullptr);
    const long long at = ((long long)b * width + head) * D;
    float x = 0.0f;
    if (j < D) {
        x = to_f32(src[at + j]);
        if (bias) x = round_to<T>(x + to_f32(bias[head * D + j]));
    }
    if (norm) {  // uniform per block: every thread reaches the block sum
        const float s = block_sum(j < D ? x * x : 0.0f, scratch);
        const float r = rsqrtf(s / (float)D + eps);
        if (j < D) x = round_to<T>(x * r * to_f32(norm[j]));
    }
    if (kind < 2) {  // RoPE, rotate-half: element j pairs with j ± D/2
        if (j < D) row[j] = x;
        __syncthreads();
        const int h = D / 2;
        if (j < D) {
            const int i = j < h ? j : j - h;
            const float c = cs[(long long)b * h + i], s = sn[(long long)b * h + i];
            const float a = row[i], bb = row[i + h];
            x = j < h ? round_to<T>(a * c - bb * s) : round_to<T>(bb * c + a * s);
        }
    }
    if (j >= D) return;
    if (kind == 0) {
        q[at + j] = from_f32<T>(x);
        return;
    }
    // Cache element (layer, pos, head, j) of sequence b: slot pos % bs of block pos / bs.
    const int p = pos[b];
    T* blk = (T*)blocks[(long long)b * nblk[0] + p / bs];
    const long long off = (((long long)layer * bs + p % bs) * kv_heads + head) * D + j + (kind == 2 ? vofs : 0);
    blk[off] = from_f32<T>(x);
}

template <class T>
__device__ __forceinline__ void add_rmsnorm_impl(T* x, const T* y, const T* w, T* h, int D, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    T* xr = x + row * D;
    float s = 0.0f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const float v = round_to<T>(to_f32(xr[j]) + to_f32(y[row * D + j]));
        xr[j] = from_f32<T>(v);
        s += v * v;
    }
    s = block_sum(s, scratch);
    const float r = rsqrtf(s / (float)D + eps);
    for (int j = threadIdx.x; j < D; j += blockDim.x) h[row * D + j] = from_f32<T>(to_f32(xr[j]) * r * to_f32(w[j]));
}

extern "C" __global__ void decode_qkv_bf16(bf16* q, const bf16* k, const bf16* v, const bf16* bq, const bf16* bk,
                                           const bf16* bv, const bf16* qn, const bf16* kn, const float* cs,
                                           const float* sn, const long long* blocks, const int* nblk, const int* pos,
                                           int bs, long long vofs, int layer, int q_heads, int kv_heads, int D,
                                           float eps) {
    decode_qkv_impl(q, k, v, bq, bk, bv, qn, kn, cs, sn, blocks, nblk, pos, bs, vofs, layer, q_heads, kv_heads, D, eps);
}
extern "C" __global__ void decode_qkv_f32(float* q, const float* k, const float* v, const float* bq, const float* bk,
                                          const float* bv, const float* qn, const float* kn, const float* cs,
                                          const float* sn, const long long* blocks, const int* nblk, const int* pos,
                                          int bs, long long vofs, int layer, int q_heads, int kv_heads, int D,
                                          float eps) {
    decode_qkv_impl(q, k, v, bq, bk, bv, qn, kn, cs, sn, blocks, nblk, pos, bs, vofs, layer, q_heads, kv_heads, D, eps);
}
extern "C" __global__ void add_rmsnorm_bf16(bf16* x, const bf16* y, const bf16* w, bf16* h, int D, float eps) {
    add_rmsnorm_impl(x, y, w, h, D, eps);
}
extern "C" __global__ void add_rmsnorm_f32(float* x, const float* y, const float* w, float* h, int D, float eps) {
    add_rmsnorm_impl(x, y, w, h, D, eps);
}

template <class T>
__device__ __forceinline__ void kv_append_impl(const T* k, const T* v, const long long* slots, int row, long long lofs,
                                               long long vofs) {
    const long long t = blockIdx.x;
    T* dst = (T*)slots[t] + lofs;
    for (int j = threadIdx.x; j < row; j += blockDim.x) {
        dst[j] = k[t * row + j];
        dst[vofs + j] = v[t * row + j];
    }
}
extern "C" __global__ void kv_append_bf16(const bf16* k, const bf16* v, const long long* slots, int row, long long lofs,
                                          long long vofs) {
    kv_append_impl(k, v, slots, row, lofs, vofs);
}
extern "C" __global__ void kv_append_f32(const float* k, const float* v, const long long* slots, int row, long long lofs,
                                         long long vofs) {
    kv_append_impl(k, v, slots, row, lofs, vofs);
}
