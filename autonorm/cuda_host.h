// CUDA's execution model on the CPU, for the CuPy kernels of templates/cupy (autonorm/cuda_host.py builds and runs them).
//
// Every thread of a block is a fiber (ucontext) on one OS thread; a seeded PRNG picks the next runnable fiber,
// so two seeds are two legal schedules: seed 0 picks uniformly (threads advance together), every other seed
// gives each thread a random priority and runs the highest runnable one, now and then drawing a running thread's
// priority anew (so some warps run far ahead of others, as a race needs to show). Fibers switch only where CUDA threads synchronize: __syncthreads, warp
// shuffles and __syncwarp, the cluster barrier, cp.async's wait. The blocks of one thread-block cluster run
// together, each with its own shared memory; clusters run one after another. Shared memory is poisoned (0xFF:
// NaN in fp32, fp16 and bf16) at block start, and a cp.async destination until its wait, so a read before the
// write shows up in the result. What no GPU would run stops the process with one line on stderr and an exit
// code per kind of error (AN_EXIT_*), which cuda_host.py turns into an exception.
#pragma once
#ifndef AN_HOST
#define AN_HOST 1
#endif

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <random>
#include <typeinfo>
#include <utility>
#include <vector>

namespace an_host {

enum Exit {  // mirrored in cuda_host.py
    AN_EXIT_DEADLOCK = 20,       // every live thread waits, or a thread exits while others wait at a barrier
    AN_EXIT_BARRIER_LINES = 21,  // one block's threads wait at __syncthreads of two source lines
    AN_EXIT_EXITED_BLOCK = 22,   // a read of the shared memory of a cluster block that has exited
    AN_EXIT_LAUNCH_RULE = 23,    // shared memory over what the launch may use
    AN_EXIT_WARP = 24,           // a shuffle's mask or source lane no GPU would accept
    AN_EXIT_FAULT = 25,          // SIGSEGV / SIGBUS: a guard page (past a tensor or dynamic shared memory)
};

[[noreturn]] inline void fail(int code, const char* fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
    _exit(code);
}

struct uint3 { unsigned x = 0, y = 0, z = 0; };

}  // namespace an_host

// The built-in variables: the scheduler sets them before it switches to a thread.
inline an_host::uint3 threadIdx, blockIdx, blockDim, gridDim;

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __align__(n) alignas(n)
#define __syncthreads() an_host::sync_block(__LINE__)

// ---- 16-bit floats: storage types with the hardware's round-to-nearest-even conversions ----
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };

inline float an_bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t an_float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.x & 0x8000) << 16, e = (h.x >> 10) & 0x1f, m = h.x & 0x3ff;
    if (e == 0) return an_bits_float(sign) + (sign ? -1.f : 1.f) * std::ldexp(float(m), -24);
    if (e == 31) return an_bits_float(sign | 0x7f800000u | (m << 13));
    return an_bits_float(sign | ((e + 112) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
    const uint32_t u = an_float_bits(f), sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u) h = 0x7e00;                  // NaN
    else if (a >= 0x477ff000u) h = 0x7c00;            // 65520 and up round to infinity (and infinity)
    else if (a < 0x38800000u) h = (uint32_t)std::nearbyint(an_bits_float(a) * 16777216.f);  // subnormal: units of 2^-24
    else {
        h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ff);
        const uint32_t rest = a & 0x1fff;
        if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // ties to even; a carry moves into the exponent
    }
    return __half{(unsigned short)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return an_bits_float(uint32_t(b.x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = an_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};  // quiet NaN
    return __nv_bfloat16{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1)) >> 16)};
}

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }

namespace an_host {

// ---- scheduler state ----
enum class State { runnable, blocked, done };

struct Copy { void* dst; const void* src; unsigned bytes; };

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int block = 0;            // its block's index in the cluster
    State state = State::runnable;
    const char* waits = "";   // what it is blocked on, for the deadlock message
    int line = 0;
    uint64_t priority = 0;
    unsigned shuffles = 0;    // warp collectives done (its rendezvous generation)
    unsigned arrived = 0;     // cluster barrier arrivals
    std::vector<Copy> copies;  // cp.async in flight
};

struct Warp {
    uint64_t value[2][32];
    int count[2] = {0, 0}, read[2] = {0, 0};
    unsigned mask[2] = {0, 0};
    std::vector<Fiber*> waiting[2];
};

struct Site { const char* name; size_t bytes; };
inline std::vector<Site>& sites() { static std::vector<Site> s; return s; }

