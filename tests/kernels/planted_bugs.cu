// Planted bugs for the emu sanitizer's tests (tests/emu_check.rs): each kernel has one defect a
// check must catch. build.rs compiles this file into the emu device only (not NVRTC's sources).
#include "common.cuh"

// Copies n floats: correct, for use-after-free and uninitialised inputs.
extern "C" __global__ void planted_copy(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

// memcheck: thread n-1 reads x[n], one past the end.
extern "C" __global__ void planted_oob_read(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + 1];
}

// racecheck: reads a neighbour's shared slot without the __syncthreads between (`sync` = 0), or
// with it (`sync` = 1, the correct kernel). blockDim.x <= 128.
extern "C" __global__ void planted_shared_race(const float* x, float* y, int sync) {
    __shared__ float s[128];
    int t = threadIdx.x, n = blockDim.x;
    s[t] = x[t];
    if (sync) __syncthreads();
    y[t] = s[(t + 1) % n];
}

// synccheck: the two warps of a 64-thread block wait at different __syncthreads.
extern "C" __global__ void planted_divergent_barrier(float* y) {
    int t = threadIdx.x;
    if (t < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[t] = (float)t;
}

// synccheck: lanes 16..31 exit, then the rest shuffle with a full mask.
extern "C" __global__ void planted_shuffle_after_exit(const float* x, float* y) {
    int t = threadIdx.x;
    if (t >= 16) return;
    y[t] = __shfl_xor_sync(FULL_MASK, x[t], 1);
}

// synccheck: half the warp shuffles while the other half votes.
extern "C" __global__ void planted_diverged_collective(const float* x, float* y) {
    int t = threadIdx.x;
    float v = x[t];
    if (t < 16)
        v = __shfl_xor_sync(FULL_MASK, v, 1);
    else
        v = (float)__ballot_sync(FULL_MASK, v > 0.0f);
    y[t] = v;
}

// synccheck: lane 0 waits at __syncthreads, lanes 1..31 at a shuffle that needs lane 0.
extern "C" __global__ void planted_deadlock(const float* x, float* y) {
    int t = threadIdx.x;
    float v = x[t];
    if (t == 0)
        __syncthreads();
    else
        v = __shfl_xor_sync(FULL_MASK, v, 1);
    y[t] = v;
}

// Schedule fuzzing: reads the slot thread t-1 wrote, with no barrier. Correct only when threads
// run in index order (the emu's default schedule); thread 0 reads its own slot.
extern "C" __global__ void planted_order_dependent(const float* x, float* y) {
    __shared__ float s[128];
    int t = threadIdx.x;
    s[t] = x[t];
    y[t] = s[t > 0 ? t - 1 : 0];
}
