// Flash attention (FlashAttention-2), causal, GQA, packed variable-length sequences, bf16 inputs,
// fp32 accumulation on tensor cores (mma.sync m16n8k16 bf16 through ptx.cuh), head dim 16, 32, 64 or
// 128 (the small ones serve tiny test and default models; other head dims are zero-padded to the
// next of these by the launcher, with the scale of the real head dim).
//
// Layout: q [tokens, q_heads, D], k/v [tokens, kv_heads, D] (bf16), sequences given by cu_seqlens
// (n_seq + 1 offsets into the token axis). Query head h reads kv head h / (q_heads / kv_heads).
// Scale 1/sqrt(D) (passed in). Saves lse [tokens, q_heads] (natural log) for the backward.
//
// Shared prefixes (`shared` = 1): cu_seqlens is followed by four ints per sequence (seq_prefix):
// the first key row and length of its prefix (another sequence, whose keys it sees in full before
// its own causal keys) and the first index and count of the sequences that name it as their
// prefix. The forward kernels walk the prefix keys first. The f32 key-parallel backward of a
// prefix's key row walks its own queries (causal) and then every query of each sequence naming
// it; the bf16 one (at its register limit) gets the dependants' share from fa_bwd_dep first.
//
// fa_fwd_d{16,32,64,128}: grid = (ceil(max_len / 64), q_heads, n_seq), block = 128 (4 warps × 16 query
//   rows), dynamic smem = 3 · 64 · (D + 8) · 2 bytes (27 KiB for D=64, 51 KiB for D=128: opt-in).
//   Per block: Q tile in smem → registers (ldmatrix.x4), loop over 64-key tiles up to the diagonal:
//   S = Q·Kᵀ (mma, K via ldmatrix), causal mask, online softmax in exp2 domain, O += P·V (P re-used
//   from the S accumulators as A fragments, V via ldmatrix.trans).
//   Roofline per (sequence of L, head): FLOPs ≈ 2·L²·D (causal half of 4·L²·D); bytes ≈ 2·L·D·2 (Q,
//   O) + K,V re-read once per query tile: 2·L·D·2·(L/64)/2 — compute bound for L >~ 256.
// fa_bwd_dot: delta[t, h] = Σ_d O·dO (f32); one warp per (token, head), block 256.
// fa_bwd_d{16,32,64,128}: grid = (ceil(max_len / 64), kv_heads, n_seq), block = 128 (4 warps × 16 keys).
//   Each block owns one 64-key tile of one kv head: recomputes Sᵀ = K·Qᵀ for every query tile at or
//   after the diagonal and every q head of the group, P from lse, dV += Pᵀ·dO, dPᵀ = V·dOᵀ,
//   dSᵀ = Pᵀ ⊙ (dPᵀ − delta), dK += dSᵀ·Q, and dQ += dS·K through shared memory and f32 atomics
//   (dq must be zeroed; cast it to bf16 afterwards). Query tile 64 rows (D<=64) / 16 rows (D=128, to stay within 255 registers).
//   dynamic smem = (2·64 + 2·BM)·(D + 8)·2 + 64·(BM + 8)·2 + 2·BM·4 bytes.
// fa_bwd_dep_d{16,32,64,128}: the same grid, run first when there are shared prefixes: block
//   (x, kvh, seq) takes key tile x of seq's prefix against every query of seq (no causal mask),
//   adds dQ as above and its unscaled dK/dV to f32 acc_dk/acc_dv with atomics; fa_bwd_d* then
//   starts that tile's accumulators from them, so each dK/dV element still has one writer.
//   Roofline: ≈ 2.5× the forward FLOPs (5 GEMM-shaped products instead of 2).
#include "ptx.cuh"

// rows × D bf16 tile from global (row stride `stride` elements) into smem (row stride D + 8);
// rows >= valid are zero-filled. 16-byte chunks, all threads of the block.
template <int D>
__device__ __forceinline__ void load_tile(u16* dst, const bf16* src, long long stride, int valid, int rows) {
    const int per_row = D / 8, chunks = rows * per_row;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int r = c / per_row, cc = c % per_row;
        u32x4 v; v.x = 0; v.y = 0; v.z = 0; v.w = 0;
        if (r < valid) v = *(const u32x4*)(src + r * stride + cc * 8);
        *(u32x4*)(dst + r * (D + 8) + cc * 8) = v;
    }
}

