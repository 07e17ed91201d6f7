// Every inline-PTX instruction fcgpu uses, each in one small wrapper with its semantics stated.
// kernels/emu/ptx_emu.h re-implements each wrapper on the CPU from these statements, so a kernel
// that goes through these wrappers runs unchanged on the emu device.
#pragma once
#include "common.cuh"

#ifdef FCGPU_EMU
#include "emu/ptx_emu.h"
#else

// Shared-memory address (32-bit, .shared window) of a generic pointer into __shared__ memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D(16x8) = A(16x16) * B(16x8) + C.
// Warp-collective. Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane >> 2 (group) and t = lane & 3 (thread in group):
//   A (row-major 16x16 bf16), 4 regs of bf16x2: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1],
//     a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]   (low half = lower column index)
//   B ("col": stored K-major, 16x8 bf16), 2 regs: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D (16x8 f32), 4 regs: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
__device__ __forceinline__ void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// ldmatrix.sync.aligned.m8n8.xN.shared.b16: warp-collective load of N 8x8 b16 matrices from
// shared memory. Lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes each,
// 16-byte aligned; for x1 lanes 0-7, x2 lanes 0-15 are used). Lane l receives, in register i,
// row l/4, elements 2(l%4), 2(l%4)+1 of matrix i. The .trans form delivers the transpose:
// register i of lane l holds elements [2(l%4)][l/4] and [2(l%4)+1][l/4] of matrix i.
__device__ __forceinline__ void ldmatrix_x1(u32 r[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(u32 r[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(u32 r[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(u32 r[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

#endif
