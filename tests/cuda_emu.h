// A CPU emulator for dgemma's CUDA kernels, for the tests (tests/cuda_emu.py compiles csrc/*.cu with g++ and
// this header in front). Every CUDA thread is a fiber with its own stack (x86-64: a 14-instruction switch
// below, where ucontext's swapcontext makes a system call per switch); the threads of a block
// run one block at a time on one OS thread, each until it blocks at __syncthreads() or at a warp-wide
// instruction (__shfl_xor_sync, mma.sync, ldmatrix: cuda_emu_warp.h), so shared memory is a function-local
// static. What it checks beyond the results:
//   - global memory: tests/cuda_emu.py passes every tensor (its view's bytes, or its whole storage where
//     several arguments share one) in a buffer touching an inaccessible page, after it in one pass and
//     before it in the other, so a read or write past either end faults; reported with kernel, block, thread;
//   - shared memory is filled with 0xFF bytes (NaN floats, -1 ints) at the start of every block (dynamic, and
//     each __shared__ array when the first thread passes its declaration): a read of a value no thread wrote
//     shows; arrays indexed out of bounds trap (-fsanitize=bounds), and so do loads and stores through
//     pointers misaligned for their type (-fsanitize=alignment), which a GPU faults on;
//   - __syncthreads() reached from different places, warp instructions with a lane missing (exited, or at a
//     barrier), __trap(): errors, not hangs;
//   - the launch runs twice, the second time with the blocks, the warps of a block and the lanes of a warp in
//     reverse order and unwritten shared memory holding another byte: results that change are a race (or
//     a read of unwritten shared memory).
// Not modelled: timing, memory ordering between blocks (blocks run one after the other), launch limits.
// Tensor-core fragments follow the PTX ISA's "Matrix Fragments for mma.m16n8k16" (floating point and
// integer types); -ftz=true (CuPy's NVRTC default) as the MXCSR's flush-to-zero and denormals-are-zero.
#pragma once
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <type_traits>
#include <utility>
#include <vector>

#define DG_EMU 1
#define __CUDACC__ 1  // no __CUDA_ARCH__: device-only PTX paths stay out, DG_EMU enables the tiles' bodies
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // one copy, shared by the fibers of the block (tests/cuda_emu.py adds the poisoning)

struct uint3 { unsigned x, y, z; };

namespace emu {

enum State { RUN, BARRIER, WARP, DONE };
enum Op { OP_NONE, OP_SHFL_XOR, OP_MMA_F16, OP_MMA_S8, OP_LDMATRIX, OP_MMA_F16_K8, OP_MMA_S8_M8 };

// emu_switch(&from, to): save the callee-saved registers on this stack, store the stack pointer in *from,
// continue on the stack `to` (where the same were saved, or a new fiber's frame). MXCSR and the x87 control
// word stay as emu_launch sets them for every fiber (saving them made a switch four times slower).
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
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
    .size emu_switch, .-emu_switch
)");
extern "C" void emu_switch(void **from, void *to);

struct Thread {
    void *sp;  // its saved stack pointer while it is not running
    State state;
    uint3 idx;
    int linear;
    const char *site;  // the __syncthreads() call it waits at (file:line)
    int op;            // the warp instruction it waits at, with its operands and results
    uint32_t mask, arg, in[10], out[4];
    struct Copy {  // a cp.async in flight: its bytes, read at the call, land at the thread's wait
        void *dst;
        unsigned char bytes[16];
    };
    std::vector<Copy> copies;
};

constexpr size_t STACK = 128 << 10;
inline std::vector<Thread> threads;
inline std::vector<char *> stacks;
inline Thread *cur = nullptr;
inline void *scheduler = nullptr;  // the scheduler's saved stack pointer
inline uint3 block_idx, block_dim, grid_dim;
inline void (*entry)(void **) = nullptr;
inline void **entry_args = nullptr;
inline char *dynamic_smem = nullptr;
inline size_t dynamic_smem_bytes = 0;
inline long atomics = 0;  // atomicAdd calls in this launch
inline int poison = 0xFF;  // the byte unwritten shared memory holds (each pass its own)

