// The emu sanitizer (FCGPU_EMU_CHECK): what compute-sanitizer's memcheck, initcheck and racecheck
// do on a GPU, done on the CPU.
//
// The checked copy of every kernel is compiled with GCC's -fsanitize=kernel-address and
// --param asan-instrumentation-with-call-threshold=0, so each load and store of kernel code calls
// __asan_{load,store}{1,2,4,8,16,N}_noabort(address). Those callbacks are defined here (no ASan
// runtime is linked) and sort the address:
//  - in the checked arena: device memory. memcheck finds the allocation the address falls in
//    (a page table, lock-free) and reports out-of-bounds and use-after-free; initcheck keeps one
//    shadow byte per byte (written or not) and reports a read of bytes never written;
//  - in the fibers' stacks or the scheduler's thread/block records: private, not checked;
//  - anything else a kernel touches is shared memory (static __shared__ variables are
//    thread_local, dynamic shared memory is the block's buffer, the warp exchange slots are the
//    runtime's): racecheck remembers, per byte and between two barriers, the last writer and up
//    to two readers, and reports two threads that touch a byte with at least one write, unless
//    they are lanes of one warp with a warp collective between them.
// Device memory in the arena is never reused (freed pages are returned to the OS but their
// addresses stay reserved), so every use-after-free is caught; each allocation has a guard page
// before and a guard zone after it, so an access just outside is attributed to its allocation.
#include "check.h"

#include <sys/mman.h>

#include <atomic>
#include <cinttypes>

