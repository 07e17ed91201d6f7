// Embedding lookup and its backward.
//   fwd: out[t, :] = W[ids[t], :]         (ids outside [0, vocab) give a zero row)
//   bwd: dW[ids[t], :] += dout[t, :]      (f32 dW; scatter-add with atomics, repeated ids add up)
// Launch: grid = tokens, block = 256 (threads stride over D).
// Roofline: fwd moves 2·D·sizeof(T) bytes per token; bwd reads D·sizeof(T) and does D atomic
// read-modify-writes on f32 (8·D bytes) per token. Memory bound.
#include "common.cuh"

template <class T>
__device__ __forceinline__ void emb_fwd(const int* __restrict__ ids, const T* __restrict__ w, T* __restrict__ out, int vocab, int D) {
    const long long t = blockIdx.x;
    const int id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    for (int j = threadIdx.x; j < D; j += blockDim.x) out[t * D + j] = ok ? w[(long long)id * D + j] : from_f32<T>(0.0f);
}

template <class T>
__device__ __forceinline__ void emb_bwd(const int* __restrict__ ids, const T* __restrict__ dout, float* __restrict__ dw, int vocab, int D) {
    const long long t = blockIdx.x;
    const int id = ids[t];
    if (id < 0 || id >= vocab) return;
    for (int j = threadIdx.x; j < D; j += blockDim.x) atomicAdd(&dw[(long long)id * D + j], to_f32(dout[t * D + j]));
}

extern "C" __global__ void embedding_fwd_bf16(const int* ids, const bf16* w, bf16* out, int vocab, int D) { emb_fwd(ids, w, out, vocab, D); }
extern "C" __global__ void embedding_fwd_f32(const int* ids, const float* w, float* out, int vocab, int D) { emb_fwd(ids, w, out, vocab, D); }
extern "C" __global__ void embedding_bwd_bf16(const int* ids, const bf16* dout, float* dw, int vocab, int D) { emb_bwd(ids, dout, dw, vocab, D); }
extern "C" __global__ void embedding_bwd_f32(const int* ids, const float* dout, float* dw, int vocab, int D) { emb_bwd(ids, dout, dw, vocab, D); }