struct Block {
    uint3 idx;
    std::vector<unsigned char> statics;       // static shared memory, one slot per declaration site
    std::vector<std::pair<int, size_t>> slots;  // (site, offset in statics)
    unsigned char* dynamic = nullptr;         // dynamic shared memory: its end abuts a guard page
    int live = 0;
    bool exited = false;
    int bar_count = 0, bar_line = 0;
    std::vector<Fiber*> bar_waiting;
    std::vector<Warp> warps;
};

struct Launch {  // filled by cuda_host.py (ctypes), field for field
    unsigned grid, block, cluster, first_block;
    long long dynamic_smem;
    long long static_smem;       // what the compiler allocates (cuda_host.py: the audit's number, else the sites')
    long long max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize, or -1 when not set
    long long smem_optin;        // the device's per-block maximum with the opt-in
    unsigned long long seed;
    void** args;
};

struct Scheduler {
    const Launch* launch = nullptr;
    void (*body)(void** args) = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Block> blocks;
    std::vector<Fiber*> runnable;
    std::vector<int> cluster_count;                  // cluster barrier: arrivals per phase
    std::vector<std::vector<Fiber*>> cluster_waiting;
    unsigned cluster_threads = 0;
    ucontext_t main;
    Fiber* cur = nullptr;
    std::mt19937_64 rng;
    bool by_priority = false;
    unsigned char* stacks = nullptr;
    size_t stack_bytes = 0, page = 0;
};
inline Scheduler* g = nullptr;

inline Block& my_block() { return g->blocks[g->cur->block]; }
inline unsigned lin(const uint3& t) { return t.x; }  // the templates launch 1-D blocks

inline bool lower(const Fiber* a, const Fiber* b) { return a->priority < b->priority; }

inline void make_runnable(Fiber* f) {
    f->state = State::runnable;
    g->runnable.push_back(f);
    if (g->by_priority) std::push_heap(g->runnable.begin(), g->runnable.end(), lower);
}

inline Fiber* next_runnable() {
    Fiber* f;
    if (g->by_priority) {
        std::pop_heap(g->runnable.begin(), g->runnable.end(), lower);
        f = g->runnable.back();
    } else {
        const size_t k = g->rng() % g->runnable.size();
        f = g->runnable[k];
        g->runnable[k] = g->runnable.back();
    }
    g->runnable.pop_back();
    return f;
}

// Back to the scheduler: still runnable (a switch point that did not block) or blocked until released.
inline void switch_out(bool blocked, const char* what = "", int line = 0) {
    Fiber* f = g->cur;
    if (g->by_priority && g->rng() % 64 == 0) f->priority = g->rng();
    if (blocked) { f->state = State::blocked; f->waits = what; f->line = line; }
    else make_runnable(f);
    swapcontext(&f->ctx, &g->main);
}

// ---- shared memory ----
inline void check_smem_rule() {
    const Launch& L = *g->launch;
    const long long static_bytes = L.static_smem;
    if (L.max_dynamic_smem < 0) {
        if (static_bytes + L.dynamic_smem > 48 * 1024)
            fail(AN_EXIT_LAUNCH_RULE, "launch rule: %lld bytes of static + %lld of dynamic shared memory exceed 48 KiB "
                 "without the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize)", static_bytes, L.dynamic_smem);
    } else if (L.dynamic_smem > L.max_dynamic_smem) {
        fail(AN_EXIT_LAUNCH_RULE, "launch rule: %lld bytes of dynamic shared memory over the %lld opted in",
             L.dynamic_smem, L.max_dynamic_smem);
    } else if (static_bytes + L.max_dynamic_smem > L.smem_optin) {
        fail(AN_EXIT_LAUNCH_RULE, "launch rule: %lld bytes of static + %lld of opted-in dynamic shared memory exceed the "
             "device's %lld a block", static_bytes, L.max_dynamic_smem, L.smem_optin);
    }
}

inline unsigned char* static_slot(int site) {
    Block& b = my_block();
    for (auto& [s, off] : b.slots)
        if (s == site) return b.statics.data() + off;
    const size_t off = (b.statics.size() + 15) / 16 * 16;
    if (off + sites()[site].bytes > b.statics.capacity())  // growing would move the arrays declared before
        fail(AN_EXIT_LAUNCH_RULE, "launch rule: over %zu bytes of static shared memory", b.statics.capacity());
    b.statics.resize(off + sites()[site].bytes, 0xFF);  // poisoned until written
    b.slots.push_back({site, off});
    return b.statics.data() + off;
}