// Sequence `seq`'s prefix and dependants (zeros without shared prefixes): {key start, key count,
// first dependant, dependant count}.
struct SeqPrefix {
    int start, len, first, count;
};
__device__ __forceinline__ SeqPrefix seq_prefix(const int* cu_seqlens, int n_seq, int seq, int shared) {
    SeqPrefix p = {0, 0, 0, 0};
    if (shared) {
        const int* e = cu_seqlens + n_seq + 1 + 4 * seq;
        p.start = e[0]; p.len = e[1]; p.first = e[2]; p.count = e[3];
    }
    return p;
}

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

template <int D>
__device__ __forceinline__ void fa_fwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                                            const int* __restrict__ cu_seqlens, int q_heads, int kv_heads, float scale,
                                            int shared) {
    constexpr int BM = 64, BN = 64, LD = D + 8;
    FC_DYN_SMEM(u16, smem);
    u16* sQ = smem;
    u16* sK = sQ + BM * LD;
    u16* sV = sK + BN * LD;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int start = cu_seqlens[seq], len = cu_seqlens[seq + 1] - start;
    const int m0 = blockIdx.x * BM;
    if (m0 >= len) return;  // uniform across the block
    const int kvh = h / (q_heads / kv_heads);
    const long long qs = (long long)q_heads * D, ks = (long long)kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int mi = lane >> 3, r8 = lane & 7;

    load_tile<D>(sQ, q + (start + m0) * qs + h * D, qs, min(BM, len - m0), BM);
    __syncthreads();
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) ldmatrix_x4(qf[kk], &sQ[(warp * 16 + r8 + 8 * (mi & 1)) * LD + kk * 16 + 8 * (mi >> 1)]);

    float of[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) { of[i][0] = 0.0f; of[i][1] = 0.0f; of[i][2] = 0.0f; of[i][3] = 0.0f; }
    float mrow[2] = {-FC_INF, -FC_INF}, lrow[2] = {0.0f, 0.0f};
    const float sl2 = scale * LOG2E;
    const int row0 = m0 + warp * 16 + g;  // query positions (within the sequence) of this thread's rows
    const int n_end = min(len, m0 + BM);
    const SeqPrefix pre = seq_prefix(cu_seqlens, gridDim.z, seq, shared);
    const int pre_tiles = (pre.len + BN - 1) / BN;

    // Key tiles: the prefix's (all visible), then the sequence's own up to the diagonal.
    for (int it = 0; it < pre_tiles + (n_end + BN - 1) / BN; it++) {
        const bool in_pre = it < pre_tiles;
        const int n0 = (in_pre ? it : it - pre_tiles) * BN;
        const int kstart = in_pre ? pre.start : start, klen = in_pre ? pre.len : len;
        __syncthreads();
        load_tile<D>(sK, k + (long long)(kstart + n0) * ks + kvh * D, ks, min(BN, klen - n0), BN);
        load_tile<D>(sV, v + (long long)(kstart + n0) * ks + kvh * D, ks, min(BN, klen - n0), BN);
        __syncthreads();
        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) { s[nt][0] = 0.0f; s[nt][1] = 0.0f; s[nt][2] = 0.0f; s[nt][3] = 0.0f; }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++) {
                u32 b[2];
                ldmatrix_x2(b, &sK[(nt * 8 + r8) * LD + kk * 16 + 8 * (mi & 1)]);
                mma_bf16_16816(s[nt], qf[kk], b, s[nt]);
            }
        }
        float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = n0 + nt * 8 + 2 * t + (e & 1), row = row0 + (e >> 1) * 8;
                float x = s[nt][e] * sl2;
                if (col >= klen || (!in_pre && col > row)) x = -FC_INF;
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 2));
            const float corr = mx[i] == -FC_INF ? 1.0f : exp2f(mrow[i] - mx[i]);
            mrow[i] = mx[i];
            lrow[i] *= corr;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) { of[dt][2 * i] *= corr; of[dt][2 * i + 1] *= corr; }
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float x = s[nt][e];
                const float p = x == -FC_INF ? 0.0f : exp2f(x - mrow[e >> 1]);
                s[nt][e] = p;
                lrow[e >> 1] += p;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 a[4];
            a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                u32 b[2];
                ldmatrix_x2_trans(b, &sV[(kk * 16 + r8 + 8 * (mi & 1)) * LD + dt * 8]);
                mma_bf16_16816(of[dt], a, b, of[dt]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float l = lrow[i];
        l += __shfl_xor_sync(FULL_MASK, l, 1);
        l += __shfl_xor_sync(FULL_MASK, l, 2);
        const int row = row0 + 8 * i;
        if (row < len) {
            const float inv = 1.0f / l;
            bf16* orow = o + (start + row) * qs + h * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                orow[dt * 8 + 2 * t] = f32_to_bf16(of[dt][2 * i] * inv);
                orow[dt * 8 + 2 * t + 1] = f32_to_bf16(of[dt][2 * i + 1] * inv);
            }
            if (t == 0) lse[(long long)(start + row) * q_heads + h] = (mrow[i] + __log2f(l)) * LN2;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) fa_fwd_d16(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                                                             const int* cu_seqlens, int q_heads, int kv_heads, float scale, int shared) {
    fa_fwd_impl<16>(q, k, v, o, lse, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_fwd_d32(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                                                             const int* cu_seqlens, int q_heads, int kv_heads, float scale, int shared) {
    fa_fwd_impl<32>(q, k, v, o, lse, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_fwd_d64(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                                                             const int* cu_seqlens, int q_heads, int kv_heads, float scale, int shared) {
    fa_fwd_impl<64>(q, k, v, o, lse, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_fwd_d128(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                                                              const int* cu_seqlens, int q_heads, int kv_heads, float scale, int shared) {
    fa_fwd_impl<128>(q, k, v, o, lse, cu_seqlens, q_heads, kv_heads, scale, shared);
}

extern "C" __global__ void fa_bwd_dot(const bf16* o, const bf16* dout, float* delta, long long rows, int D) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= rows) return;  // whole warps exit together
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += bf16_to_f32(o[w * D + d]) * bf16_to_f32(dout[w * D + d]);
    s = warp_sum(s);
    if (lane == 0) delta[w] = s;
}

// DEP = false: one key tile of a sequence against its own queries (causal); with shared prefixes
// its dK/dV start from what fa_bwd_dep left in acc_dk/acc_dv. DEP = true (fa_bwd_dep): one key
// tile of the prefix of sequence blockIdx.z against all of that sequence's queries; dK/dV
// (unscaled f32) are added to acc_dk/acc_dv with atomics, dQ as always.
template <int D, int BM, bool DEP>
__device__ __forceinline__ void fa_bwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                            const bf16* __restrict__ dout, const float* __restrict__ lse,
                                            const float* __restrict__ delta, float* __restrict__ dq, bf16* __restrict__ dk,
                                            bf16* __restrict__ dv, float* __restrict__ acc_dk, float* __restrict__ acc_dv,
                                            const int* __restrict__ cu_seqlens, int q_heads, int kv_heads, float scale,
                                            int shared) {
    constexpr int BN = 64, LD = D + 8, LDS = BM + 8;
    FC_DYN_SMEM(u16, smem);
    u16* sK = smem;
    u16* sV = sK + BN * LD;
    u16* sQ = sV + BN * LD;
    u16* sO = sQ + BM * LD;        // dO tile
    u16* sS = sO + BM * LD;        // dSᵀ [BN keys][BM queries]
    float* sL = (float*)(sS + BN * LDS);
    float* sD = sL + BM;
    const int seq = blockIdx.z, kvh = blockIdx.y;
    const int start = cu_seqlens[seq], len = cu_seqlens[seq + 1] - start;  // the queries
    // The keys: the sequence's own, or (DEP) its prefix's.
    const SeqPrefix pre = seq_prefix(cu_seqlens, gridDim.z, seq, DEP ? 1 : 0);
    const int kstart = DEP ? pre.start : start, klen = DEP ? pre.len : len;
    const int n0 = blockIdx.x * BN;
    if (n0 >= klen) return;
    const int group = q_heads / kv_heads;
    const long long qs = (long long)q_heads * D, ks = (long long)kv_heads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int mi = lane >> 3, r8 = lane & 7;
    const float sl2 = scale * LOG2E;

    load_tile<D>(sK, k + (long long)(kstart + n0) * ks + kvh * D, ks, min(BN, klen - n0), BN);
    load_tile<D>(sV, v + (long long)(kstart + n0) * ks + kvh * D, ks, min(BN, klen - n0), BN);

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) { dka[i][e] = 0.0f; dva[i][e] = 0.0f; }
    const int key0 = n0 + warp * 16 + g;  // this thread's key rows: key0, key0 + 8
    if (!DEP && shared) {  // the dependants' share, from fa_bwd_dep
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const long long r = (long long)(kstart + key0 + 8 * i) * ks + kvh * D + 2 * t;
            if (key0 + 8 * i < klen) {
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    dka[dt][2 * i] = acc_dk[r + dt * 8];
                    dka[dt][2 * i + 1] = acc_dk[r + dt * 8 + 1];
                    dva[dt][2 * i] = acc_dv[r + dt * 8];
                    dva[dt][2 * i + 1] = acc_dv[r + dt * 8 + 1];
                }
            }
        }
    }

    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int m0 = DEP ? 0 : (n0 / BM) * BM; m0 < len; m0 += BM) {
            __syncthreads();
            const int valid = min(BM, len - m0);
            load_tile<D>(sQ, q + (start + m0) * qs + h * D, qs, valid, BM);
            load_tile<D>(sO, dout + (start + m0) * qs + h * D, qs, valid, BM);
            for (int i = threadIdx.x; i < BM; i += blockDim.x) {
                sL[i] = i < valid ? lse[(long long)(start + m0 + i) * q_heads + h] * LOG2E : 0.0f;
                sD[i] = i < valid ? delta[(long long)(start + m0 + i) * q_heads + h] : 0.0f;
            }
            __syncthreads();
            float st[BM / 8][4], dp[BM / 8][4];
#pragma unroll
            for (int nt = 0; nt < BM / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) { st[nt][e] = 0.0f; dp[nt][e] = 0.0f; }
            // Sᵀ = K_w · Qᵀ and dPᵀ = V_w · dOᵀ
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 ak[4], av[4];
                ldmatrix_x4(ak, &sK[(warp * 16 + r8 + 8 * (mi & 1)) * LD + kk * 16 + 8 * (mi >> 1)]);
                ldmatrix_x4(av, &sV[(warp * 16 + r8 + 8 * (mi & 1)) * LD + kk * 16 + 8 * (mi >> 1)]);
#pragma unroll
                for (int nt = 0; nt < BM / 8; nt++) {
                    u32 bq[2], bo[2];
                    ldmatrix_x2(bq, &sQ[(nt * 8 + r8) * LD + kk * 16 + 8 * (mi & 1)]);
                    ldmatrix_x2(bo, &sO[(nt * 8 + r8) * LD + kk * 16 + 8 * (mi & 1)]);
                    mma_bf16_16816(st[nt], ak, bq, st[nt]);
                    mma_bf16_16816(dp[nt], av, bo, dp[nt]);
                }
            }
            // Pᵀ (causal: query >= key) and dSᵀ = Pᵀ ⊙ (dPᵀ − delta)