// errors leave the launch through a jump back to emu_launch's frame
inline sigjmp_buf escape;
inline bool in_launch = false;
inline char message[512];
inline uintptr_t fault_address = 0;

inline void describe_thread(char *out, size_t n) {
    if (cur)
        snprintf(out, n, "block (%u, %u, %u) thread (%u, %u, %u)", block_idx.x, block_idx.y, block_idx.z, cur->idx.x,
                 cur->idx.y, cur->idx.z);
    else
        snprintf(out, n, "block (%u, %u, %u)", block_idx.x, block_idx.y, block_idx.z);
}

[[noreturn]] inline void fail(const char *fmt, ...) {
    char where[96], what[400];
    describe_thread(where, sizeof where);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(message, sizeof message, "%s: %s", where, what);
    siglongjmp(escape, 1);
}

inline void yield() { emu_switch(&cur->sp, scheduler); }

inline void barrier(const char *site) {  // site: file:line of the __syncthreads() (the optimiser may copy a call)
    cur->site = site;
    cur->state = BARRIER;
    yield();
}

// a warp-wide instruction: operands in cur->in, results in cur->out once every lane of the warp has arrived
inline void warp_op(int op, uint32_t mask, uint32_t arg) {
    cur->op = op;
    cur->mask = mask;
    cur->arg = arg;
    cur->state = WARP;
    yield();
}

inline void *dynamic_shared() { return dynamic_smem; }

// Called by the first thread of a block to pass a __shared__ declaration (tests/cuda_emu.py puts the call
// after each one): fill the array with 0xFF bytes, once per block.
// The shared memory a block has declared so far (static arrays reached, plus the dynamic bytes) may not pass
// the 48 KB a kernel gets without opting in (cudaFuncSetAttribute, which the wrappers never call).
constexpr size_t SHARED_LIMIT = 48 << 10;
inline long block_epoch = 0;
inline size_t block_shared = 0;
struct SharedArray {
    const char *p;
    size_t n;
    long epoch;  // the block that last filled it
};
inline std::vector<SharedArray> poisoned;
inline void poison_shared(void *p, size_t n) {
    bool known = false;
    for (auto &e : poisoned)
        if (e.p == p) {
            if (e.epoch == block_epoch) return;
            e.epoch = block_epoch;
            known = true;
            break;
        }
    if (!known) poisoned.push_back(SharedArray{(const char *)p, n, block_epoch});
    memset(p, poison, n);
    block_shared += n;
    if (block_shared > SHARED_LIMIT)
        fail("%zu bytes of shared memory (static and dynamic), more than the %zu a kernel gets without opting in",
             block_shared, SHARED_LIMIT);
}

// [p, p + n) lies inside one __shared__ array of this block, or the dynamic shared memory
inline bool in_shared(const char *p, size_t n) {
    for (const auto &e : poisoned)
        if (e.epoch == block_epoch && p >= e.p && p + n <= e.p + e.n) return true;
    return dynamic_smem && p >= dynamic_smem && p + n <= dynamic_smem + dynamic_smem_bytes;
}

}  // namespace emu

#define threadIdx (::emu::cur->idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
#define __syncthreads() ::emu::barrier(__FILE__ ":" EMU_STR(__LINE__))
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    static_assert(sizeof(V) == 4, "the emulator shuffles 32-bit values");
    memcpy(&emu::cur->in[0], &v, 4);
    emu::warp_op(emu::OP_SHFL_XOR, mask, (uint32_t)lane_mask);
    V out;
    memcpy(&out, &emu::cur->out[0], 4);
    return out;
}

inline float atomicAdd(float *p, float v) {  // fibers never interleave within a call
    ++emu::atomics;  // their order follows the threads': tests/cuda_emu.py's race check allows for it
    const float old = *p;
    *p = old + v;
    return old;
}

inline int __float2int_rn(float x) {  // cvt.rni.s32.f32: nearest even, NaN -> 0, saturated
    if (x != x) return 0;
    const float r = nearbyintf(x);
    return r >= 2147483648.0f ? 2147483647 : r < -2147483648.0f ? (-2147483647 - 1) : (int)r;
}
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