// One registration per declaration site, made when the library loads (cuda_host.py reads the sizes before a launch).
template <class S> struct SiteId {
    static inline const int id = (sites().push_back({typeid(S).name(), S::bytes()}), int(sites().size()) - 1);
};
template <class U, class S> U* shared_array() { return reinterpret_cast<U*>(static_slot(SiteId<S>::id)); }

// ---- barriers and warp collectives ----
inline void sync_block(int line) {
    Block& b = my_block();
    if (b.bar_count && b.bar_line != line)
        fail(AN_EXIT_BARRIER_LINES, "barrier divergence: threads of block %u wait at __syncthreads of line %d and "
             "line %d", b.idx.x, b.bar_line, line);
    b.bar_line = line;
    b.bar_waiting.push_back(g->cur);
    if (++b.bar_count == b.live) {
        for (Fiber* f : b.bar_waiting) if (f != g->cur) make_runnable(f);
        b.bar_waiting.clear();
        b.bar_count = 0;
        switch_out(false);
    } else {
        switch_out(true, "__syncthreads", line);
    }
}

// All lanes of `mask` exchange a value: lane i gets the value of lane src(i). Two buffers by generation parity:
// a lane writes generation k + 2 only after every lane has arrived at k + 1, so after each has read k.
template <class V, class Src> V warp_exchange(unsigned mask, V v, Src src, const char* what) {
    static_assert(sizeof(V) <= 8, "a shuffle moves 32 or 64 bits");
    Fiber* f = g->cur;
    Block& b = my_block();
    const unsigned lane = lin(f->tid) & 31, w = lin(f->tid) >> 5;
    const unsigned lanes = std::min(32u, blockDim.x - w * 32);
    const unsigned present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    if (!(mask >> lane & 1) || (mask & ~present))
        fail(AN_EXIT_WARP, "%s: mask 0x%08x in lane %u of warp %u (lanes present 0x%08x)", what, mask, lane, w, present);
    Warp& wp = b.warps[w];
    const int p = f->shuffles & 1;
    if (wp.count[p] == 0) wp.mask[p] = mask;
    else if (wp.mask[p] != mask)
        fail(AN_EXIT_WARP, "%s: lanes of warp %u of block %u use masks 0x%08x and 0x%08x", what, w, b.idx.x,
             wp.mask[p], mask);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    wp.value[p][lane] = bits;
    wp.waiting[p].push_back(f);
    if (++wp.count[p] == __builtin_popcount(mask)) {
        for (Fiber* o : wp.waiting[p]) if (o != f) make_runnable(o);
        wp.waiting[p].clear();
        switch_out(false);
    } else {
        switch_out(true, what, 0);
    }
    const unsigned from = src(lane);
    if (from < 32 && !(mask >> from & 1))
        fail(AN_EXIT_WARP, "%s: lane %u reads lane %u, outside mask 0x%08x", what, lane, from, mask);
    V out = v;  // a source outside the warp leaves the value as is (CUDA's rule for out-of-range lanes)
    if (from < 32) std::memcpy(&out, &wp.value[p][from], sizeof(V));
    if (++wp.read[p] == __builtin_popcount(mask)) { wp.count[p] = 0; wp.read[p] = 0; }
    ++f->shuffles;
    return out;
}

// ---- thread-block clusters ----
inline void cluster_arrive() {
    Fiber* f = g->cur;
    const unsigned phase = f->arrived++;
    if (g->cluster_count.size() <= phase) { g->cluster_count.resize(phase + 1, 0); g->cluster_waiting.resize(phase + 1); }
    if (++g->cluster_count[phase] == (int)g->cluster_threads) {
        for (Fiber* o : g->cluster_waiting[phase]) make_runnable(o);
        g->cluster_waiting[phase].clear();
    }
}

inline void cluster_wait() {
    Fiber* f = g->cur;
    if (f->arrived == 0) fail(AN_EXIT_DEADLOCK, "barrier.cluster.wait without an arrive (thread %u of block %u)",
                              lin(f->tid), my_block().idx.x);
    const unsigned phase = f->arrived - 1;
    if (g->cluster_count[phase] == (int)g->cluster_threads) { switch_out(false); return; }
    g->cluster_waiting[phase].push_back(f);
    switch_out(true, "barrier.cluster.wait", 0);
}

