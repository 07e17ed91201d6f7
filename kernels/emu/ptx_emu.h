// CPU implementations of the inline-PTX wrappers of kernels/ptx.cuh, from the PTX ISA semantics
// stated there. Each is a warp collective: lanes publish their operands in the warp's scratch,
// rendezvous, compute their own result from everyone's operands, and rendezvous again.
// Runtime names are qualified from the global namespace (::fcemu): build.rs compiles the checked
// copy of each kernel file inside a namespace of its own.
#pragma once

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)(unsigned long long)p; }

namespace fcemu_ptx {
inline float bf16_lo(u32 r) { return __uint_as_float(r << 16); }
inline float bf16_hi(u32 r) { return __uint_as_float(r & 0xffff0000u); }
inline float bf16_half(u32 r, int h) { return h ? bf16_hi(r) : bf16_lo(r); }
}  // namespace fcemu_ptx

__device__ __forceinline__ void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2], const float c[4]) {
    struct Frag { u32 a[4], b[2]; };
    Frag* s = (Frag*)::fcemu::warp_scratch();
    unsigned lane = ::fcemu::cur->lane;
    for (int i = 0; i < 4; i++) s[lane].a[i] = a[i];
    for (int i = 0; i < 2; i++) s[lane].b[i] = b[i];
    ::fcemu::warp_barrier(0xffffffffu, "mma.sync");
    int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; e++) {
        int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; k++) {
            // A[row][k]: lane (row%8)*4 + (k%8)/2, reg (row>=8) + 2*(k>=8), half k%2
            const Frag& fa = s[(row & 7) * 4 + ((k & 7) >> 1)];
            float av = fcemu_ptx::bf16_half(fa.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
            // B[k][col]: lane col*4 + (k%8)/2, reg (k>=8), half k%2
            const Frag& fb = s[col * 4 + ((k & 7) >> 1)];
            float bv = fcemu_ptx::bf16_half(fb.b[k >= 8 ? 1 : 0], k & 1);
            acc += av * bv;
        }
        out[e] = acc;
    }
    ::fcemu::warp_barrier(0xffffffffu, "mma.sync");
    for (int e = 0; e < 4; e++) d[e] = out[e];
}

namespace fcemu_ptx {
template <int N, bool TRANS> inline void ldmatrix(u32* r, const void* p) {
    const u16** addr = (const u16**)::fcemu::warp_scratch();
    unsigned lane = ::fcemu::cur->lane;
    addr[lane] = (const u16*)p;
    ::fcemu::warp_barrier(0xffffffffu, "ldmatrix");
    u32 out[N];
    for (int i = 0; i < N; i++) {
        if (!TRANS) {
            const u16* row = addr[8 * i + (lane >> 2)];
            out[i] = (u32)row[2 * (lane & 3)] | ((u32)row[2 * (lane & 3) + 1] << 16);
        } else {
            const u16* r0 = addr[8 * i + 2 * (lane & 3)];
            const u16* r1 = addr[8 * i + 2 * (lane & 3) + 1];
            out[i] = (u32)r0[lane >> 2] | ((u32)r1[lane >> 2] << 16);
        }
    }
    ::fcemu::warp_barrier(0xffffffffu, "ldmatrix");
    for (int i = 0; i < N; i++) r[i] = out[i];
}
}  // namespace fcemu_ptx

__device__ __forceinline__ void ldmatrix_x1(u32 r[1], const void* p) { fcemu_ptx::ldmatrix<1, false>(r, p); }
__device__ __forceinline__ void ldmatrix_x2(u32 r[2], const void* p) { fcemu_ptx::ldmatrix<2, false>(r, p); }
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* p) { fcemu_ptx::ldmatrix<4, false>(r, p); }
__device__ __forceinline__ void ldmatrix_x1_trans(u32 r[1], const void* p) { fcemu_ptx::ldmatrix<1, true>(r, p); }
__device__ __forceinline__ void ldmatrix_x2_trans(u32 r[2], const void* p) { fcemu_ptx::ldmatrix<2, true>(r, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* p) { fcemu_ptx::ldmatrix<4, true>(r, p); }