#include "cuda_emu_warp.h"  // dg::mma_m16n8k16_*, ldmatrix, cp_async16; emu::resolve_warp

namespace emu {

// The lanes of a warp (`lanes` of them) that wait at a warp instruction go on once every lane its mask names
// waits there too: resolve them. Returns whether it did.
inline bool try_resolve(Thread *lane, int lanes) {
    for (int l = 0; l < lanes; ++l) {
        if (lane[l].state != WARP) continue;
        const uint32_t mask = lane[l].mask;
        bool all = true;
        for (int m = 0; m < 32 && all; ++m)
            if (mask >> m & 1u) all = m < lanes && lane[m].state == WARP;
        if (all) {
            resolve_warp(lane, mask);
            return true;
        }
    }
    return false;
}

inline void fiber_main() {  // entered by emu_switch's ret; never returns
    entry(entry_args);
    if (!cur->copies.empty()) fail("%zu cp.async copies never waited for (cp_async_wait_all)", cur->copies.size());
    cur->state = DONE;
    emu_switch(&cur->sp, scheduler);
    __builtin_unreachable();
}

// A new fiber's stack as emu_switch leaves it: six registers, then fiber_main as the return address, at a
// 16-byte boundary so that fiber_main starts with the alignment of a called function. Fiber i's frame is
// i * 80 bytes (mod 4 KB) below its stack's end: stacks 128 KB apart would otherwise put every fiber's hot
// frame in the same cache sets.
inline void *fiber_frame(char *stack, int i) {
    uint64_t *top = (uint64_t *)(((uintptr_t)(stack + STACK - (i * 80) % 4096)) & ~(uintptr_t)15);
    top[-1] = 0;  // fiber_main's return address: none
    top[-2] = (uint64_t)(uintptr_t)&fiber_main;
    for (int r = 3; r <= 8; ++r) top[-r] = 0;  // rbp rbx r12 r13 r14 r15
    return &top[-8];
}

// Run one block to the end: every thread until it finishes, barriers and warp instructions in between.
inline void run_block(int n, bool reverse) {
    ++block_epoch;
    block_shared = dynamic_smem_bytes;
    if (block_shared > SHARED_LIMIT) fail("%zu bytes of dynamic shared memory, more than %zu", block_shared, SHARED_LIMIT);
    if (dynamic_smem_bytes) memset(dynamic_smem, poison, dynamic_smem_bytes);
    for (int i = 0; i < n; ++i) {
        Thread &t = threads[i];
        t.state = RUN;
        t.linear = i;
        t.idx = uint3{(unsigned)(i % block_dim.x), (unsigned)(i / block_dim.x % block_dim.y),
                      (unsigned)(i / (block_dim.x * block_dim.y))};
        t.op = OP_NONE;
        t.copies.clear();
        t.sp = fiber_frame(stacks[i], i);
    }
    const int warps = (n + 31) / 32;
    for (;;) {
        // warp after warp, each as far as it gets: a warp instruction resolves as soon as the lanes its mask
        // names wait there, so a warp reaches the next __syncthreads() (or the end) before the next warp
        // starts (resolving them block-wide would order the warps at every shuffle and MMA, hiding races)
        bool ran = false;
        for (int wj = 0; wj < warps; ++wj) {
            const int w = reverse ? warps - 1 - wj : wj;
            const int lanes = n - w * 32 < 32 ? n - w * 32 : 32;
            Thread *lane = &threads[w * 32];
            for (;;) {
                bool any = false;
                for (int lj = 0; lj < lanes; ++lj) {
                    const int l = reverse ? lanes - 1 - lj : lj;
                    if (lane[l].state != RUN) continue;
                    cur = &lane[l];
                    emu_switch(&scheduler, cur->sp);
                    any = ran = true;
                }
                cur = nullptr;
                if (try_resolve(lane, lanes)) continue;
                if (!any) break;
            }
        }
        if (ran) continue;
        // nothing ran: every warp's waiting lanes wait for a lane that cannot come, or all wait at a barrier
        int alive = 0, at_barrier = 0;
        for (int w = 0; w < warps; ++w) {
            Thread *lane = &threads[w * 32];
            const int lanes = n - w * 32 < 32 ? n - w * 32 : 32;
            for (int l = 0; l < lanes; ++l) {
                if (lane[l].state != WARP) continue;
                for (int m = 0; m < 32; ++m) {
                    if (!(lane[l].mask >> m & 1u) || (m < lanes && lane[m].state == WARP)) continue;
                    if (m >= lanes) fail("warp %d has %d lanes; lane %d's warp instruction names lane %d", w, lanes, l, m);
                    cur = &lane[m];
                    fail("warp %d: lane %d is %s while lane %d waits for it at a warp instruction with mask %08x", w, m,
                         lane[m].state == DONE ? "exited" : "at __syncthreads()", l, lane[l].mask);
                }
            }
        }
        const char *site = nullptr;
        for (int i = 0; i < n; ++i) {
            if (threads[i].state == DONE) continue;
            ++alive;
            if (threads[i].state == BARRIER) {
                ++at_barrier;
                if (site && strcmp(threads[i].site, site) != 0) {
                    cur = &threads[i];
                    fail("threads wait at different __syncthreads() calls (%s, and %s)", threads[i].site, site);
                }
                site = threads[i].site;
            }
        }
        if (alive == 0) return;
        if (at_barrier != alive) fail("no thread can go on (%d alive, %d at a barrier)", alive, at_barrier);
        for (int i = 0; i < n; ++i)
            if (threads[i].state == BARRIER) threads[i].state = RUN;  // exited threads count as arrived
    }
}

inline void on_signal(int sig, siginfo_t *info, void *) {
    if (!in_launch) {  // not ours: the default action (the caller restores the previous handlers)
        signal(sig, SIG_DFL);
        return;
    }
    fault_address = (uintptr_t)info->si_addr;
    char where[96];
    describe_thread(where, sizeof where);
    const char *what = sig == SIGSEGV || sig == SIGBUS
                           ? "memory access outside every buffer (before its start or past its end)"
                       : sig == SIGILL ? "illegal instruction: an array index out of bounds or a misaligned load or "
                                         "store (a trap of -fsanitize=bounds,alignment), or code built for another CPU"
                                       : "arithmetic fault (integer division by zero?)";
    snprintf(message, sizeof message, "%s: %s at address 0x%lx", where, what, (unsigned long)fault_address);
    siglongjmp(escape, 2);
}

}  // namespace emu