// The float at `p` (this block's static shared memory) in the static shared memory of cluster block `rank`.
inline float dsmem_load(const float* p, unsigned rank) {
    Block& me = my_block();
    const unsigned char* at = reinterpret_cast<const unsigned char*>(p);
    if (rank >= g->launch->cluster) fail(AN_EXIT_EXITED_BLOCK, "distributed shared memory: rank %u of a cluster of %u",
                                         rank, g->launch->cluster);
    Block& other = g->blocks[rank];
    for (auto& [site, off] : me.slots) {
        const size_t bytes = sites()[site].bytes;
        if (at < me.statics.data() + off || at >= me.statics.data() + off + bytes) continue;
        if (other.exited)
            fail(AN_EXIT_EXITED_BLOCK, "block %u reads the shared memory of cluster block %u (block %u), which has "
                 "exited", me.idx.x, rank, other.idx.x);
        for (auto& [s2, off2] : other.slots)
            if (s2 == site) { float v; std::memcpy(&v, other.statics.data() + off2 + (at - me.statics.data() - off), 4); return v; }
        return an_bits_float(0xFFFFFFFFu);  // the other block has not reached the declaration: nothing written yet
    }
    fail(AN_EXIT_EXITED_BLOCK, "distributed shared memory: address %p is not in block %u's static shared memory",
         (const void*)p, me.idx.x);
}

// ---- cp.async: a deferred copy whose destination reads as poison until the wait ----
inline void cp_async(void* dst, const void* src, unsigned bytes) {
    std::memset(dst, 0xFF, bytes);
    g->cur->copies.push_back({dst, src, bytes});
}

inline void cp_async_wait_all() {
    for (const Copy& c : g->cur->copies) std::memcpy(c.dst, c.src, c.bytes);
    g->cur->copies.clear();
    switch_out(false);
}

// ---- running a grid ----
inline void on_fault(int sig, siginfo_t* info, void*) {
    char line[256];
    const Fiber* f = g ? g->cur : nullptr;
    const uintptr_t at = reinterpret_cast<uintptr_t>(info->si_addr);
    const char* where = "";
    unsigned past = 0;
    if (g && g->launch->dynamic_smem)
        for (const Block& b : g->blocks) {
            const uintptr_t end = reinterpret_cast<uintptr_t>(b.dynamic) + g->launch->dynamic_smem;
            if (at >= end && at < end + 16 + g->page) { where = ": past the dynamic shared memory of block "; past = b.idx.x; }
        }
    int n = snprintf(line, sizeof line, "signal %d at address 0x%llx in thread %u of block %u%s",
                     sig, (unsigned long long)at, f ? lin(f->tid) : 0u, f ? g->blocks[f->block].idx.x : 0u, where);
    if (*where) n += snprintf(line + n, sizeof line - n, "%u", past);
    line[n++] = '\n';
    if (write(2, line, n) < 0) {}
    _exit(AN_EXIT_FAULT);
}

inline void fiber_main() {
    Fiber* f = g->cur;
    g->body(g->launch->args);
    f->state = State::done;
    Block& b = g->blocks[f->block];
    if (b.bar_count)
        fail(AN_EXIT_DEADLOCK, "deadlock: thread %u of block %u exits while %d threads wait at __syncthreads (line %d)",
             lin(f->tid), b.idx.x, b.bar_count, b.bar_line);
    if (--b.live == 0) b.exited = true;
}

// Threads of one cluster (CLUSTER consecutive blocks) as fibers until all are done.
inline void run_cluster(unsigned first) {
    const Launch& L = *g->launch;
    const unsigned threads = L.block, nb = L.cluster;
    g->fibers.assign(size_t(threads) * nb, Fiber());
    g->blocks.assign(nb, Block());
    g->cluster_count.clear();
    g->cluster_waiting.clear();
    g->cluster_threads = threads * nb;
    g->runnable.clear();
    const size_t dyn_span = (L.dynamic_smem + g->page - 1) / g->page * g->page;
    for (unsigned b = 0; b < nb; ++b) {
        Block& blk = g->blocks[b];
        blk.idx.x = first + b;
        blk.live = threads;
        blk.statics.reserve(64 * 1024);
        blk.warps.assign((threads + 31) / 32, Warp());
        if (L.dynamic_smem) {
            // its own pages, the last byte against the guard page that follows (16-byte aligned start)
            unsigned char* base = g->stacks - (nb - b) * (dyn_span + g->page);
            blk.dynamic = reinterpret_cast<unsigned char*>(
                (reinterpret_cast<uintptr_t>(base) + dyn_span - L.dynamic_smem) & ~uintptr_t(15));
            std::memset(blk.dynamic, 0xFF, L.dynamic_smem);
        }
    }
    for (size_t i = 0; i < g->fibers.size(); ++i) {
        Fiber& f = g->fibers[i];
        f.block = int(i / threads);
        f.tid.x = unsigned(i % threads);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = g->stacks + i * (g->stack_bytes + g->page) + g->page;  // guard page below
        f.ctx.uc_stack.ss_size = g->stack_bytes;
        f.ctx.uc_link = &g->main;
        makecontext(&f.ctx, fiber_main, 0);
        f.priority = g->rng();
        make_runnable(&f);
    }
    blockDim.x = threads;
    gridDim.x = L.grid;
    while (!g->runnable.empty()) {
        Fiber* f = next_runnable();
        g->cur = f;
        threadIdx = f->tid;
        blockIdx = g->blocks[f->block].idx;
        swapcontext(&g->main, &f->ctx);
    }
    for (const Fiber& f : g->fibers)
        if (f.state != State::done)
            fail(AN_EXIT_DEADLOCK, "deadlock: every live thread waits; thread %u of block %u waits at %s%s%.0d",
                 lin(f.tid), g->blocks[f.block].idx.x, f.waits, f.line ? " line " : "", f.line);
}

