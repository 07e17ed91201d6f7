// The emu sanitizer (FCGPU_EMU_CHECK), between the scheduler (runtime.cpp) and the checks
// (check.cpp). Internal to kernels/emu.
#pragma once
#include "cuda_emu.h"

#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace fcemu {
namespace chk {

// Which checks a launch runs (the bits the Rust driver passes to fcemu_launch).
enum : unsigned {
    MEMCHECK = 1,
    INITCHECK = 2,
    RACECHECK = 4,
    SYNCCHECK = 8,
    SHUFFLE = 16,   // schedule fuzzing: fibers resumed in a seeded random order
    INSTRUMENTED = MEMCHECK | INITCHECK | RACECHECK,
};

// What one launch found: at most kMaxLines distinct lines, and a count of all.
struct Sink {
    static constexpr size_t kMaxLines = 12;
    std::mutex m;
    std::vector<std::string> lines;
    std::set<std::string> keys;
    unsigned long long count = 0;
    // `key` deduplicates: one line per kind of fault and place, however many threads hit it.
    void add(const std::string& key, const std::string& line);
    std::string text() const;
};

// Per OS thread, set for the duration of a checked launch.
void worker_begin(Sink* sink, unsigned flags, const char* kernel, const void* stacks_lo, const void* stacks_hi,
                  const void* ctx_lo, const void* ctx_hi, const void* warps_lo, const void* warps_hi);
void worker_end();
void block_begin(unsigned nwarps);
void block_barrier();             // a __syncthreads released: every earlier access is ordered
void warp_release(unsigned warp); // a warp collective released: lanes of that warp are ordered
// A fault of the running thread (fcemu::cur), prefixed with kernel, block and thread.
void report(const char* check, const std::string& key, const std::string& what);
std::string thread_name(unsigned linear);   // "(x,y,z)" of a thread of the running block

}  // namespace chk
}  // namespace fcemu
