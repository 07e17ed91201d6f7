// Fused log-probability + entropy over full-vocabulary rows of logits (SPEC §7), with temperature.
//
// For a row z (length V), target y and temperature T, with x = z/T:
//   m = max x, s = Σ e^{x-m}, t = Σ e^{x-m}·x, logZ = m + ln s, logp(y) = x_y − logZ,
//   H = logZ − t/s.
// Computed in one pass with an online max/rescale; no V-sized softmax ever exists. Used chunk by
// chunk after the LM-head GEMM, so full T×V logits never exist either.
// Backward: ∂logp/∂z_k = (1[k=y] − p_k)/T, ∂H/∂z_k = −p_k·(log p_k + H)/T, combined with the
// upstream gradients of logp and H (either may be null = 0).
// A row with target < 0 (ignored position) gets logp = 0 and no logp gradient; H is still computed.
// Logits of −inf (masked vocabulary entries) contribute p = 0.
//
// Launch: grid = rows, block = 256 (any multiple of 32 up to 1024). Rows whose address is 16-byte
// aligned are read (and in the backward written) 16 bytes at a time, with a scalar tail.
// Roofline per row: fwd reads V·sizeof(T) bytes, ~4V FLOPs + V exp; bwd reads V and writes V
// elements (2V·sizeof(T) bytes), ~8V FLOPs + V exp. Memory bound (intensity ~2 FLOP/byte bf16).
#include "common.cuh"

struct Online { float m, s, t; };

__device__ __forceinline__ void online_add(Online& a, float x) {
    if (x == -FC_INF) return;
    if (x > a.m) {
        float c = __expf(a.m - x);          // 0 when a.m = -inf
        a.s = a.s * c + 1.0f;
        a.t = a.t * c + x;
        a.m = x;
    } else {
        float e = __expf(x - a.m);
        a.s += e;
        a.t += e * x;
    }
}

__device__ __forceinline__ Online online_merge(Online a, Online b) {
    if (b.m == -FC_INF) return a;
    if (a.m == -FC_INF) return b;
    float m = fmaxf(a.m, b.m);
    float ca = __expf(a.m - m), cb = __expf(b.m - m);
    Online r;
    r.m = m;
    r.s = a.s * ca + b.s * cb;
    r.t = a.t * ca + b.t * cb;
    return r;
}

__device__ __forceinline__ Online warp_merge(Online a) {
    for (int o = 16; o > 0; o >>= 1) {
        Online b;
        b.m = __shfl_xor_sync(FULL_MASK, a.m, o);
        b.s = __shfl_xor_sync(FULL_MASK, a.s, o);
        b.t = __shfl_xor_sync(FULL_MASK, a.t, o);
        a = online_merge(a, b);
    }
    return a;
}

template <class T>
__device__ __forceinline__ void lpe_fwd_impl(const T* __restrict__ logits, long long ld, const int* __restrict__ targets,
                                             int V, float inv_temp, float* __restrict__ logp,
                                             float* __restrict__ entropy, float* __restrict__ logz) {
    __shared__ float sm[32], ss[32], st[32];
    const int row = blockIdx.x;
    const T* z = logits + (long long)row * ld;
    Online a; a.m = -FC_INF; a.s = 0.0f; a.t = 0.0f;
    constexpr int EPV = 16 / sizeof(T);  // elements per 16-byte load
    int k0 = 0;
    if (((unsigned long long)z & 15) == 0) {  // uniform per row: 16-byte loads, one rescale per 8
        const int nv = V / EPV;
        for (int c = threadIdx.x; c < nv; c += blockDim.x) {
            float x[EPV];
            unpack16(((const u32x4*)z)[c], x, z);
            float mloc = -FC_INF;
#pragma unroll
            for (int j = 0; j < EPV; j++) { x[j] *= inv_temp; mloc = fmaxf(mloc, x[j]); }
            if (mloc == -FC_INF) continue;
            if (mloc > a.m) {
                const float cr = __expf(a.m - mloc);
                a.s *= cr; a.t *= cr; a.m = mloc;
            }
#pragma unroll
            for (int j = 0; j < EPV; j++) {
                if (x[j] == -FC_INF) continue;
                const float e = __expf(x[j] - a.m);
                a.s += e; a.t += e * x[j];
            }
        }
        k0 = nv * EPV;
    }
    for (int k = k0 + threadIdx.x; k < V; k += blockDim.x) online_add(a, to_f32(z[k]) * inv_temp);
    a = warp_merge(a);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sm[wid] = a.m; ss[wid] = a.s; st[wid] = a.t; }
    __syncthreads();
    if (wid == 0) {
        Online b;
        if (lane < nw) { b.m = sm[lane]; b.s = ss[lane]; b.t = st[lane]; }
        else { b.m = -FC_INF; b.s = 0.0f; b.t = 0.0f; }
        b = warp_merge(b);
        if (lane == 0) {
            float lz = b.m + __logf(b.s);
            float h = lz - b.t / b.s;
            int y = targets ? targets[row] : -1;
            if (logp) logp[row] = y >= 0 && y < V ? to_f32(z[y]) * inv_temp - lz : 0.0f;
            if (entropy) entropy[row] = h;
            if (logz) logz[row] = lz;
        }
    }
}