namespace fcemu {
namespace chk {

namespace {

constexpr uintptr_t kPage = 4096;
constexpr uintptr_t kArenaBytes = uintptr_t(256) << 30;   // address space only (MAP_NORESERVE)
constexpr size_t kMaxAllocs = size_t(1) << 24;
constexpr unsigned char kPoison = 0xff;                   // f32/bf16 NaN, int -1

struct Alloc {
    uintptr_t base = 0;
    size_t bytes = 0;
    std::atomic<int> freed{0};
};

struct Arena {
    uintptr_t base = 0, shadow = 0, next = 0;
    std::atomic<uint32_t>* page_owner = nullptr;   // page -> allocation id (0: none)
    Alloc* allocs = nullptr;
    uint32_t nallocs = 0;
    std::mutex m;
    bool ok = false;
};

void* reserve(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

Arena& arena() {
    static Arena a;
    static std::once_flag once;
    std::call_once(once, [] {
        void* base = reserve(kArenaBytes);
        void* shadow = reserve(kArenaBytes);
        void* owners = reserve(kArenaBytes / kPage * sizeof(uint32_t));
        void* allocs = reserve(kMaxAllocs * sizeof(Alloc));
        if (!base || !shadow || !owners || !allocs) return;
        a.base = a.next = (uintptr_t)base;
        a.shadow = (uintptr_t)shadow;
        a.page_owner = (std::atomic<uint32_t>*)owners;
        a.allocs = (Alloc*)allocs;   // zero pages: every Alloc starts as {0, 0, 0}
        a.ok = true;
    });
    return a;
}

bool in_arena(uintptr_t p) {
    Arena& a = arena();
    return p - a.base < kArenaBytes;
}

unsigned char* shadow_of(uintptr_t p) {
    Arena& a = arena();
    return (unsigned char*)(a.shadow + (p - a.base));
}

uintptr_t round_up(uintptr_t x, uintptr_t m) { return (x + m - 1) / m * m; }

// One shared-memory byte's accesses since the last barrier: last writer and up to two readers
// (thread index + 1, 0 = none), each with its warp's collective count at the time.
struct Cell {
    unsigned writer = 0, wgen = 0;
    unsigned reader[2] = {0, 0}, rgen[2] = {0, 0};
};

// The cells of one block since its last barrier: open addressing, emptied in O(1) by bumping the
// epoch (a barrier empties it, and barriers are frequent).
class Cells {
    struct Slot {
        uintptr_t key = 0;
        unsigned epoch = 0;
        Cell cell;
    };
    std::vector<Slot> tab_ = std::vector<Slot>(1 << 12);
    unsigned epoch_ = 1;
    size_t used_ = 0;

    static size_t hash(uintptr_t k) { return (size_t)((k * 0x9e3779b97f4a7c15ull) >> 20); }
    void grow() {
        std::vector<Slot> old(tab_.size() * 2);
        old.swap(tab_);
        used_ = 0;
        for (auto& s : old)
            if (s.epoch == epoch_) at(s.key) = s.cell;
    }

  public:
    void clear() {
        if (++epoch_ == 0) {   // wrapped: really empty the table once in 2^32 barriers
            for (auto& s : tab_) s.epoch = 0;
            epoch_ = 1;
        }
        used_ = 0;
    }
    Cell& at(uintptr_t k) {
        if (2 * (used_ + 1) > tab_.size()) grow();
        size_t m = tab_.size() - 1, h = hash(k) & m;
        while (tab_[h].epoch == epoch_ && tab_[h].key != k) h = (h + 1) & m;
        Slot& s = tab_[h];
        if (s.epoch != epoch_) {
            s.epoch = epoch_;
            s.key = k;
            s.cell = Cell{};
            used_++;
        }
        return s.cell;
    }
};

struct Range {
    uintptr_t lo = 0, hi = 0;
    bool has(uintptr_t p) const { return p - lo < hi - lo; }
};

struct Tls {
    Sink* sink = nullptr;
    unsigned flags = 0;
    const char* kernel = "";
    Range stacks, ctx, warps;   // private to a fiber, the scheduler's records, the runtime's warp slots
    Cells cells;
    std::vector<unsigned> wgen;
};

thread_local Tls T;

std::string hex(uintptr_t v) {
    char b[32];
    std::snprintf(b, sizeof b, "0x%" PRIxPTR, v);
    return b;
}

// Whether an access by thread `me` is ordered after an earlier one by `other` (both linear
// indices) made when `other`'s warp had done `gen` collectives.
bool ordered(unsigned me, unsigned other, unsigned gen) {
    if (other == me) return true;
    if ((other >> 5) != (me >> 5)) return false;
    return T.wgen[me >> 5] != gen;
}

void race(uintptr_t addr, unsigned other, bool other_wrote, bool write) {
    std::string kind = std::string(write ? "write" : "read") + " after " + (other_wrote ? "write" : "read");
    std::string what = kind + " of shared byte " + hex(addr) + ": thread " + thread_name(cur->linear) +
                       (write ? " writes" : " reads") + " it, thread " + thread_name(other) +
                       (other_wrote ? " wrote" : " read") + " it since the last __syncthreads";
    report("racecheck", std::string(T.kernel) + "/race/" + kind + "/" + std::to_string(addr), what);
}

void shared_access(uintptr_t addr, size_t n, bool write) {
    unsigned me = cur->linear, gen = T.wgen[me >> 5];
    for (size_t i = 0; i < n; i++) {
        Cell& c = T.cells.at(addr + i);
        if (c.writer && !ordered(me, c.writer - 1, c.wgen)) {
            race(addr + i, c.writer - 1, true, write);
            return;
        }
        if (write) {
            for (int r = 0; r < 2; r++)
                if (c.reader[r] && !ordered(me, c.reader[r] - 1, c.rgen[r])) {
                    race(addr + i, c.reader[r] - 1, false, true);
                    return;
                }
            c = Cell{};
            c.writer = me + 1;
            c.wgen = gen;
        } else {
            int slot = c.reader[0] == me + 1 || !c.reader[0] ? 0 : 1;
            c.reader[slot] = me + 1;
            c.rgen[slot] = gen;
        }
    }
}

// memcheck and initcheck of `n` bytes at `p` in the arena. Returns "" or what is wrong.
std::string device_fault(uintptr_t p, size_t n, bool read, bool write, unsigned flags) {
    Arena& a = arena();
    uint32_t id = a.page_owner[(p - a.base) / kPage].load(std::memory_order_acquire);
    if (id == 0) {
        if (flags & MEMCHECK) return "address " + hex(p) + " is in no allocation (wild pointer)";
        return "";
    }
    const Alloc& al = a.allocs[id];
    long long off = (long long)(p - al.base);
    auto where = [&] {   // built only for a fault: this runs on every access
        return "at offset " + std::to_string(off) + " of a " + std::to_string(al.bytes) + "-byte allocation";
    };
    if (flags & MEMCHECK) {
        if (al.freed.load(std::memory_order_acquire)) return where() + " that was freed (use after free)";
        if (off < 0 || (unsigned long long)off + n > al.bytes) return where() + " (out of bounds)";
    }
    if (!(flags & INITCHECK) || off < 0 || (unsigned long long)off + n > al.bytes) return "";
    unsigned char* s = shadow_of(p);
    if (read) {
        for (size_t i = 0; i < n; i++)
            if (!s[i])
                return where() + ": byte " + std::to_string(off + (long long)i) + " was never written (uninitialized)";
    }
    if (write) std::memset(s, 1, n);
    return "";
}

void access(uintptr_t p, size_t n, bool read, bool write, bool atomic) {
    if (!T.sink || !cur) return;
    if (in_arena(p)) {
        std::string f = device_fault(p, n, read, write, T.flags);
        if (!f.empty()) {
            const char* check = f.find("uninitialized") != std::string::npos ? "initcheck" : "memcheck";
            std::string op = std::string(atomic ? "atomic " : "") + (write && !read ? "write" : "read") + " of " +
                             std::to_string(n) + " bytes ";
            report(check, std::string(T.kernel) + "/" + check + "/" + f.substr(0, f.find(':')), op + f);
        }
        return;
    }
    if (!(T.flags & RACECHECK) || atomic) return;
    if (T.stacks.has(p) || T.ctx.has(p) || T.warps.has(p)) return;
    if (p == (uintptr_t)&cur) return;
    shared_access(p, n, write);
}

}  // namespace

void Sink::add(const std::string& key, const std::string& line) {
    std::lock_guard<std::mutex> g(m);
    count++;
    if (keys.insert(key).second && lines.size() < kMaxLines) lines.push_back(line);
}

std::string Sink::text() const {
    std::string s;
    for (auto& l : lines) s += l + "\n";
    if (count > lines.size())
        s += "(" + std::to_string(count) + " faults in all, " + std::to_string(lines.size()) + " shown)\n";
    return s;
}

void worker_begin(Sink* sink, unsigned flags, const char* kernel, const void* stacks_lo, const void* stacks_hi,
                  const void* ctx_lo, const void* ctx_hi, const void* warps_lo, const void* warps_hi) {
    T.sink = sink;
    T.flags = flags;
    T.kernel = kernel;
    T.stacks = Range{(uintptr_t)stacks_lo, (uintptr_t)stacks_hi};
    T.ctx = Range{(uintptr_t)ctx_lo, (uintptr_t)ctx_hi};
    // The exchange slots of shuffles and the PTX wrappers: the runtime's, ordered by its own
    // rendezvous (a race there would be an emu bug, not a kernel's).
    T.warps = Range{(uintptr_t)warps_lo, (uintptr_t)warps_hi};
}

void worker_end() {
    T.sink = nullptr;
    T.cells.clear();
}

void block_begin(unsigned nwarps) {
    T.cells.clear();
    T.wgen.assign(nwarps, 0);
}

void block_barrier() { T.cells.clear(); }

void warp_release(unsigned warp) {
    if (warp < T.wgen.size()) T.wgen[warp]++;
}

std::string thread_name(unsigned linear) {
    const dim3& b = cur->blk->block;
    return "(" + std::to_string(linear % b.x) + "," + std::to_string(linear / b.x % b.y) + "," +
           std::to_string(linear / (b.x * b.y)) + ")";
}

void report(const char* check, const std::string& key, const std::string& what) {
    if (!T.sink) return;
    const uint3& bi = cur->blk->idx;
    std::string line = std::string(check) + ": kernel " + T.kernel + ", block (" + std::to_string(bi.x) + "," +
                       std::to_string(bi.y) + "," + std::to_string(bi.z) + "), thread " +
                       thread_name(cur->linear) + ": " + what;
    T.sink->add(key, line);
}

}  // namespace chk

void chk_atomic(const void* p, unsigned bytes) { chk::access((uintptr_t)p, bytes, true, true, true); }

}  // namespace fcemu

using fcemu::chk::access;

// The instrumentation's callbacks (GCC -fsanitize=kernel-address -fsanitize-recover=...).
extern "C" {
#define FCEMU_HOOKS(n)                                                                           \
    void __asan_load##n##_noabort(uintptr_t p) { access(p, n, true, false, false); }             \
    void __asan_store##n##_noabort(uintptr_t p) { access(p, n, false, true, false); }
FCEMU_HOOKS(1)
FCEMU_HOOKS(2)
FCEMU_HOOKS(4)
FCEMU_HOOKS(8)
FCEMU_HOOKS(16)
void __asan_loadN_noabort(uintptr_t p, size_t n) { access(p, n, true, false, false); }
void __asan_storeN_noabort(uintptr_t p, size_t n) { access(p, n, false, true, false); }
void __asan_handle_no_return() {}

// Device memory of a checked emu device: `bytes` poisoned bytes (never written as far as
// initcheck knows), or null when the arena is exhausted.
void* fcemu_chk_alloc(size_t bytes) {
    using namespace fcemu::chk;
    Arena& a = arena();
    if (!a.ok) return nullptr;
    std::lock_guard<std::mutex> g(a.m);
    uintptr_t data = round_up(bytes ? bytes : 1, kPage);
    uintptr_t guard = std::max<uintptr_t>(kPage, round_up(data / 4, kPage));
    uintptr_t span = kPage + data + guard;
    if (a.next + span > a.base + kArenaBytes || a.nallocs + 1 >= kMaxAllocs) return nullptr;
    uint32_t id = ++a.nallocs;
    uintptr_t base = a.next + kPage;
    a.allocs[id].base = base;
    a.allocs[id].bytes = bytes;
    for (uintptr_t pg = (a.next - a.base) / kPage, e = pg + span / kPage; pg < e; pg++)
        a.page_owner[pg].store(id, std::memory_order_release);
    a.next += span;
    std::memset((void*)base, kPoison, bytes);
    return (void*)base;
}

void fcemu_chk_free(void* p) {
    using namespace fcemu::chk;
    Arena& a = arena();
    uintptr_t q = (uintptr_t)p;
    if (!in_arena(q)) return;
    uint32_t id = a.page_owner[(q - a.base) / kPage].load(std::memory_order_acquire);
    if (!id) return;
    Alloc& al = a.allocs[id];
    al.freed.store(1, std::memory_order_release);
    size_t span = round_up(al.bytes ? al.bytes : 1, kPage);
    madvise((void*)al.base, span, MADV_DONTNEED);   // the memory goes back; the addresses stay taken
    madvise(shadow_of(al.base), span, MADV_DONTNEED);
}

// Host writes (upload, memset): the bytes are initialised.
void fcemu_chk_mark(const void* p, size_t n) {
    using namespace fcemu::chk;
    if (in_arena((uintptr_t)p)) std::memset(shadow_of((uintptr_t)p), 1, n);
}

// Device-to-device copy: the destination is as initialised as the source.
void fcemu_chk_copy_shadow(const void* src, void* dst, size_t n) {
    using namespace fcemu::chk;
    if (in_arena((uintptr_t)src) && in_arena((uintptr_t)dst))
        std::memmove(shadow_of((uintptr_t)dst), shadow_of((uintptr_t)src), n);
    else
        fcemu_chk_mark(dst, n);
}

// A host-side access by the device (the CPU GEMM): writes into `msg` and returns 1 when the
// range is out of bounds, freed or (`read` with initcheck) not initialised; `write` marks it.
int fcemu_chk_range(const void* p, size_t n, int read, int write, unsigned flags, char* msg, size_t cap) {
    using namespace fcemu::chk;
    if (!in_arena((uintptr_t)p) || n == 0) return 0;
    std::string f = device_fault((uintptr_t)p, n, read, write, flags);
    if (f.empty()) return 0;
    std::snprintf(msg, cap, "%s", f.c_str());
    return 1;
}
}
