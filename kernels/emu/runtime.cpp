// The emu device's scheduler: cooperative fibers (one per CUDA thread) per block, blocks spread
// over OS threads. See cuda_emu.h for the model, check.cpp for the sanitizer (FCGPU_EMU_CHECK).
#include "cuda_emu.h"
#include "check.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

// Fiber context switch. On x86-64 a hand-written switch of the callee-saved registers (no
// signal-mask syscalls, ~100x faster than swapcontext); elsewhere ucontext.
#if defined(__x86_64__)
#define FCEMU_ASM_SWITCH 1
extern "C" void fcemu_switch(void** save_sp, void* new_sp);
asm(R"(
    .text
    .globl fcemu_switch
    .type fcemu_switch,@function
fcemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fcemu_switch, .-fcemu_switch
)");
#endif

namespace fcemu {

thread_local ThreadCtx* cur = nullptr;

namespace {

constexpr size_t kStack = 128 * 1024;

struct Warp {
    int arrived = 0, live = 0;
    unsigned gen = 0;
    unsigned live_mask = 0;
    unsigned mask = 0;          // synccheck: mask and collective of the first lane to arrive
    const char* what = nullptr;
    unsigned long long slots[32];
    alignas(16) unsigned char scratch[32 * 128];
};

// Where a thread waits (synccheck): a __syncthreads at file:line, or a warp collective.
struct Wait {
    const char* what = "";
    const char* file = nullptr;
    int line = 0;
};

struct Worker {
#ifdef FCEMU_ASM_SWITCH
    void* sched_sp = nullptr;
    std::vector<void*> sp;
#else
    ucontext_t sched;
    std::vector<ucontext_t> ctx;
#endif
    std::vector<ThreadCtx> th;
    std::vector<char> done;
    std::vector<Wait> waits;          // synccheck: where each waiting thread waits
    std::vector<unsigned> order;      // the order fibers are resumed in (shuffled when fuzzing)
    std::vector<Warp> warps;
    char* stacks = nullptr;
    size_t nstacks = 0;
    BlockCtx blk;
    int live = 0, bar_arrived = 0;
    unsigned bar_gen = 0;
    unsigned long long progress = 0;
    std::vector<unsigned char> dyn;
    void (*fn)(void**) = nullptr;
    void** args = nullptr;
    const char* name = "";
    int current = -1;
    unsigned flags = 0;               // chk:: bits of this launch
    unsigned long long rng = 0;       // schedule fuzzing
    const char* bar_file = nullptr;   // synccheck: site of the first arrival at the open barrier
    int bar_line = 0;
    ~Worker() {
        if (stacks) munmap(stacks, nstacks * kStack);
    }
};

thread_local Worker* W = nullptr;

void yield() {
#ifdef FCEMU_ASM_SWITCH
    fcemu_switch(&W->sp[W->current], W->sched_sp);
#else
    swapcontext(&W->ctx[W->current], &W->sched);
#endif
}

std::string site(const char* file, int line) {
    const char* slash = std::strrchr(file, '/');
    return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

void warp_released(Worker& w, Warp& wp) {
    wp.arrived = 0;
    wp.gen++;
    wp.what = nullptr;
    if (w.flags & chk::RACECHECK) chk::warp_release((unsigned)(&wp - w.warps.data()));
}

void block_released(Worker& w) {
    w.bar_arrived = 0;
    w.bar_gen++;
    w.bar_file = nullptr;
    if (w.flags & chk::RACECHECK) chk::block_barrier();
}

void release_if_complete(Worker& w, Warp& wp) {
    if (wp.arrived > 0 && wp.arrived >= wp.live) warp_released(w, wp);
}

unsigned long long next_random(unsigned long long& s) {   // splitmix64
    unsigned long long z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// synccheck: the block cannot go on (no fiber made progress); say where every thread is.
std::string deadlock_report(Worker& w, unsigned n) {
    std::string s = "deadlock: no thread can go on;";
    int shown = 0;
    for (unsigned i = 0; i < n && shown < 8; i++) {
        if (w.done[i]) continue;
        const Wait& wt = w.waits[i];
        s += " thread " + chk::thread_name(i) + " waits at " + wt.what;
        if (wt.file) s += " " + site(wt.file, wt.line);
        s += ";";
        shown++;
    }
    s += " (a barrier or warp collective that not every live thread reaches)";
    return s;
}

void fiber_entry(int i) {
    W->fn(W->args);
    Worker* w = W;
    w->done[i] = 1;
    w->live--;
    w->progress++;
    Warp& wp = w->warps[w->th[i].warp];
    wp.live--;
    wp.live_mask &= ~(1u << w->th[i].lane);
    release_if_complete(*w, wp);
    if (w->bar_arrived > 0 && w->bar_arrived >= w->live) block_released(*w);
#ifdef FCEMU_ASM_SWITCH
    void* dead;
    fcemu_switch(&dead, w->sched_sp);   // never resumed
    __builtin_unreachable();
#endif
    // ucontext: returning switches to uc_link (the scheduler)
}

#ifdef FCEMU_ASM_SWITCH
void fiber_start() { fiber_entry(W->current); }
#endif

void run_block(Worker& w, unsigned bx, unsigned by, unsigned bz) {
    unsigned n = w.blk.block.x * w.blk.block.y * w.blk.block.z;
    w.blk.idx = uint3{bx, by, bz};
    unsigned nwarps = (n + 31) / 32;
    for (unsigned i = 0; i < nwarps; i++) {
        Warp& wp = w.warps[i];
        wp.arrived = 0;
        wp.gen = 0;
        wp.live = (int)std::min(32u, n - 32 * i);
        wp.live_mask = wp.live == 32 ? 0xffffffffu : ((1u << wp.live) - 1);
        wp.what = nullptr;
    }
    w.live = (int)n;
    w.bar_arrived = 0;
    w.bar_file = nullptr;
    if (w.flags & chk::RACECHECK) chk::block_begin(nwarps);
    for (unsigned i = 0; i < n; i++) {
        w.done[i] = 0;
#ifdef FCEMU_ASM_SWITCH
        // Initial frame: six callee-saved registers (0), the return address fiber_start, and a
        // zero "return address" for fiber_start so that it is entered with rsp = 8 mod 16.
        unsigned long long* top = (unsigned long long*)(w.stacks + (size_t)(i + 1) * kStack);
        top[-1] = 0;
        top[-2] = (unsigned long long)&fiber_start;
        for (int r = 3; r <= 8; r++) top[-r] = 0;
        w.sp[i] = (void*)(top - 8);
#else
        ucontext_t& c = w.ctx[i];
        getcontext(&c);
        c.uc_stack.ss_sp = w.stacks + (size_t)i * kStack;
        c.uc_stack.ss_size = kStack;
        c.uc_link = &w.sched;
        makecontext(&c, (void (*)())fiber_entry, 1, (int)i);
#endif
    }
    w.order.resize(n);
    for (unsigned i = 0; i < n; i++) w.order[i] = i;
    while (w.live > 0) {
        unsigned long long before = w.progress;
        if (w.flags & chk::SHUFFLE)
            for (unsigned i = n; i > 1; i--) std::swap(w.order[i - 1], w.order[next_random(w.rng) % i]);
        for (unsigned k = 0; k < n; k++) {
            unsigned i = w.order[k];
            if (w.done[i]) continue;
            w.current = (int)i;
            cur = &w.th[i];
#ifdef FCEMU_ASM_SWITCH
            fcemu_switch(&w.sched_sp, w.sp[i]);
#else
            swapcontext(&w.sched, &w.ctx[i]);
#endif
        }
        if (w.live > 0 && w.progress == before && (w.flags & chk::SYNCCHECK)) {
            // Report, and abandon the block's fibers (their stacks are re-initialised next block).
            for (unsigned i = 0; i < n; i++)
                if (!w.done[i]) {
                    cur = &w.th[i];
                    chk::report("synccheck", std::string(w.name) + "/deadlock", deadlock_report(w, n));
                    break;
                }
            break;
        }
        if (w.live > 0 && w.progress == before) {
            std::string msg = std::string("deadlock in kernel ") + w.name +
                              " (threads wait on a barrier that the others never reach)";
            trap(msg.c_str());
        }
    }
    cur = nullptr;
}

}  // namespace

void syncthreads(const char* file, int line) {
    Worker* w = W;
    w->progress++;
    if (w->flags & chk::SYNCCHECK) {
        // Threads that wait at different __syncthreads calls: UB on a GPU, merged by the emu.
        if (!w->bar_file) {
            w->bar_file = file;
            w->bar_line = line;
        } else if (w->bar_line != line || std::strcmp(w->bar_file, file) != 0) {
            chk::report("synccheck", std::string(w->name) + "/divergent-barrier/" + site(file, line),
                        "divergent __syncthreads: this thread is at " + site(file, line) +
                            " while other threads of the block wait at " + site(w->bar_file, w->bar_line));
        }
        w->waits[cur->linear] = Wait{"__syncthreads", file, line};
    }
    unsigned g = w->bar_gen;
    if (++w->bar_arrived >= w->live) {
        block_released(*w);
        return;
    }
    while (w->bar_gen == g) yield();
}

namespace {
std::string mask_hex(unsigned m) {
    char b[16];
    std::snprintf(b, sizeof b, "0x%08x", m);
    return b;
}

void check_collective(Worker& w, Warp& wp, unsigned mask, const char* what) {
    auto key = [&] { return std::string(w.name) + "/" + what; };   // only for a fault
    if (mask & ~wp.live_mask)
        chk::report("synccheck", key() + "/exited",
                    std::string(what) + " with mask " + mask_hex(mask) + " names lanes that exited (live lanes " +
                        mask_hex(wp.live_mask) + ")");
    if (!wp.what) {
        wp.what = what;
        wp.mask = mask;
    } else if (wp.mask != mask || std::strcmp(wp.what, what) != 0) {
        chk::report("synccheck", key() + "/diverged",
                    std::string("diverged warp: this lane calls ") + what + " (mask " + mask_hex(mask) +
                        ") while other lanes of its warp are in " + wp.what + " (mask " + mask_hex(wp.mask) + ")");
    }
    w.waits[cur->linear] = Wait{what, nullptr, 0};
}
}  // namespace

void warp_barrier(unsigned mask, const char* what) {
    Worker* w = W;
    Warp& wp = w->warps[cur->warp];
    w->progress++;
    if (w->flags & chk::SYNCCHECK) check_collective(*w, wp, mask, what);
    unsigned g = wp.gen;
    if (++wp.arrived >= wp.live) {
        warp_released(*w, wp);
        return;
    }
    while (wp.gen == g) yield();
}

unsigned long long* warp_slots() { return W->warps[cur->warp].slots; }
unsigned char* warp_scratch() { return W->warps[cur->warp].scratch; }
unsigned warp_live_mask() { return W->warps[cur->warp].live_mask; }
unsigned char* dyn_smem() { return W->dyn.data(); }

void trap(const char* what) {
    std::fprintf(stderr, "fcgpu emu: %s\n", what);
    std::abort();
}

}  // namespace fcemu

using namespace fcemu;

struct fcemu_kernel {
    const char* name;
    void (*fn)(void**);
};

// Runs one kernel launch to completion. Returns 0, or a negative code for a bad configuration.
// `flags`: chk:: bits (0 for a plain launch); `seed`: schedule fuzzing. Returns -2 when a check
// found faults, with their report (NUL-terminated, truncated to `cap`) in `report`.
extern "C" int fcemu_launch(const fcemu_kernel* k, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned smem_bytes, void** args, unsigned max_threads,
                            unsigned flags, unsigned long long seed, char* report, size_t cap) {
    unsigned n = bx * by * bz;
    if (n == 0 || n > 1024 || gx == 0 || gy == 0 || gz == 0) return -1;
    unsigned long long nblocks = (unsigned long long)gx * gy * gz;
    unsigned hw = std::thread::hardware_concurrency();
    if (hw == 0) hw = 1;
    if (max_threads > 0 && max_threads < hw) hw = max_threads;
    unsigned nw = (unsigned)std::min<unsigned long long>(hw, nblocks);
    std::atomic<unsigned long long> next(0);
    chk::Sink sink;
    auto work = [&]() {
        Worker w;
        w.flags = flags;
        w.waits.resize(flags & chk::SYNCCHECK ? n : 0);
        w.fn = k->fn;
        w.args = args;
        w.name = k->name;
        w.blk.grid = dim3{gx, gy, gz};
        w.blk.block = dim3{bx, by, bz};
#ifdef FCEMU_ASM_SWITCH
        w.sp.resize(n);
#else
        w.ctx.resize(n);
#endif
        w.th.resize(n);
        w.done.resize(n);
        w.warps.resize((n + 31) / 32);
        w.dyn.assign(smem_bytes + 16, 0);
        w.nstacks = n;
        void* st = mmap(nullptr, n * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (st == MAP_FAILED) trap("cannot map fiber stacks");
        w.stacks = (char*)st;
        for (unsigned i = 0; i < n; i++) {
            ThreadCtx& t = w.th[i];
            t.tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
            t.linear = i;
            t.lane = i & 31;
            t.warp = i >> 5;
            t.blk = &w.blk;
        }
        W = &w;
        if (flags)
            chk::worker_begin(&sink, flags, k->name, w.stacks, w.stacks + n * kStack, w.th.data(), w.th.data() + n,
                              w.warps.data(), w.warps.data() + w.warps.size());
        for (;;) {
            unsigned long long b = next.fetch_add(1);
            if (b >= nblocks) break;
            w.rng = seed ^ (b * 0x2545f4914f6cdd1dull);
            run_block(w, (unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / ((unsigned long long)gx * gy)));
        }
        if (flags) chk::worker_end();
        W = nullptr;
    };
    std::vector<std::thread> pool;
    for (unsigned i = 1; i < nw; i++) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    if (sink.count == 0) return 0;
    if (cap > 0) std::snprintf(report, cap, "%s", sink.text().c_str());
    return -2;
}