template <class... A, size_t... I>
void call_with(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

// Runs blocks [first_block, grid) of `kernel`; returns only when every one finished (errors exit the process).
template <class... A> int launch(void (*kernel)(A...), const Launch* L) {
    static void (*k)(A...) = nullptr;  // one kernel at a time per process: cuda_host.py forks a child per launch
    k = kernel;
    Scheduler s;
    g = &s;
    s.launch = L;
    s.body = [](void** args) { call_with(k, args, std::index_sequence_for<A...>{}); };
    s.rng.seed(L->seed);
    s.by_priority = L->seed != 0;
    s.page = size_t(sysconf(_SC_PAGESIZE));
    s.stack_bytes = 256 * 1024;
    if (L->cluster == 0 || L->grid % L->cluster || L->first_block % L->cluster || L->block == 0 || L->block > 1024)
        fail(AN_EXIT_LAUNCH_RULE, "launch rule: grid %u, block %u, cluster %u, first block %u", L->grid, L->block,
             L->cluster, L->first_block);
    check_smem_rule();
    // One mapping: each block's dynamic shared memory and its guard page, then each fiber's guard page and stack.
    const size_t dyn = (L->dynamic_smem + s.page - 1) / s.page * s.page + s.page;
    const size_t nfib = size_t(L->block) * L->cluster, per = s.stack_bytes + s.page;
    unsigned char* map = static_cast<unsigned char*>(mmap(nullptr, dyn * L->cluster + nfib * per, PROT_READ | PROT_WRITE,
                                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (map == MAP_FAILED) fail(AN_EXIT_FAULT, "mmap of %zu fiber stacks failed", nfib);
    for (unsigned b = 0; b < L->cluster; ++b) mprotect(map + (b + 1) * dyn - s.page, s.page, PROT_NONE);
    s.stacks = map + dyn * L->cluster;
    for (size_t i = 0; i < nfib; ++i) mprotect(s.stacks + i * per, s.page, PROT_NONE);
    static std::vector<unsigned char> alt(1 << 16);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    for (unsigned first = L->first_block; first < L->grid; first += L->cluster) run_cluster(first);
    munmap(map, dyn * L->cluster + nfib * per);
    g = nullptr;
    return 0;
}

}  // namespace an_host

// ---- what the kernels call ----
#define AN_SHARED(type, name, count) \
    struct an_site_##name { static constexpr std::size_t bytes() { return sizeof(type) * (count); } }; \
    type* const name = an_host::shared_array<type, an_site_##name>()
#define AN_DYNAMIC_SHARED(name) unsigned char* const name = an_host::my_block().dynamic

template <class V> inline V __shfl_xor_sync(unsigned mask, V v, int o, int width = 32) {
    (void)width;
    return an_host::warp_exchange(mask, v, [=](unsigned l) { return (l ^ unsigned(o)) & 31; }, "__shfl_xor_sync");
}
template <class V> inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
    (void)width;
    return an_host::warp_exchange(mask, v, [=](unsigned) { return unsigned(src) & 31; }, "__shfl_sync");
}
template <class V> inline V __shfl_down_sync(unsigned mask, V v, unsigned d, int width = 32) {
    (void)width;
    return an_host::warp_exchange(mask, v, [=](unsigned l) { return l + d < 32 ? l + d : 32u; }, "__shfl_down_sync");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    an_host::warp_exchange(mask, 0, [](unsigned l) { return l; }, "__syncwarp");
}
template <class V> inline V atomicAdd(V* p, V v) { const V old = *p; *p = old + v; return old; }  // fibers never preempt