// `logits` and `dlogits` are not __restrict__: linear_lpe_bwd writes the gradient over the logits
// chunk it reads (each element is read, then written, by the same thread).
template <class T>
__device__ __forceinline__ void lpe_bwd_impl(const T* logits, long long ld, const int* __restrict__ targets,
                                             int V, float inv_temp, const float* __restrict__ logz,
                                             const float* __restrict__ entropy, const float* __restrict__ dlogp,
                                             const float* __restrict__ dent, T* dlogits, long long ldd) {
    const int row = blockIdx.x;
    const T* z = logits + (long long)row * ld;
    T* dz = dlogits + (long long)row * ldd;
    const float lz = logz[row], h = entropy[row];
    const int y = targets ? targets[row] : -1;
    const float gl = (dlogp && y >= 0) ? dlogp[row] : 0.0f;
    const float gh = dent ? dent[row] : 0.0f;
    constexpr int EPV = 16 / sizeof(T);
    int k0 = 0;
    if ((((unsigned long long)z | (unsigned long long)dz) & 15) == 0) {  // 16-byte loads and stores
        const int nv = V / EPV;
        for (int c = threadIdx.x; c < nv; c += blockDim.x) {
            float x[EPV];
            unpack16(((const u32x4*)z)[c], x, z);
#pragma unroll
            for (int j = 0; j < EPV; j++) {
                const float xs = x[j] * inv_temp, lp = xs - lz;
                const float p = xs == -FC_INF ? 0.0f : __expf(lp);
                float g = -gl * p - (p > 0.0f ? gh * p * (lp + h) : 0.0f);
                if (c * EPV + j == y) g += gl;
                x[j] = g * inv_temp;
            }
            ((u32x4*)dz)[c] = pack16(x, dz);
        }
        k0 = nv * EPV;
    }
    for (int k = k0 + threadIdx.x; k < V; k += blockDim.x) {
        float x = to_f32(z[k]) * inv_temp;
        float lp = x - lz;
        float p = x == -FC_INF ? 0.0f : __expf(lp);
        float g = -gl * p - (p > 0.0f ? gh * p * (lp + h) : 0.0f);
        if (k == y) g += gl;
        dz[k] = from_f32<T>(g * inv_temp);
    }
}

extern "C" __global__ void lpe_fwd_bf16(const bf16* logits, long long ld, const int* targets, int V, float inv_temp,
                                        float* logp, float* entropy, float* logz) {
    lpe_fwd_impl(logits, ld, targets, V, inv_temp, logp, entropy, logz);
}
extern "C" __global__ void lpe_fwd_f32(const float* logits, long long ld, const int* targets, int V, float inv_temp,
                                       float* logp, float* entropy, float* logz) {
    lpe_fwd_impl(logits, ld, targets, V, inv_temp, logp, entropy, logz);
}
extern "C" __global__ void lpe_bwd_bf16(const bf16* logits, long long ld, const int* targets, int V, float inv_temp,
                                        const float* logz, const float* entropy, const float* dlogp, const float* dent,
                                        bf16* dlogits, long long ldd) {
    lpe_bwd_impl(logits, ld, targets, V, inv_temp, logz, entropy, dlogp, dent, dlogits, ldd);
}
extern "C" __global__ void lpe_bwd_f32(const float* logits, long long ld, const int* targets, int V, float inv_temp,
                                       const float* logz, const float* entropy, const float* dlogp, const float* dent,
                                       float* dlogits, long long ldd) {
    lpe_bwd_impl(logits, ld, targets, V, inv_temp, logz, entropy, dlogp, dent, dlogits, ldd);
}