#pragma unroll
            for (int nt = 0; nt < BM / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = nt * 8 + 2 * t + (e & 1), key = key0 + (e >> 1) * 8, qpos = m0 + qi;
                    const bool ok = (DEP || qpos >= key) && qpos < len && key < klen;
                    const float p = ok ? exp2f(st[nt][e] * sl2 - sL[qi]) : 0.0f;
                    st[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - sD[qi]);
                }
            }
            // dV += Pᵀ · dO, dK += dSᵀ · Q (k = queries)
#pragma unroll
            for (int kq = 0; kq < BM / 16; kq++) {
                u32 ap[4], as[4];
                ap[0] = pack_bf16x2(st[2 * kq][0], st[2 * kq][1]);
                ap[1] = pack_bf16x2(st[2 * kq][2], st[2 * kq][3]);
                ap[2] = pack_bf16x2(st[2 * kq + 1][0], st[2 * kq + 1][1]);
                ap[3] = pack_bf16x2(st[2 * kq + 1][2], st[2 * kq + 1][3]);
                as[0] = pack_bf16x2(dp[2 * kq][0], dp[2 * kq][1]);
                as[1] = pack_bf16x2(dp[2 * kq][2], dp[2 * kq][3]);
                as[2] = pack_bf16x2(dp[2 * kq + 1][0], dp[2 * kq + 1][1]);
                as[3] = pack_bf16x2(dp[2 * kq + 1][2], dp[2 * kq + 1][3]);
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    u32 bo[2], bq[2];
                    ldmatrix_x2_trans(bo, &sO[(kq * 16 + r8 + 8 * (mi & 1)) * LD + dt * 8]);
                    ldmatrix_x2_trans(bq, &sQ[(kq * 16 + r8 + 8 * (mi & 1)) * LD + dt * 8]);
                    mma_bf16_16816(dva[dt], ap, bo, dva[dt]);
                    mma_bf16_16816(dka[dt], as, bq, dka[dt]);
                }
            }
            // dSᵀ to shared memory, then dQ += scale · dS · K over the whole key tile