// ---- the C interface tests/cuda_emu.py calls through ctypes ---------------------------------------------
#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace emu {

template <typename F> struct Params;
template <typename... A> struct Params<void (*)(A...)> {
    static constexpr int count = sizeof...(A);
    template <auto Fn, size_t... I> static void call(void **args, std::index_sequence<I...>) {
        Fn(*static_cast<std::remove_cv_t<A> *>(args[I])...);
    }
    static void sizes(int *out) {
        const int s[] = {(int)sizeof(A)..., 0};
        for (int i = 0; i < count; ++i) out[i] = s[i];
    }
};

template <auto Fn> void invoke(void **args) {
    using P = Params<decltype(Fn)>;
    P::template call<Fn>(args, std::make_index_sequence<P::count>{});
}

struct Kernel {
    const char *name;
    void (*run)(void **);
    int params;
    void (*sizes)(int *);
};

template <auto Fn> constexpr Kernel kernel_info(const char *name) {
    using P = Params<decltype(Fn)>;
    return Kernel{name, &invoke<Fn>, P::count, &P::sizes};
}

}  // namespace emu

#define EMU_KERNEL(...) ::emu::kernel_info<&__VA_ARGS__>(#__VA_ARGS__)  // variadic: a name expression may hold commas

extern const emu::Kernel emu_kernels[];
extern const int emu_kernel_total;

EMU_EXPORT int emu_kernel_count() { return emu_kernel_total; }
EMU_EXPORT const char *emu_kernel_name(int k) { return emu_kernels[k].name; }
EMU_EXPORT int emu_kernel_params(int k, int *sizes) {
    emu_kernels[k].sizes(sizes);
    return emu_kernels[k].params;
}

