// Self-test kernels for the execution model itself (used by tests/gpu_emu.rs and tests/gpu_cuda.rs):
// per-block __shared__ memory with __syncthreads, dynamic shared memory, warp shuffles and votes,
// atomics, and the mma.sync / ldmatrix wrappers against their documented fragment layouts.
// Launch shapes are given per kernel. Not performance kernels: no roofline.
#include "ptx.cuh"

// grid = any, block = n (<= 1024): out[b*n + t] = in[b*n + n-1-t] via static shared memory.
extern "C" __global__ void selftest_block_reverse(const int* in, int* out) {
    __shared__ int buf[1024];
    const int n = blockDim.x, t = threadIdx.x;
    const long long base = (long long)blockIdx.x * n;
    buf[t] = in[base + t];
    __syncthreads();
    int v = buf[n - 1 - t];
    __syncthreads();          // everyone has read before anyone overwrites (second round)
    buf[t] = v * 2;
    __syncthreads();
    out[base + t] = v + (buf[n - 1 - t] / 2 - in[base + t]);   // the bracket is 0 when shared memory is per block
}

// grid = any, block = n, dynamic smem = n * 4: out[b*n + t] = Σ_{s<=t} in[b*n + s] (Hillis-Steele scan).
extern "C" __global__ void selftest_scan(const float* in, float* out) {
    FC_DYN_SMEM(float, s);
    const int n = blockDim.x, t = threadIdx.x;
    const long long base = (long long)blockIdx.x * n;
    s[t] = in[base + t];
    __syncthreads();
    for (int o = 1; o < n; o <<= 1) {
        float v = t >= o ? s[t - o] : 0.0f;
        __syncthreads();
        s[t] += v;
        __syncthreads();
    }
    out[base + t] = s[t];
}

// grid = 1, block = 64 (two warps). Per lane: xor-16, down-3, broadcast of lane 5, up-1, ballot of odd
// values, warp_sum, and an atomicAdd of the value into total[0].
extern "C" __global__ void selftest_warp(const int* in, int* out_xor, int* out_down, int* out_bcast, int* out_up,
                                         unsigned* ballot, float* wsum, float* total) {
    const int t = threadIdx.x;
    int v = in[t];
    out_xor[t] = __shfl_xor_sync(FULL_MASK, v, 16);
    out_down[t] = __shfl_down_sync(FULL_MASK, v, 3);
    out_bcast[t] = __shfl_sync(FULL_MASK, v, 5);
    out_up[t] = __shfl_up_sync(FULL_MASK, v, 1);
    ballot[t] = __ballot_sync(FULL_MASK, v & 1);
    wsum[t] = warp_sum((float)v);
    atomicAdd(total, (float)v);
}

// grid = 1, block = 32. D (16x8, f32, row-major) = A (16x16 bf16 row-major) · B, B given K-major as
// Bt (8x16 bf16 row-major, Bt[n][k] = B[k][n]). Fragments loaded directly per the documented layout.
extern "C" __global__ void selftest_mma_direct(const bf16* A, const bf16* Bt, float* D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const u16* a16 = (const u16*)A;
    const u16* b16 = (const u16*)Bt;
    u32 a[4], b[2];
    a[0] = a16[g * 16 + 2 * t] | ((u32)a16[g * 16 + 2 * t + 1] << 16);
    a[1] = a16[(g + 8) * 16 + 2 * t] | ((u32)a16[(g + 8) * 16 + 2 * t + 1] << 16);
    a[2] = a16[g * 16 + 2 * t + 8] | ((u32)a16[g * 16 + 2 * t + 9] << 16);
    a[3] = a16[(g + 8) * 16 + 2 * t + 8] | ((u32)a16[(g + 8) * 16 + 2 * t + 9] << 16);
    b[0] = b16[g * 16 + 2 * t] | ((u32)b16[g * 16 + 2 * t + 1] << 16);
    b[1] = b16[g * 16 + 2 * t + 8] | ((u32)b16[g * 16 + 2 * t + 9] << 16);
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
    mma_bf16_16816(d, a, b, c);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// grid = 1, block = 32. Same product through shared memory and ldmatrix: A with x4, B either from
// Bt (8x16, non-transposed x2) into D1, or from B (16x8 row-major, k-major rows, .trans x2) into D2.
extern "C" __global__ void selftest_mma_ldmatrix(const bf16* A, const bf16* Bt, const bf16* B, float* D1, float* D2) {
    __shared__ __align__(16) u16 sa[16 * 16];
    __shared__ __align__(16) u16 sbt[8 * 16];
    __shared__ __align__(16) u16 sb[16 * 8];
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    for (int i = lane; i < 256; i += 32) sa[i] = ((const u16*)A)[i];
    for (int i = lane; i < 128; i += 32) { sbt[i] = ((const u16*)Bt)[i]; sb[i] = ((const u16*)B)[i]; }
    __syncthreads();
    u32 a[4], b[2], b2[2];
    const int mi = lane >> 3, r = lane & 7;
    ldmatrix_x4(a, &sa[(r + 8 * (mi & 1)) * 16 + 8 * (mi >> 1)]);
    ldmatrix_x2(b, &sbt[r * 16 + 8 * (mi & 1)]);              // lanes 0-15 give addresses
    ldmatrix_x2_trans(b2, &sb[(r + 8 * (mi & 1)) * 8]);      // rows k = 0..7, 8..15 of B
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4], e[4];
    mma_bf16_16816(d, a, b, c);
    mma_bf16_16816(e, a, b2, c);
    D1[g * 8 + 2 * t] = d[0]; D1[g * 8 + 2 * t + 1] = d[1];
    D1[(g + 8) * 8 + 2 * t] = d[2]; D1[(g + 8) * 8 + 2 * t + 1] = d[3];
    D2[g * 8 + 2 * t] = e[0]; D2[g * 8 + 2 * t + 1] = e[1];
    D2[(g + 8) * 8 + 2 * t] = e[2]; D2[(g + 8) * 8 + 2 * t + 1] = e[3];
}