#pragma unroll
            for (int nt = 0; nt < BM / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int kl = warp * 16 + g + (e >> 1) * 8, qi = nt * 8 + 2 * t + (e & 1);
                    sS[kl * LDS + qi] = f32_to_bf16(dp[nt][e]).bits;
                }
            }
            __syncthreads();
            constexpr int RG = BM / 16;            // query row groups
            for (int task = warp; task < RG * (D / 8); task += 4) {
                const int rg = task % RG, dt = task / RG;
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int kk = 0; kk < BN / 16; kk++) {
                    u32 a[4], b[2];
                    ldmatrix_x4_trans(a, &sS[(kk * 16 + r8 + 8 * (mi >> 1)) * LDS + rg * 16 + 8 * (mi & 1)]);
                    ldmatrix_x2_trans(b, &sK[(kk * 16 + r8 + 8 * (mi & 1)) * LD + dt * 8]);
                    mma_bf16_16816(acc, a, b, acc);
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qpos = m0 + rg * 16 + g + (e >> 1) * 8;
                    if (qpos < len) atomicAdd(&dq[(long long)(start + qpos) * qs + h * D + dt * 8 + 2 * t + (e & 1)], acc[e] * scale);
                }
            }
        }
    }
    if (DEP) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const long long r = (long long)(kstart + key0 + 8 * i) * ks + kvh * D + 2 * t;
            if (key0 + 8 * i < klen) {
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    atomicAdd(&acc_dk[r + dt * 8], dka[dt][2 * i]);
                    atomicAdd(&acc_dk[r + dt * 8 + 1], dka[dt][2 * i + 1]);
                    atomicAdd(&acc_dv[r + dt * 8], dva[dt][2 * i]);
                    atomicAdd(&acc_dv[r + dt * 8 + 1], dva[dt][2 * i + 1]);
                }
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int key = key0 + 8 * i;
        if (key < len) {
            bf16* dkr = dk + (start + key) * ks + kvh * D;
            bf16* dvr = dv + (start + key) * ks + kvh * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                dkr[dt * 8 + 2 * t] = f32_to_bf16(dka[dt][2 * i] * scale);
                dkr[dt * 8 + 2 * t + 1] = f32_to_bf16(dka[dt][2 * i + 1] * scale);
                dvr[dt * 8 + 2 * t] = f32_to_bf16(dva[dt][2 * i]);
                dvr[dt * 8 + 2 * t + 1] = f32_to_bf16(dva[dt][2 * i + 1]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) fa_bwd_d16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                             const float* lse, const float* delta, float* dq, bf16* dk,
                                                             bf16* dv, float* acc_dk, float* acc_dv, const int* cu_seqlens,
                                                             int q_heads, int kv_heads, float scale, int shared) {
    fa_bwd_impl<16, 64, false>(q, k, v, dout, lse, delta, dq, dk, dv, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_d32(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                             const float* lse, const float* delta, float* dq, bf16* dk,
                                                             bf16* dv, float* acc_dk, float* acc_dv, const int* cu_seqlens,
                                                             int q_heads, int kv_heads, float scale, int shared) {
    fa_bwd_impl<32, 64, false>(q, k, v, dout, lse, delta, dq, dk, dv, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_d64(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                             const float* lse, const float* delta, float* dq, bf16* dk,
                                                             bf16* dv, float* acc_dk, float* acc_dv, const int* cu_seqlens,
                                                             int q_heads, int kv_heads, float scale, int shared) {
    fa_bwd_impl<64, 64, false>(q, k, v, dout, lse, delta, dq, dk, dv, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_d128(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                              const float* lse, const float* delta, float* dq, bf16* dk,
                                                              bf16* dv, float* acc_dk, float* acc_dv, const int* cu_seqlens,
                                                              int q_heads, int kv_heads, float scale, int shared) {
    fa_bwd_impl<128, 16, false>(q, k, v, dout, lse, delta, dq, dk, dv, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, shared);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_dep_d16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                                 const float* lse, const float* delta, float* dq, float* acc_dk,
                                                                 float* acc_dv, const int* cu_seqlens, int q_heads, int kv_heads,
                                                                 float scale) {
    fa_bwd_impl<16, 64, true>(q, k, v, dout, lse, delta, dq, nullptr, nullptr, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, 1);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_dep_d32(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                                 const float* lse, const float* delta, float* dq, float* acc_dk,
                                                                 float* acc_dv, const int* cu_seqlens, int q_heads, int kv_heads,
                                                                 float scale) {
    fa_bwd_impl<32, 64, true>(q, k, v, dout, lse, delta, dq, nullptr, nullptr, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, 1);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_dep_d64(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                                 const float* lse, const float* delta, float* dq, float* acc_dk,
                                                                 float* acc_dv, const int* cu_seqlens, int q_heads, int kv_heads,
                                                                 float scale) {
    fa_bwd_impl<64, 64, true>(q, k, v, dout, lse, delta, dq, nullptr, nullptr, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, 1);
}
extern "C" __global__ void __launch_bounds__(128) fa_bwd_dep_d128(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                                                                  const float* lse, const float* delta, float* dq, float* acc_dk,
                                                                  float* acc_dv, const int* cu_seqlens, int q_heads, int kv_heads,
                                                                  float scale) {
    fa_bwd_impl<128, 16, true>(q, k, v, dout, lse, delta, dq, nullptr, nullptr, acc_dk, acc_dv, cu_seqlens, q_heads, kv_heads, scale, 1);
}

// ---------------------------------------------------------------------------------------------
// The f32 path (`--dtype f32`): the same attention on f32 q/k/v with f32 arithmetic throughout,
// on CUDA cores. It exists for parity with the cpu (the bf16 tensor-core kernels above round
// q, k, v, P and dS to bf16), not for speed. Any head dim up to 256, no padding: lanes split D.
//
// fa_fwd_f32: grid = (ceil(max_len / 4), q_heads, n_seq), block = 128; warp w owns query row
//   blockIdx.x·4 + w and walks its prefix's keys, then keys 0..row, with an online softmax
//   (natural exp). Writes o and lse.
// fa_bwd_dot_f32: delta[t, h] = Σ_d O·dO; one warp per (token, head), block 256.
// fa_bwd_dq_f32: grid as the forward; warp per query row: dq_i = scale · Σ_j dS_ij · k_j.
// fa_bwd_dkdv_f32: grid = (ceil(max_len / 4), kv_heads, n_seq), block = 128; warp per key row j
//   of one kv head: over the group's q heads and queries i >= j (and every query of the sequences
//   that have this one as their prefix), dk_j = scale · Σ dS_ij · q_i and
//   dv_j = Σ P_ij · dO_i. With P_ij = exp(scale·q_i·k_j − lse_i), dS_ij = P_ij (dO_i·v_j − delta_i).
//   No atomics: every output element has one writer, so the result is deterministic.
// Roofline: ≈ 2·L²·D FLOPs per (sequence, head) forward and ≈ 3× that backward, at CUDA-core rate.
#define FA32_PER 8  // D / 32 rounded up, at most

__device__ __forceinline__ void fa32_load(float* r, const float* src, int D, int lane, float mul) {
#pragma unroll
    for (int e = 0; e < FA32_PER; e++) {
        const int d = lane + 32 * e;
        r[e] = d < D ? src[d] * mul : 0.0f;
    }
}

__device__ __forceinline__ float fa32_dot(const float* r, const float* src, int D, int lane) {
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < FA32_PER; e++) {
        const int d = lane + 32 * e;
        if (d < D) s += r[e] * src[d];
    }
    return warp_sum(s);
}

__device__ __forceinline__ void fa32_store(float* dst, const float* r, int D, int lane, float mul) {
#pragma unroll
    for (int e = 0; e < FA32_PER; e++) {
        const int d = lane + 32 * e;
        if (d < D) dst[d] = r[e] * mul;
    }
}

extern "C" __global__ void __launch_bounds__(128) fa_fwd_f32(const float* q, const float* k, const float* v, float* o,
                                                             float* lse, const int* cu_seqlens, int q_heads,
                                                             int kv_heads, int D, float scale, int shared) {
    const int seq = blockIdx.z, h = blockIdx.y, lane = threadIdx.x & 31;
    const int start = cu_seqlens[seq], len = cu_seqlens[seq + 1] - start;
    const int i = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (i >= len) return;  // whole warps; no block barrier below
    const int kvh = h / (q_heads / kv_heads);
    const long long qs = (long long)q_heads * D, ks = (long long)kv_heads * D;
    float qv[FA32_PER], acc[FA32_PER];
    fa32_load(qv, q + (start + i) * qs + (long long)h * D, D, lane, scale);
#pragma unroll
    for (int e = 0; e < FA32_PER; e++) acc[e] = 0.0f;
    float m = -FC_INF, l = 0.0f;
    const SeqPrefix pre = seq_prefix(cu_seqlens, gridDim.z, seq, shared);
    for (int j = 0; j <= pre.len + i; j++) {  // the prefix's keys, then the own keys 0..i
        const long long kr = (j < pre.len ? pre.start + j : start + j - pre.len) * ks + (long long)kvh * D;
        const float s = fa32_dot(qv, k + kr, D, lane);
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), p = expf(s - mn);  // m = -inf at j = 0: corr = 0
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < FA32_PER; e++) {
            const int d = lane + 32 * e;
            acc[e] = acc[e] * corr + (d < D ? p * v[kr + d] : 0.0f);
        }
        m = mn;
    }
    fa32_store(o + (start + i) * qs + (long long)h * D, acc, D, lane, 1.0f / l);
    if (lane == 0) lse[(long long)(start + i) * q_heads + h] = m + logf(l);
}

extern "C" __global__ void fa_bwd_dot_f32(const float* o, const float* dout, float* delta, long long rows, int D) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= rows) return;  // whole warps exit together
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += o[w * D + d] * dout[w * D + d];
    s = warp_sum(s);
    if (lane == 0) delta[w] = s;
}

extern "C" __global__ void __launch_bounds__(128) fa_bwd_dq_f32(const float* q, const float* k, const float* v,
                                                                const float* dout, const float* lse, const float* delta,
                                                                float* dq, const int* cu_seqlens, int q_heads,
                                                                int kv_heads, int D, float scale, int shared) {
    const int seq = blockIdx.z, h = blockIdx.y, lane = threadIdx.x & 31;
    const int start = cu_seqlens[seq], len = cu_seqlens[seq + 1] - start;
    const int i = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (i >= len) return;
    const int kvh = h / (q_heads / kv_heads);
    const long long qs = (long long)q_heads * D, ks = (long long)kv_heads * D, qr = (start + i) * qs + (long long)h * D;
    const long long row = (long long)(start + i) * q_heads + h;
    const float li = lse[row], di = delta[row];
    float qv[FA32_PER], go[FA32_PER], acc[FA32_PER];
    fa32_load(qv, q + qr, D, lane, scale);
    fa32_load(go, dout + qr, D, lane, 1.0f);
#pragma unroll
    for (int e = 0; e < FA32_PER; e++) acc[e] = 0.0f;
    const SeqPrefix pre = seq_prefix(cu_seqlens, gridDim.z, seq, shared);
    for (int j = 0; j <= pre.len + i; j++) {  // the prefix's keys, then the own keys 0..i
        const long long kr = (j < pre.len ? pre.start + j : start + j - pre.len) * ks + (long long)kvh * D;
        const float p = expf(fa32_dot(qv, k + kr, D, lane) - li);
        const float ds = p * (fa32_dot(go, v + kr, D, lane) - di);
#pragma unroll
        for (int e = 0; e < FA32_PER; e++) {
            const int d = lane + 32 * e;
            if (d < D) acc[e] += ds * k[kr + d];
        }
    }
    fa32_store(dq + qr, acc, D, lane, scale);
}

// (128, 1): without the occupancy hint ptxas caps this kernel at 64 registers on sm_90 and spills.
extern "C" __global__ void __launch_bounds__(128, 1) fa_bwd_dkdv_f32(const float* q, const float* k, const float* v,
                                                                  const float* dout, const float* lse,
                                                                  const float* delta, float* dk, float* dv,
                                                                  const int* cu_seqlens, int q_heads, int kv_heads,
                                                                  int D, float scale, int shared) {
    const int seq = blockIdx.z, kvh = blockIdx.y, lane = threadIdx.x & 31;
    const int start = cu_seqlens[seq], len = cu_seqlens[seq + 1] - start;
    const int j = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (j >= len) return;
    const int group = q_heads / kv_heads;
    const long long qs = (long long)q_heads * D, ks = (long long)kv_heads * D, kr = (start + j) * ks + (long long)kvh * D;
    float kv[FA32_PER], vv[FA32_PER], ak[FA32_PER], av[FA32_PER];
    fa32_load(kv, k + kr, D, lane, scale);
    fa32_load(vv, v + kr, D, lane, 1.0f);
#pragma unroll
    for (int e = 0; e < FA32_PER; e++) { ak[e] = 0.0f; av[e] = 0.0f; }
    const SeqPrefix pre = seq_prefix(cu_seqlens, gridDim.z, seq, shared);
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        // Own queries i >= j (src 0), then every query of each sequence with this one as prefix.
        for (int src = 0; src <= pre.count; src++) {
            const int qseq = src == 0 ? seq : pre.first + src - 1;
            const int qstart = cu_seqlens[qseq], qlen = cu_seqlens[qseq + 1] - qstart;
            for (int i = src == 0 ? j : 0; i < qlen; i++) {
                const long long qr = (qstart + i) * qs + (long long)h * D, row = (long long)(qstart + i) * q_heads + h;
                const float p = expf(fa32_dot(kv, q + qr, D, lane) - lse[row]);
                const float ds = p * (fa32_dot(vv, dout + qr, D, lane) - delta[row]);
#pragma unroll
                for (int e = 0; e < FA32_PER; e++) {
                    const int d = lane + 32 * e;
                    if (d < D) {
                        ak[e] += ds * q[qr + d];
                        av[e] += p * dout[qr + d];
                    }
                }
            }
        }
    }
    fa32_store(dk + kr, ak, D, lane, scale);
    fa32_store(dv + kr, av, D, lane, 1.0f);
}