// A buffer of n bytes (n a multiple of `align`) between two inaccessible pages, touching the one after it
// (at_end) or the one before; the rest of its pages hold `fill`. *base, *span: the mapping.
EMU_EXPORT void *emu_guarded(size_t n, size_t align, int at_end, int fill, void **base, size_t *span) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (n + page - 1) / page * page;
    *span = body + 2 * page;
    char *m = (char *)mmap(nullptr, *span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    if (body && mprotect(m + page, body, PROT_READ | PROT_WRITE) != 0) return nullptr;
    if (body) memset(m + page, fill, body);
    *base = m;
    const size_t padded = (n + align - 1) / align * align;
    return at_end ? m + page + body - padded : m + page;
}

EMU_EXPORT void emu_release(void *base, size_t span) { munmap(base, span); }

EMU_EXPORT long emu_atomics() { return emu::atomics; }  // atomicAdd calls in the last launch

// Run kernel k over grid x block with `smem` bytes of dynamic shared memory. Returns 0, or 1 with a
// message in `out` (and the faulting address in *fault, 0 when none).
EMU_EXPORT int emu_launch(int k, const unsigned *grid, const unsigned *block, size_t smem, void **args, int reverse,
                          int poison_byte, char *out, int out_len, uintptr_t *fault) {
    using namespace emu;
    const long n_long = (long)block[0] * block[1] * block[2];
    if (n_long < 1 || n_long > 1024 || block[2] > 64 || grid[0] < 1 || grid[0] > 0x7FFFFFFFu || grid[1] < 1 ||
        grid[1] > 65535 || grid[2] < 1 || grid[2] > 65535) {  // CUDA's limits: "invalid configuration argument"
        snprintf(out, out_len, "grid (%u, %u, %u) x block (%u, %u, %u) is outside CUDA's launch limits (grid x < 2^31, "
                 "y and z <= 65535, all >= 1; 1 to 1024 threads per block, z <= 64)", grid[0], grid[1], grid[2],
                 block[0], block[1], block[2]);
        *fault = 0;
        return 1;
    }
    const int n = (int)n_long;
    while ((int)stacks.size() < n) {
        char *s = (char *)mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        mprotect(s, 4096, PROT_NONE);  // the stack's overflow end
        stacks.push_back(s);
    }
    threads.resize(stacks.size());
    void *smem_base = nullptr;
    size_t smem_span = 0;
    dynamic_smem = smem ? (char *)emu_guarded(smem, 4, !reverse, poison_byte, &smem_base, &smem_span) : nullptr;
    dynamic_smem_bytes = smem;

    static char alt[1 << 16];
    stack_t ss{}, old_ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, &old_ss);
    struct sigaction sa{}, old[4];
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    const int sigs[4] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
    for (int i = 0; i < 4; ++i) sigaction(sigs[i], &sa, &old[i]);
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);  // FTZ and DAZ: NVRTC's -ftz=true (CuPy's default)

    entry = emu_kernels[k].run;
    entry_args = args;
    grid_dim = uint3{grid[0], grid[1], grid[2]};
    block_dim = uint3{block[0], block[1], block[2]};
    message[0] = 0;
    fault_address = 0;
    atomics = 0;
    poison = poison_byte;
    int status = 0;
    cur = nullptr;
    in_launch = true;
    if (sigsetjmp(escape, 1) == 0) {
        for (unsigned zz = 0; zz < grid[2]; ++zz)  // the reverse pass also runs the blocks in reverse order
            for (unsigned yy = 0; yy < grid[1]; ++yy)
                for (unsigned xx = 0; xx < grid[0]; ++xx) {
                    block_idx = reverse ? uint3{grid[0] - 1 - xx, grid[1] - 1 - yy, grid[2] - 1 - zz} : uint3{xx, yy, zz};
                    run_block(n, reverse != 0);
                }
    } else {
        status = 1;
    }
    in_launch = false;
    cur = nullptr;
    _mm_setcsr(csr);
    for (int i = 0; i < 4; ++i) sigaction(sigs[i], &old[i], nullptr);
    sigaltstack(&old_ss, nullptr);
    if (smem_base) emu_release(smem_base, smem_span);
    dynamic_smem = nullptr;
    snprintf(out, out_len, "%s", message);
    *fault = fault_address;
    return status;
}
